//! The records a connector hands to healthd.
//!
//! Every record names its account by the **source's own key** (`account_key`): healthd maps
//! `(connector instance, account_key)` to its internal account, creating the account on the first
//! [`Account`] record (or matching an existing one by [`Account::domain`]). Records for an account
//! key healthd has never seen an [`Account`] record for are still accepted: the host creates a
//! placeholder account named after the key.
//!
//! Optional fields (`Option`) mean "the source does not say": the host never overwrites a value it
//! already knows with `None`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// One unit of data from a source system. Serialized with a `kind` tag, e.g.
/// `{"kind":"usage_event","account_key":"acme","event":"login",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A customer account (upserted by key).
    Account(Account),
    /// One raw product usage event (deduplicated by [`UsageEvent::uid`]).
    UsageEvent(UsageEvent),
    /// Usage already aggregated per day by the source (added to the daily rollup as given).
    UsageDaily(UsageDaily),
    /// A support ticket (upserted by ticket id: send it again when it changes).
    Ticket(Ticket),
    /// A billing subscription (upserted by subscription id).
    Subscription(Subscription),
    /// An invoice (upserted by invoice id).
    Invoice(Invoice),
    /// The account churned (stopped being a customer) at this instant: the outcome scoring
    /// calibration learns from.
    Churn(Churn),
}

impl Record {
    /// The kind of data this record refreshes (what `source_freshness` tracks).
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Account(_) => RecordKind::Accounts,
            Record::UsageEvent(_) | Record::UsageDaily(_) => RecordKind::Usage,
            Record::Ticket(_) => RecordKind::Support,
            Record::Subscription(_) | Record::Invoice(_) => RecordKind::Billing,
            Record::Churn(_) => RecordKind::Churn,
        }
    }

    /// The source's key of the account the record belongs to.
    pub fn account_key(&self) -> &str {
        match self {
            Record::Account(r) => &r.key,
            Record::UsageEvent(r) => &r.account_key,
            Record::UsageDaily(r) => &r.account_key,
            Record::Ticket(r) => &r.account_key,
            Record::Subscription(r) => &r.account_key,
            Record::Invoice(r) => &r.account_key,
            Record::Churn(r) => &r.account_key,
        }
    }
}

/// A customer account as the source knows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Account {
    /// The source's stable key for the account (required, non-empty).
    pub key: String,
    /// Display name; the host uses the key when it has no name at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The customer's web domain (e.g. `acme.com`). The host uses it to match an account another
    /// connector already created, so the same customer seen by two systems is one account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Email of the account owner (the customer success manager) at your company.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_email: Option<String>,
    /// Plan name, free text (e.g. `growth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Number of paid seats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<i32>,
    /// Monthly recurring revenue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrr: Option<Money>,
    /// Next contract renewal date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_date: Option<NaiveDate>,
}

/// One product usage event.
///
/// `event` is free text, but three values have meaning for scoring: `login`, `page_view`, and
/// anything else counts as use of a product capability (name it in `feature`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The source's account key.
    pub account_key: String,
    /// The acting user (any stable id, e.g. an email); `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `login`, `page_view`, or the name of a product action (e.g. `report_exported`).
    pub event: String,
    /// The product feature the event belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// How many times it happened (default 1), so a source can send pre-counted events.
    #[serde(default = "one")]
    pub count: i32,
    /// The source's unique id for the event, if it has one. Without it the host identifies the
    /// event by a hash of the whole record (see [`UsageEvent::uid`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

fn one() -> i32 {
    1
}

impl UsageEvent {
    /// The identity the host deduplicates the event by: `id:<event_id>` when the source gave
    /// one, otherwise `h:` followed by a hash of every field. Two events identical in every
    /// field are therefore one event; re-sending an event (a re-run, a resumed file) never
    /// counts it twice.
    pub fn uid(&self) -> String {
        if let Some(id) = &self.event_id {
            return format!("id:{id}");
        }
        let mut h = Sha256::new();
        // Unit separators keep ("ab","c") and ("a","bc") apart; a 0 byte marks None.
        let mut field = |v: Option<&str>| {
            match v {
                Some(s) => {
                    h.update([1u8]);
                    h.update(s.as_bytes());
                }
                None => h.update([0u8]),
            }
            h.update([0x1f]);
        };
        field(Some(&self.account_key));
        field(self.user_id.as_deref());
        field(Some(&self.event));
        field(self.feature.as_deref());
        field(Some(&self.occurred_at.timestamp_micros().to_string()));
        field(Some(&self.count.to_string()));
        let digest = h.finalize();
        let mut out = String::with_capacity(2 + 32);
        out.push_str("h:");
        for b in &digest[..16] {
            use std::fmt::Write;
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// Usage the source already counted per day. The host adds `count` to its daily rollup for
/// `(account, day, user, event, feature)`, replacing what this connector sent for the same key
/// before (so re-sending a day is harmless).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageDaily {
    /// The source's account key.
    pub account_key: String,
    /// The UTC day counted.
    pub day: NaiveDate,
    /// The user, if counted per user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `login`, `page_view` or a product action, as in [`UsageEvent::event`].
    pub event: String,
    /// The product feature, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// Number of events that day.
    pub count: i64,
}

/// A support ticket, in its current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// The source's account key.
    pub account_key: String,
    /// The help desk's ticket id.
    pub ticket_id: String,
    /// Subject line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Priority (default `normal`).
    #[serde(default)]
    pub priority: Priority,
    /// Current status.
    pub status: TicketStatus,
    /// When the customer opened it.
    pub opened_at: DateTime<Utc>,
    /// When it was solved or closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<DateTime<Utc>>,
    /// Customer satisfaction rating, 1 (bad) to 5 (great). Values outside 1..=5 are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csat: Option<u8>,
}

/// A billing subscription, in its current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// The source's account key.
    pub account_key: String,
    /// The billing system's subscription id.
    pub subscription_id: String,
    /// Current status.
    pub status: SubscriptionStatus,
    /// Monthly recurring revenue of this subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrr: Option<Money>,
    /// End of the period already paid for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_period_end: Option<DateTime<Utc>>,
    /// The customer asked to cancel at the end of the current period.
    #[serde(default)]
    pub cancel_at_period_end: bool,
}

/// An invoice, in its current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    /// The source's account key.
    pub account_key: String,
    /// The billing system's invoice id.
    pub invoice_id: String,
    /// Amount due.
    pub amount: Money,
    /// ISO 4217 currency code; the host assumes `USD` when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Payment due date.
    pub due_date: NaiveDate,
    /// When it was paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
    /// Current status.
    pub status: InvoiceStatus,
}

/// The account stopped being a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    /// The source's account key.
    pub account_key: String,
    /// When the customer churned.
    pub churned_at: DateTime<Utc>,
}

/// The kinds of data a connector can provide, as declared in its [`crate::Manifest`] and tracked
/// for freshness (a score built on stale usage data says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// [`Account`] records.
    Accounts,
    /// [`UsageEvent`] and [`UsageDaily`] records.
    Usage,
    /// [`Ticket`] records.
    Support,
    /// [`Subscription`] and [`Invoice`] records.
    Billing,
    /// [`Churn`] records.
    Churn,
}

impl RecordKind {
    /// Every kind, in the order the host applies them within a batch.
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Accounts,
        RecordKind::Usage,
        RecordKind::Support,
        RecordKind::Billing,
        RecordKind::Churn,
    ];

    /// The lower-case name (`accounts`, `usage`, `support`, `billing`, `churn`).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Accounts => "accounts",
            RecordKind::Usage => "usage",
            RecordKind::Support => "support",
            RecordKind::Billing => "billing",
            RecordKind::Churn => "churn",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value outside the allowed set of an enum field (the message lists the allowed values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}` (expected one of {allowed})")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
    allowed: &'static str,
}

/// Declares a lower-case string enum with `as_str`, `FromStr` and `Display`.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, $allowed:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The lower-case text form stored by the host.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            /// Parses the lower-case form; surrounding spaces and letter case are ignored.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let t = s.trim();
                $(if t.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                Err(UnknownValue { what: $what, value: s.to_string(), allowed: $allowed })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Ticket priority.
    #[derive(Default)]
    Priority, "priority", "low, normal, high, urgent", {
        /// Low.
        Low => "low",
        /// Normal (the default).
        #[default]
        Normal => "normal",
        /// High.
        High => "high",
        /// Urgent.
        Urgent => "urgent",
    }
);

text_enum!(
    /// Ticket status.
    TicketStatus, "ticket status", "new, open, pending, solved, closed", {
        /// Not yet looked at.
        New => "new",
        /// Being worked on.
        Open => "open",
        /// Waiting for the customer.
        Pending => "pending",
        /// Solved.
        Solved => "solved",
        /// Closed.
        Closed => "closed",
    }
);

text_enum!(
    /// Subscription status (the Stripe vocabulary).
    SubscriptionStatus, "subscription status", "trialing, active, past_due, unpaid, canceled", {
        /// In a free trial.
        Trialing => "trialing",
        /// Paying.
        Active => "active",
        /// A payment is overdue.
        PastDue => "past_due",
        /// Payments failed and the subscription is suspended.
        Unpaid => "unpaid",
        /// Ended.
        Canceled => "canceled",
    }
);

text_enum!(
    /// Invoice status (the Stripe vocabulary).
    InvoiceStatus, "invoice status", "draft, open, paid, void, uncollectible", {
        /// Not yet sent.
        Draft => "draft",
        /// Sent, awaiting payment.
        Open => "open",
        /// Paid.
        Paid => "paid",
        /// Cancelled.
        Void => "void",
        /// Written off.
        Uncollectible => "uncollectible",
    }
);

/// A decimal amount of money, such as `1234.50`, carried as text so no precision is lost on the
/// way to the database (`NUMERIC(14,2)`).
///
/// Valid values: an optional `-`, 1 to 12 digits, and optionally `.` followed by 1 or 2 digits.
/// Construct with [`Money::parse`] or [`Money::from_cents`]; deserializing also validates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Money(String);

/// Why a text is not a valid [`Money`] amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount `{0}` (expected a decimal number such as 1234.50)")]
pub struct InvalidMoney(pub String);

impl Money {
    /// Parses a decimal amount (surrounding spaces ignored).
    pub fn parse(s: &str) -> Result<Money, InvalidMoney> {
        let t = s.trim();
        let digits = t.strip_prefix('-').unwrap_or(t);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let ok_int = !int.is_empty() && int.len() <= 12 && int.bytes().all(|b| b.is_ascii_digit());
        let ok_frac = frac
            .is_none_or(|f| (1..=2).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
        if ok_int && ok_frac {
            Ok(Money(t.to_string()))
        } else {
            Err(InvalidMoney(s.to_string()))
        }
    }

    /// An amount from a whole number of cents (`123450` -> `1234.50`).
    pub fn from_cents(cents: i64) -> Money {
        let sign = if cents < 0 { "-" } else { "" };
        let abs = cents.unsigned_abs();
        Money(format!("{sign}{}.{:02}", abs / 100, abs % 100))
    }

    /// The decimal text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Money {
    type Err = InvalidMoney;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse(s)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount as a string such as \"1234.50\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn records_round_trip_with_kind_tag() {
        let records = vec![
            Record::Account(Account {
                key: "acme".into(),
                name: Some("Acme".into()),
                domain: Some("acme.com".into()),
                mrr: Some(Money::parse("1200.5").unwrap()),
                renewal_date: NaiveDate::from_ymd_opt(2027, 1, 31),
                ..Default::default()
            }),
            Record::UsageEvent(UsageEvent {
                account_key: "acme".into(),
                user_id: Some("u1".into()),
                event: "login".into(),
                feature: None,
                occurred_at: t("2026-11-26T08:00:00Z"),
                count: 1,
                event_id: None,
            }),
            Record::Ticket(Ticket {
                account_key: "acme".into(),
                ticket_id: "T-1".into(),
                subject: None,
                priority: Priority::Urgent,
                status: TicketStatus::Pending,
                opened_at: t("2026-11-20T10:00:00Z"),
                closed_at: None,
                csat: Some(4),
            }),
            Record::Subscription(Subscription {
                account_key: "acme".into(),
                subscription_id: "sub_1".into(),
                status: SubscriptionStatus::PastDue,
                mrr: None,
                current_period_end: Some(t("2026-12-01T00:00:00Z")),
                cancel_at_period_end: true,
            }),
            Record::Invoice(Invoice {
                account_key: "acme".into(),
                invoice_id: "in_1".into(),
                amount: Money::from_cents(-1050),
                currency: None,
                due_date: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
                paid_at: None,
                status: InvoiceStatus::Uncollectible,
            }),
            Record::Churn(Churn {
                account_key: "acme".into(),
                churned_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            }),
        ];
        let json = serde_json::to_string(&records).unwrap();
        assert!(json.contains(r#""kind":"usage_event""#), "{json}");
        assert!(json.contains(r#""status":"past_due""#), "{json}");
        assert!(json.contains(r#""amount":"-10.50""#), "{json}");
        let back: Vec<Record> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, records);
        assert_eq!(back[1].kind(), RecordKind::Usage);
        assert_eq!(back[4].kind(), RecordKind::Billing);
        assert_eq!(back[5].account_key(), "acme");
    }

    #[test]
    fn defaults_apply_when_fields_are_absent() {
        let r: Record = serde_json::from_str(
            r#"{"kind":"usage_event","account_key":"a","event":"page_view","occurred_at":"2026-11-26T08:00:00+01:00"}"#,
        )
        .unwrap();
        let Record::UsageEvent(e) = r else { panic!() };
        assert_eq!(e.count, 1);
        assert_eq!(e.occurred_at, t("2026-11-26T07:00:00Z"));
        let r: Record = serde_json::from_str(
            r#"{"kind":"ticket","account_key":"a","ticket_id":"1","status":"new","opened_at":"2026-11-26T08:00:00Z"}"#,
        )
        .unwrap();
        let Record::Ticket(tk) = r else { panic!() };
        assert_eq!(tk.priority, Priority::Normal);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(serde_json::from_str::<Record>(r#"{"kind":"invoice","account_key":"a","invoice_id":"1","amount":"12,50","due_date":"2026-11-01","status":"paid"}"#).is_err());
        assert!(serde_json::from_str::<Record>(r#"{"kind":"ticket","account_key":"a","ticket_id":"1","status":"wip","opened_at":"2026-11-26T08:00:00Z"}"#).is_err());
        assert!(serde_json::from_str::<Record>(r#"{"kind":"nope","account_key":"a"}"#).is_err());
    }

    #[test]
    fn money_parsing() {
        for ok in [
            "0",
            "12",
            "12.5",
            "12.50",
            "-3.10",
            " 7.00 ",
            "999999999999.99",
        ] {
            assert!(Money::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-",
            "1.",
            ".5",
            "1.234",
            "1e3",
            "1,000",
            "abc",
            "1000000000000",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Money::from_cents(5).as_str(), "0.05");
        assert_eq!(Money::from_cents(123450).as_str(), "1234.50");
    }

    #[test]
    fn enums_parse_loosely_and_print_lower_case() {
        assert_eq!(
            " Past_Due ".parse::<SubscriptionStatus>().unwrap(),
            SubscriptionStatus::PastDue
        );
        assert_eq!(SubscriptionStatus::PastDue.to_string(), "past_due");
        let err = "wip".parse::<TicketStatus>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown ticket status `wip` (expected one of new, open, pending, solved, closed)"
        );
    }

    #[test]
    fn usage_uid_is_stable_and_field_sensitive() {
        let e = UsageEvent {
            account_key: "a".into(),
            user_id: Some("u".into()),
            event: "login".into(),
            feature: None,
            occurred_at: t("2026-11-26T08:00:00Z"),
            count: 1,
            event_id: None,
        };
        let uid = e.uid();
        assert_eq!(uid, e.clone().uid());
        assert!(uid.starts_with("h:") && uid.len() == 34);
        let mut other = e.clone();
        other.user_id = None;
        assert_ne!(other.uid(), uid);
        other.user_id = Some("u".into());
        other.feature = Some(String::new());
        assert_ne!(other.uid(), uid);
        let mut with_id = e;
        with_id.event_id = Some("evt_9".into());
        assert_eq!(with_id.uid(), "id:evt_9");
    }
}
