//! Durations, sizes and times as pipeline files write them, for serde and
//! the editor schema.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!("invalid duration `{s}`: {e} (e.g. 30s, 5ms, 7d)"))
    })
}

pub(super) fn de_opt_time<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, D::Error> {
    let s = String::deserialize(d)?;
    parse_time(&s).map(Some).map_err(serde::de::Error::custom)
}

/// An RFC 3339 time such as `2026-11-25T21:00:00Z`.
pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("invalid time `{s}`: {e} (e.g. 2026-11-25T21:00:00Z)"))
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A duration such as `5ms`, `30s`, `2m`, `7d`.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)] // describes the format only
pub(super) struct DurationText(String);

/// A byte size: a plain number or one with a unit (KB, KiB, MB, MiB, GB, GiB).
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum SizeRepr {
    Number(u64),
    Text(String),
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeRepr::deserialize(d)? {
        SizeRepr::Number(n) => Ok(n),
        SizeRepr::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

pub(super) fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}` (e.g. 1048576, 512KiB, 1GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}
