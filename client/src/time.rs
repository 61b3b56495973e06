//! Times on the command line: `now`, Unix seconds, `YYYY-MM-DD` (midnight UTC) or
//! `YYYY-MM-DDTHH:MM:SSZ` (UTC), and the system clock.

use tribute_channels::Timestamp;

/// The system clock in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Parses a time given on the command line, `now` being `now`.
pub fn parse_time(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Timestamp).map_err(|_| format!("{s:?}: too large"));
    }
    let bad = || format!("{s:?}: expected `now`, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |p: &str, len: usize| -> Result<i64, String> {
        if p.len() != len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        p.parse().map_err(|_| bad())
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, dd] = d.as_slice() else { return Err(bad()) };
    let (y, m, dd) = (num(y, 4)?, num(m, 2)?, num(dd, 2)?);
    if !(1..=12).contains(&m) || dd < 1 || dd > days_in_month(y, m) {
        return Err(bad());
    }
    let secs_of_day = match time {
        None => 0,
        Some(t) => {
            let p: Vec<&str> = t.split(':').collect();
            let [h, mi, se] = p.as_slice() else { return Err(bad()) };
            let (h, mi, se) = (num(h, 2)?, num(mi, 2)?, num(se, 2)?);
            if h > 23 || mi > 59 || se > 59 {
                return Err(bad());
            }
            h * 3600 + mi * 60 + se
        }
    };
    let secs = days_from_civil(y, m, dd) * 86_400 + secs_of_day;
    u64::try_from(secs).map(Timestamp).map_err(|_| format!("{s:?}: before 1970"))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (the form [`parse_time`] reads back).
pub fn format_time(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(days);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60)
}

/// The date `days` after 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let now = Timestamp(42);
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("1700000000", now), Ok(Timestamp(1_700_000_000)));
        assert_eq!(parse_time("1970-01-01", now), Ok(Timestamp(0)));
        assert_eq!(parse_time("2023-11-14T22:13:20Z", now), Ok(Timestamp(1_700_000_000)));
        assert_eq!(parse_time("2024-02-29", now), Ok(Timestamp(1_709_164_800)));
        for bad in [
            "",
            "2023-02-29",
            "2023-13-01",
            "2023-1-01",
            "2023-11-14T22:13:20",
            "tomorrow",
            "1969-12-31",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_what_it_parses() {
        for t in [0u64, 1_700_000_000, 1_709_164_800, 951_782_400, 4_102_444_799] {
            let text = format_time(t);
            assert_eq!(parse_time(&text, Timestamp(0)), Ok(Timestamp(t)), "{text}");
        }
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
