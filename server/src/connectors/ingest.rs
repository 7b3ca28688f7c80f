//! Writing what connectors emit: each batch, its rejections and the cursor that follows it in
//! ONE transaction, with set-based statements (one `INSERT ... SELECT FROM unnest(...)` per record
//! kind, whatever the batch size).
//!
//! * Usage events are inserted with `ON CONFLICT DO NOTHING RETURNING`, and the same statement
//!   adds only the rows actually inserted to `usage_daily`: re-sent events never count twice.
//!   An event's identity is its `event_id`, else a hash of the whole record.
//! * Tickets, subscriptions and invoices upsert by natural key (a later record updates the row);
//!   optional fields the record leaves out keep their stored value.
//! * Account records upsert the account's details; churn outcomes are inserted once.
//! * Each record is validated on its own; a bad one is rejected with its reason and the rest of
//!   the batch is written.
//!
//! The work is split in two: [`prepare`] (validation, event identities, column building) runs on
//! the connector's thread, [`BatchWriter::write`] runs on the async runtime with the database
//! connection. [`IngestSink`] connects them with a bounded queue so parsing the next batch
//! overlaps with writing the previous one; batches are committed strictly in order, so the saved
//! cursor always belongs to the last committed batch.
//!
//! Ingest transactions use `synchronous_commit = off`: if PostgreSQL itself crashes, the last
//! fraction of a second of batches may be lost, but always together with their cursors, so the
//! next run fetches them again. A crash of healthd loses nothing that was committed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Date, Int4, Int8, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use healthd_plugin_api::{limits, Batch, Record, RecordKind, Rejection};

use super::identities;
use crate::plugins::BatchSink;

/// At most this many rejections are stored per run (all are counted).
pub const MAX_STORED_REJECTIONS: i64 = 10_000;

/// Why a batch could not be written. The run stops there; nothing of the batch is saved.
/// The `Display` text is what viewers of the run read: it never carries database text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error(
        "saving a batch failed: the database refused it (reference {reference}; the server log has the detail)"
    )]
    Database { reference: String },
    #[error("the run is no longer active (it timed out, was cancelled or was marked failed)")]
    RunNotActive,
}

/// Logs `detail` (database text, not for viewers) under a new short reference id and returns
/// the id, for a message viewers may read.
fn log_with_reference(context: &str, detail: &dyn std::fmt::Display) -> String {
    let reference = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    tracing::error!(reference = %reference, error = %detail, "{context}");
    reference
}

/// `what` for viewers, with the reference of `detail` logged under `context`.
pub(crate) fn with_reference(what: &str, context: &str, detail: &dyn std::fmt::Display) -> String {
    let r = log_with_reference(context, detail);
    format!("{what} (reference {r}; the server log has the detail)")
}

impl IngestError {
    fn database(detail: &dyn std::fmt::Display) -> Self {
        IngestError::Database {
            reference: log_with_reference("saving a connector batch failed", detail),
        }
    }
}

impl From<diesel::result::Error> for IngestError {
    fn from(e: diesel::result::Error) -> Self {
        IngestError::database(&e)
    }
}

#[derive(Default)]
struct AccountCols {
    key: Vec<u32>,
    name: Vec<Option<String>>,
    domain: Vec<Option<String>>,
    owner: Vec<Option<String>>,
    plan: Vec<Option<String>>,
    seats: Vec<Option<i32>>,
    mrr: Vec<Option<String>>,
    renewal: Vec<Option<NaiveDate>>,
}

#[derive(Default)]
struct UsageCols {
    key: Vec<u32>,
    uid: Vec<String>,
    user: Vec<Option<String>>,
    event: Vec<String>,
    feature: Vec<Option<String>>,
    at: Vec<DateTime<Utc>>,
    count: Vec<i32>,
}

#[derive(Default)]
struct DailyCols {
    key: Vec<u32>,
    day: Vec<NaiveDate>,
    user: Vec<String>,
    event: Vec<String>,
    feature: Vec<String>,
    count: Vec<i64>,
}

#[derive(Default)]
struct TicketCols {
    key: Vec<u32>,
    id: Vec<String>,
    subject: Vec<Option<String>>,
    priority: Vec<String>,
    status: Vec<String>,
    opened: Vec<DateTime<Utc>>,
    closed: Vec<Option<DateTime<Utc>>>,
    csat: Vec<Option<i32>>,
}

#[derive(Default)]
struct SubscriptionCols {
    key: Vec<u32>,
    id: Vec<String>,
    status: Vec<String>,
    mrr: Vec<Option<String>>,
    period_end: Vec<Option<DateTime<Utc>>>,
    cancel: Vec<bool>,
}

#[derive(Default)]
struct InvoiceCols {
    key: Vec<u32>,
    id: Vec<String>,
    amount: Vec<String>,
    currency: Vec<String>,
    due: Vec<NaiveDate>,
    paid: Vec<Option<DateTime<Utc>>>,
    status: Vec<String>,
}

#[derive(Default)]
struct ChurnCols {
    key: Vec<u32>,
    at: Vec<DateTime<Utc>>,
}

/// A batch validated and laid out in columns, ready for [`BatchWriter::write`].
#[derive(Default)]
pub struct PreparedBatch {
    /// Distinct account keys of the batch; the column `key` fields index into it.
    keys: Vec<String>,
    /// Domain given for each key by an account record (normalised).
    domains: Vec<Option<String>>,
    accounts: AccountCols,
    usage: UsageCols,
    /// The usage events aggregated per (account key, day, user, event, feature).
    usage_rollup: DailyCols,
    daily: DailyCols,
    tickets: TicketCols,
    subscriptions: SubscriptionCols,
    invoices: InvoiceCols,
    churn: ChurnCols,
    /// Rejections from the connector and from validation here.
    pub rejections: Vec<Rejection>,
    /// The cursor that is true once this batch is saved.
    pub cursor: Option<String>,
    /// Records accepted.
    pub records: u64,
    /// Kinds of the accepted records.
    pub kinds: BTreeSet<RecordKind>,
}

impl PreparedBatch {
    /// Records that will be written.
    pub fn accepted(&self) -> u64 {
        self.records
    }
}

struct Keys {
    index: HashMap<String, u32>,
}

impl Keys {
    fn idx(&mut self, batch: &mut PreparedBatch, key: String) -> u32 {
        if let Some(i) = self.index.get(&key) {
            return *i;
        }
        let i = batch.keys.len() as u32;
        batch.keys.push(key.clone());
        batch.domains.push(None);
        self.index.insert(key, i);
        i
    }
}

/// An optional text: empty or blank means "not given".
fn opt(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
}

fn has_nul(values: &[Option<&str>]) -> bool {
    values.iter().flatten().any(|v| v.contains('\0'))
}

/// A value quoted in a message, cut to a readable length (an over-long value is the problem
/// being reported, it must not make the report itself huge).
fn shown(v: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 64;
    if v.len() <= MAX && !v.contains('\0') {
        return v.into();
    }
    format!("{}...", v[..char_floor(v, MAX)].replace('\0', "\\0")).into()
}

/// The largest index at most `max` that is a character boundary of `v`.
fn char_floor(v: &str, max: usize) -> usize {
    let mut end = max.min(v.len());
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    end
}

fn rejection(what: &str, key: &str, problem: impl std::fmt::Display) -> Rejection {
    let key = shown(key);
    let reason = if key.trim().is_empty() {
        format!("{what}: {problem}")
    } else {
        format!("{what} for account `{key}`: {problem}")
    };
    Rejection {
        file: None,
        line: None,
        reason,
    }
}

/// What a record is called in rejection messages.
fn label(record: &Record) -> &'static str {
    match record {
        Record::Account(_) => "account",
        Record::UsageEvent(_) => "usage event",
        Record::UsageDaily(_) => "daily usage",
        Record::Ticket(_) => "ticket",
        Record::Subscription(_) => "subscription",
        Record::Invoice(_) => "invoice",
        Record::Churn(_) => "churn",
    }
}

/// An invoice's currency as stored: upper-case, `USD` when not given.
fn invoice_currency(raw: Option<&str>) -> String {
    raw.map(|c| c.trim().to_ascii_uppercase())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "USD".to_string())
}

const NUL_FIELD: &str = "a field contains a NUL character";

/// The first reason `record` cannot be ingested, if any. Every check of [`prepare`] lives here, so
/// laying a record out in columns never has to reject anything.
fn check(record: &Record) -> Option<Rejection> {
    let key = record.account_key();
    if key.trim().is_empty() {
        return Some(rejection(label(record), "", "missing account key"));
    }
    if key.contains('\0') {
        return Some(rejection(
            "record",
            "",
            "account key contains a NUL character",
        ));
    }
    let what = label(record);
    let problem: Option<String> = match record {
        Record::Account(a) => {
            if has_nul(&[
                a.name.as_deref(),
                a.domain.as_deref(),
                a.owner_email.as_deref(),
                a.plan.as_deref(),
            ]) {
                Some(NUL_FIELD.into())
            } else if a.seats.is_some_and(|s| s < 0) {
                Some("seats must not be negative".into())
            } else {
                None
            }
        }
        Record::UsageEvent(e) => {
            if e.event.trim().is_empty() {
                Some("missing event name".into())
            } else if e.count < 1 {
                Some(format!("count must be at least 1, got {}", e.count))
            } else if has_nul(&[
                Some(&e.event),
                e.user_id.as_deref(),
                e.feature.as_deref(),
                e.event_id.as_deref(),
            ]) {
                Some(NUL_FIELD.into())
            } else {
                None
            }
        }
        Record::UsageDaily(d) => {
            if d.event.trim().is_empty() {
                Some("missing event name".into())
            } else if d.count < 0 {
                Some("count must not be negative".into())
            } else if has_nul(&[Some(&d.event), d.user_id.as_deref(), d.feature.as_deref()]) {
                Some(NUL_FIELD.into())
            } else {
                None
            }
        }
        Record::Ticket(t) => {
            if t.ticket_id.trim().is_empty() {
                Some("missing ticket id".into())
            } else if let Some(c) = t.csat.filter(|c| !(1..=5).contains(c)) {
                let what = format!("ticket `{}`", shown(&t.ticket_id));
                return Some(rejection(
                    &what,
                    key,
                    format!("csat must be 1 to 5, got {c}"),
                ));
            } else if has_nul(&[Some(&t.ticket_id), t.subject.as_deref()]) {
                Some(NUL_FIELD.into())
            } else {
                None
            }
        }
        Record::Subscription(s) => (s.subscription_id.trim().is_empty()
            || s.subscription_id.contains('\0'))
        .then(|| "missing or invalid subscription id".into()),
        Record::Invoice(i) => {
            if i.invoice_id.trim().is_empty() || i.invoice_id.contains('\0') {
                Some("missing or invalid invoice id".into())
            } else {
                let c = invoice_currency(i.currency.as_deref());
                if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                    let what = format!("invoice `{}`", shown(&i.invoice_id));
                    return Some(rejection(
                        &what,
                        key,
                        format!(
                            "currency must be a 3-letter code such as USD, got `{}`",
                            shown(&c)
                        ),
                    ));
                }
                None
            }
        }
        Record::Churn(_) => None,
    };
    let problem = problem.or_else(|| {
        let v = limits::violations(record);
        (!v.is_empty()).then(|| v.join("; "))
    });
    problem.map(|p| rejection(what, key, p))
}

/// Validates a batch and lays it out in columns. Pure CPU work: runs on the connector's thread.
pub fn prepare(batch: Batch) -> PreparedBatch {
    let Batch {
        records,
        rejections,
        cursor,
    } = batch;
    let mut out = PreparedBatch {
        rejections,
        cursor,
        ..Default::default()
    };
    let mut keys = Keys {
        index: HashMap::new(),
    };
    let mut bad = Vec::new();
    for record in records {
        if let Some(r) = check(&record) {
            bad.push(r);
            continue;
        }
        let kind = record.kind();
        match record {
            Record::Account(a) => {
                let domain = identities::normalize_domain(a.domain.as_deref());
                let k = keys.idx(&mut out, a.key);
                if domain.is_some() {
                    out.domains[k as usize] = domain.clone();
                }
                let c = &mut out.accounts;
                c.key.push(k);
                c.name.push(opt(a.name));
                c.domain.push(domain);
                c.owner.push(opt(a.owner_email));
                c.plan.push(opt(a.plan));
                c.seats.push(a.seats);
                c.mrr.push(a.mrr.map(|m| m.as_str().to_string()));
                c.renewal.push(a.renewal_date);
            }
            Record::UsageEvent(e) => {
                let uid = e.uid();
                let k = keys.idx(&mut out, e.account_key);
                let c = &mut out.usage;
                c.key.push(k);
                c.uid.push(uid);
                c.user.push(opt(e.user_id));
                c.event.push(e.event);
                c.feature.push(opt(e.feature));
                c.at.push(e.occurred_at);
                c.count.push(e.count);
            }
            Record::UsageDaily(d) => {
                let k = keys.idx(&mut out, d.account_key);
                let c = &mut out.daily;
                c.key.push(k);
                c.day.push(d.day);
                c.user.push(opt(d.user_id).unwrap_or_default());
                c.event.push(d.event);
                c.feature.push(opt(d.feature).unwrap_or_default());
                c.count.push(d.count);
            }
            Record::Ticket(t) => {
                let k = keys.idx(&mut out, t.account_key);
                let c = &mut out.tickets;
                c.key.push(k);
                c.id.push(t.ticket_id);
                c.subject.push(opt(t.subject));
                c.priority.push(t.priority.as_str().to_string());
                c.status.push(t.status.as_str().to_string());
                c.opened.push(t.opened_at);
                c.closed.push(t.closed_at);
                c.csat.push(t.csat.map(i32::from));
            }
            Record::Subscription(s) => {
                let k = keys.idx(&mut out, s.account_key);
                let c = &mut out.subscriptions;
                c.key.push(k);
                c.id.push(s.subscription_id);
                c.status.push(s.status.as_str().to_string());
                c.mrr.push(s.mrr.map(|m| m.as_str().to_string()));
                c.period_end.push(s.current_period_end);
                c.cancel.push(s.cancel_at_period_end);
            }
            Record::Invoice(i) => {
                let currency = invoice_currency(i.currency.as_deref());
                let k = keys.idx(&mut out, i.account_key);
                let c = &mut out.invoices;
                c.key.push(k);
                c.id.push(i.invoice_id);
                c.amount.push(i.amount.as_str().to_string());
                c.currency.push(currency);
                c.due.push(i.due_date);
                c.paid.push(i.paid_at);
                c.status.push(i.status.as_str().to_string());
            }
            Record::Churn(ch) => {
                let k = keys.idx(&mut out, ch.account_key);
                out.churn.key.push(k);
                out.churn.at.push(ch.churned_at);
            }
        }
        out.records += 1;
        out.kinds.insert(kind);
    }
    out.rejections.extend(bad);
    dedupe_usage(&mut out.usage);
    out.usage_rollup = rollup(&out.usage);
    out
}

/// Drops repeated events (same account key and identity) within a batch: they are one event.
fn dedupe_usage(u: &mut UsageCols) {
    let mut seen = HashSet::with_capacity(u.uid.len());
    let keep: Vec<bool> = u
        .key
        .iter()
        .zip(&u.uid)
        .map(|(k, uid)| seen.insert((*k, uid.as_str())))
        .collect();
    drop(seen);
    if keep.iter().all(|k| *k) {
        return;
    }
    fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
        let mut i = 0;
        v.retain(|_| {
            i += 1;
            keep[i - 1]
        });
    }
    retain(&mut u.key, &keep);
    retain(&mut u.uid, &keep);
    retain(&mut u.user, &keep);
    retain(&mut u.event, &keep);
    retain(&mut u.feature, &keep);
    retain(&mut u.at, &keep);
    retain(&mut u.count, &keep);
}

/// Sums events per (account key, UTC day, user, event, feature), `''` for no user or feature.
fn rollup(u: &UsageCols) -> DailyCols {
    type Key<'a> = (u32, NaiveDate, &'a str, &'a str, &'a str);
    let mut sums: HashMap<Key<'_>, i64> = HashMap::new();
    for i in 0..u.key.len() {
        let key = (
            u.key[i],
            u.at[i].date_naive(),
            u.user[i].as_deref().unwrap_or(""),
            u.event[i].as_str(),
            u.feature[i].as_deref().unwrap_or(""),
        );
        *sums.entry(key).or_insert(0) += i64::from(u.count[i]);
    }
    let mut out = DailyCols::default();
    for ((k, day, user, event, feature), n) in sums {
        out.key.push(k);
        out.day.push(day);
        out.user.push(user.to_string());
        out.event.push(event.to_string());
        out.feature.push(feature.to_string());
        out.count.push(n);
    }
    out
}

/// Totals of a run's writes so far.
#[derive(Debug, Clone, Default)]
pub struct WriteTotals {
    pub batches: u64,
    pub records: u64,
    pub rejections: u64,
    pub kinds: BTreeSet<RecordKind>,
    /// Accounts the run wrote data for (to rescore).
    pub accounts: HashSet<i64>,
    pub cursor: Option<String>,
}

/// Writes the prepared batches of one run, in order, each in its own transaction.
pub struct BatchWriter {
    source: String,
    connector_id: i64,
    run_id: i64,
    /// Identities already resolved in this run (only those committed).
    identities: HashMap<String, i64>,
    pub totals: WriteTotals,
}

fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

fn ids(map: &HashMap<String, i64>, keys: &[String], idx: &[u32]) -> Vec<i64> {
    idx.iter().map(|i| map[&keys[*i as usize]]).collect()
}

impl BatchWriter {
    /// A writer for run `run_id` of the instance `source` (its name) with id `connector_id`.
    pub fn new(source: &str, connector_id: i64, run_id: i64) -> Self {
        BatchWriter {
            source: source.to_string(),
            connector_id,
            run_id,
            identities: HashMap::new(),
            totals: WriteTotals::default(),
        }
    }

    /// Writes one batch, its rejections, the run's progress and the cursor in one transaction.
    /// Fails with [`IngestError::RunNotActive`] (and writes nothing) once the run was marked
    /// finished elsewhere, so an abandoned connector thread can never write after its run ended.
    pub async fn write(
        &mut self,
        conn: &mut AsyncPgConnection,
        batch: PreparedBatch,
    ) -> Result<(), IngestError> {
        let known = &self.identities;
        let source = self.source.as_str();
        let connector_id = self.connector_id;
        let run_id = self.run_id;
        let stored_rejections = self.totals.rejections as i64;
        let batch_ref = &batch;
        let resolved = conn
            .transaction::<_, IngestError, _>(async |conn| {
                diesel::sql_query("SET LOCAL synchronous_commit = off")
                    .execute(conn)
                    .await?;
                let map = resolve_keys(conn, source, known, batch_ref).await?;
                write_rows(conn, source, &map, batch_ref).await?;
                store_rejections(conn, run_id, stored_rejections, &batch_ref.rejections).await?;
                diesel::sql_query(
                    "UPDATE connectors SET cursor = COALESCE($2, cursor), \
                     records_ingested = records_ingested + $3 WHERE id = $1",
                )
                .bind::<BigInt, _>(connector_id)
                .bind::<Nullable<Text>, _>(batch_ref.cursor.as_deref())
                .bind::<BigInt, _>(batch_ref.records as i64)
                .execute(conn)
                .await?;
                let n = diesel::sql_query(
                    "UPDATE connector_runs SET heartbeat_at = now(), \
                     records_ingested = records_ingested + $2, records_rejected = records_rejected + $3 \
                     WHERE id = $1 AND status = 'running'",
                )
                .bind::<BigInt, _>(run_id)
                .bind::<BigInt, _>(batch_ref.records as i64)
                .bind::<BigInt, _>(batch_ref.rejections.len() as i64)
                .execute(conn)
                .await?;
                if n == 0 {
                    return Err(IngestError::RunNotActive);
                }
                Ok(map)
            })
            .await?;
        let t = &mut self.totals;
        t.batches += 1;
        t.records += batch.records;
        t.rejections += batch.rejections.len() as u64;
        t.kinds.extend(batch.kinds.iter().copied());
        t.accounts.extend(resolved.values().copied());
        if batch.cursor.is_some() {
            t.cursor = batch.cursor;
        }
        self.identities.extend(resolved);
        Ok(())
    }
}

/// Account ids of every key of the batch: cached ones, the rest resolved in this transaction.
async fn resolve_keys(
    conn: &mut AsyncPgConnection,
    source: &str,
    known: &HashMap<String, i64>,
    batch: &PreparedBatch,
) -> Result<HashMap<String, i64>, IngestError> {
    let mut map = HashMap::with_capacity(batch.keys.len());
    let mut todo_keys = Vec::new();
    let mut todo_domains = Vec::new();
    for (k, d) in batch.keys.iter().zip(&batch.domains) {
        match known.get(k) {
            Some(id) => {
                map.insert(k.clone(), *id);
            }
            None => {
                todo_keys.push(k.clone());
                todo_domains.push(d.clone());
            }
        }
    }
    if !todo_keys.is_empty() {
        let found = identities::resolve(conn, source, &todo_keys, &todo_domains).await?;
        if found.len() < todo_keys.len() {
            return Err(IngestError::database(
                &"could not map every account key to an account",
            ));
        }
        map.extend(found);
    }
    Ok(map)
}

async fn write_rows(
    conn: &mut AsyncPgConnection,
    source: &str,
    map: &HashMap<String, i64>,
    b: &PreparedBatch,
) -> Result<(), IngestError> {
    let keys = &b.keys;
    let a = &b.accounts;
    if !a.key.is_empty() {
        // Later records of a key win; a domain another account already holds is not taken over.
        diesel::sql_query(
            "UPDATE accounts a SET \
               name = COALESCE(x.name, a.name), \
               domain = CASE WHEN x.domain IS NULL OR x.domain_rank > 1 OR EXISTS ( \
                          SELECT 1 FROM accounts o WHERE lower(o.domain) = x.domain AND o.id <> a.id) \
                        THEN a.domain ELSE x.domain END, \
               owner = COALESCE(x.owner, a.owner), plan = COALESCE(x.plan, a.plan), \
               seats = COALESCE(x.seats, a.seats), mrr = COALESCE(x.mrr::numeric, a.mrr), \
               renewal_date = COALESCE(x.renewal, a.renewal_date), updated_at = now() \
             FROM (SELECT *, row_number() OVER (PARTITION BY domain ORDER BY ord) AS domain_rank FROM ( \
                     SELECT DISTINCT ON (id) * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], \
                       $5::text[], $6::int4[], $7::text[], $8::date[]) WITH ORDINALITY \
                       AS u(id, name, domain, owner, plan, seats, mrr, renewal, ord) \
                     ORDER BY id, ord DESC) d) x \
             WHERE a.id = x.id",
        )
        .bind::<Array<Int8>, _>(ids(map, keys, &a.key))
        .bind::<Array<Nullable<Text>>, _>(&a.name)
        .bind::<Array<Nullable<Text>>, _>(&a.domain)
        .bind::<Array<Nullable<Text>>, _>(&a.owner)
        .bind::<Array<Nullable<Text>>, _>(&a.plan)
        .bind::<Array<Nullable<Int4>>, _>(&a.seats)
        .bind::<Array<Nullable<Text>>, _>(&a.mrr)
        .bind::<Array<Nullable<Date>>, _>(&a.renewal)
        .execute(conn)
        .await?;
    }
    let u = &b.usage;
    if !u.key.is_empty() {
        let account_ids = ids(map, keys, &u.key);
        // Fast path, for new events (the usual case): a plain insert, as cheap as it gets, and the
        // rollup the batch computed. A re-sent event makes it fail on the primary key; then the
        // savepoint is rolled back and the batch goes through the deduplicating statement.
        let fast = conn
            .transaction::<_, diesel::result::Error, _>(async |conn| {
                diesel::sql_query(
                    // unnest() in the select list zips the arrays without materialising them
                    // first (measurably cheaper than `FROM unnest(...)` for large batches).
                    "INSERT INTO usage_events (account_id, source, event_uid, user_id, event, feature, occurred_at, count) \
                     SELECT unnest($2::int8[]), $1, unnest($3::text[]), unnest($4::text[]), unnest($5::text[]), \
                       unnest($6::text[]), unnest($7::timestamptz[]), unnest($8::int4[])",
                )
                .bind::<Text, _>(source)
                .bind::<Array<Int8>, _>(&account_ids)
                .bind::<Array<Text>, _>(&u.uid)
                .bind::<Array<Nullable<Text>>, _>(&u.user)
                .bind::<Array<Text>, _>(&u.event)
                .bind::<Array<Nullable<Text>>, _>(&u.feature)
                .bind::<Array<Timestamptz>, _>(&u.at)
                .bind::<Array<Int4>, _>(&u.count)
                .execute(conn)
                .await
            })
            .await;
        match fast {
            Ok(_) => {
                let r = &b.usage_rollup;
                // Two source keys can map to one account: group again by account id.
                diesel::sql_query(
                    "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) \
                     SELECT a, day, usr, ev, feat, sum(n)::bigint \
                     FROM unnest($1::int8[], $2::date[], $3::text[], $4::text[], $5::text[], $6::int8[]) \
                       AS u(a, day, usr, ev, feat, n) \
                     GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 \
                     ON CONFLICT (account_id, day, user_id, event, feature) \
                     DO UPDATE SET events = usage_daily.events + EXCLUDED.events",
                )
                .bind::<Array<Int8>, _>(ids(map, keys, &r.key))
                .bind::<Array<Date>, _>(&r.day)
                .bind::<Array<Text>, _>(&r.user)
                .bind::<Array<Text>, _>(&r.event)
                .bind::<Array<Text>, _>(&r.feature)
                .bind::<Array<Int8>, _>(&r.count)
                .execute(conn)
                .await?;
            }
            Err(e) if is_unique_violation(&e) => {
                diesel::sql_query(
                    "WITH ins AS ( \
                       INSERT INTO usage_events (account_id, source, event_uid, user_id, event, feature, occurred_at, count) \
                       SELECT a, $1, uid, usr, ev, feat, at, n FROM unnest($2::int8[], $3::text[], $4::text[], \
                         $5::text[], $6::text[], $7::timestamptz[], $8::int4[]) AS u(a, uid, usr, ev, feat, at, n) \
                       ON CONFLICT DO NOTHING \
                       RETURNING account_id, user_id, event, feature, occurred_at, count) \
                     INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) \
                     SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, COALESCE(user_id, ''), event, \
                            COALESCE(feature, ''), sum(count) \
                     FROM ins GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 \
                     ON CONFLICT (account_id, day, user_id, event, feature) \
                     DO UPDATE SET events = usage_daily.events + EXCLUDED.events",
                )
                .bind::<Text, _>(source)
                .bind::<Array<Int8>, _>(&account_ids)
                .bind::<Array<Text>, _>(&u.uid)
                .bind::<Array<Nullable<Text>>, _>(&u.user)
                .bind::<Array<Text>, _>(&u.event)
                .bind::<Array<Nullable<Text>>, _>(&u.feature)
                .bind::<Array<Timestamptz>, _>(&u.at)
                .bind::<Array<Int4>, _>(&u.count)
                .execute(conn)
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let d = &b.daily;
    if !d.key.is_empty() {
        // The rollup gets the difference between what this source says now and said before.
        diesel::sql_query(
            "WITH input AS ( \
               SELECT DISTINCT ON (a, day, usr, ev, feat) a, day, usr, ev, feat, n \
               FROM unnest($2::int8[], $3::date[], $4::text[], $5::text[], $6::text[], $7::int8[]) \
                 WITH ORDINALITY AS u(a, day, usr, ev, feat, n, ord) \
               ORDER BY a, day, usr, ev, feat, ord DESC), \
             delta AS ( \
               SELECT i.*, i.n - COALESCE(x.events, 0) AS diff FROM input i \
               LEFT JOIN usage_daily_external x ON x.account_id = i.a AND x.source = $1 AND x.day = i.day \
                 AND x.user_id = i.usr AND x.event = i.ev AND x.feature = i.feat), \
             saved AS ( \
               INSERT INTO usage_daily_external (account_id, source, day, user_id, event, feature, events) \
               SELECT a, $1, day, usr, ev, feat, n FROM input \
               ON CONFLICT (account_id, source, day, user_id, event, feature) DO UPDATE SET events = EXCLUDED.events) \
             INSERT INTO usage_daily (account_id, day, user_id, event, feature, events) \
             SELECT a, day, usr, ev, feat, diff FROM delta WHERE diff <> 0 \
             ON CONFLICT (account_id, day, user_id, event, feature) \
             DO UPDATE SET events = usage_daily.events + EXCLUDED.events",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Int8>, _>(ids(map, keys, &d.key))
        .bind::<Array<Date>, _>(&d.day)
        .bind::<Array<Text>, _>(&d.user)
        .bind::<Array<Text>, _>(&d.event)
        .bind::<Array<Text>, _>(&d.feature)
        .bind::<Array<Int8>, _>(&d.count)
        .execute(conn)
        .await?;
    }
    let t = &b.tickets;
    if !t.key.is_empty() {
        diesel::sql_query(
            "INSERT INTO support_tickets (account_id, source, ticket_id, subject, priority, status, opened_at, closed_at, csat) \
             SELECT DISTINCT ON (a, id) a, $1, id, subj, prio, st, op, cl, cs::smallint \
             FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], \
               $8::timestamptz[], $9::int4[]) WITH ORDINALITY AS u(a, id, subj, prio, st, op, cl, cs, ord) \
             ORDER BY a, id, ord DESC \
             ON CONFLICT (account_id, source, ticket_id) DO UPDATE SET \
               subject = COALESCE(EXCLUDED.subject, support_tickets.subject), priority = EXCLUDED.priority, \
               status = EXCLUDED.status, opened_at = EXCLUDED.opened_at, \
               closed_at = COALESCE(EXCLUDED.closed_at, support_tickets.closed_at), \
               csat = COALESCE(EXCLUDED.csat, support_tickets.csat), updated_at = now()",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Int8>, _>(ids(map, keys, &t.key))
        .bind::<Array<Text>, _>(&t.id)
        .bind::<Array<Nullable<Text>>, _>(&t.subject)
        .bind::<Array<Text>, _>(&t.priority)
        .bind::<Array<Text>, _>(&t.status)
        .bind::<Array<Timestamptz>, _>(&t.opened)
        .bind::<Array<Nullable<Timestamptz>>, _>(&t.closed)
        .bind::<Array<Nullable<Int4>>, _>(&t.csat)
        .execute(conn)
        .await?;
    }
    let s = &b.subscriptions;
    if !s.key.is_empty() {
        diesel::sql_query(
            "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end, cancel_at_period_end) \
             SELECT DISTINCT ON (a, id) a, $1, id, st, mrr::numeric, pe, c \
             FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[]) \
               WITH ORDINALITY AS u(a, id, st, mrr, pe, c, ord) \
             ORDER BY a, id, ord DESC \
             ON CONFLICT (account_id, source, subscription_id) DO UPDATE SET \
               status = EXCLUDED.status, mrr = COALESCE(EXCLUDED.mrr, subscriptions.mrr), \
               current_period_end = COALESCE(EXCLUDED.current_period_end, subscriptions.current_period_end), \
               cancel_at_period_end = EXCLUDED.cancel_at_period_end, updated_at = now()",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Int8>, _>(ids(map, keys, &s.key))
        .bind::<Array<Text>, _>(&s.id)
        .bind::<Array<Text>, _>(&s.status)
        .bind::<Array<Nullable<Text>>, _>(&s.mrr)
        .bind::<Array<Nullable<Timestamptz>>, _>(&s.period_end)
        .bind::<Array<Bool>, _>(&s.cancel)
        .execute(conn)
        .await?;
    }
    let i = &b.invoices;
    if !i.key.is_empty() {
        diesel::sql_query(
            "INSERT INTO invoices (account_id, source, invoice_id, amount, currency, due_date, paid_at, status) \
             SELECT DISTINCT ON (a, id) a, $1, id, amt::numeric, cur, due, paid, st \
             FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::date[], $7::timestamptz[], $8::text[]) \
               WITH ORDINALITY AS u(a, id, amt, cur, due, paid, st, ord) \
             ORDER BY a, id, ord DESC \
             ON CONFLICT (account_id, source, invoice_id) DO UPDATE SET \
               amount = EXCLUDED.amount, currency = EXCLUDED.currency, due_date = EXCLUDED.due_date, \
               paid_at = COALESCE(EXCLUDED.paid_at, invoices.paid_at), status = EXCLUDED.status, \
               updated_at = now()",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Int8>, _>(ids(map, keys, &i.key))
        .bind::<Array<Text>, _>(&i.id)
        .bind::<Array<Text>, _>(&i.amount)
        .bind::<Array<Text>, _>(&i.currency)
        .bind::<Array<Date>, _>(&i.due)
        .bind::<Array<Nullable<Timestamptz>>, _>(&i.paid)
        .bind::<Array<Text>, _>(&i.status)
        .execute(conn)
        .await?;
    }
    let c = &b.churn;
    if !c.key.is_empty() {
        diesel::sql_query(
            "INSERT INTO churn_outcomes (account_id, churned_at, source) \
             SELECT a, at, $1 FROM unnest($2::int8[], $3::timestamptz[]) AS u(a, at) \
             ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(source)
        .bind::<Array<Int8>, _>(ids(map, keys, &c.key))
        .bind::<Array<Timestamptz>, _>(&c.at)
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Bytes of a stored rejection reason and file name (a plugin's text is cut, never refused).
const MAX_REASON_BYTES: usize = 2048;
const MAX_FILE_BYTES: usize = 1024;

/// `v` without NUL characters, cut to `max` bytes (at a character boundary, marked `...`).
fn stored_text(v: &str, max: usize) -> String {
    let v = v.replace('\0', "");
    if v.len() <= max {
        return v;
    }
    format!("{}...", &v[..char_floor(&v, max - 3)])
}

async fn store_rejections(
    conn: &mut AsyncPgConnection,
    run_id: i64,
    already: i64,
    rejections: &[Rejection],
) -> Result<(), IngestError> {
    let room = (MAX_STORED_REJECTIONS - already).max(0) as usize;
    let take = rejections.len().min(room);
    if take == 0 {
        return Ok(());
    }
    let slice = &rejections[..take];
    let files: Vec<Option<&str>> = slice.iter().map(|r| r.file.as_deref()).collect();
    let lines: Vec<Option<i64>> = slice
        .iter()
        .map(|r| r.line.map(|l| l.min(i64::MAX as u64) as i64))
        .collect();
    let reasons: Vec<String> = slice
        .iter()
        .map(|r| stored_text(&r.reason, MAX_REASON_BYTES))
        .collect();
    let files: Vec<Option<String>> = files
        .into_iter()
        .map(|f| f.map(|f| stored_text(f, MAX_FILE_BYTES)))
        .collect();
    diesel::sql_query(
        "INSERT INTO connector_run_rejections (run_id, seq, file, line, reason) \
         SELECT $1, $2 + ord::int, f, l, r FROM unnest($3::text[], $4::int8[], $5::text[]) \
           WITH ORDINALITY AS u(f, l, r, ord)",
    )
    .bind::<BigInt, _>(run_id)
    .bind::<Int4, _>(already as i32)
    .bind::<Array<Nullable<Text>>, _>(&files)
    .bind::<Array<Nullable<Int8>>, _>(&lines)
    .bind::<Array<Text>, _>(&reasons)
    .execute(conn)
    .await?;
    Ok(())
}

/// The [`BatchSink`] handed to a plugin: prepares each batch on the connector's thread and
/// queues it for the writer task. Batches are committed in order; once a write failed, every
/// later batch is refused with that error, so no later cursor can skip the failed batch.
pub struct IngestSink {
    queue: tokio::sync::mpsc::Sender<PreparedBatch>,
    failure: Arc<Mutex<Option<String>>>,
}

/// The writer half of an [`IngestSink`]: run [`SinkWriter::run`] on the async runtime.
pub struct SinkWriter {
    queue: tokio::sync::mpsc::Receiver<PreparedBatch>,
    failure: Arc<Mutex<Option<String>>>,
}

/// A connected sink and writer. `depth` batches may wait while one is being written.
pub fn sink_pair(depth: usize) -> (IngestSink, SinkWriter) {
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    let failure = Arc::new(Mutex::new(None));
    (
        IngestSink {
            queue: tx,
            failure: Arc::clone(&failure),
        },
        SinkWriter { queue: rx, failure },
    )
}

impl IngestSink {
    fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }
}

impl BatchSink for IngestSink {
    fn batch(&mut self, batch: Batch) -> Result<(), String> {
        if let Some(f) = self.failure() {
            return Err(f);
        }
        let prepared = prepare(batch);
        self.queue.blocking_send(prepared).map_err(|_| {
            self.failure()
                .unwrap_or_else(|| "the batch writer stopped".to_string())
        })
    }
}

impl SinkWriter {
    /// Writes queued batches until the sink is dropped or `stop` fires (an abandoned connector
    /// thread keeps its sink alive). `on_batch` sees the totals after each commit.
    pub async fn run(
        mut self,
        conn: &mut AsyncPgConnection,
        writer: &mut BatchWriter,
        stop: tokio_util::sync::CancellationToken,
        mut on_batch: impl FnMut(&WriteTotals),
    ) -> Result<(), IngestError> {
        loop {
            let next = tokio::select! {
                biased;
                b = self.queue.recv() => b,
                _ = stop.cancelled() => None,
            };
            let Some(batch) = next else { return Ok(()) };
            if let Err(e) = writer.write(conn, batch).await {
                if let Ok(mut f) = self.failure.lock() {
                    *f = Some(e.to_string());
                }
                self.queue.close();
                return Err(e);
            }
            on_batch(&writer.totals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use healthd_plugin_api::{Account, Ticket, TicketStatus, UsageEvent};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn prepare_rejects_bad_records_and_keeps_the_rest() {
        let ev = |key: &str, count: i32| {
            Record::UsageEvent(UsageEvent {
                account_key: key.into(),
                user_id: Some("".into()),
                event: "login".into(),
                feature: None,
                occurred_at: t("2026-11-26T08:00:00Z"),
                count,
                event_id: None,
            })
        };
        let batch = Batch {
            records: vec![
                ev("acme", 1),
                ev("", 1),
                ev("acme", 0),
                Record::Account(Account {
                    key: "beta".into(),
                    domain: Some("WWW.Beta.io".into()),
                    ..Default::default()
                }),
                Record::Ticket(Ticket {
                    account_key: "acme".into(),
                    ticket_id: "T1".into(),
                    subject: None,
                    priority: Default::default(),
                    status: TicketStatus::Open,
                    opened_at: t("2026-11-20T08:00:00Z"),
                    closed_at: None,
                    csat: Some(9),
                }),
            ],
            rejections: vec![],
            cursor: Some("c1".into()),
        };
        let p = prepare(batch);
        assert_eq!(p.records, 2);
        assert_eq!(p.rejections.len(), 3);
        assert!(p.rejections[0].reason.contains("missing account key"));
        assert!(p.rejections[1].reason.contains("count must be at least 1"));
        assert!(p.rejections[2].reason.contains("csat must be 1 to 5"));
        assert_eq!(p.keys, vec!["acme".to_string(), "beta".to_string()]);
        assert_eq!(p.domains[1].as_deref(), Some("beta.io"));
        assert_eq!(p.usage.user[0], None);
        assert_eq!(p.cursor.as_deref(), Some("c1"));
    }

    #[test]
    fn invoices_and_accounts_are_checked_with_their_reasons() {
        let invoice = |id: &str, currency: Option<&str>| {
            Record::Invoice(healthd_plugin_api::Invoice {
                account_key: "acme".into(),
                invoice_id: id.into(),
                amount: healthd_plugin_api::Money::parse("12.50").unwrap(),
                currency: currency.map(Into::into),
                due_date: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
                paid_at: None,
                status: healthd_plugin_api::InvoiceStatus::Open,
            })
        };
        let p = prepare(Batch {
            records: vec![
                invoice("I1", Some(" eur ")),
                invoice("I2", None),
                invoice("I3", Some("euro")),
                invoice(" ", None),
                Record::Account(Account {
                    key: "beta".into(),
                    seats: Some(-1),
                    ..Default::default()
                }),
                Record::Account(Account {
                    key: "gamma".into(),
                    name: Some("a\0b".into()),
                    ..Default::default()
                }),
            ],
            rejections: vec![],
            cursor: None,
        });
        assert_eq!(
            p.invoices.currency,
            vec!["EUR".to_string(), "USD".to_string()]
        );
        let reasons: Vec<&str> = p.rejections.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "invoice `I3` for account `acme`: currency must be a 3-letter code such as USD, got `EURO`",
                "invoice for account `acme`: missing or invalid invoice id",
                "account for account `beta`: seats must not be negative",
                "account for account `gamma`: a field contains a NUL character",
            ]
        );
    }

    #[test]
    fn repeated_events_in_a_batch_count_once_and_roll_up_per_day() {
        let ev = |user: &str, at: &str, id: Option<&str>| {
            Record::UsageEvent(UsageEvent {
                account_key: "a".into(),
                user_id: Some(user.into()),
                event: "page_view".into(),
                feature: None,
                occurred_at: t(at),
                count: 2,
                event_id: id.map(str::to_string),
            })
        };
        let p = prepare(Batch {
            records: vec![
                ev("u1", "2026-11-23T09:00:00Z", None),
                ev("u1", "2026-11-23T09:00:00Z", None),
                ev("u1", "2026-11-23T10:00:00Z", None),
                ev("u2", "2026-11-24T00:30:00Z", Some("e1")),
                ev("u2", "2026-11-24T00:31:00Z", Some("e1")),
            ],
            rejections: vec![],
            cursor: None,
        });
        assert_eq!(p.records, 5);
        assert_eq!(p.usage.uid.len(), 3);
        let mut days: Vec<(String, String, i64)> = (0..p.usage_rollup.key.len())
            .map(|i| {
                (
                    p.usage_rollup.day[i].to_string(),
                    p.usage_rollup.user[i].clone(),
                    p.usage_rollup.count[i],
                )
            })
            .collect();
        days.sort();
        assert_eq!(
            days,
            vec![
                ("2026-11-23".to_string(), "u1".to_string(), 4),
                ("2026-11-24".to_string(), "u2".to_string(), 2)
            ]
        );
    }
}
