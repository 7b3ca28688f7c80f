//! The limits every record must respect. The host checks them for every record from any source
//! (a plugin, or anything else feeding its ingest path) before the database sees it, and rejects
//! a record that breaks one with the reason; connectors may check them earlier (the `csv`
//! connector does, so its rejections name the file and line).
//!
//! Why limits at all: PostgreSQL refuses an index entry over about 2.7 KB and any text holding a
//! NUL character; without limits one such value would fail its whole batch, again on every run.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use crate::records::Record;

/// Bytes of a key or id: account keys, ticket, subscription, invoice and event ids, user ids.
pub const MAX_KEY_BYTES: usize = 256;
/// Bytes of a name: event and feature names, account name, domain, owner email, plan.
pub const MAX_NAME_BYTES: usize = 512;
/// Bytes of free text: a ticket subject.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Largest `count` of one usage event.
pub const MAX_EVENT_COUNT: i32 = 1_000_000;
/// Largest `count` of one day of pre-aggregated usage.
pub const MAX_DAILY_COUNT: i64 = 1_000_000_000_000;
/// Largest number of seats.
pub const MAX_SEATS: i32 = 10_000_000;
/// Dates and times must fall in these years (inclusive).
pub const YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// Checks one text value: its length, and no NUL character.
fn text(errors: &mut Vec<String>, field: &str, value: Option<&str>, max: usize) {
    let Some(v) = value else { return };
    if v.len() > max {
        errors.push(format!(
            "`{field}` is {} bytes long; at most {max} are allowed",
            v.len()
        ));
    } else if v.contains('\0') {
        errors.push(format!("`{field}` contains a NUL character"));
    }
}

fn year(errors: &mut Vec<String>, field: &str, y: Option<i32>) {
    if let Some(y) = y.filter(|y| !YEARS.contains(y)) {
        errors.push(format!(
            "`{field}` is in year {y}; dates must be in the years {} to {}",
            YEARS.start(),
            YEARS.end()
        ));
    }
}

fn time(errors: &mut Vec<String>, field: &str, t: Option<&DateTime<Utc>>) {
    year(errors, field, t.map(|t| t.year()));
}

fn date(errors: &mut Vec<String>, field: &str, d: Option<&NaiveDate>) {
    year(errors, field, d.map(|d| d.year()));
}

/// Every limit `record` breaks, as reasons a user can act on (empty when it is within them).
pub fn violations(record: &Record) -> Vec<String> {
    let mut e = Vec::new();
    let (k, n, t) = (MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_TEXT_BYTES);
    match record {
        Record::Account(a) => {
            text(&mut e, "account_key", Some(&a.key), k);
            text(&mut e, "name", a.name.as_deref(), n);
            text(&mut e, "domain", a.domain.as_deref(), n);
            text(&mut e, "owner_email", a.owner_email.as_deref(), n);
            text(&mut e, "plan", a.plan.as_deref(), n);
            if let Some(s) = a.seats.filter(|s| !(0..=MAX_SEATS).contains(s)) {
                e.push(format!("`seats` must be 0 to {MAX_SEATS}, got {s}"));
            }
            date(&mut e, "renewal_date", a.renewal_date.as_ref());
        }
        Record::UsageEvent(u) => {
            text(&mut e, "account_key", Some(&u.account_key), k);
            text(&mut e, "user_id", u.user_id.as_deref(), k);
            text(&mut e, "event", Some(&u.event), n);
            text(&mut e, "feature", u.feature.as_deref(), n);
            text(&mut e, "event_id", u.event_id.as_deref(), k);
            if !(1..=MAX_EVENT_COUNT).contains(&u.count) {
                e.push(format!(
                    "`count` must be 1 to {MAX_EVENT_COUNT}, got {}",
                    u.count
                ));
            }
            time(&mut e, "occurred_at", Some(&u.occurred_at));
        }
        Record::UsageDaily(d) => {
            text(&mut e, "account_key", Some(&d.account_key), k);
            text(&mut e, "user_id", d.user_id.as_deref(), k);
            text(&mut e, "event", Some(&d.event), n);
            text(&mut e, "feature", d.feature.as_deref(), n);
            if !(0..=MAX_DAILY_COUNT).contains(&d.count) {
                e.push(format!(
                    "`count` must be 0 to {MAX_DAILY_COUNT}, got {}",
                    d.count
                ));
            }
            date(&mut e, "day", Some(&d.day));
        }
        Record::Ticket(tk) => {
            text(&mut e, "account_key", Some(&tk.account_key), k);
            text(&mut e, "ticket_id", Some(&tk.ticket_id), k);
            text(&mut e, "subject", tk.subject.as_deref(), t);
            time(&mut e, "opened_at", Some(&tk.opened_at));
            time(&mut e, "closed_at", tk.closed_at.as_ref());
            if tk.closed_at.is_some_and(|c| c < tk.opened_at) {
                e.push("`closed_at` is before `opened_at`".into());
            }
        }
        Record::Subscription(s) => {
            text(&mut e, "account_key", Some(&s.account_key), k);
            text(&mut e, "subscription_id", Some(&s.subscription_id), k);
            time(&mut e, "current_period_end", s.current_period_end.as_ref());
        }
        Record::Invoice(i) => {
            text(&mut e, "account_key", Some(&i.account_key), k);
            text(&mut e, "invoice_id", Some(&i.invoice_id), k);
            text(&mut e, "currency", i.currency.as_deref(), k);
            date(&mut e, "due_date", Some(&i.due_date));
            time(&mut e, "paid_at", i.paid_at.as_ref());
        }
        Record::Churn(c) => {
            text(&mut e, "account_key", Some(&c.account_key), k);
            time(&mut e, "churned_at", Some(&c.churned_at));
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Ticket, TicketStatus, UsageEvent};
    use chrono::TimeZone;

    fn event(name: String) -> Record {
        Record::UsageEvent(UsageEvent {
            account_key: "a".into(),
            user_id: None,
            event: name,
            feature: None,
            occurred_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            count: 1,
            event_id: Some("x\0y".into()),
        })
    }

    #[test]
    fn long_values_nul_and_ranges_are_named() {
        assert_eq!(
            violations(&event("e".repeat(513))),
            [
                "`event` is 513 bytes long; at most 512 are allowed",
                "`event_id` contains a NUL character"
            ]
        );
        let opened = Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap();
        let t = Record::Ticket(Ticket {
            account_key: "a".into(),
            ticket_id: "t".into(),
            subject: None,
            priority: Default::default(),
            status: TicketStatus::Open,
            opened_at: opened,
            closed_at: Some(Utc.with_ymd_and_hms(0, 12, 31, 0, 0, 0).unwrap()),
            csat: None,
        });
        assert_eq!(
            violations(&t),
            [
                "`closed_at` is in year 0; dates must be in the years 1 to 9999",
                "`closed_at` is before `opened_at`"
            ]
        );
    }
}
