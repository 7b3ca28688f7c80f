//! Connector schedules: `every 15m` style intervals or cron expressions (default: daily).
//!
//! Accepted forms:
//! * `every <n><unit>` with unit `s`, `m`, `h`, `d` (also `sec`, `min`, `hour(s)`, `day(s)`...),
//!   e.g. `every 15m`, `every 1h`, `every 2 days`;
//! * `hourly`, `daily` (same as `every 1h`, `every 1d`); an empty schedule is daily;
//! * a cron expression with 5 fields (minute precision) or 6 (seconds first), evaluated in UTC,
//!   e.g. `0 6 * * *` (06:00 UTC every day) or `*/10 * * * *`; aliases such as `@hourly` work.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};

/// The schedule applied when none is given.
pub const DEFAULT_SCHEDULE: &str = "every 24h";

/// Why a schedule text is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule `{text}`: {message}")]
pub struct ScheduleError {
    pub text: String,
    pub message: String,
}

/// A parsed schedule.
#[derive(Clone)]
pub enum Schedule {
    /// A fixed interval after the previous run was claimed.
    Every(Duration),
    /// A cron expression, in UTC.
    Cron(Box<croner::Cron>),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "Every({}s)", d.num_seconds()),
            Schedule::Cron(c) => write!(f, "Cron({})", c.pattern),
        }
    }
}

impl Schedule {
    /// Parses a schedule (see the module docs for the forms).
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let err = |message: String| ScheduleError {
            text: text.to_string(),
            message,
        };
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "" | "daily" => return Ok(Schedule::Every(Duration::days(1))),
            "hourly" => return Ok(Schedule::Every(Duration::hours(1))),
            _ => {}
        }
        if let Some(rest) = lower.strip_prefix("every") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(err(
                    "say how often, e.g. `every 15m`, `every 1h` or `every 1d`".into(),
                ));
            }
            let split = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (num, unit) = rest.split_at(split);
            let n: i64 = num
                .parse()
                .map_err(|_| err("expected a whole number and a unit, e.g. `every 15m`".into()))?;
            if n <= 0 {
                return Err(err("the interval must be positive".into()));
            }
            let secs = match unit.trim() {
                "s" | "sec" | "secs" | "second" | "seconds" => 1,
                "m" | "min" | "mins" | "minute" | "minutes" => 60,
                "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
                "d" | "day" | "days" => 86_400,
                other => {
                    return Err(err(format!(
                        "unknown unit `{other}`: use s, m, h or d (e.g. `every 15m`)"
                    )))
                }
            };
            let total = n
                .checked_mul(secs)
                .filter(|s| *s <= 366 * 86_400)
                .ok_or_else(|| err("the interval must be at most a year".into()))?;
            return Ok(Schedule::Every(Duration::seconds(total)));
        }
        let cron = croner::Cron::from_str(t).map_err(|e| {
            err(format!(
                "not `every <n><unit>` and not a valid cron expression ({e})"
            ))
        })?;
        if cron.find_next_occurrence(&Utc::now(), false).is_err() {
            return Err(err("the cron expression never matches".into()));
        }
        Ok(Schedule::Cron(Box::new(cron)))
    }

    /// The first due time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Every(d) => t + *d,
            Schedule::Cron(c) => c
                .find_next_occurrence(&t, false)
                // Checked at parse time; an expression that stops matching (years out of range)
                // falls back to daily rather than never running again.
                .unwrap_or_else(|_| t + Duration::days(1)),
        }
    }

    /// Roughly how long between two runs (used to cap retry backoff).
    pub fn nominal_interval(&self, now: DateTime<Utc>) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron(_) => {
                let a = self.next_after(now);
                let b = self.next_after(a);
                b - a
            }
        }
    }
}

/// Delay before retrying a failed run: 30 s doubled per consecutive failure, at most an hour,
/// and never later than the next regular run would be.
pub fn retry_delay(failures: i32, interval: Duration) -> Duration {
    let exp = failures.clamp(1, 20) - 1;
    let backoff = Duration::seconds(30i64.saturating_mul(1i64 << exp)).min(Duration::hours(1));
    backoff.min(interval).max(Duration::seconds(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, h, m, 0).unwrap()
    }

    #[test]
    fn intervals() {
        let cases = [
            ("every 15m", 900),
            ("every 1h", 3600),
            ("every 1d", 86_400),
            ("every 24h", 86_400),
            ("every 30s", 30),
            ("Every 2 hours", 7200),
            ("daily", 86_400),
            ("hourly", 3600),
            ("", 86_400),
        ];
        for (text, secs) in cases {
            let s = Schedule::parse(text).unwrap();
            assert_eq!(
                s.next_after(at(8, 0)),
                at(8, 0) + Duration::seconds(secs),
                "{text}"
            );
        }
    }

    #[test]
    fn cron_expressions() {
        let s = Schedule::parse("0 6 * * *").unwrap();
        assert_eq!(s.next_after(at(8, 0)), at(6, 0) + Duration::days(1));
        assert_eq!(s.next_after(at(5, 59)), at(6, 0));
        let s = Schedule::parse("*/10 * * * *").unwrap();
        assert_eq!(s.next_after(at(8, 1)), at(8, 10));
        assert_eq!(s.nominal_interval(at(8, 1)), Duration::minutes(10));
        assert!(Schedule::parse("@hourly").is_ok());
    }

    #[test]
    fn bad_schedules_say_why() {
        for bad in [
            "every",
            "every 0m",
            "every 5 fortnights",
            "every -1h",
            "sometimes",
            "61 * * * *",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(!e.message.is_empty(), "{bad}");
        }
        let e = Schedule::parse("every 5 weeks").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let day = Duration::days(1);
        assert_eq!(retry_delay(1, day), Duration::seconds(30));
        assert_eq!(retry_delay(2, day), Duration::seconds(60));
        assert_eq!(retry_delay(3, day), Duration::seconds(120));
        assert_eq!(retry_delay(30, day), Duration::hours(1));
        assert_eq!(retry_delay(5, Duration::minutes(1)), Duration::minutes(1));
    }
}
