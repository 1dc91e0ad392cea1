//! Templates without logic, evaluated without the template engine.
//!
//! Most insert statements are fixed SQL whose `{{ }}` expressions are plain
//! paths (`event.a.b`, `msg.seq`, `headers.x`, `subject`) or the id and
//! clock functions. Rendering them through minijinja costs a deep copy of
//! the event into template values and an interpreter pass per event; here
//! the SQL text is computed once and each value is read straight from the
//! parsed event. A template qualifies only if rendering it both ways gives
//! the same statement (checked when it is compiled); anything else keeps
//! the template engine.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use crate::transform::template::MsgMeta;
use crate::util::rfc3339::{self, Fraction};

/// Where one value comes from.
#[derive(Debug, Clone)]
pub enum Expr {
    /// `event.a.b`: a path into the event; missing is null.
    Event(Vec<String>),
    /// `msg.seq`, `msg.time`, ...
    Msg(String),
    /// `subject`.
    Subject,
    /// `headers.name`.
    Header(String),
    /// `cuid()`, `uuid()`, `uuid7()`, `now()`.
    Call(fn() -> String),
}

impl Expr {
    /// Parses the inside of a `{{ }}`; None when it is anything but a
    /// plain path or a call without arguments of a known function.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Some(f) = text.strip_suffix("()").and_then(function) {
            return Some(Expr::Call(f));
        }
        let mut parts = text.split('.');
        let root = parts.next()?;
        let path: Vec<String> = parts.map(str::to_string).collect();
        if !std::iter::once(root)
            .chain(path.iter().map(String::as_str))
            .all(is_identifier)
        {
            return None;
        }
        match (root, path.as_slice()) {
            ("event", _) => Some(Expr::Event(path)),
            ("subject", []) => Some(Expr::Subject),
            ("msg", [field]) => Some(Expr::Msg(field.clone())),
            ("headers", [name]) => Some(Expr::Header(name.clone())),
            _ => None,
        }
    }

    /// The value for one event, as the template engine would give it.
    pub fn eval(&self, event: &Json, msg: &MsgMeta, headers: &BTreeMap<String, String>) -> Json {
        match self {
            Expr::Event(path) => at(event, path).cloned().unwrap_or(Json::Null),
            Expr::Msg(field) => match field.as_str() {
                "subject" => Json::from(msg.subject.as_str()),
                "stream" => msg.stream.clone().map_or(Json::Null, Json::from),
                "seq" => msg.seq.map_or(Json::Null, Json::from),
                "time" => msg.time.clone().map_or(Json::Null, Json::from),
                "delivered" => msg.delivered.map_or(Json::Null, Json::from),
                _ => Json::Null,
            },
            Expr::Subject => Json::from(msg.subject.as_str()),
            Expr::Header(name) => headers
                .get(name)
                .map_or(Json::Null, |v| Json::from(v.as_str())),
            Expr::Call(f) => Json::from(f()),
        }
    }

    /// A value for this expression in the sample event of the equivalence
    /// check: distinct per position, so a misplaced value shows.
    fn sample(&self, k: usize, event: &mut Json, headers: &mut BTreeMap<String, String>) {
        let tag = format!("v{k}");
        match self {
            Expr::Event(path) => set_path(event, path, Json::from(tag)),
            Expr::Header(name) => {
                headers.insert(name.clone(), tag);
            }
            _ => {}
        }
    }
}

impl Expr {
    /// The text the template engine would render for this value as a
    /// metric label, or None when only the engine knows (numbers with a
    /// fraction, arrays, objects).
    pub fn label(
        &self,
        event: &Json,
        msg: &MsgMeta,
        headers: &BTreeMap<String, String>,
    ) -> Option<String> {
        let found = match self {
            Expr::Event(path) => at(event, path),
            Expr::Subject => return Some(msg.subject.clone()),
            Expr::Header(name) => return Some(headers.get(name).cloned().unwrap_or_default()),
            Expr::Msg(_) | Expr::Call(_) => return None,
        };
        match found {
            None => Some(String::new()),
            Some(Json::Null) => Some("None".into()),
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Bool(b)) => Some(if *b { "True" } else { "False" }.into()),
            Some(Json::Number(n)) if !n.is_f64() => Some(n.to_string()),
            Some(_) => None,
        }
    }
}

/// The value at `path` in the event, as the template engine finds it: a
/// missing key (or a key of something that is not an object) is nothing.
fn at<'a>(event: &'a Json, path: &[String]) -> Option<&'a Json> {
    path.iter().try_fold(event, |v, k| v.get(k))
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The template functions a value may call (see `template::base_env`).
pub fn function(name: &str) -> Option<fn() -> String> {
    match name {
        "cuid" => Some(cuid1::cuid),
        "uuid" => Some(|| uuid::Uuid::new_v4().to_string()),
        "uuid7" => Some(|| uuid::Uuid::now_v7().to_string()),
        "now" => Some(|| rfc3339::now_utc(Fraction::Micros)),
        _ => None,
    }
}

fn set_path(event: &mut Json, path: &[String], value: Json) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = event;
    for key in parents {
        if !at.get(key).is_some_and(Json::is_object) {
            at[key.as_str()] = Json::Object(Map::new());
        }
        at = &mut at[key.as_str()];
    }
    at[last.as_str()] = value;
}

/// A template made only of text and `{{ }}` values: the text with `$n` for
/// each value, and where each value comes from.
#[derive(Debug, Clone)]
pub struct Direct {
    pub sql: std::sync::Arc<str>,
    pub exprs: Vec<Expr>,
    /// True when no event path is used twice or inside another, so each
    /// value can be moved out of the event rather than copied.
    movable: bool,
}

impl Direct {
    /// Splits a template into text and plain values; None when it has any
    /// statement, comment, whitespace control or non-plain expression.
    pub fn parse(source: &str) -> Option<Self> {
        if source.contains("{%") || source.contains("{#") {
            return None;
        }
        let mut sql = String::with_capacity(source.len());
        let mut exprs = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            let close = open + rest[open..].find("}}")?;
            let inner = &rest[open + 2..close];
            if inner.starts_with(['-', '+']) || inner.ends_with(['-', '+']) {
                return None;
            }
            exprs.push(Expr::parse(inner)?);
            sql.push_str(&rest[..open]);
            sql.push_str(&format!("${}", exprs.len()));
            rest = &rest[close + 2..];
        }
        if rest.contains("}}") {
            return None;
        }
        sql.push_str(rest);
        // The template engine drops one trailing newline.
        if sql.ends_with('\n') {
            sql.pop();
            if sql.ends_with('\r') {
                sql.pop();
            }
        }
        let paths: Vec<&Vec<String>> = exprs
            .iter()
            .filter_map(|e| match e {
                Expr::Event(p) => Some(p),
                _ => None,
            })
            .collect();
        let movable = paths.iter().enumerate().all(|(i, a)| {
            paths
                .iter()
                .skip(i + 1)
                .all(|b| !a.starts_with(b) && !b.starts_with(a))
        });
        Some(Self {
            sql: sql.into(),
            exprs,
            movable,
        })
    }

    pub fn values(
        &self,
        event: &Json,
        msg: &MsgMeta,
        headers: &BTreeMap<String, String>,
    ) -> Vec<Json> {
        self.exprs
            .iter()
            .map(|e| e.eval(event, msg, headers))
            .collect()
    }

    /// The values, moved out of the event where that is safe (the event
    /// is left with nulls there).
    pub fn take_values(
        &self,
        event: &mut Json,
        msg: &MsgMeta,
        headers: &BTreeMap<String, String>,
    ) -> Vec<Json> {
        if !self.movable {
            return self.values(event, msg, headers);
        }
        self.exprs
            .iter()
            .map(|e| match e {
                Expr::Event(path) => path
                    .iter()
                    .try_fold(&mut *event, |v, k| v.get_mut(k))
                    .map(std::mem::take)
                    .unwrap_or(Json::Null),
                other => other.eval(event, msg, headers),
            })
            .collect()
    }

    /// A sample event and headers giving each value a distinct text, for
    /// comparing this evaluation with the template engine's.
    pub fn sample(&self) -> (Json, BTreeMap<String, String>) {
        let mut event = Json::Object(Map::new());
        let mut headers = BTreeMap::new();
        for (k, e) in self.exprs.iter().enumerate() {
            e.sample(k, &mut event, &mut headers);
        }
        (event, headers)
    }

    /// True when the value at `k` differs on every evaluation (an id or a
    /// clock), so two evaluations can only be compared by kind.
    pub fn is_call(&self, k: usize) -> bool {
        matches!(self.exprs.get(k), Some(Expr::Call(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_templates_are_split_into_text_and_values() {
        let d = Direct::parse(
            "INSERT INTO t VALUES ({{ cuid() }}, {{event.a.b}}, {{ msg.seq }}, {{ subject }}, {{ headers.x }})\n",
        )
        .unwrap();
        assert_eq!(&*d.sql, "INSERT INTO t VALUES ($1, $2, $3, $4, $5)");
        let msg = MsgMeta {
            subject: "s".into(),
            seq: Some(9),
            ..MsgMeta::default()
        };
        let headers = BTreeMap::from([("x".to_string(), "h".to_string())]);
        let values = d.values(&json!({"a": {"b": [1]}}), &msg, &headers);
        assert!(values[0].as_str().is_some_and(|id| id.starts_with('c')));
        assert_eq!(values[1..], [json!([1]), json!(9), json!("s"), json!("h")]);
        assert_eq!(d.values(&json!({"a": 1}), &msg, &headers)[1], Json::Null);
        let mut event = json!({"a": {"b": "moved"}, "c": 1});
        assert_eq!(d.take_values(&mut event, &msg, &headers)[1], json!("moved"));
        assert_eq!(event, json!({"a": {"b": null}, "c": 1}));
        let twice = Direct::parse("{{ event.a }} {{ event.a.b }}").unwrap();
        let mut event = json!({"a": {"b": 2}});
        assert_eq!(
            twice.take_values(&mut event, &msg, &headers),
            [json!({"b": 2}), json!(2)]
        );
    }

    #[test]
    fn anything_with_logic_keeps_the_template_engine() {
        for t in [
            "{% if event.a %}x{% endif %}",
            "{{ event.a | upper }}",
            "{{ event.a ~ 'x' }}",
            "{{- event.a }}",
            "{{ event['a b'] }}",
            "{{ event.items.0 }}",
            "{{ range(3) }}",
            "{# c #}",
            "x }} y",
        ] {
            assert!(Direct::parse(t).is_none(), "{t}");
        }
    }
}
