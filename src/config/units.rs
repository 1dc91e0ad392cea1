//! Durations, sizes and times as pipeline files write them, for serde and
//! the editor schema, each checked against the range the value must fit
//! where it ends up (a timer, a Postgres setting, a NATS field).
//!
//! The checks run inside serde visitors, called while the deserializer
//! stands on the value: serde_yaml then reports the value's own line and
//! the field's full key path, which an error raised after the value was
//! read (the enclosing mapping's) would not.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use schemars::JsonSchema;
use serde::de::{self, Deserializer, Visitor};

/// Why a duration, size or time in a pipeline file is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration `{text}`: {source} (e.g. 30s, 5ms, 7d)")]
    Duration {
        text: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("duration `{text}` is below {floor}: {why}")]
    DurationBelow {
        text: String,
        floor: String,
        why: &'static str,
    },
    #[error("duration `{text}` is above {ceiling}: {why}")]
    DurationAbove {
        text: String,
        ceiling: String,
        why: &'static str,
    },
    #[error("invalid size `{0}` (e.g. 1048576, 512KiB, 1GiB)")]
    Size(String),
    #[error("unknown size unit `{0}` (use B, KB, KiB, MB, MiB, GB, GiB)")]
    SizeUnit(String),
    #[error("size `{0}` is too large")]
    SizeOverflow(String),
    #[error("size `{text}` is below {floor} bytes: {why}")]
    SizeBelow {
        text: String,
        floor: u64,
        why: &'static str,
    },
    #[error("size `{text}` is above {ceiling} bytes: {why}")]
    SizeAbove {
        text: String,
        ceiling: u64,
        why: &'static str,
    },
    #[error("invalid time `{text}`: {source} (e.g. 2026-11-25T21:00:00Z)")]
    Time {
        text: String,
        #[source]
        source: time::error::Parse,
    },
}

/// The range a value must fall in, with the reason for each end, so an
/// error says what the value is for.
pub(super) struct Range<T: 'static> {
    pub floor: (T, &'static str),
    pub ceiling: (T, &'static str),
}

/// Days in a year, for the ceilings below.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest duration the engine arms a timer with or sends to NATS: a
/// deadline `now + d` must fit an `Instant`, and NATS counts durations in
/// signed 64-bit nanoseconds (292 years).
const LONGEST: (Duration, &str) = (
    Duration::from_secs(100 * YEAR.as_secs()),
    "the engine's timers and NATS' nanosecond durations must be able to hold it",
);

/// A duration of at least `floor`, for `why`, and at most [`LONGEST`].
const fn at_least(floor: Duration, why: &'static str) -> Range<Duration> {
    Range {
        floor: (floor, why),
        ceiling: LONGEST,
    }
}

/// The largest `batch.max_bytes`: a batch travels as text arrays that may
/// take a few times its payload, and Postgres refuses messages over 1 GB.
pub(super) const MAX_BATCH_BYTES: u64 = 256 << 20;

/// The range a field's value must fall in: one type per kind of field, so
/// a field's `deserialize_with` names what the value is for.
pub(super) trait Bounded<T: 'static> {
    const RANGE: Range<T>;
}

macro_rules! bounds {
    ($($(#[$doc:meta])* $name:ident: $t:ty = $range:expr;)*) => {
        $($(#[$doc])* pub(super) struct $name;
        impl Bounded<$t> for $name {
            const RANGE: Range<$t> = $range;
        })*
    };
}

bounds! {
    /// `statement_timeout`, `lock_timeout`: Postgres counts them in whole
    /// milliseconds up to `i32::MAX`, and reads 0 as "no limit".
    PgTimeout: Duration = Range {
        floor: (
            Duration::from_millis(1),
            "Postgres counts this timeout in whole milliseconds and would read 0 as no limit",
        ),
        ceiling: (
            Duration::from_millis(i32::MAX as u64),
            "the largest timeout Postgres accepts",
        ),
    };
    /// `lag_interval`, `backoff_initial`: something done every so often,
    /// or a first backoff that later ones double.
    Interval: Duration = at_least(
        Duration::from_millis(1),
        "it is the period of something repeated, which zero would make spin",
    );
    /// `max_wait`, `backoff_max`, `delay`: a wait that may be none.
    Wait: Duration = at_least(Duration::ZERO, "");
    /// `connect_timeout`.
    Connect: Duration = at_least(
        Duration::from_millis(1),
        "no connection can be opened in no time",
    );
    /// `consumer.ack_wait`: held messages get progress acks every third of
    /// it, at least 100 ms apart.
    AckWait: Duration = at_least(
        Duration::from_secs(1),
        "held messages are kept alive every third of ack_wait, at most every 100ms; a shorter one would redeliver what the engine still holds",
    );
    /// `stream.max_age`: NATS refuses one under 100 ms.
    MaxAge: Duration = at_least(
        Duration::from_millis(100),
        "NATS refuses a shorter max_age (leave it out for no limit)",
    );
    /// `stream.duplicate_window`: zero would be the server's default.
    DuplicateWindow: Duration = at_least(
        Duration::from_millis(1),
        "NATS reads 0 as its default window (leave it out for that)",
    );
    /// `batch.max_bytes`.
    BatchBytes: u64 = Range {
        floor: (1, "a batch must be able to hold an event"),
        ceiling: (
            MAX_BATCH_BYTES,
            "a batch's statement must stay far below Postgres' 1 GB message limit",
        ),
    };
    /// `max_payload`.
    PayloadBytes: u64 = Range {
        floor: (1, "every event would be too large"),
        ceiling: (
            MAX_BATCH_BYTES,
            "an event must fit a batch, whose largest is 256 MiB",
        ),
    };
    /// `stream.max_bytes`: NATS counts stream bytes in a signed 64-bit
    /// number.
    StreamBytes: u64 = Range {
        floor: (1, "a stream that holds no byte holds nothing"),
        ceiling: (i64::MAX as u64, "NATS counts stream bytes in a signed 64-bit number"),
    };
}

/// A duration within `B`'s range.
pub fn parse_duration_in<B: Bounded<Duration>>(text: &str) -> Result<Duration, UnitError> {
    let d = humantime::parse_duration(text.trim()).map_err(|source| UnitError::Duration {
        text: text.to_string(),
        source,
    })?;
    let Range { floor, ceiling } = B::RANGE;
    if d < floor.0 {
        return Err(UnitError::DurationBelow {
            text: text.to_string(),
            floor: show(floor.0),
            why: floor.1,
        });
    }
    if d > ceiling.0 {
        return Err(UnitError::DurationAbove {
            text: text.to_string(),
            ceiling: show(ceiling.0),
            why: ceiling.1,
        });
    }
    Ok(d)
}

/// A duration as a pipeline file would write it, in its largest whole
/// unit (humantime's own format splits days into months and years).
fn show(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    match () {
        _ if nanos == 0 && secs % 86_400 == 0 && secs > 0 => format!("{}d", secs / 86_400),
        _ if nanos == 0 => format!("{secs}s"),
        _ if nanos % 1_000_000 == 0 => format!("{}ms", d.as_millis()),
        _ => format!("{}ns", d.as_nanos()),
    }
}

/// A size within `B`'s range.
fn size_in<B: Bounded<u64>>(n: u64, text: &str) -> Result<u64, UnitError> {
    let Range { floor, ceiling } = B::RANGE;
    if n < floor.0 {
        return Err(UnitError::SizeBelow {
            text: text.to_string(),
            floor: floor.0,
            why: floor.1,
        });
    }
    if n > ceiling.0 {
        return Err(UnitError::SizeAbove {
            text: text.to_string(),
            ceiling: ceiling.0,
            why: ceiling.1,
        });
    }
    Ok(n)
}

struct DurationVisitor<B>(PhantomData<B>);

impl<B: Bounded<Duration>> Visitor<'_> for DurationVisitor<B> {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration such as 30s, 5ms or 7d")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
        parse_duration_in::<B>(s).map_err(E::custom)
    }
}

pub(super) fn de_duration<'de, B: Bounded<Duration>, D: Deserializer<'de>>(
    d: D,
) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor::<B>(PhantomData))
}

pub(super) fn de_opt_duration<'de, B: Bounded<Duration>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration::<B, D>(d).map(Some)
}

struct TimeVisitor;

impl Visitor<'_> for TimeVisitor {
    type Value = OffsetDateTime;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 time such as 2026-11-25T21:00:00Z")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        parse_time(s).map_err(E::custom)
    }
}

pub(super) fn de_opt_time<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<OffsetDateTime>, D::Error> {
    d.deserialize_str(TimeVisitor).map(Some)
}

/// An RFC 3339 time such as `2026-11-25T21:00:00Z`, in UTC.
pub fn parse_time(s: &str) -> Result<OffsetDateTime, UnitError> {
    OffsetDateTime::parse(s.trim(), &Rfc3339)
        .map(|t| t.to_offset(UtcOffset::UTC))
        .map_err(|source| UnitError::Time {
            text: s.to_string(),
            source,
        })
}

/// A duration such as `5ms`, `30s`, `2m`, `7d`.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)] // describes the format only
pub(super) struct DurationText(String);

/// A byte size: a plain number or one with a unit (KB, KiB, MB, MiB, GB, GiB).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes the format only
pub(super) enum SizeRepr {
    Number(u64),
    Text(String),
}

struct SizeVisitor<B>(PhantomData<B>);

impl<B: Bounded<u64>> Visitor<'_> for SizeVisitor<B> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size such as 1048576, 512KiB or 1GiB")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        size_in::<B>(n, &n.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        let n = u64::try_from(n).map_err(|_| E::custom(UnitError::Size(n.to_string())))?;
        self.visit_u64(n)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        parse_size(s)
            .and_then(|n| size_in::<B>(n, s))
            .map_err(E::custom)
    }
}

pub(super) fn de_size<'de, B: Bounded<u64>, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor::<B>(PhantomData))
}

pub(super) fn de_opt_size<'de, B: Bounded<u64>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    de_size::<B, D>(d).map(Some)
}

pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::Size(s.to_string()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => return Err(UnitError::SizeUnit(other.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| UnitError::SizeOverflow(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range's ends are themselves accepted, and the values just
    /// outside refused, so no bound is off by one.
    #[test]
    fn duration_ranges_include_their_ends() {
        fn ends<B: Bounded<Duration>>() {
            let Range { floor, ceiling } = B::RANGE;
            for d in [floor.0, ceiling.0] {
                let text = format!("{}ns", d.as_nanos());
                assert_eq!(parse_duration_in::<B>(&text).unwrap(), d);
            }
            let above = format!("{}ns", ceiling.0.as_nanos() + 1);
            assert!(matches!(
                parse_duration_in::<B>(&above),
                Err(UnitError::DurationAbove { .. })
            ));
            if let Some(below) = floor.0.as_nanos().checked_sub(1) {
                assert!(matches!(
                    parse_duration_in::<B>(&format!("{below}ns")),
                    Err(UnitError::DurationBelow { .. })
                ));
            }
        }
        ends::<PgTimeout>();
        ends::<Interval>();
        ends::<Wait>();
        ends::<Connect>();
        ends::<AckWait>();
        ends::<MaxAge>();
        ends::<DuplicateWindow>();
    }

    /// The ceiling is what a timer and NATS can hold: a deadline that far
    /// ahead fits an `Instant`, and its nanoseconds an `i64`.
    #[test]
    fn the_longest_duration_fits_an_instant_and_nats_nanoseconds() {
        let longest = LONGEST.0;
        assert!(std::time::Instant::now().checked_add(longest).is_some());
        assert!(tokio::time::Instant::now().checked_add(longest).is_some());
        assert!(i64::try_from(longest.as_nanos()).is_ok());
    }

    #[test]
    fn sub_millisecond_timeouts_are_refused() {
        let err = parse_duration_in::<PgTimeout>("500us").unwrap_err();
        assert!(err.to_string().contains("whole milliseconds"), "{err}");
        assert!(parse_duration_in::<Interval>("0s").is_err());
        assert!(parse_duration_in::<Wait>("0s").is_ok());
        assert!(parse_duration_in::<Wait>("400000000000y").is_err());
    }
}
