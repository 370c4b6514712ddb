//! Durations as people write them in feature-view files: "250ms", "10s",
//! "5m", "1h", "7d". One unit per value keeps the file unambiguous.
//!
//! Every duration is at most [`MAX`], so each later computation stays in
//! range: milliseconds as `i64` added to or taken from event times, and
//! protobuf `Duration`s in `ListFeatureViews`.

use std::time::Duration;

/// The longest duration a view may declare: ten years.
pub const MAX: Duration = Duration::from_secs(3650 * 86_400);

/// Parses "10s"-style durations; the error says what was expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("duration {text:?} must start with a whole number"));
    }
    // All digits, so the only way to fail is to overflow.
    let n: u64 = number.parse().map_err(|_| too_long(text))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!("duration {text:?} has unknown unit {unit:?} (use ms, s, m, h or d)"));
        }
    };
    let millis = n.checked_mul(millis).ok_or_else(|| too_long(text))?;
    let duration = Duration::from_millis(millis);
    if duration > MAX {
        return Err(too_long(text));
    }
    Ok(duration)
}

fn too_long(text: &str) -> String {
    format!("duration {text:?} is longer than the longest supported, {}", format(MAX))
}

/// Formats a duration the way `parse` reads it, with the largest exact unit.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        assert!(parse("10").unwrap_err().contains("no unit"));
        assert!(parse("10x").unwrap_err().contains("unknown unit"));
        assert!(parse("s").unwrap_err().contains("whole number"));
        assert!(parse("1.5s").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn refuses_what_would_overflow_later() {
        assert_eq!(parse("3650d"), Ok(MAX));
        for text in ["3651d", "87601h", "106751991168d", "18446744073709551615ms", "99999999999999999999999s"] {
            assert!(parse(text).unwrap_err().contains("longest supported, 3650d"), "{text}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["250ms", "10s", "90s", "5m", "1h", "7d"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
