//! The statement model: what a transform renders for the sink (SQL text
//! with `$n` placeholders and their values), and the lexer that reads such
//! text. Both transform and sink depend on it; it depends on neither.

pub mod lexer;

use std::sync::Arc;

use serde_json::Value as Json;

/// One rendered row: SQL with `$1..$n` placeholders and their values (what
/// a transform renders for the sink).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Shared by every event of a plain template: cloning it per event
    /// costs a reference count, and the sink recognises the same statement
    /// by pointer.
    pub sql: Arc<str>,
    pub params: Vec<ParamValue>,
}

impl Rendered {
    pub fn new(sql: Arc<str>, values: Vec<Json>) -> Self {
        Self {
            sql,
            params: values.into_iter().map(ParamValue::from).collect(),
        }
    }
}

/// One value of a rendered statement. An object is kept as its JSON text:
/// that is what it becomes for any column type, and a row waits for its
/// batch to be written with its text a fraction of the parsed tree's size.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Value(Json),
    Object(String),
}

impl From<Json> for ParamValue {
    fn from(v: Json) -> Self {
        match v {
            Json::Object(_) => ParamValue::Object(json_text(&v)),
            other => ParamValue::Value(other),
        }
    }
}

thread_local! {
    /// Where objects are serialized before their text is copied out at its
    /// exact size: serializing straight into a new string grows it two or
    /// three times for a typical event object, each a reallocation and copy.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch kept between objects; a larger one (a rare large event) is
/// given back rather than held by the thread for good.
const SCRATCH_KEPT: usize = 64 * 1024;

/// The compact JSON text of a value (objects become their text once, when
/// rendered; other values when a plan encodes them).
pub fn json_text(v: &Json) -> String {
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        serde_json::to_writer(&mut *buf, v).expect("a JSON value serializes");
        let text = std::str::from_utf8(buf)
            .expect("serde_json writes UTF-8")
            .to_owned();
        if buf.capacity() > SCRATCH_KEPT {
            *buf = Vec::new();
        }
        text
    })
}

/// A value equals the JSON it was made from (an object's text parses back
/// to it).
impl PartialEq<Json> for ParamValue {
    fn eq(&self, other: &Json) -> bool {
        match self {
            ParamValue::Value(v) => v == other,
            ParamValue::Object(text) => {
                serde_json::from_str::<Json>(text).is_ok_and(|v| v == *other)
            }
        }
    }
}

impl ParamValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ParamValue::Value(v) => v.as_str(),
            ParamValue::Object(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object's text is serde_json's, whatever size the objects before
    /// it had (the scratch is kept, grown, or given back).
    #[test]
    fn objects_become_their_compact_json_text() {
        let big = "x".repeat(SCRATCH_KEPT + 1);
        for v in [
            serde_json::json!({"a": [1, 2.5, null], "b": {"c": "é\"\n"}}),
            serde_json::json!({"big": big}),
            serde_json::json!({}),
            serde_json::json!({"z": true, "a": {"nested": [{"k": -1}]}}),
        ] {
            let ParamValue::Object(text) = ParamValue::from(v.clone()) else {
                panic!("an object stays an object");
            };
            assert_eq!(text, serde_json::to_string(&v).unwrap());
        }
    }
}
