//! The SQL insert template and the metric label templates.
//!
//! Injection-proof by construction: the insert environment's formatter never
//! writes a value into the SQL text. Each `{{ expression }}` appends its value
//! to the row's parameter list and writes the placeholder `$n` instead, so the
//! rendered text holds only what the pipeline author wrote.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

pub use crate::statement::Rendered;
use crate::transform::direct::{Direct, Expr};
use crate::util::rfc3339::{self, Fraction, Zulu};

thread_local! {
    /// Values of the `{{ }}` expressions of the render in progress on this
    /// thread. Rendering is synchronous, so a thread-local is exact.
    static PARAMS: RefCell<Vec<Json>> = const { RefCell::new(Vec::new()) };
}

/// The message an event came in, as templates see it (`msg.seq`, ...).
/// Outside a stream (`ingestd check`) only the subject is known.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MsgMeta {
    pub subject: String,
    pub stream: Option<String>,
    /// The stream sequence: unique and increasing within the stream.
    pub seq: Option<u64>,
    /// The publish time, RFC 3339 in UTC.
    pub time: Option<String>,
    /// How many times this message has been delivered (1 the first time).
    pub delivered: Option<i64>,
}

impl MsgMeta {
    /// What templates see of a message JetStream delivered: the engine
    /// builds it with this, and so does `ingestd test`, so that both
    /// render `msg.time` alike (RFC 3339 in UTC, to the nanosecond).
    pub fn delivered(
        subject: String,
        stream: String,
        seq: u64,
        delivered: i64,
        published: time::OffsetDateTime,
    ) -> Self {
        let utc = published.to_offset(time::UtcOffset::UTC);
        let time = rfc3339::format(utc, Fraction::Nanos, Zulu::Letter);
        Self {
            subject,
            stream: Some(stream),
            seq: Some(seq),
            time: Some(time),
            delivered: Some(delivered),
        }
    }
}

/// A template compile error, with its line inside the template.
#[derive(Debug)]
pub struct TemplateError {
    pub line: Option<usize>,
    pub message: String,
}

/// Why a template did not render for an event.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("insert template: {0:#}")]
    Insert(#[source] minijinja::Error),
    #[error("metric label `{name}`: {source}")]
    Label {
        name: String,
        #[source]
        source: minijinja::Error,
    },
}

/// Conditions beyond this many are not combined exhaustively (2^n
/// renders): each is then taken alone, plus all of them and none.
const MAX_COMBINED_CONDITIONS: usize = 8;

/// The name the branch-enumerating copy of the template reads its
/// conditions from.
const BRANCHES: &str = "__ingestd_branch";

/// The compiled templates of one pipeline.
pub struct Templates {
    insert: Environment<'static>,
    /// How many `if`/`elif` conditions the insert template has.
    conditions: usize,
    labels: Environment<'static>,
    label_names: Vec<String>,
    /// Whether any template names `msg` / `headers` / `subject`: building
    /// them costs an allocation or more per event, so events skip what no
    /// template reads.
    pub reads_msg: bool,
    pub reads_headers: bool,
    pub reads_subject: bool,
    /// The insert template evaluated without the engine, where it has no
    /// logic and gives the same statement (see [`crate::transform::direct`]).
    direct_insert: Option<Direct>,
    /// Likewise each label template that is one plain value.
    direct_labels: Vec<Option<Expr>>,
}

impl Templates {
    pub fn compile(insert: &str, labels: &BTreeMap<String, String>) -> Result<Self, TemplateError> {
        let mut env = base_env();
        env.set_formatter(|out, _state, value| {
            let n = PARAMS.with(|p| {
                let mut p = p.borrow_mut();
                p.push(to_json(value));
                p.len()
            });
            write!(out, "${n}").map_err(|_| {
                minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write failed")
            })
        });
        env.add_template_owned("insert", insert.to_string())
            .map_err(template_error)?;
        let (branches, conditions) = with_branch_conditions(insert);
        env.add_template_owned("branches", branches)
            .map_err(template_error)?;
        let mut label_env = base_env();
        for (name, text) in labels {
            label_env
                .add_template_owned(name.clone(), text.clone())
                .map_err(template_error)?;
        }
        let sources = || std::iter::once(insert).chain(labels.values().map(String::as_str));
        let mut templates = Self {
            insert: env,
            conditions,
            labels: label_env,
            label_names: labels.keys().cloned().collect(),
            reads_msg: sources().any(|t| names_word(t, "msg")),
            reads_headers: sources().any(|t| names_word(t, "headers")),
            reads_subject: sources().any(|t| names_word(t, "subject")),
            direct_insert: None,
            direct_labels: labels.values().map(|t| direct_label(t)).collect(),
        };
        templates.direct_insert = Direct::parse(insert).filter(|d| templates.same_as_engine(d));
        Ok(templates)
    }

    /// True when `direct` renders the sample event exactly as the engine
    /// does (ids and clocks compared by kind: they differ on every call).
    fn same_as_engine(&self, direct: &Direct) -> bool {
        let (event, headers) = direct.sample();
        let msg = MsgMeta {
            subject: "s".into(),
            stream: Some("S".into()),
            seq: Some(7),
            time: Some("t".into()),
            delivered: Some(1),
        };
        let Ok(engine) = self.render_insert(&Self::context(&event, &msg, &headers)) else {
            return false;
        };
        let ours = direct.values(&event, &msg, &headers);
        *engine.sql == *direct.sql
            && engine.params.len() == ours.len()
            && engine
                .params
                .iter()
                .zip(&ours)
                .enumerate()
                .all(|(k, (a, b))| {
                    a == b || (direct.is_call(k) && a.as_str().is_some() && b.is_string())
                })
    }

    /// The event's statement and metric labels. The event is consumed: a
    /// plain template moves its values out instead of copying them.
    pub fn render(
        &self,
        mut event: Json,
        msg: &MsgMeta,
        headers: &BTreeMap<String, String>,
    ) -> Result<(Rendered, Vec<String>), RenderError> {
        let mut ctx = None;
        let mut labels = Vec::with_capacity(self.label_names.len());
        for (name, direct) in self.label_names.iter().zip(&self.direct_labels) {
            match direct.as_ref().and_then(|e| e.label(&event, msg, headers)) {
                Some(text) => labels.push(text),
                None => {
                    let ctx = ctx.get_or_insert_with(|| Self::context(&event, msg, headers));
                    labels.push(self.render_label(name, ctx)?)
                }
            }
        }
        let rendered = match &self.direct_insert {
            Some(d) => Rendered::new(d.sql.clone(), d.take_values(&mut event, msg, headers)),
            None => {
                let ctx = ctx.get_or_insert_with(|| Self::context(&event, msg, headers));
                self.render_insert(ctx)?
            }
        };
        Ok((rendered, labels))
    }

    /// The values visible to templates: `event`, `msg`, `subject` (also
    /// `msg.subject`) and `headers`.
    pub fn context(event: &Json, msg: &MsgMeta, headers: &BTreeMap<String, String>) -> Value {
        minijinja::context! {
            event => Value::from(Serde(event)),
            msg => Value::from(Serde(msg)),
            subject => &msg.subject,
            headers => Value::from(Serde(headers)),
        }
    }

    pub fn render_insert(&self, ctx: &Value) -> Result<Rendered, RenderError> {
        PARAMS.with(|p| p.borrow_mut().clear());
        let sql = self
            .insert
            .get_template("insert")
            .and_then(|t| t.render(ctx))
            .map_err(RenderError::Insert);
        let params = PARAMS.with(|p| std::mem::take(&mut *p.borrow_mut()));
        Ok(Rendered::new(Arc::from(sql?), params))
    }

    /// The distinct statements the insert template can render: every
    /// combination of its `if`/`elif` conditions, over an empty event.
    /// Loops run zero times, so a statement built by a loop shows only its
    /// empty form.
    pub fn variants(&self) -> Vec<Rendered> {
        let n = self.conditions;
        let combos: Vec<Vec<bool>> = if n <= MAX_COMBINED_CONDITIONS {
            (0..1u32 << n)
                .map(|bits| (0..n).map(|k| bits & (1 << k) != 0).collect())
                .collect()
        } else {
            let mut c = vec![vec![false; n], vec![true; n]];
            c.extend((0..n).map(|k| (0..n).map(|j| j == k).collect()));
            c
        };
        let mut out: Vec<Rendered> = Vec::new();
        for combo in combos {
            let ctx = minijinja::context! {
                event => Value::from(Serde(Json::Object(Default::default()))),
                msg => Value::from(Serde(MsgMeta::default())),
                headers => Value::from(Serde(BTreeMap::<String, String>::new())),
                __ingestd_branch => combo,
            };
            PARAMS.with(|p| p.borrow_mut().clear());
            let sql = self
                .insert
                .get_template("branches")
                .and_then(|t| t.render(ctx));
            let params = PARAMS.with(|p| std::mem::take(&mut *p.borrow_mut()));
            if let Ok(sql) = sql {
                if !out.iter().any(|r| *r.sql == *sql) {
                    out.push(Rendered::new(Arc::from(sql), params));
                }
            }
        }
        out
    }

    fn render_label(&self, name: &str, ctx: &Value) -> Result<String, RenderError> {
        self.labels
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|source| RenderError::Label {
                name: name.to_string(),
                source,
            })
    }
}

/// Functions available to every template. None of them reads the
/// environment or the file system.
fn base_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.add_function("cuid", cuid1::cuid);
    env.add_function("uuid", || uuid::Uuid::new_v4().to_string());
    env.add_function("uuid7", || uuid::Uuid::now_v7().to_string());
    env.add_function("now", || rfc3339::now_utc(Fraction::Micros));
    env
}

/// The one plain value a label template is, if that is all it is.
fn direct_label(text: &str) -> Option<Expr> {
    Direct::parse(text)
        .filter(|d| &*d.sql == "$1")
        .and_then(|d| d.exprs.into_iter().next())
}

/// True when `word` stands in `text` as a whole word (a template that may
/// read the variable of that name).
fn names_word(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// The template with the condition of its `k`-th `{% if %}` or
/// `{% elif %}` tag replaced by `__ingestd_branch[k]`, and how many there
/// are.
fn with_branch_conditions(source: &str) -> (String, usize) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut k = 0;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c) else {
            break;
        };
        let inner = &rest[open + 2..close];
        let trimmed = inner.trim_start_matches(['-', '+']).trim_start();
        let keyword = ["if ", "elif "]
            .into_iter()
            .find(|w| trimmed.starts_with(w));
        out.push_str(&rest[..open + 2]);
        match keyword {
            Some(w) => {
                let lead = &inner[..inner.len() - trimmed.len()];
                let trail = if inner.trim_end().ends_with(['-', '+']) {
                    &inner[inner.trim_end().len() - 1..]
                } else {
                    " "
                };
                out.push_str(&format!("{lead}{w}{BRANCHES}[{k}] {trail}"));
                k += 1;
            }
            None => out.push_str(inner),
        }
        out.push_str("%}");
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    (out, k)
}

fn template_error(e: minijinja::Error) -> TemplateError {
    TemplateError {
        line: e.line(),
        message: e.detail().map_or_else(|| e.to_string(), str::to_string),
    }
}

/// Undefined (a missing field) binds as NULL, like an absent optional value.
fn to_json(value: &Value) -> Json {
    if value.is_undefined() || value.is_none() {
        return Json::Null;
    }
    serde_json::to_value(value).unwrap_or(Json::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(insert: &str, event: Json) -> Rendered {
        let t = Templates::compile(insert, &BTreeMap::new()).unwrap();
        let msg = MsgMeta {
            subject: "s.x".into(),
            stream: Some("S".into()),
            seq: Some(7),
            time: Some("2026-01-01T00:00:00Z".into()),
            delivered: Some(1),
        };
        t.render_insert(&Templates::context(&event, &msg, &BTreeMap::new()))
            .unwrap()
    }

    fn subject_only(subject: &str) -> MsgMeta {
        MsgMeta {
            subject: subject.into(),
            ..MsgMeta::default()
        }
    }

    #[test]
    fn every_expression_becomes_a_parameter() {
        let r = render(
            "INSERT INTO t VALUES ({{ event.a }}, {{ event.b }}, {{ subject }}, {{ event.missing.deep }})",
            json!({"a": "'); DROP TABLE t; --", "b": {"x": [1, true]}}),
        );
        assert_eq!(&*r.sql, "INSERT INTO t VALUES ($1, $2, $3, $4)");
        assert_eq!(
            r.params,
            vec![
                json!("'); DROP TABLE t; --"),
                json!({"x": [1, true]}),
                json!("s.x"),
                Json::Null
            ]
        );
    }

    #[test]
    fn message_metadata_is_visible() {
        let r = render(
            "INSERT INTO t VALUES ({{ msg.stream }}, {{ msg.seq }}, {{ msg.time }}, {{ msg.delivered }}, {{ msg.subject }})",
            json!({}),
        );
        assert_eq!(
            r.params,
            vec![
                json!("S"),
                json!(7),
                json!("2026-01-01T00:00:00Z"),
                json!(1),
                json!("s.x")
            ]
        );
    }

    #[test]
    fn control_flow_shapes_the_sql() {
        let tpl = "INSERT INTO t VALUES ({{ event.a }}{% if event.b %}, {{ event.b }}{% endif %})";
        assert_eq!(
            &*render(tpl, json!({"a": 1})).sql,
            "INSERT INTO t VALUES ($1)"
        );
        assert_eq!(
            render(tpl, json!({"a": 1, "b": 2})).params,
            vec![json!(1), json!(2)]
        );
    }

    #[test]
    fn variants_cover_every_branch() {
        let tpl = "{%- if event.a == 1 -%}INSERT INTO a VALUES ({{ event.x }})\
                   {%- elif event.b %}INSERT INTO b VALUES ({{ event.y }}, {{ event.z }})\
                   {%- else %}UPDATE c SET n = n + 1{% endif %}\
                   {% if event.r %} RETURNING *{% endif %}";
        let t = Templates::compile(tpl, &BTreeMap::new()).unwrap();
        let mut sqls: Vec<String> = t
            .variants()
            .into_iter()
            .map(|r| r.sql.to_string())
            .collect();
        sqls.sort();
        assert_eq!(
            sqls,
            vec![
                "INSERT INTO a VALUES ($1)",
                "INSERT INTO a VALUES ($1) RETURNING *",
                "INSERT INTO b VALUES ($1, $2)",
                "INSERT INTO b VALUES ($1, $2) RETURNING *",
                "UPDATE c SET n = n + 1",
                "UPDATE c SET n = n + 1 RETURNING *",
            ]
        );
    }

    #[test]
    fn knows_which_variables_templates_read() {
        let t = Templates::compile(
            "INSERT INTO t VALUES ({{ msg.seq }}, {{ event.messages }})",
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(t.reads_msg && !t.reads_headers);
        let labels = BTreeMap::from([("h".to_string(), "{{ headers['x'] }}".to_string())]);
        let t =
            Templates::compile("INSERT INTO t VALUES ({{ event.msg_count }})", &labels).unwrap();
        assert!(!t.reads_msg && t.reads_headers);
    }

    /// The engine-free evaluation of plain templates (values and labels)
    /// against the template engine, over events of every JSON shape.
    #[test]
    fn direct_evaluation_matches_the_engine() {
        let insert = "INSERT INTO t VALUES ({{ uuid() }}, {{ event.a }}, {{ event.b.c }},\n {{ msg.seq }}, {{ subject }}, {{ headers.h }})\n";
        let labels = BTreeMap::from([
            ("l1".to_string(), "{{ event.a }}".to_string()),
            ("l2".to_string(), "{{ event.b.c }}".to_string()),
            ("l3".to_string(), "{{ subject }}".to_string()),
        ]);
        let t = Templates::compile(insert, &labels).unwrap();
        assert!(t.direct_insert.is_some() && t.direct_labels.iter().all(Option::is_some));
        let msg = MsgMeta {
            subject: "s.x".into(),
            seq: Some(3),
            ..MsgMeta::default()
        };
        let headers = BTreeMap::from([("h".to_string(), "hv".to_string())]);
        let shapes = [
            json!("text"),
            json!(""),
            json!(null),
            json!(true),
            json!(0),
            json!(-17),
            json!(9007199254740993_i64),
            json!(u64::MAX),
            json!(1.5),
            json!(1e300),
            json!([1, "x", null]),
            json!({"k": {"n": [true]}}),
        ];
        for a in &shapes {
            for c in &shapes {
                for event in [
                    json!({"a": a, "b": {"c": c}}),
                    json!({"a": a}),
                    json!({"b": c}),
                ] {
                    let (direct, direct_labels) = t.render(event.clone(), &msg, &headers).unwrap();
                    let ctx = Templates::context(&event, &msg, &headers);
                    let engine = t.render_insert(&ctx).unwrap();
                    assert_eq!(direct.sql, engine.sql);
                    let again = t.render(event.clone(), &msg, &headers).unwrap();
                    assert!(Arc::ptr_eq(&direct.sql, &again.0.sql));
                    assert_eq!(direct.params[1..], engine.params[1..], "{event}");
                    let engine_labels: Vec<String> = ["l1", "l2", "l3"]
                        .iter()
                        .map(|l| t.render_label(l, &ctx).unwrap())
                        .collect();
                    assert_eq!(direct_labels, engine_labels, "{event}");
                }
            }
        }
    }

    #[test]
    fn cuid_is_v1() {
        let r = render("{{ cuid() }}", json!({}));
        let id = r.params[0].as_str().unwrap();
        assert_eq!(id.len(), 25);
        assert!(id.starts_with('c'));
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = Templates::compile("INSERT\nINTO {{ x ", &BTreeMap::new())
            .err()
            .unwrap();
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn templates_cannot_reach_files_or_the_environment() {
        // No loader: includes and imports cannot read files.
        let t = Templates::compile("{% include '/etc/passwd' %}", &BTreeMap::new()).unwrap();
        let ctx = Templates::context(&json!({}), &subject_only("s"), &BTreeMap::new());
        assert!(t.render_insert(&ctx).is_err());
        // Only event, subject and headers are in scope: `env` is undefined.
        std::env::set_var("INGESTD_TEMPLATE_SECRET", "hunter2");
        let r = render(
            "{{ env }}{{ environ }}{{ INGESTD_TEMPLATE_SECRET }}",
            json!({}),
        );
        assert_eq!(r.params, vec![Json::Null, Json::Null, Json::Null]);
    }

    #[test]
    fn labels_render_as_text() {
        let labels = BTreeMap::from([("a".to_string(), "{{ event.k }}".to_string())]);
        let t = Templates::compile("x", &labels).unwrap();
        let ctx = Templates::context(&json!({"k": "v"}), &subject_only("s"), &BTreeMap::new());
        assert_eq!(t.render_label("a", &ctx).unwrap(), "v");
    }
}
