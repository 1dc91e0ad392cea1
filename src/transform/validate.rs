//! JSON Schema validation with Zod-like removal of undeclared keys.
//!
//! The original service validated with Zod, whose objects drop keys they do
//! not declare; the stored `data` therefore holds only declared keys. JSON
//! Schema has no such notion, so after validation we walk the (dereferenced)
//! schema beside the event and remove keys that no `properties` declares.
//! For `anyOf`/`oneOf` the first alternative that validates decides, as in
//! a Zod union.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::util::text::truncate;

/// How many schema violations an error message lists.
const MAX_REPORTED: usize = 3;

/// Why a schema could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{}:{}: schema is not JSON: {source}", path.display(), source.line(), source.column())]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A schema file's content, named by its path.
    #[error("{}: {source}", path.display())]
    Content {
        path: PathBuf,
        #[source]
        source: ContentError,
    },
}

/// Why a schema document cannot be compiled (the compile errors boxed:
/// they are large, and only a load that fails carries one).
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("invalid schema: {0}")]
    Invalid(#[source] Box<jsonschema::ValidationError<'static>>),
    #[error("cannot resolve $ref: {0}")]
    Unresolved(#[source] Box<jsonschema::ReferencingError>),
    #[error("invalid schema alternative: {0}")]
    InvalidAlternative(#[source] Box<jsonschema::ValidationError<'static>>),
}

/// Where an event breaks its schema: up to [`MAX_REPORTED`] JSON pointers,
/// each with what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Violations(String);

/// A compiled schema, and the shape used to strip undeclared keys.
pub struct EventValidator {
    validator: jsonschema::Validator,
    shape: Option<Shape>,
}

impl EventValidator {
    /// Reads and compiles a schema file. Formats (`date-time`, ...) are
    /// asserted: an event whose timestamp is not a date is invalid.
    pub fn load(path: &Path, strip_unknown: bool) -> Result<Self, SchemaError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path_buf(),
            source,
        })?;
        let schema: Value = serde_json::from_str(&text).map_err(|source| SchemaError::NotJson {
            path: path_buf(),
            source,
        })?;
        Self::new(&schema, strip_unknown).map_err(|source| SchemaError::Content {
            path: path_buf(),
            source,
        })
    }

    pub fn new(schema: &Value, strip_unknown: bool) -> Result<Self, ContentError> {
        let options = options();
        let validator = options
            .build(schema)
            .map_err(|e| ContentError::Invalid(Box::new(e)))?;
        let shape = if strip_unknown {
            let resolved = options
                .dereference(schema)
                .map_err(|e| ContentError::Unresolved(Box::new(e)))?;
            Some(Shape::compile(&resolved)?)
        } else {
            None
        };
        Ok(Self { validator, shape })
    }

    /// Validates the event and, if configured, strips undeclared keys.
    /// The error text names the failing locations (JSON pointers).
    pub fn apply(&self, event: &mut Value) -> Result<(), Violations> {
        if !self.validator.is_valid(event) {
            return Err(Violations(self.describe_errors(event)));
        }
        if let Some(shape) = &self.shape {
            shape.strip(event, None);
        }
        Ok(())
    }

    fn describe_errors(&self, event: &Value) -> String {
        let mut parts: Vec<String> = self
            .validator
            .iter_errors(event)
            .take(MAX_REPORTED)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("{at}: {}", truncate(&e.to_string(), 200))
            })
            .collect();
        if parts.is_empty() {
            parts.push("schema violation".into());
        }
        parts.join("; ")
    }
}

fn options() -> jsonschema::ValidationOptions<'static> {
    jsonschema::options().should_validate_formats(true)
}

/// What a schema declares, for stripping: the declared properties of an
/// object, the item shape of an array, and union alternatives.
#[derive(Default)]
struct Shape {
    /// Looked up for every key of every event object: a fast hash, as the
    /// keys are the schema's own names, not an attacker's choice of keys
    /// to collide (an event's keys are only looked up, never inserted).
    properties: HashMap<String, Shape, foldhash::fast::FixedState>,
    /// True where `properties` is declared and extra keys are not allowed
    /// explicitly (`additionalProperties` true or a schema, or patterns).
    strips: bool,
    items: Option<Box<Shape>>,
    alternatives: Vec<(jsonschema::Validator, Shape)>,
}

impl Shape {
    fn compile(schema: &Value) -> Result<Self, ContentError> {
        let mut shape = Shape::default();
        shape.merge(schema)?;
        Ok(shape)
    }

    /// Adds what `schema` declares; `allOf` members are merged in, since
    /// every one of them applies.
    fn merge(&mut self, schema: &Value) -> Result<(), ContentError> {
        let Some(obj) = schema.as_object() else {
            return Ok(());
        };
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            let open = matches!(obj.get("additionalProperties"), Some(v) if v != &Value::Bool(false))
                || obj.contains_key("patternProperties");
            self.strips |= !open;
            for (name, sub) in props {
                self.properties
                    .entry(name.clone())
                    .or_default()
                    .merge(sub)?;
            }
        }
        if let Some(items) = obj.get("items").filter(|i| i.is_object()) {
            self.items
                .get_or_insert_with(Default::default)
                .merge(items)?;
        }
        for member in array(obj, "allOf") {
            self.merge(member)?;
        }
        for alt in array(obj, "anyOf").chain(array(obj, "oneOf")) {
            let validator = options()
                .build(alt)
                .map_err(|e| ContentError::InvalidAlternative(Box::new(e)))?;
            self.alternatives.push((validator, Shape::compile(alt)?));
        }
        Ok(())
    }

    /// `extra` is the union alternative chosen one level up: its declared
    /// keys count as declared here too.
    fn strip(&self, value: &mut Value, extra: Option<&Shape>) {
        let alt = self
            .alternatives
            .iter()
            .find(|(v, _)| v.is_valid(value))
            .map(|(_, s)| s);
        if let Some(alt) = alt {
            alt.strip(value, Some(self));
        }
        match value {
            Value::Object(map) => self.strip_object(map, alt.or(extra)),
            Value::Array(items) => {
                if let Some(item) = &self.items {
                    items.iter_mut().for_each(|v| item.strip(v, None));
                }
            }
            _ => {}
        }
    }

    /// One lookup per key where nothing is stripped (the common case);
    /// the map is rewritten only when it holds an undeclared key.
    fn strip_object(&self, map: &mut Map<String, Value>, other: Option<&Shape>) {
        let strips = self.strips || other.is_some_and(|o| o.strips);
        let declared_by_other = |k: &str| other.is_some_and(|o| o.properties.contains_key(k));
        let mut undeclared = false;
        for (k, v) in map.iter_mut() {
            match self.properties.get(k.as_str()) {
                Some(sub) => sub.strip(v, None),
                None => undeclared |= strips && !declared_by_other(k),
            }
        }
        if undeclared {
            map.retain(|k, _| self.properties.contains_key(k.as_str()) || declared_by_other(k));
        }
    }
}

fn array<'a>(obj: &'a Map<String, Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    obj.get(key).and_then(Value::as_array).into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiktok() -> EventValidator {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/tiktok-event.schema.json");
        EventValidator::load(&path, true).unwrap()
    }

    fn event() -> Value {
        json!({
            "eventId": "e1", "timestamp": "2025-01-15T10:00:00Z", "source": "tiktok",
            "funnelStage": "top", "eventType": "video.view",
            "data": {
                "user": {"userId": "u", "username": "n", "followers": 3, "extra": 1},
                "engagement": {"watchTime": 1, "percentageWatched": 2, "device": "iOS",
                               "country": "US", "videoId": "v", "junk": true},
                "more": "x"
            },
            "correlationId": "c"
        })
    }

    #[test]
    fn strips_undeclared_keys_at_every_level() {
        let mut e = event();
        tiktok().apply(&mut e).unwrap();
        assert!(e.get("correlationId").is_none());
        let stripped = json!({"user": {"userId": "u", "username": "n", "followers": 3},
                   "engagement": {"watchTime": 1, "percentageWatched": 2, "device": "iOS",
                                  "country": "US", "videoId": "v"}});
        assert_eq!(e["data"], stripped);
        // Undeclared keys only below a level where every key is declared.
        let mut e = event();
        e.as_object_mut().unwrap().remove("correlationId");
        e["data"].as_object_mut().unwrap().remove("more");
        tiktok().apply(&mut e).unwrap();
        assert_eq!(e["data"], stripped);
    }

    #[test]
    fn second_union_alternative_keeps_its_own_keys() {
        let mut e = event();
        e["data"]["engagement"] = json!({"actionTime": "t", "profileId": null,
            "purchasedItem": "i", "purchaseAmount": null, "watchTime": 5});
        tiktok().apply(&mut e).unwrap();
        assert_eq!(
            e["data"]["engagement"],
            json!({"actionTime": "t", "profileId": null, "purchasedItem": "i", "purchaseAmount": null})
        );
    }

    #[test]
    fn invalid_date_time_is_rejected_with_its_location() {
        let mut e = event();
        e["timestamp"] = json!("yesterday");
        let err = tiktok().apply(&mut e).unwrap_err().to_string();
        assert!(err.contains("/timestamp"), "{err}");
    }

    #[test]
    fn wrong_enum_is_rejected() {
        let mut e = event();
        e["funnelStage"] = json!("middle");
        assert!(tiktok().apply(&mut e).is_err());
    }

    #[test]
    fn open_objects_are_not_stripped() {
        let v = EventValidator::new(
            &json!({"type": "object", "properties": {"a": {}}, "additionalProperties": true}),
            true,
        )
        .unwrap();
        let mut e = json!({"a": 1, "b": 2});
        v.apply(&mut e).unwrap();
        assert_eq!(e, json!({"a": 1, "b": 2}));
    }

    /// The messages `check` prints stay as they were; the cause is the
    /// error's source, for whoever reads the chain.
    #[test]
    fn schema_errors_name_the_file_and_keep_their_cause() {
        use std::error::Error as _;
        let dir = std::env::temp_dir().join(format!("ingestd-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.json");
        let err = EventValidator::load(&missing, true).err().unwrap();
        assert!(matches!(err, SchemaError::Read { .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot read schema "), "{err}");
        let io = err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );

        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\n  \"type\": }").unwrap();
        let err = EventValidator::load(&broken, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!("{}:2:11: schema is not JSON: ", broken.display())),
            "{err}"
        );

        let wrong = dir.join("wrong.json");
        std::fs::write(&wrong, r#"{"type": 7}"#).unwrap();
        let err = EventValidator::load(&wrong, true).err().unwrap();
        assert!(
            err.to_string()
                .starts_with(&format!("{}: invalid schema: ", wrong.display())),
            "{err}"
        );
        let inner = err.source().and_then(|s| s.downcast_ref::<ContentError>());
        assert!(matches!(inner, Some(ContentError::Invalid(_))), "{inner:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
