//! RFC 3339 text of an instant, written by hand in fixed forms: templates,
//! probes and `/pipelines` show times in exactly these forms, and the `time`
//! crate's own RFC 3339 formatter trims the fraction to what it needs.

use std::fmt::Write;

use time::{OffsetDateTime, UtcOffset};

/// How many digits of the second's fraction the text shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fraction {
    /// None: `…:05Z`.
    Seconds,
    /// Three digits: `…:05.120Z`.
    Millis,
    /// Six digits: `…:05.120000Z`.
    Micros,
    /// Nine digits: `…:05.120000000Z`.
    Nanos,
    /// As many as the instant needs, in steps of three: none, 3, 6 or 9.
    Fewest,
}

/// How a zero offset is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zulu {
    /// `Z`.
    Letter,
    /// `+00:00`.
    Offset,
}

/// `t` in its own offset, e.g. `2026-11-25T21:00:05.120Z` or
/// `2026-11-25T22:00:05+01:00`.
pub fn format(t: OffsetDateTime, fraction: Fraction, zulu: Zulu) -> String {
    let mut s = String::with_capacity(35);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let nanos = t.nanosecond();
    let digits = match fraction {
        Fraction::Seconds => 0,
        Fraction::Millis => 3,
        Fraction::Micros => 6,
        Fraction::Nanos => 9,
        Fraction::Fewest if nanos == 0 => 0,
        Fraction::Fewest if nanos.is_multiple_of(1_000_000) => 3,
        Fraction::Fewest if nanos.is_multiple_of(1_000) => 6,
        Fraction::Fewest => 9,
    };
    if digits > 0 {
        let _ = write!(s, ".{:0digits$}", nanos / 10u32.pow(9 - digits as u32));
    }
    let offset = t.offset();
    if offset == UtcOffset::UTC && zulu == Zulu::Letter {
        s.push('Z');
    } else {
        let (h, m, _) = offset.as_hms();
        let sign = if offset.is_negative() { '-' } else { '+' };
        let _ = write!(s, "{sign}{:02}:{:02}", h.unsigned_abs(), m.unsigned_abs());
    }
    s
}

/// Now in UTC, ending in `Z`.
pub fn now_utc(fraction: Fraction) -> String {
    format(OffsetDateTime::now_utc(), fraction, Zulu::Letter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(nanos: i128, offset_secs: i32) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap()
            .to_offset(UtcOffset::from_whole_seconds(offset_secs).unwrap())
    }

    const T: i128 = 1_795_640_405_000_000_000; // 2026-11-25T21:00:05Z

    #[test]
    fn fixed_fractions_keep_their_digits() {
        let t = at(T + 120_000_000, 0);
        assert_eq!(
            format(t, Fraction::Seconds, Zulu::Letter),
            "2026-11-25T21:00:05Z"
        );
        assert_eq!(
            format(t, Fraction::Millis, Zulu::Letter),
            "2026-11-25T21:00:05.120Z"
        );
        assert_eq!(
            format(t, Fraction::Micros, Zulu::Letter),
            "2026-11-25T21:00:05.120000Z"
        );
        assert_eq!(
            format(t, Fraction::Nanos, Zulu::Letter),
            "2026-11-25T21:00:05.120000000Z"
        );
        assert_eq!(
            format(at(T + 7, 0), Fraction::Nanos, Zulu::Letter),
            "2026-11-25T21:00:05.000000007Z"
        );
        assert_eq!(
            format(at(T + 999_999_999, 0), Fraction::Millis, Zulu::Letter),
            "2026-11-25T21:00:05.999Z",
            "digits are cut, not rounded"
        );
    }

    #[test]
    fn fewest_steps_by_three() {
        let f = |n| format(at(T + n, 0), Fraction::Fewest, Zulu::Offset);
        assert_eq!(f(0), "2026-11-25T21:00:05+00:00");
        assert_eq!(f(120_000_000), "2026-11-25T21:00:05.120+00:00");
        assert_eq!(f(120_300_000), "2026-11-25T21:00:05.120300+00:00");
        assert_eq!(f(120_300_001), "2026-11-25T21:00:05.120300001+00:00");
    }

    #[test]
    fn offsets_are_written_as_hours_and_minutes() {
        let t = at(T, 5 * 3600 + 30 * 60);
        assert_eq!(
            format(t, Fraction::Millis, Zulu::Letter),
            "2026-11-26T02:30:05.000+05:30"
        );
        let t = at(T, -(3 * 3600 + 30 * 60));
        assert_eq!(
            format(t, Fraction::Seconds, Zulu::Letter),
            "2026-11-25T17:30:05-03:30"
        );
    }

    /// Forms every consumer of these texts reads back as the same instant.
    #[test]
    fn parses_back() {
        let t = at(T + 123_456_789, 3600);
        for fraction in [Fraction::Nanos, Fraction::Fewest] {
            for zulu in [Zulu::Letter, Zulu::Offset] {
                let s = format(t, fraction, zulu);
                let back =
                    OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .unwrap();
                assert_eq!(back, t, "{s}");
            }
        }
    }
}
