//! Evaluating the rules: one set-based statement over the accounts in scope raises new alerts
//! (at most one unresolved per account and rule, none within the cool-down) and resolves those
//! whose condition has cleared by its margin.

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Jsonb};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{rules, AlertError};
use crate::app::AppState;
use crate::db::{DbError, DbPool};

/// Which accounts to evaluate.
#[derive(Debug, Clone)]
pub enum AlertScope {
    All,
    Accounts(Vec<i64>),
}

/// What one evaluation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct EvaluationSummary {
    #[diesel(sql_type = BigInt)]
    pub raised: i64,
    #[diesel(sql_type = BigInt)]
    pub resolved: i64,
    /// Snoozed alerts whose snooze ended and that are open again.
    #[diesel(sql_type = BigInt)]
    pub reopened: i64,
}

/// Facts per account in scope, the condition per rule, then one insert and one update.
/// `$1` is the settings document ([`rules::RuleSet::to_sql_json`]); `{SCOPE}` a fixed WHERE clause.
const EVALUATE_SQL: &str = r#"
WITH st AS (SELECT $1::jsonb AS s),
scope AS (SELECT a.id, a.owner, a.renewal_date FROM accounts a {SCOPE}),
facts AS (
    SELECT sc.id AS account_id, sc.owner, sc.renewal_date,
           hc.score, hc.tier,
           CASE hc.tier WHEN 'healthy' THEN 0 WHEN 'at_risk' THEN 1 WHEN 'critical' THEN 2 END AS tier_rank,
           coalesce(drv.drivers, '[]'::jsonb) AS drivers, drv.why,
           peak.peak, best.best_rank,
           lg.last_login, fu.first_day,
           inv.n AS overdue_n, inv.amount AS overdue_amount, inv.oldest_days AS overdue_days,
           inv.usd AS overdue_usd, inv.currency AS overdue_currency,
           tk.open_n AS urgent_open, tk.old_n AS urgent_old, tk.oldest_days AS urgent_oldest_days
    FROM scope sc
    CROSS JOIN st
    LEFT JOIN current_health_scores hc ON hc.account_id = sc.id
    -- The score's drivers (signals that cost points), worst first; the top three explain the alert.
    LEFT JOIN LATERAL (
        SELECT jsonb_agg(d.s::jsonb ORDER BY d.impact DESC) AS drivers,
               string_agg(d.s ->> 'explanation', '; ' ORDER BY d.impact DESC) FILTER (WHERE d.rn <= 3) AS why
        FROM (
            SELECT x.s, (x.s ->> 'impact')::float8 AS impact,
                   row_number() OVER (ORDER BY (x.s ->> 'impact')::float8 DESC) AS rn
            FROM json_array_elements(CASE WHEN json_typeof(hc.signals) = 'array' THEN hc.signals ELSE '[]'::json END) AS x(s)
            WHERE json_typeof(x.s -> 'impact') = 'number' AND (x.s ->> 'impact')::float8 > 0
        ) d
    ) drv ON true
    -- Highest score within the score_drop window (history rows and the feed's previous scores).
    LEFT JOIN LATERAL (
        SELECT max(w.v) AS peak FROM (
            SELECT hs.score AS v FROM health_scores hs
            WHERE hs.account_id = sc.id
              AND hs.computed_at >= now() - make_interval(days => (st.s #>> '{rules,score_drop,window_days}')::int)
            UNION ALL
            SELECT ch.previous_score FROM score_changes ch
            WHERE ch.account_id = sc.id
              AND ch.changed_at >= now() - make_interval(days => (st.s #>> '{rules,score_drop,window_days}')::int)
        ) w
    ) peak ON true
    -- Best tier within the tier_worsened window.
    LEFT JOIN LATERAL (
        SELECT min(CASE w.t WHEN 'healthy' THEN 0 WHEN 'at_risk' THEN 1 WHEN 'critical' THEN 2 END) AS best_rank FROM (
            SELECT hs.tier AS t FROM health_scores hs
            WHERE hs.account_id = sc.id
              AND hs.computed_at >= now() - make_interval(days => (st.s #>> '{rules,tier_worsened,window_days}')::int)
            UNION ALL
            SELECT ch.previous_tier FROM score_changes ch
            WHERE ch.account_id = sc.id
              AND ch.changed_at >= now() - make_interval(days => (st.s #>> '{rules,tier_worsened,window_days}')::int)
        ) w
    ) best ON true
    LEFT JOIN LATERAL (
        SELECT ud.day AS last_login FROM usage_daily ud
        WHERE ud.account_id = sc.id AND ud.event = 'login' ORDER BY ud.day DESC LIMIT 1
    ) lg ON true
    LEFT JOIN LATERAL (
        SELECT ud.day AS first_day FROM usage_daily ud WHERE ud.account_id = sc.id ORDER BY ud.day LIMIT 1
    ) fu ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS n, sum(i.amount) AS amount, max(current_date - i.due_date) AS oldest_days,
               bool_and(i.currency = 'USD') AS usd, min(i.currency) AS currency
        FROM invoices i
        WHERE i.account_id = sc.id AND i.status = 'open' AND i.paid_at IS NULL
          AND i.due_date < current_date - (st.s #>> '{rules,invoice_past_due,grace_days}')::int
    ) inv ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS open_n,
               count(*) FILTER (WHERE t.opened_at < now() - make_interval(hours => (st.s #>> '{rules,urgent_ticket_open,hours}')::int)) AS old_n,
               floor(extract(epoch FROM now() - min(t.opened_at)) / 86400)::int AS oldest_days
        FROM support_tickets t
        WHERE t.account_id = sc.id AND t.priority = 'urgent' AND t.status IN ('new', 'open', 'pending')
    ) tk ON true
),
cond AS (
    SELECT f.account_id, 'score_drop'::text AS rule,
           (f.peak - f.score) >= (st.s #>> '{rules,score_drop,points}')::float8 AS raise,
           format('Score fell %s points in %s days (%s to %s)', round((f.peak - f.score)::numeric),
                  st.s #>> '{rules,score_drop,window_days}', round(f.peak::numeric), round(f.score::numeric)) AS headline,
           jsonb_build_object('peak', f.peak, 'score', f.score, 'drop', f.peak - f.score) AS details
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,score_drop,enabled}')::bool AND f.score IS NOT NULL AND f.peak IS NOT NULL
    UNION ALL
    SELECT f.account_id, 'tier_worsened', f.tier_rank > f.best_rank,
           format('Health tier fell from %s to %s (score %s)',
                  CASE f.best_rank WHEN 0 THEN 'HEALTHY' WHEN 1 THEN 'AT_RISK' ELSE 'CRITICAL' END,
                  upper(f.tier), round(f.score::numeric)),
           jsonb_build_object('fromTier', CASE f.best_rank WHEN 0 THEN 'healthy' WHEN 1 THEN 'at_risk' ELSE 'critical' END,
                              'toTier', f.tier, 'score', f.score)
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,tier_worsened,enabled}')::bool AND f.tier_rank IS NOT NULL AND f.best_rank IS NOT NULL
    UNION ALL
    SELECT f.account_id, 'no_login',
           current_date - coalesce(f.last_login, f.first_day) >= (st.s #>> '{rules,no_login,days}')::int,
           CASE WHEN f.last_login IS NULL
                THEN format('No login recorded in %s days of usage data', current_date - f.first_day)
                ELSE format('No login in %s days', current_date - f.last_login) END,
           jsonb_build_object('lastLogin', f.last_login, 'days', current_date - coalesce(f.last_login, f.first_day))
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,no_login,enabled}')::bool AND f.first_day IS NOT NULL
    UNION ALL
    SELECT f.account_id, 'invoice_past_due', f.overdue_n > 0,
           format('%s past due, oldest %s days (%s)',
                  CASE WHEN f.overdue_n = 1 THEN '1 invoice' ELSE f.overdue_n || ' invoices' END,
                  f.overdue_days,
                  CASE WHEN f.overdue_usd THEN '$' || to_char(f.overdue_amount, 'FM999,999,999,990.00')
                       ELSE to_char(f.overdue_amount, 'FM999,999,999,990.00') || ' ' || f.overdue_currency END),
           jsonb_build_object('count', f.overdue_n, 'amount', f.overdue_amount, 'oldestDays', f.overdue_days)
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,invoice_past_due,enabled}')::bool
    UNION ALL
    SELECT f.account_id, 'urgent_ticket_open', f.urgent_old > 0,
           format('%s open for over %s hours, oldest %s days',
                  CASE WHEN f.urgent_old = 1 THEN '1 urgent ticket' ELSE f.urgent_old || ' urgent tickets' END,
                  st.s #>> '{rules,urgent_ticket_open,hours}', f.urgent_oldest_days),
           jsonb_build_object('count', f.urgent_old, 'oldestDays', f.urgent_oldest_days)
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,urgent_ticket_open,enabled}')::bool
    UNION ALL
    SELECT f.account_id, 'renewal_at_risk',
           f.renewal_date BETWEEN current_date AND current_date + (st.s #>> '{rules,renewal_at_risk,within_days}')::int
               AND f.tier IN ('at_risk', 'critical'),
           format('Renewal in %s days (%s) while %s (score %s)', f.renewal_date - current_date,
                  to_char(f.renewal_date, 'YYYY-MM-DD'), upper(f.tier), round(f.score::numeric)),
           jsonb_build_object('renewalDate', f.renewal_date, 'tier', f.tier, 'score', f.score)
    FROM facts f CROSS JOIN st
    WHERE (st.s #>> '{rules,renewal_at_risk,enabled}')::bool AND f.renewal_date IS NOT NULL AND f.tier IS NOT NULL
),
raised AS (
    INSERT INTO alerts (account_id, rule, severity, message, drivers, details, owner, assignee, due_at)
    SELECT c.account_id, c.rule, st.s #>> ARRAY['rules', c.rule, 'severity'],
           c.headline || coalesce(': ' || f.why, ''), f.drivers, c.details, f.owner, f.owner,
           now() + make_interval(hours => nullif((st.s #>> ARRAY['rules', c.rule, 'due_hours'])::int, 0))
    FROM cond c
    JOIN facts f ON f.account_id = c.account_id
    CROSS JOIN st
    WHERE c.raise
      AND NOT EXISTS (
          SELECT 1 FROM alerts r
          WHERE r.account_id = c.account_id AND r.rule = c.rule AND r.status = 'resolved'
            AND r.resolved_at > now() - make_interval(hours => (st.s #>> ARRAY['rules', c.rule, 'cooldown_hours'])::int))
    ORDER BY c.account_id, c.rule
    ON CONFLICT (account_id, rule) WHERE status <> 'resolved' DO NOTHING
    RETURNING id
),
resolved AS (
    UPDATE alerts al
    SET status = 'resolved', resolved_at = now(), resolved_by = 'auto', snoozed_until = NULL, updated_at = now()
    FROM facts f CROSS JOIN st
    WHERE al.account_id = f.account_id AND al.status <> 'resolved'
      AND coalesce((st.s #>> ARRAY['rules', al.rule, 'enabled'])::bool, false)
      AND CASE al.rule
          WHEN 'score_drop' THEN
              f.score >= (al.details ->> 'peak')::float8
                         - ((st.s #>> '{rules,score_drop,points}')::float8 - (st.s #>> '{rules,score_drop,clear_margin}')::float8)
          WHEN 'tier_worsened' THEN
              f.tier_rank <= CASE al.details ->> 'fromTier' WHEN 'healthy' THEN 0 WHEN 'at_risk' THEN 1 ELSE 2 END
              AND f.score >= CASE al.details ->> 'fromTier'
                                 WHEN 'healthy' THEN (st.s ->> 'healthy_min')::float8
                                 WHEN 'at_risk' THEN (st.s ->> 'at_risk_min')::float8
                                 ELSE 0 END
                             + (st.s #>> '{rules,tier_worsened,clear_margin}')::float8
          WHEN 'no_login' THEN
              f.first_day IS NULL
              OR current_date - coalesce(f.last_login, f.first_day)
                 <= (st.s #>> '{rules,no_login,days}')::int - (st.s #>> '{rules,no_login,clear_margin_days}')::int
          WHEN 'invoice_past_due' THEN f.overdue_n = 0
          WHEN 'urgent_ticket_open' THEN f.urgent_open = 0
          WHEN 'renewal_at_risk' THEN
              f.renewal_date IS NULL OR f.renewal_date < current_date
              OR f.renewal_date > current_date + (st.s #>> '{rules,renewal_at_risk,within_days}')::int
                                               + (st.s #>> '{rules,renewal_at_risk,clear_margin_days}')::int
              OR (f.tier = 'healthy'
                  AND f.score >= (st.s ->> 'healthy_min')::float8 + (st.s #>> '{rules,renewal_at_risk,clear_margin}')::float8)
          ELSE false
      END
    RETURNING al.id
)
SELECT (SELECT count(*) FROM raised)::bigint AS raised, (SELECT count(*) FROM resolved)::bigint AS resolved,
       0::bigint AS reopened
"#;

/// Reopens snoozed alerts whose snooze has ended (in scope).
const WAKE_SQL: &str =
    "UPDATE alerts SET status = 'open', snoozed_until = NULL, updated_at = now() \
    WHERE status = 'snoozed' AND snoozed_until <= now() {SCOPE}";

/// Evaluates every enabled rule for the accounts in scope, in one transaction: new alerts (with
/// their webhook outbox rows and the fan-out notification, by trigger) commit together.
/// Called after each scoring run with the accounts whose scores changed, and periodically for all.
/// Uses the process's installed `[alerts]` section ([`rules::install_file_config`]).
pub async fn evaluate(pool: &DbPool, scope: &AlertScope) -> Result<EvaluationSummary, AlertError> {
    evaluate_with(pool, scope, rules::installed_file_config().as_ref()).await
}

/// [`evaluate`] with an explicit `[alerts]` config section.
pub async fn evaluate_with(
    pool: &DbPool,
    scope: &AlertScope,
    file: Option<&serde_json::Value>,
) -> Result<EvaluationSummary, AlertError> {
    Ok(evaluate_inner(pool, scope, file, false)
        .await?
        .unwrap_or_default())
}

/// With `exclusive`, gives up (`None`) when another evaluation holds the periodic lock; the lock
/// is transaction-scoped, so a cancelled evaluation never leaves it held.
async fn evaluate_inner(
    pool: &DbPool,
    scope: &AlertScope,
    file: Option<&serde_json::Value>,
    exclusive: bool,
) -> Result<Option<EvaluationSummary>, AlertError> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    if let AlertScope::Accounts(ids) = scope {
        if ids.is_empty() {
            return Ok(Some(EvaluationSummary::default()));
        }
    }
    let settings = rules::load(pool, file).await?.to_sql_json();
    let (eval_sql, wake_sql, ids) = match scope {
        AlertScope::All => (
            EVALUATE_SQL.replace("{SCOPE}", ""),
            WAKE_SQL.replace("{SCOPE}", ""),
            Vec::new(),
        ),
        AlertScope::Accounts(ids) => (
            EVALUATE_SQL.replace("{SCOPE}", "WHERE a.id = ANY($2)"),
            WAKE_SQL.replace("{SCOPE}", "AND account_id = ANY($1)"),
            ids.clone(),
        ),
    };
    let started = std::time::Instant::now();
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let all = matches!(scope, AlertScope::All);
    let summary = conn
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            if exclusive {
                let got: Locked =
                    diesel::sql_query("SELECT pg_try_advisory_xact_lock(7368500043) AS locked")
                        .get_result(conn)
                        .await?;
                if !got.locked {
                    return Ok(None);
                }
            }
            let reopened = if all {
                diesel::sql_query(wake_sql).execute(conn).await?
            } else {
                diesel::sql_query(wake_sql)
                    .bind::<Array<BigInt>, _>(&ids)
                    .execute(conn)
                    .await?
            };
            let mut summary: EvaluationSummary = if all {
                diesel::sql_query(eval_sql)
                    .bind::<Jsonb, _>(&settings)
                    .get_result(conn)
                    .await?
            } else {
                diesel::sql_query(eval_sql)
                    .bind::<Jsonb, _>(&settings)
                    .bind::<Array<BigInt>, _>(&ids)
                    .get_result(conn)
                    .await?
            };
            summary.reopened = reopened as i64;
            Ok(Some(summary))
        })
        .await?;
    let Some(summary) = summary else {
        return Ok(None);
    };
    metrics::counter!("healthd_alerts_raised_total").increment(summary.raised as u64);
    metrics::counter!("healthd_alerts_resolved_total").increment(summary.resolved as u64);
    metrics::histogram!("healthd_alert_evaluation_seconds").record(started.elapsed().as_secs_f64());
    if summary.raised > 0 || summary.resolved > 0 {
        tracing::info!(
            raised = summary.raised,
            resolved = summary.resolved,
            reopened = summary.reopened,
            "alert rules evaluated"
        );
    }
    Ok(Some(summary))
}

/// Background job: evaluates every account every `evaluate_every_minutes` (default 15), for the
/// rules that change with time alone (no login, ticket age, renewal, snoozes ending). With many
/// processes, one evaluates per period (an advisory lock); the others skip.
pub async fn run_periodic_evaluation(state: AppState) {
    if let Err(e) = rules::install_file_config(&state.config.alerts) {
        tracing::error!(error = %e, "invalid [alerts] configuration; periodic alert evaluation disabled");
        return;
    }
    let minutes = rules::RuleSet::defaults().global("evaluate_every_minutes");
    let mut period = Duration::from_secs_f64((minutes * 60.0).max(10.0));
    loop {
        if let Ok(set) = rules::load(&state.pool, Some(&state.config.alerts)).await {
            period =
                Duration::from_secs_f64((set.global("evaluate_every_minutes") * 60.0).max(10.0));
        }
        match try_locked_evaluation(&state.pool, &state.config.alerts).await {
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "periodic alert evaluation failed"),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Evaluates all accounts unless another process is doing it right now.
async fn try_locked_evaluation(
    pool: &DbPool,
    file: &serde_json::Value,
) -> Result<Option<EvaluationSummary>, AlertError> {
    evaluate_inner(pool, &AlertScope::All, Some(file), true).await
}
