//! Bulk rescoring as a two-stage pipeline. The loader reads the inputs of a batch of accounts with
//! one statement and hands the batch on; writer tasks score each batch in Rust and write it in one
//! transaction with multi-row `UNNEST` statements: `health_current` for every account,
//! `health_scores` when the score or tier changed or the last history row is a day old, and
//! `score_changes` (the durable feed) when the score or tier changed (see [`write_batch`]). The
//! stages run on separate connections and threads, joined by a bounded channel, so loading overlaps
//! scoring and writing and memory stays at a few batches. The feed's insert trigger (migration
//! 000040) sends `NOTIFY healthd_events` with the batch's highest feed id in the same transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::mpsc;

use super::breakdown;
use super::engine::{self, EngineContext, Score};
use super::inputs::{self, BATCH_SIZE};
use super::model::{self, ActiveModels};
use super::signals::AccountInputs;
use super::ScoringError;
use crate::db::DbPool;

/// Loaded batches waiting for a writer. One lets the loader run a batch ahead; more would only
/// hold more memory.
const WRITE_QUEUE: usize = 1;

/// Writer tasks. While batches are being loaded, loading and writing each keep a core busy; once
/// the last batch is loaded, the second writer puts the loader's core to work on what is left.
/// Feed rows still commit in id order (see [`FEED_LOCK`]).
const WRITERS: usize = 2;

/// Taken (transaction-scoped) right before appending to `score_changes`, so feed rows commit in
/// id order across concurrent writers and processes: a reader that resumes after the highest id
/// it saw can never miss a row committed later with a lower id.
const FEED_LOCK: i64 = 7_368_500_050;

/// Which accounts to rescore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RescoreScope {
    /// Every account (the daily job, `healthd score`, `recomputeScores`).
    All,
    /// The accounts a connector run touched.
    Accounts(Vec<i64>),
}

/// What a rescore did. The alerts step reads `changed_account_ids` and the feed rows by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RescoreSummary {
    /// Accounts that got a score (accounts with no data of any kind stay unscored).
    pub accounts_scored: usize,
    /// Accounts looked at but left unscored for lack of any data.
    pub accounts_without_data: usize,
    /// Accounts whose score or tier changed (including first scores).
    pub changed_account_ids: Vec<i64>,
    /// `score_changes` ids appended, ascending.
    pub feed_ids: Vec<i64>,
    pub max_feed_id: Option<i64>,
    /// `health_scores` rows written.
    pub history_rows: usize,
    /// The active default model's version.
    pub model_version: i32,
    /// Every model version that scored an account in this run.
    pub model_versions: Vec<i32>,
    /// The moment T the scores are as of.
    pub computed_at: DateTime<Utc>,
    pub full: bool,
    pub elapsed_ms: u64,
    /// Time spent loading inputs, scoring in Rust, and writing, in milliseconds.
    pub load_ms: u64,
    pub score_ms: u64,
    pub write_ms: u64,
}

/// Rescores `scope` as of now. The entry point for connector runs and the daily job.
pub async fn rescore(pool: &DbPool, scope: RescoreScope) -> Result<RescoreSummary, ScoringError> {
    let alert_scope = match &scope {
        RescoreScope::All => crate::alerts::AlertScope::All,
        RescoreScope::Accounts(ids) => crate::alerts::AlertScope::Accounts(ids.clone()),
    };
    let summary = rescore_at(pool, scope, Utc::now()).await?;
    // Alerts follow the scores they are about, in their own transaction. A failure leaves the
    // scores in place; the periodic evaluation (alerts::run_periodic_evaluation) catches up.
    if let Err(e) = crate::alerts::evaluate(pool, &alert_scope).await {
        tracing::warn!(error = %e, "alert evaluation after rescoring failed");
    }
    Ok(summary)
}

/// `healthd score`: every account, now.
pub async fn recompute_now(pool: &DbPool) -> Result<RescoreSummary, ScoringError> {
    rescore(pool, RescoreScope::All).await
}

/// Everything a run shares across batches.
pub(crate) struct RunContext {
    pub models: ActiveModels,
    pub engine: EngineContext,
    pub support_synced: bool,
}

/// Loads models, freshness and key features as of `now`. `full` refreshes the derived key features.
pub(crate) async fn run_context(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    full: bool,
    with_freshness: bool,
) -> Result<RunContext, ScoringError> {
    let models = model::load_active(conn).await?;
    let wanted = std::iter::once(&models.default)
        .chain(models.segments.iter())
        .filter(|m| m.config.key_features.is_empty())
        .map(|m| m.config.key_feature_count)
        .max();
    let default_key_features = match wanted {
        Some(n) => inputs::key_features(conn, now, n, full).await?,
        None => Vec::new(),
    };
    let stale = if with_freshness {
        inputs::stale_sources(conn, now).await?
    } else {
        Vec::new()
    };
    let support_synced = inputs::support_synced(conn, now).await?;
    Ok(RunContext {
        models,
        engine: EngineContext {
            default_key_features,
            stale,
        },
        support_synced,
    })
}

/// Scores already-loaded inputs (pure; the engine per account with the model precedence rule).
pub(crate) fn score_batch(
    run: &RunContext,
    inputs: &[super::signals::AccountInputs],
    now: DateTime<Utc>,
) -> (Vec<Score>, usize) {
    let mut out = Vec::with_capacity(inputs.len());
    let mut without = 0;
    for i in inputs {
        let model = run.models.for_account(&i.fields);
        match engine::score_account(i, now, model, &run.engine) {
            Some(s) => out.push(s),
            None => without += 1,
        }
    }
    (out, without)
}

/// Rescores `scope` as of `now` (injectable so tests and rebuilds are deterministic).
pub async fn rescore_at(
    pool: &DbPool,
    scope: RescoreScope,
    now: DateTime<Utc>,
) -> Result<RescoreSummary, ScoringError> {
    let started = Instant::now();
    let full = scope == RescoreScope::All;
    let mut conn = pool.get().await?;
    let run = Arc::new(run_context(&mut conn, now, full, true).await?);
    let mut summary = RescoreSummary {
        model_version: run.models.default.version,
        computed_at: now,
        full,
        ..Default::default()
    };

    // The scoring and writing stage: WRITERS tasks (so scoring and serialising run beside the
    // loader's decoding), each taking a pool connection per batch (so a pool of two suffices).
    let (tx, rx) = mpsc::channel::<Vec<AccountInputs>>(WRITE_QUEUE);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| tokio::spawn(write_stage(pool.clone(), run.clone(), rx.clone(), now)))
        .collect();
    drop(rx);

    let loaded = load_stage(&mut conn, &run, &scope, now, &tx, &mut summary).await;
    // Closing the channel lets the writers finish what they have and report.
    drop(tx);
    let mut written = Vec::with_capacity(WRITERS);
    for w in writers {
        written.push(
            w.await
                .map_err(|e| ScoringError::Db(format!("rescore writer task failed: {e}")))?,
        );
    }
    // A loader error wins (the writers then only stopped for lack of work); otherwise a write error.
    loaded?;
    let mut versions_used = std::collections::BTreeSet::new();
    let mut all = Written::default();
    for w in written {
        let w = w?;
        // Writers run side by side: each phase took as long as in the busiest writer.
        summary.write_ms = summary.write_ms.max(w.write_ms);
        summary.score_ms = summary.score_ms.max(w.score_ms);
        summary.accounts_scored += w.accounts_scored;
        summary.accounts_without_data += w.accounts_without_data;
        versions_used.extend(w.model_versions);
        all.add(w.written);
    }
    summary.model_versions = versions_used.into_iter().collect();
    summary.history_rows = all.history_rows;
    summary.changed_account_ids = all.changed;
    summary.feed_ids = all.feed_ids;
    summary.feed_ids.sort_unstable();
    summary.max_feed_id = summary.feed_ids.last().copied();
    if full {
        // Current scores of accounts deleted while a rescore wrote them (there is no foreign key).
        diesel::sql_query(
            "DELETE FROM health_current hc WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = hc.account_id)",
        )
        .execute(&mut conn)
        .await?;
        diesel::sql_query("UPDATE scoring_state SET last_full_finished_at = $1, last_full_accounts = $2 WHERE id = 1")
            .bind::<Timestamptz, _>(now)
            .bind::<Integer, _>(summary.accounts_scored as i32)
            .execute(&mut conn)
            .await?;
    }
    drop(conn);
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    metrics::counter!("healthd_scoring_accounts_scored_total")
        .increment(summary.accounts_scored as u64);
    metrics::counter!("healthd_scoring_score_changes_total")
        .increment(summary.changed_account_ids.len() as u64);
    metrics::histogram!("healthd_scoring_rescore_seconds", "scope" => if full { "all" } else { "accounts" })
        .record(started.elapsed().as_secs_f64());
    tracing::info!(
        scored = summary.accounts_scored,
        changed = summary.changed_account_ids.len(),
        history_rows = summary.history_rows,
        elapsed_ms = summary.elapsed_ms,
        full,
        "rescore finished"
    );

    // Alerts are evaluated in `rescore` (now), not here: backfills and benchmarks at a given time
    // must not raise alerts.

    Ok(summary)
}

/// The loader stage: batches of account ids in id order, inputs loaded with one statement per
/// batch and handed to the writers. Fills `summary.load_ms`.
async fn load_stage(
    conn: &mut AsyncPgConnection,
    run: &RunContext,
    scope: &RescoreScope,
    now: DateTime<Utc>,
    tx: &mpsc::Sender<Vec<AccountInputs>>,
    summary: &mut RescoreSummary,
) -> Result<(), ScoringError> {
    let csat_window = run.models.default.config.csat_window_days;
    let explicit: Option<Vec<i64>> = match scope {
        RescoreScope::All => None,
        RescoreScope::Accounts(ids) => {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
    };
    let mut last_id = i64::MIN;
    let mut chunks = explicit.as_deref().map(|ids| ids.chunks(BATCH_SIZE));
    loop {
        let ids = match &mut chunks {
            Some(chunks) => match chunks.next() {
                Some(chunk) => chunk.to_vec(),
                None => break,
            },
            None => {
                let ids = next_account_ids(conn, last_id, BATCH_SIZE).await?;
                match ids.last() {
                    Some(l) => last_id = *l,
                    None => break,
                }
                ids
            }
        };
        let phase = Instant::now();
        let inputs =
            inputs::load_inputs_at(conn, &ids, now, run.support_synced, csat_window).await?;
        summary.load_ms += phase.elapsed().as_millis() as u64;
        if tx.send(inputs).await.is_err() {
            // The writers stopped on errors, which they report.
            break;
        }
    }
    Ok(())
}

/// What one writer task did over the whole run.
#[derive(Default)]
struct WriteTotals {
    accounts_scored: usize,
    accounts_without_data: usize,
    model_versions: std::collections::BTreeSet<i32>,
    score_ms: u64,
    write_ms: u64,
    written: Written,
}

/// A scoring and writing task: scores each loaded batch and writes it in its own transaction.
/// Stops at its first error (when every writer has stopped, the receiver is dropped, which stops
/// the loader).
async fn write_stage(
    pool: DbPool,
    run: Arc<RunContext>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<AccountInputs>>>>,
    now: DateTime<Utc>,
) -> Result<WriteTotals, ScoringError> {
    let mut totals = WriteTotals::default();
    loop {
        // The lock is held only while waiting for the next batch, not while writing it.
        let Some(inputs) = rx.lock().await.recv().await else {
            break;
        };
        let phase = Instant::now();
        let (scores, without) = score_batch(&run, &inputs, now);
        drop(inputs);
        totals.score_ms += phase.elapsed().as_millis() as u64;
        totals.accounts_without_data += without;
        totals.accounts_scored += scores.len();
        totals
            .model_versions
            .extend(scores.iter().map(|s| s.model_version));
        if scores.is_empty() {
            continue;
        }
        // A connection per batch, returned right after: with a small pool the writers take turns
        // instead of one waiting for a connection the other holds for the whole run.
        let mut conn = pool.get().await?;
        let phase = Instant::now();
        let written = write_batch(&mut conn, &scores, now).await?;
        drop(conn);
        totals.write_ms += phase.elapsed().as_millis() as u64;
        totals.written.add(written);
    }
    Ok(totals)
}

/// The next `limit` account ids after `after`, in id order (batches of a full pass).
pub(crate) async fn next_account_ids(
    conn: &mut AsyncPgConnection,
    after: i64,
    limit: usize,
) -> Result<Vec<i64>, ScoringError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let rows: Vec<Id> =
        diesel::sql_query("SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
            .bind::<BigInt, _>(after)
            .bind::<BigInt, _>(limit as i64)
            .load(conn)
            .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// What was written: per batch, then summed per writer and per run.
#[derive(Default)]
struct Written {
    changed: Vec<i64>,
    feed_ids: Vec<i64>,
    history_rows: usize,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.changed.extend(other.changed);
        self.feed_ids.extend(other.feed_ids);
        self.history_rows += other.history_rows;
    }
}

#[derive(QueryableByName)]
struct Previous {
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = Double)]
    score: f64,
    #[diesel(sql_type = Text)]
    tier: String,
    #[diesel(sql_type = Bool)]
    stale: bool,
    #[diesel(sql_type = Integer)]
    model_version: i32,
    #[diesel(sql_type = Nullable<Double>)]
    previous_score: Option<f64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    signals_digest: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    history_at: Option<DateTime<Utc>>,
}

/// FNV-1a: a digest of the serialized signals that is stable across builds and Rust versions (it
/// is stored); a collision only means one write is skipped until the next real change (the score
/// and tier are compared separately).
fn digest(text: &str) -> i64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(text.as_bytes());
    h.finish() as i64
}

/// What becomes of one account's score in [`write_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// A history row with the new breakdown, and the current row upserted to name it: a changed
    /// score or tier, a first score, or a changed breakdown once the last history row is a day old.
    Fresh,
    /// Same score and tier, new numbers in the breakdown: the current row holds the breakdown until
    /// the next history row takes it over.
    Restate,
    /// Nothing changed but the last history row is a day old: the day's history row is a copy of the
    /// current breakdown made inside the database.
    Carry,
    /// Nothing changed: only `computed_at` moves.
    Touch,
}

/// The decisions for one batch, made from the locked current rows (pure, so testable alone).
struct BatchPlan {
    /// Per score, in batch order.
    writes: Vec<Write>,
    /// The score before this one, as `health_current.previous_score` keeps it.
    previous_scores: Vec<Option<f64>>,
    /// Indexes of the scores whose score or tier changed (first scores included): the feed rows.
    changed: Vec<usize>,
}

fn plan_batch(
    scores: &[Score],
    digests: &[i64],
    prev: &HashMap<i64, Previous>,
    now: DateTime<Utc>,
) -> BatchPlan {
    let mut plan = BatchPlan {
        writes: Vec::with_capacity(scores.len()),
        previous_scores: Vec::with_capacity(scores.len()),
        changed: Vec::new(),
    };
    for (i, s) in scores.iter().enumerate() {
        let p = prev.get(&s.account_id);
        let is_change =
            p.is_none_or(|p| (p.score - s.score).abs() > 1e-9 || p.tier != s.tier.as_str());
        let same_content = !is_change
            && p.is_some_and(|p| {
                p.history_at.is_some()
                    && p.signals_digest == Some(digests[i])
                    && p.stale == s.stale
                    && p.model_version == s.model_version
            });
        let history_due = p
            .and_then(|p| p.history_at)
            .is_none_or(|t| now - t >= Duration::hours(24));
        if is_change {
            plan.changed.push(i);
        }
        // previous_score moves only when the score changes, so `score_change` keeps saying how the
        // latest change went after unchanged rescores.
        plan.previous_scores.push(match p {
            None => None,
            Some(p) if is_change => Some(p.score),
            Some(p) => p.previous_score,
        });
        plan.writes
            .push(match (is_change, same_content, history_due) {
                (true, _, _) | (false, false, true) => Write::Fresh,
                (false, false, false) => Write::Restate,
                (false, true, true) => Write::Carry,
                (false, true, false) => Write::Touch,
            });
    }
    plan
}

/// Writes one batch of scores in one transaction. Each breakdown is stored once: in the history
/// row `health_current.history_at` names, or, when it changed since without a change of score or
/// tier, in `health_current.signals` (history rows follow score and tier changes plus one a day,
/// not every new number in an explanation). See [`Write`] for what each account gets; feed rows
/// for score or tier changes are appended in the same transaction.
async fn write_batch(
    conn: &mut AsyncPgConnection,
    scores: &[Score],
    now: DateTime<Utc>,
) -> Result<Written, ScoringError> {
    if scores.is_empty() {
        return Ok(Written::default());
    }
    let ids: Vec<i64> = scores.iter().map(|s| s.account_id).collect();
    // Serialise outside the transaction: it is the main CPU cost on this side.
    let texts: Vec<String> = scores
        .iter()
        .map(|s| breakdown::encode(&s.signals))
        .collect();
    let digests: Vec<i64> = texts.iter().map(|t| digest(t)).collect();
    conn.transaction::<Written, ScoringError, _>(async |conn| {
        // Lock the current rows: concurrent rescores of the same accounts serialise here.
        let prev: Vec<Previous> = diesel::sql_query(
            "SELECT account_id, score, tier, stale, model_version, previous_score, signals_digest, history_at
             FROM health_current WHERE account_id = ANY($1) FOR UPDATE",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .load(conn)
        .await?;
        let prev: HashMap<i64, Previous> = prev.into_iter().map(|p| (p.account_id, p)).collect();
        let plan = plan_batch(scores, &digests, &prev, now);
        let of = |kind: Write| -> Vec<usize> {
            (0..scores.len()).filter(|&i| plan.writes[i] == kind).collect()
        };
        let (fresh, restate, carry, touch) = (
            of(Write::Fresh),
            of(Write::Restate),
            of(Write::Carry),
            of(Write::Touch),
        );
        let rows = BatchRows {
            scores,
            texts: &texts,
            digests: &digests,
            previous_scores: &plan.previous_scores,
        };

        touch_current(conn, now, &touch.iter().map(|&i| ids[i]).collect::<Vec<_>>()).await?;
        carry_history(conn, now, &carry.iter().map(|&i| ids[i]).collect::<Vec<_>>()).await?;
        restate_current(conn, now, &rows, &restate).await?;
        write_fresh(conn, now, &rows, &fresh).await?;
        let feed_ids = append_feed(conn, now, scores, &prev, &plan.changed).await?;
        Ok(Written {
            changed: plan.changed.iter().map(|&i| ids[i]).collect(),
            feed_ids,
            history_rows: fresh.len() + carry.len(),
        })
    })
    .await
}

/// A batch's scores with what [`write_batch`] derived for them, indexed alike.
struct BatchRows<'a> {
    scores: &'a [Score],
    texts: &'a [String],
    digests: &'a [i64],
    previous_scores: &'a [Option<f64>],
}

/// The columns every write of a breakdown binds, for the scores at `which`.
struct BreakdownColumns<'a> {
    ids: Vec<i64>,
    stale: Vec<bool>,
    version: Vec<i32>,
    signals: Vec<&'a str>,
    digest: Vec<i64>,
}

impl<'a> BatchRows<'a> {
    fn breakdown_columns(&self, which: &[usize]) -> BreakdownColumns<'a> {
        let (scores, texts) = (self.scores, self.texts);
        BreakdownColumns {
            ids: which.iter().map(|&i| scores[i].account_id).collect(),
            stale: which.iter().map(|&i| scores[i].stale).collect(),
            version: which.iter().map(|&i| scores[i].model_version).collect(),
            signals: which.iter().map(|&i| texts[i].as_str()).collect(),
            digest: which.iter().map(|&i| self.digests[i]).collect(),
        }
    }
}

/// [`Write::Touch`]: only `computed_at` moves.
async fn touch_current(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    ids: &[i64],
) -> Result<(), ScoringError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "UPDATE health_current SET computed_at = $1 WHERE account_id = ANY($2) AND computed_at <= $1",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`Write::Carry`]: the current breakdown (restated in the current row, or that of the last
/// history row) copied into the day's history row, which the current row then names.
async fn carry_history(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    ids: &[i64],
) -> Result<(), ScoringError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "WITH copied AS (
            INSERT INTO health_scores (account_id, computed_at, score, tier, stale, model_version, signals)
            SELECT h.account_id, $1, h.score, h.tier, h.stale, h.model_version, h.signals
            FROM current_health_scores h
            WHERE h.account_id = ANY($2) AND h.computed_at <= $1 AND h.signals IS NOT NULL
            ON CONFLICT (account_id, computed_at) DO UPDATE SET
               score = EXCLUDED.score, tier = EXCLUDED.tier, stale = EXCLUDED.stale,
               model_version = EXCLUDED.model_version, signals = EXCLUDED.signals
            RETURNING account_id)
         UPDATE health_current h SET computed_at = $1, history_at = $1, signals = NULL
         FROM copied c WHERE h.account_id = c.account_id",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`Write::Restate`]: the current row takes the new breakdown; no history row.
async fn restate_current(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    rows: &BatchRows<'_>,
    which: &[usize],
) -> Result<(), ScoringError> {
    if which.is_empty() {
        return Ok(());
    }
    let c = rows.breakdown_columns(which);
    diesel::sql_query(
        "UPDATE health_current h SET computed_at = $1, stale = x.stale, model_version = x.model_version,
                signals = x.signals::json, signals_digest = x.digest
         FROM unnest($2::bigint[], $3::bool[], $4::int[], $5::text[], $6::bigint[])
              AS x(account_id, stale, model_version, signals, digest)
         WHERE h.account_id = x.account_id AND h.computed_at <= $1",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(&c.ids)
    .bind::<Array<Bool>, _>(&c.stale)
    .bind::<Array<Integer>, _>(&c.version)
    .bind::<Array<Text>, _>(&c.signals)
    .bind::<Array<BigInt>, _>(&c.digest)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`Write::Fresh`]: the history row with the new breakdown and the current row naming it, in one
/// statement.
async fn write_fresh(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    rows: &BatchRows<'_>,
    which: &[usize],
) -> Result<(), ScoringError> {
    if which.is_empty() {
        return Ok(());
    }
    let scores = rows.scores;
    let c = rows.breakdown_columns(which);
    let score: Vec<f64> = which.iter().map(|&i| scores[i].score).collect();
    let tier: Vec<&str> = which.iter().map(|&i| scores[i].tier.as_str()).collect();
    let previous: Vec<Option<f64>> = which.iter().map(|&i| rows.previous_scores[i]).collect();
    let change: Vec<f64> = which
        .iter()
        .map(|&i| {
            rows.previous_scores[i].map_or(0.0, |ps| ((scores[i].score - ps) * 10.0).round() / 10.0)
        })
        .collect();
    diesel::sql_query(
        "WITH x AS (
            SELECT * FROM unnest($2::bigint[], $3::float8[], $4::text[], $5::bool[], $6::int[], $7::text[],
                                 $8::bigint[], $9::float8[], $10::float8[])
                 AS x(account_id, score, tier, stale, model_version, signals, digest, previous_score, score_change)
            -- Only accounts that still exist (no foreign key checks each row; see migration 000060).
            WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.account_id)),
         history AS (
            INSERT INTO health_scores (account_id, computed_at, score, tier, stale, model_version, signals)
            SELECT x.account_id, $1, x.score, x.tier, x.stale, x.model_version, x.signals::json FROM x
            ON CONFLICT (account_id, computed_at) DO UPDATE SET
               score = EXCLUDED.score, tier = EXCLUDED.tier, stale = EXCLUDED.stale,
               model_version = EXCLUDED.model_version, signals = EXCLUDED.signals)
         INSERT INTO health_current
            (account_id, computed_at, score, tier, stale, model_version, history_at, signals, signals_digest,
             previous_score, score_change)
         SELECT x.account_id, $1, x.score, x.tier, x.stale, x.model_version, $1, NULL, x.digest,
                x.previous_score, x.score_change
         FROM x
         ON CONFLICT (account_id) DO UPDATE SET
            computed_at = EXCLUDED.computed_at, score = EXCLUDED.score, tier = EXCLUDED.tier,
            stale = EXCLUDED.stale, model_version = EXCLUDED.model_version, history_at = EXCLUDED.history_at,
            signals = NULL, signals_digest = EXCLUDED.signals_digest, previous_score = EXCLUDED.previous_score,
            score_change = EXCLUDED.score_change
         WHERE health_current.computed_at <= EXCLUDED.computed_at",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(&c.ids)
    .bind::<Array<Double>, _>(&score)
    .bind::<Array<Text>, _>(&tier)
    .bind::<Array<Bool>, _>(&c.stale)
    .bind::<Array<Integer>, _>(&c.version)
    .bind::<Array<Text>, _>(&c.signals)
    .bind::<Array<BigInt>, _>(&c.digest)
    .bind::<Array<Nullable<Double>>, _>(&previous)
    .bind::<Array<Double>, _>(&change)
    .execute(conn)
    .await?;
    Ok(())
}

/// Feed rows for the `changed` scores, in batch order, under [`FEED_LOCK`]. No drivers: readers
/// derive them from the history row written at the same moment (migration 000060), so the
/// breakdown is not stored a second time. Returns the new ids.
async fn append_feed(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    scores: &[Score],
    prev: &HashMap<i64, Previous>,
    changed: &[usize],
) -> Result<Vec<i64>, ScoringError> {
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<BigInt, _>(FEED_LOCK)
        .execute(conn)
        .await?;
    let before = |i: usize| prev.get(&scores[i].account_id);
    let ids: Vec<i64> = changed.iter().map(|&i| scores[i].account_id).collect();
    let prev_score: Vec<Option<f64>> = changed
        .iter()
        .map(|&i| before(i).map(|p| p.score))
        .collect();
    let score: Vec<f64> = changed.iter().map(|&i| scores[i].score).collect();
    let prev_tier: Vec<Option<&str>> = changed
        .iter()
        .map(|&i| before(i).map(|p| p.tier.as_str()))
        .collect();
    let tier: Vec<&str> = changed.iter().map(|&i| scores[i].tier.as_str()).collect();
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let rows: Vec<Id> = diesel::sql_query(
        "INSERT INTO score_changes (account_id, previous_score, score, previous_tier, tier, changed_at)
         SELECT x.account_id, x.previous_score, x.score, x.previous_tier, x.tier, $1
         FROM unnest($2::bigint[], $3::float8[], $4::float8[], $5::text[], $6::text[])
              WITH ORDINALITY AS x(account_id, previous_score, score, previous_tier, tier, n)
         ORDER BY x.n
         RETURNING id",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<Array<Nullable<Double>>, _>(&prev_score)
    .bind::<Array<Double>, _>(&score)
    .bind::<Array<Nullable<Text>>, _>(&prev_tier)
    .bind::<Array<Text>, _>(&tier)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::engine::Tier;

    fn score(account_id: i64, score: f64) -> Score {
        Score {
            account_id,
            score,
            tier: Tier::Healthy,
            stale: false,
            model_version: 1,
            signals: Vec::new(),
        }
    }

    fn previous(account_id: i64, score: f64, digest: i64, history_at: DateTime<Utc>) -> Previous {
        Previous {
            account_id,
            score,
            tier: "healthy".into(),
            stale: false,
            model_version: 1,
            previous_score: Some(70.0),
            signals_digest: Some(digest),
            history_at: Some(history_at),
        }
    }

    #[test]
    fn digests_are_fnv1a_as_stored_by_earlier_versions() {
        assert_eq!(digest(""), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_eq!(digest("a"), 0xaf63_dc4c_8601_ec8c_u64 as i64);
    }

    #[test]
    fn each_account_gets_the_least_write_that_keeps_history_true() {
        let now = Utc::now();
        let hour_ago = now - Duration::hours(1);
        let day_ago = now - Duration::hours(25);
        let scores = [
            score(1, 80.0), // first score
            score(2, 75.0), // score changed
            score(3, 80.0), // same score, new breakdown
            score(4, 80.0), // same score, new breakdown, history a day old
            score(5, 80.0), // nothing changed
            score(6, 80.0), // nothing changed, history a day old
        ];
        let digests = [7, 7, 8, 8, 7, 7];
        let prev: HashMap<i64, Previous> = [
            previous(2, 80.0, 7, hour_ago),
            previous(3, 80.0, 7, hour_ago),
            previous(4, 80.0, 7, day_ago),
            previous(5, 80.0, 7, hour_ago),
            previous(6, 80.0, 7, day_ago),
        ]
        .into_iter()
        .map(|p| (p.account_id, p))
        .collect();
        let plan = plan_batch(&scores, &digests, &prev, now);
        assert_eq!(
            plan.writes,
            [
                Write::Fresh,
                Write::Fresh,
                Write::Restate,
                Write::Fresh,
                Write::Touch,
                Write::Carry
            ]
        );
        assert_eq!(plan.changed, [0, 1]);
        assert_eq!(
            plan.previous_scores,
            [
                None,
                Some(80.0),
                Some(70.0),
                Some(70.0),
                Some(70.0),
                Some(70.0)
            ]
        );
    }
}
