//! `healthd bench scoring`: generates accounts with usage rollups, tickets, subscriptions and invoices
//! by set-based SQL, times a full rescore, times one bare SQL aggregate pass over the same input rows
//! (the least any scorer must read), and prints both, their ratio and the peak RSS.
//!
//! Run it against a scratch database: it adds `bench-<run>-<n>` accounts and rescores every account.

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::db::DbPool;
use crate::scoring::{rescore_at, RescoreScope};

/// The measured figures.
#[derive(Debug, Clone)]
pub struct ScoringBenchReport {
    pub accounts: usize,
    pub usage_rows: i64,
    pub usage_events: i64,
    pub tickets: i64,
    pub invoices: i64,
    pub generate_secs: f64,
    /// First full rescore (every account gets its first score, history and feed rows).
    pub rescore_secs: f64,
    /// A second full rescore an hour later (steady state: few changes).
    pub rescore_again_secs: f64,
    /// A full rescore a day later (the daily job: recency signals move, every account gets its
    /// daily history row).
    pub rescore_next_day_secs: f64,
    pub next_day_changed: usize,
    /// The rescore's own input aggregates for every account in one statement, rows kept in the
    /// database: the least a scorer reading these inputs must do.
    pub bare_pass_secs: f64,
    /// A simpler aggregate over the same rows (counts, sums, distinct users), for reference.
    pub minimal_pass_secs: f64,
    /// `rescore_secs / bare_pass_secs` (target: at most 2).
    pub ratio: f64,
    pub ratio_again: f64,
    pub accounts_scored: usize,
    /// Load / score / write split of the first rescore, in ms.
    pub phases_ms: (u64, u64, u64),
    pub phases_again_ms: (u64, u64, u64),
    /// Peak resident set size of this process, in KiB (`VmHWM`).
    pub peak_rss_kib: Option<u64>,
}

impl std::fmt::Display for ScoringBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "scoring benchmark")?;
        writeln!(
            f,
            "  data:        {} accounts, {} usage events in {} daily rollup rows, {} tickets, {} invoices (generated in {:.1} s)",
            self.accounts, self.usage_events, self.usage_rows, self.tickets, self.invoices, self.generate_secs
        )?;
        writeln!(
            f,
            "  bare pass:   {:.2} s (the rescore's input aggregates for all accounts in one SQL statement)",
            self.bare_pass_secs
        )?;
        writeln!(
            f,
            "  minimal pass: {:.2} s (counts, sums and distinct users over the same rows, for reference)",
            self.minimal_pass_secs
        )?;
        writeln!(
            f,
            "  rescore:     {:.2} s for {} accounts ({:.0} accounts/s), {:.2}x the bare pass",
            self.rescore_secs,
            self.accounts_scored,
            self.accounts_scored as f64 / self.rescore_secs.max(1e-9),
            self.ratio
        )?;
        writeln!(
            f,
            "               load inputs {} ms, score {} ms, write {} ms",
            self.phases_ms.0, self.phases_ms.1, self.phases_ms.2
        )?;
        writeln!(
            f,
            "  rescore again (steady state): {:.2} s, {:.2}x the bare pass (load {} ms, score {} ms, write {} ms)",
            self.rescore_again_secs, self.ratio_again, self.phases_again_ms.0, self.phases_again_ms.1, self.phases_again_ms.2
        )?;
        writeln!(
            f,
            "  rescore a day later (daily job): {:.2} s, {:.2}x the bare pass ({} scores changed)",
            self.rescore_next_day_secs,
            self.rescore_next_day_secs / self.bare_pass_secs.max(1e-9),
            self.next_day_changed
        )?;
        match self.peak_rss_kib {
            Some(k) => writeln!(f, "  peak RSS:    {:.1} MiB", k as f64 / 1024.0),
            None => writeln!(f, "  peak RSS:    unknown"),
        }
    }
}

/// Peak resident set size of this process (Linux), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[derive(QueryableByName)]
struct Range {
    #[diesel(sql_type = BigInt)]
    lo: i64,
    #[diesel(sql_type = BigInt)]
    hi: i64,
}

/// Generates the data set, then times a full rescore and the bare aggregate pass.
pub async fn run_scoring_bench(
    pool: &DbPool,
    accounts: usize,
    events: usize,
) -> Result<ScoringBenchReport, anyhow::Error> {
    anyhow::ensure!(accounts > 0, "--accounts must be positive");
    let now = Utc::now();
    let t0 = Instant::now();
    let (lo, hi) = generate(pool, accounts, events, now).await?;
    let generate_secs = t0.elapsed().as_secs_f64();

    let mut conn = pool.get().await?;
    #[derive(QueryableByName)]
    struct Sizes {
        #[diesel(sql_type = BigInt)]
        usage_rows: i64,
        #[diesel(sql_type = BigInt)]
        usage_events: i64,
        #[diesel(sql_type = BigInt)]
        tickets: i64,
        #[diesel(sql_type = BigInt)]
        invoices: i64,
    }
    let sizes: Sizes = diesel::sql_query(
        "SELECT u.rows AS usage_rows, u.events AS usage_events,
                (SELECT COUNT(*) FROM support_tickets WHERE account_id BETWEEN $1 AND $2) AS tickets,
                (SELECT COUNT(*) FROM invoices WHERE account_id BETWEEN $1 AND $2) AS invoices
         FROM (SELECT COUNT(*) AS rows, COALESCE(SUM(events), 0)::bigint AS events
               FROM usage_daily WHERE account_id BETWEEN $1 AND $2) u",
    )
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .get_result(&mut conn)
    .await?;

    // Reference passes first, so every timing sees a warm cache the same way.
    let minimal_pass_secs = minimal_pass(&mut conn, now).await?;
    let t = Instant::now();
    crate::scoring::inputs::aggregate_pass(&mut conn, now).await?;
    let bare_pass_secs = t.elapsed().as_secs_f64();
    drop(conn);

    let t = Instant::now();
    let summary = rescore_at(pool, RescoreScope::All, now).await?;
    let rescore_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let again = rescore_at(pool, RescoreScope::All, now + Duration::hours(1)).await?;
    let rescore_again_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let next_day = rescore_at(pool, RescoreScope::All, now + Duration::hours(25)).await?;
    let rescore_next_day_secs = t.elapsed().as_secs_f64();

    Ok(ScoringBenchReport {
        accounts,
        usage_rows: sizes.usage_rows,
        usage_events: sizes.usage_events,
        tickets: sizes.tickets,
        invoices: sizes.invoices,
        generate_secs,
        rescore_secs,
        rescore_again_secs,
        rescore_next_day_secs,
        next_day_changed: next_day.changed_account_ids.len(),
        bare_pass_secs,
        minimal_pass_secs,
        ratio: rescore_secs / bare_pass_secs.max(1e-9),
        ratio_again: rescore_again_secs / bare_pass_secs.max(1e-9),
        accounts_scored: summary.accounts_scored,
        phases_ms: (summary.load_ms, summary.score_ms, summary.write_ms),
        phases_again_ms: (again.load_ms, again.score_ms, again.write_ms),
        peak_rss_kib: peak_rss_kib(),
    })
}

/// The simplest aggregate over every input row a rescore reads (counts, sums, extremes and the
/// distinct users per account), without any scoring or writing.
async fn minimal_pass(
    conn: &mut diesel_async::AsyncPgConnection,
    now: DateTime<Utc>,
) -> Result<f64, anyhow::Error> {
    let t = Instant::now();
    diesel::sql_query(
        "SELECT ((SELECT COUNT(*) FROM (SELECT account_id, COUNT(*), SUM(events), MAX(day), COUNT(DISTINCT user_id)
                                          FROM usage_daily WHERE day <= ($1::timestamptz AT TIME ZONE 'UTC')::date
                                          GROUP BY account_id) u)
               + (SELECT COUNT(*) FROM (SELECT account_id, COUNT(*), MIN(opened_at), AVG(csat)
                                          FROM support_tickets WHERE opened_at <= $1 GROUP BY account_id) t)
               + (SELECT COUNT(*) FROM (SELECT account_id, COUNT(*), MAX(status) FROM subscriptions GROUP BY account_id) s)
               + (SELECT COUNT(*) FROM (SELECT account_id, COUNT(*), SUM(amount), MIN(due_date)
                                          FROM invoices GROUP BY account_id) i)
               + (SELECT COUNT(*) FROM accounts))::bigint AS n",
    )
    .bind::<Timestamptz, _>(now)
    .execute(conn)
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Inserts the data set with a handful of `INSERT ... SELECT FROM generate_series` statements.
/// Account classes by id: 1 in 10 gone quiet (nothing for 25+ days), 1 in 10 declining, 1 in 17
/// with an urgent ticket open, 1 in 13 with an overdue invoice, 1 in 29 cancelling; the rest steady.
async fn generate(
    pool: &DbPool,
    accounts: usize,
    events: usize,
    now: DateTime<Utc>,
) -> Result<(i64, i64), anyhow::Error> {
    let mut conn = pool.get().await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let range: Range = diesel::sql_query(
        "WITH ins AS (
            INSERT INTO accounts (key, name, plan, seats, mrr, renewal_date)
            SELECT 'bench-' || $1 || '-' || g, 'Bench ' || $1 || ' #' || g,
                   (ARRAY['starter', 'pro', 'enterprise'])[1 + g % 3], 5 + g % 50, 100 + (g % 20) * 50,
                   ($3::timestamptz AT TIME ZONE 'UTC')::date + (g % 365)::int
            FROM generate_series(1, $2) g
            RETURNING id)
         SELECT MIN(id) AS lo, MAX(id) AS hi FROM ins",
    )
    .bind::<Text, _>(&run)
    .bind::<BigInt, _>(accounts as i64)
    .bind::<Timestamptz, _>(now)
    .get_result(&mut conn)
    .await?;
    let (lo, hi) = (range.lo, range.hi);

    // Rows per account and events per row so that the total is about `events`.
    let per_account = (events as f64 / accounts as f64).max(1.0);
    let rows_per_account = (per_account / 4.0).ceil().max(1.0) as i64;
    let events_per_row = ((per_account / rows_per_account as f64).round() as i64).max(1);
    // Chunked by account range so one statement never holds millions of rows in memory at once.
    let chunk = 10_000i64;
    let mut start = lo;
    while start <= hi {
        let end = (start + chunk - 1).min(hi);
        diesel::sql_query(
            "INSERT INTO usage_daily (account_id, day, user_id, event, feature, events)
             SELECT a, ($1::timestamptz AT TIME ZONE 'UTC')::date
                       - (CASE WHEN a % 10 = 0 THEN 25 + k % 35
                               WHEN a % 10 = 1 THEN (CASE WHEN k % 4 = 0 THEN k % 30 ELSE 30 + k % 30 END)
                               ELSE k % 60 END)::int
                       - ((k / 60) % 30)::int,
                    'u' || ((k + a) % (3 + a % 20)),
                    CASE k % 4 WHEN 0 THEN 'login' WHEN 1 THEN 'page_view' ELSE 'use' END,
                    CASE WHEN k % 4 >= 2 THEN 'feature_' || ((k + a) % 7) ELSE '' END,
                    $2
             FROM generate_series($3::bigint, $4::bigint) a CROSS JOIN generate_series(0, $5 - 1) k
             ON CONFLICT DO NOTHING",
        )
        .bind::<Timestamptz, _>(now)
        .bind::<BigInt, _>(events_per_row)
        .bind::<BigInt, _>(start)
        .bind::<BigInt, _>(end)
        .bind::<BigInt, _>(rows_per_account)
        .execute(&mut conn)
        .await?;
        start = end + 1;
    }
    diesel::sql_query(
        "INSERT INTO support_tickets (account_id, source, ticket_id, subject, priority, status, opened_at, closed_at, csat)
         SELECT a, 'bench', 't' || k,
                'Ticket ' || k,
                CASE WHEN a % 17 = 0 AND k = 0 THEN 'urgent' WHEN k = 1 THEN 'high' ELSE 'normal' END,
                CASE WHEN (a % 17 = 0 AND k = 0) OR k = 2 THEN 'open' ELSE 'solved' END,
                $1::timestamptz - make_interval(days => ((a * 7 + k * 11) % 45)::int),
                CASE WHEN (a % 17 = 0 AND k = 0) OR k = 2 THEN NULL
                     ELSE $1::timestamptz - make_interval(days => ((a * 7 + k * 11) % 45)::int) + interval '1 day' END,
                CASE WHEN k = 1 THEN (1 + (a % 5))::smallint ELSE NULL END
         FROM generate_series($2::bigint, $3::bigint) a CROSS JOIN generate_series(0, 2) k
         WHERE k < 2 OR a % 5 = 0",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .execute(&mut conn)
    .await?;
    diesel::sql_query(
        "INSERT INTO subscriptions (account_id, source, subscription_id, status, mrr, current_period_end, cancel_at_period_end)
         SELECT a, 'bench', 'sub-' || a,
                CASE WHEN a % 23 = 0 THEN 'past_due' ELSE 'active' END,
                100 + (a % 20) * 50,
                $1::timestamptz + make_interval(days => (a % 30)::int),
                a % 29 = 0
         FROM generate_series($2::bigint, $3::bigint) a",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .execute(&mut conn)
    .await?;
    diesel::sql_query(
        "INSERT INTO invoices (account_id, source, invoice_id, amount, due_date, paid_at, status)
         SELECT a, 'bench', 'inv-' || a || '-' || m,
                100 + (a % 20) * 50,
                ($1::timestamptz AT TIME ZONE 'UTC')::date - (m * 30 + 5),
                CASE WHEN a % 13 = 0 AND m = 1 THEN NULL ELSE $1::timestamptz - make_interval(days => m * 30 + 6) END,
                CASE WHEN a % 13 = 0 AND m = 1 THEN 'open' ELSE 'paid' END
         FROM generate_series($2::bigint, $3::bigint) a CROSS JOIN generate_series(0, 2) m",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .execute(&mut conn)
    .await?;
    // Vacuumed and analysed, as autovacuum leaves tables written a while ago.
    for table in [
        "accounts",
        "usage_daily",
        "support_tickets",
        "subscriptions",
        "invoices",
    ] {
        diesel::sql_query(format!("VACUUM ANALYZE {table}"))
            .execute(&mut conn)
            .await?;
    }
    Ok((lo, hi))
}
