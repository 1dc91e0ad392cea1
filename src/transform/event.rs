//! One event's way from payload to SQL row: size check, JSON decode,
//! schema validation (and stripping), template rendering. Shared by the
//! engine and by `ingestd check` / `ingestd test`, so what they check is
//! what runs.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::config::reason::Reason;
use crate::config::{self, PipelineFile};
use crate::transform::template::{MsgMeta, RenderError, Rendered, Templates};
use crate::transform::validate::EventValidator;

/// Why a template's statement does not line up with its values.
#[derive(Debug, thiserror::Error)]
pub enum PlaceholderError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(
        "the template has {expressions} expressions but its SQL shows {marks} placeholders: \
         write values only as {{{{ expression }}}}, never inside quotes or as a literal $n"
    )]
    Mismatch { expressions: usize, marks: usize },
}

/// Why an event can never be stored.
#[derive(Debug)]
pub struct Invalid {
    /// One of the event's faults ([`Reason::is_event_fault`]).
    pub kind: Reason,
    pub error: String,
    /// Known when the event was JSON and `log.event_id` points at a string.
    pub event_id: Option<String>,
}

/// An event ready to write.
#[derive(Debug)]
pub struct Prepared {
    pub rendered: Rendered,
    /// Metric label values, in label-name order.
    pub labels: Vec<String>,
}

/// The parts of a pipeline that need no connection: limits, schema,
/// templates.
pub struct Compiled {
    max_payload: u64,
    /// `log.event_id`: where the event's id is, for log lines.
    event_id: Option<String>,
    validator: Option<EventValidator>,
    pub templates: Templates,
}

impl Compiled {
    /// Compiles the file's schema and templates; errors point into the file.
    pub fn new(file: &PipelineFile) -> Result<Self, config::ConfigError> {
        let cfg = &file.pipeline;
        let validator = match &cfg.validate {
            Some(v) => Some(
                EventValidator::load(&v.schema, v.strip_unknown)
                    .map_err(|e| file.error("validate.schema", e))?,
            ),
            None => None,
        };
        let templates = Templates::compile(&cfg.sink.postgres.insert, &cfg.metrics.labels)
            .map_err(|e| {
                let base = file.line_of("sink.postgres.insert");
                let line = match (base, e.line) {
                    (Some(b), Some(l)) => Some(b + l),
                    (b, _) => b,
                };
                config::ConfigError::new(&file.path, line, format!("template: {}", e.message))
            })?;
        check_placeholders(&templates).map_err(|e| file.error("sink.postgres.insert", e))?;
        Ok(Self {
            max_payload: cfg.max_payload,
            event_id: cfg.log.event_id.clone(),
            validator,
            templates,
        })
    }

    /// The event's id for log lines, where `log.event_id` points.
    fn event_id(&self, event: &Json) -> Option<String> {
        let pointer = self.event_id.as_deref()?;
        event
            .pointer(pointer)
            .and_then(Json::as_str)
            .map(str::to_string)
    }

    /// The id of the event in `payload`, for a log line about an event
    /// that was prepared: read again from the payload, since only the
    /// events that end up logged need it.
    pub fn event_id_in(&self, payload: &[u8]) -> Option<String> {
        self.event_id.as_ref()?;
        self.event_id(&serde_json::from_slice(payload).ok()?)
    }

    /// Takes one payload as far as a row; anything that stops it is
    /// permanent for this payload.
    pub fn prepare(
        &self,
        payload: &[u8],
        msg: &MsgMeta,
        headers: &BTreeMap<String, String>,
    ) -> Result<Prepared, Invalid> {
        let invalid = |kind, error: String, event: Option<&Json>| Invalid {
            kind,
            error,
            event_id: event.and_then(|e| self.event_id(e)),
        };
        if payload.len() as u64 > self.max_payload {
            let e = format!(
                "payload of {} bytes exceeds max_payload ({})",
                payload.len(),
                self.max_payload
            );
            return Err(invalid(Reason::TooLarge, e, None));
        }
        let mut event: Json = serde_json::from_slice(payload)
            .map_err(|e| invalid(Reason::NotJson, format!("not JSON: {e}"), None))?;
        if let Some(v) = &self.validator {
            v.apply(&mut event)
                .map_err(|e| invalid(Reason::Schema, e.to_string(), Some(&event)))?;
        }
        let (rendered, labels) =
            self.templates
                .render(event, msg, headers)
                .map_err(|e| Invalid {
                    kind: Reason::Template,
                    error: e.to_string(),
                    event_id: self.event_id_in(payload),
                })?;
        Ok(Prepared { rendered, labels })
    }
}

/// Every `{{ }}` must show up as a placeholder in the SQL: one inside
/// quotes would be text, and the statement would not line up with its
/// values.
fn check_placeholders(templates: &Templates) -> Result<(), PlaceholderError> {
    let sample = sample_render(templates)?;
    let marks = crate::statement::lexer::placeholders(&sample.sql).len();
    if marks == sample.params.len() {
        return Ok(());
    }
    Err(PlaceholderError::Mismatch {
        expressions: sample.params.len(),
        marks,
    })
}

/// The insert rendered over an empty event: the statement shape most
/// events produce, available before any event arrives.
pub fn sample_render(templates: &Templates) -> Result<Rendered, RenderError> {
    let ctx = Templates::context(
        &Json::Object(Default::default()),
        &MsgMeta::default(),
        &BTreeMap::new(),
    );
    templates.render_insert(&ctx)
}

/// Checks a pipeline file offline (for `ingestd check`).
pub fn check_file(path: &std::path::Path) -> Result<(), config::ConfigError> {
    Compiled::new(&PipelineFile::load(path)?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_inside_quotes_is_refused_with_the_way_to_write_it() {
        let insert = "INSERT INTO t (a) VALUES ('{{ event.a }}')";
        let templates = Templates::compile(insert, &BTreeMap::new()).unwrap();
        let err = check_placeholders(&templates).unwrap_err();
        assert!(
            matches!(
                err,
                PlaceholderError::Mismatch {
                    expressions: 1,
                    marks: 0
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("1 expressions but its SQL shows 0 placeholders")
                && text.contains("write values only as {{ expression }}"),
            "{text}"
        );
    }
}
