//! `pathprobe-collector`: receives agents' window reports, stores them, merges them exactly
//! and answers how paths compare.

pub mod compare;
pub mod dash;
mod error;
pub mod export;
pub mod fleet;
pub mod inspect;
pub mod native;
pub mod otlp;
pub mod page;
pub mod plot;
pub mod promwire;
pub mod remote;
pub mod serve;
pub mod store;
pub mod totals;

pub use error::{Error, Result};

/// Now, in Unix nanoseconds (0 before 1970).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Parses a time: RFC 3339 (`2026-11-26T10:00:00Z`) or Unix seconds.
fn parse_time(s: &str) -> std::result::Result<u64, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return secs
            .checked_mul(1_000_000_000)
            .ok_or_else(|| format!("`{s}` is too far in the future"));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("`{s}` is not a time ({e}): write it as 2026-11-26T10:00:00Z or as Unix seconds")
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .map_err(|_| format!("`{s}` is before 1970"))
}

/// The range `[from, to)` in Unix nanoseconds a question asks about: `since` (a duration
/// back from `now_ns`, like `1h`), or `from` and `to` (to defaults to now). Neither: the
/// last hour.
pub fn time_range(
    since: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    now_ns: u64,
) -> std::result::Result<(u64, u64), String> {
    let range = match (since, from) {
        (Some(_), Some(_)) => return Err("give either since or from/to, not both".to_string()),
        (Some(s), None) => {
            let d = humantime::parse_duration(s).map_err(|e| {
                format!("`{s}` is not a duration ({e}): write it like 1h, 30m or 7d")
            })?;
            let back = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            (
                now_ns.saturating_sub(back),
                to.map(parse_time).transpose()?.unwrap_or(now_ns),
            )
        }
        (None, Some(f)) => (
            parse_time(f)?,
            to.map(parse_time).transpose()?.unwrap_or(now_ns),
        ),
        (None, None) => (
            now_ns.saturating_sub(3_600_000_000_000),
            to.map(parse_time).transpose()?.unwrap_or(now_ns),
        ),
    };
    if range.0 >= range.1 {
        return Err("the range is empty: from must be before to".to_string());
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::time_range;

    #[test]
    fn ranges_parse() {
        let now = 1_795_685_400_000_000_000;
        assert_eq!(
            time_range(Some("1h"), None, None, now),
            Ok((now - 3_600_000_000_000, now))
        );
        assert_eq!(
            time_range(None, Some("2026-11-26T09:30:00Z"), Some("1795685460"), now),
            Ok((now, now + 60_000_000_000))
        );
        assert!(time_range(Some("1h"), Some("1"), None, now).is_err());
        assert!(
            time_range(None, Some("yesterday"), None, now)
                .unwrap_err()
                .contains("2026-11-26T10:00:00Z")
        );
        assert!(time_range(None, Some("1795685460"), Some("1795685400"), now).is_err());
    }
}
