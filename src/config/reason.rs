//! Why an event was not stored, under one name wherever it shows: the
//! `reason` label of the metrics, the `Ingestd-Reason` header of dead
//! letters (and `ingestd replay --reason`), and `expect.invalid` in
//! `ingestd test` case files. Operators match on these texts (alerts, the
//! collector's metric contract, replay filters), so each has exactly one
//! spelling, defined here.

use std::fmt;
use std::str::FromStr;

/// Why an event was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Larger than `max_payload`.
    TooLarge,
    /// Not JSON (or not UTF-8).
    NotJson,
    /// Refused by the JSON Schema.
    Schema,
    /// The template cannot render for this event.
    Template,
    /// Refused by the database for a reason of its own (a value, a
    /// constraint, a trigger).
    Unstorable,
    /// JetStream stopped redelivering it (`max_deliver`).
    MaxDeliver,
    /// The `events_failed_total` reason of an event that can never be
    /// stored (any of the event's faults above): the invalid policy took it.
    ValidationError,
    /// The `events_failed_total` reason of an attempt that failed
    /// transiently or was left for redelivery.
    ProcessingError,
}

/// Every reason, in declaration order, for parsing and for the tests.
const ALL: [Reason; 8] = [
    Reason::TooLarge,
    Reason::NotJson,
    Reason::Schema,
    Reason::Template,
    Reason::Unstorable,
    Reason::MaxDeliver,
    Reason::ValidationError,
    Reason::ProcessingError,
];

impl Reason {
    /// Its one spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::NotJson => "not_json",
            Reason::Schema => "schema",
            Reason::Template => "template",
            Reason::Unstorable => "unstorable",
            Reason::MaxDeliver => "max_deliver",
            Reason::ValidationError => "validation_error",
            Reason::ProcessingError => "processing_error",
        }
    }

    /// True for the classes of events that can never be stored (what a
    /// test case may expect as `invalid`).
    pub const fn is_event_fault(self) -> bool {
        matches!(
            self,
            Reason::TooLarge
                | Reason::NotJson
                | Reason::Schema
                | Reason::Template
                | Reason::Unstorable
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A text that is not one of the reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason `{0}`: one of too_large, not_json, schema, template, unstorable, max_deliver, validation_error, processing_error")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ALL.into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| UnknownReason(text.to_string()))
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts dashboards, alerts, replay filters and test files use.
    #[test]
    fn every_reason_keeps_its_spelling_and_parses_back() {
        let texts: Vec<&str> = ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            texts,
            [
                "too_large",
                "not_json",
                "schema",
                "template",
                "unstorable",
                "max_deliver",
                "validation_error",
                "processing_error"
            ]
        );
        for reason in ALL {
            assert_eq!(reason.to_string().parse::<Reason>(), Ok(reason));
            let json = serde_json::to_value(reason).unwrap();
            assert_eq!(json, serde_json::json!(reason.as_str()));
            assert_eq!(serde_json::from_value::<Reason>(json).unwrap(), reason);
            let yaml: Reason = serde_yaml::from_str(reason.as_str()).unwrap();
            assert_eq!(yaml, reason);
        }
    }

    #[test]
    fn unknown_texts_are_refused() {
        assert_eq!(
            "Schema".parse::<Reason>(),
            Err(UnknownReason("Schema".into()))
        );
        assert!(serde_json::from_str::<Reason>("\"schema_error\"").is_err());
    }

    #[test]
    fn only_the_events_own_faults_are_invalid_kinds() {
        let kinds: Vec<Reason> = ALL.into_iter().filter(|r| r.is_event_fault()).collect();
        assert_eq!(
            kinds,
            [
                Reason::TooLarge,
                Reason::NotJson,
                Reason::Schema,
                Reason::Template,
                Reason::Unstorable
            ]
        );
    }
}
