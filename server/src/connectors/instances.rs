//! Connector instances: a plugin, its settings and its schedule, under a unique name that is also
//! the `source` of everything the instance ingests.
//!
//! Instances come from two places: `[[connector]]` entries in the config file (synced into the
//! table at start by [`sync_config`], marked `from_config`) and admins over GraphQL. An entry
//! removed from the config file is disabled, not deleted, so its history stays visible.

use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper};
use diesel_async::RunQueryDsl;
use serde_json::Value;

use super::schedule::{Schedule, DEFAULT_SCHEDULE};
use super::RuntimeError;
use crate::config::ConnectorConfig;
use crate::db::schema::{connector_runs, connectors};
use crate::db::DbPool;
use crate::plugins::PluginRegistry;

/// A row of `connectors`.
#[derive(Debug, Clone, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = connectors)]
pub struct ConnectorInstance {
    pub id: i64,
    pub name: String,
    pub plugin: String,
    pub schedule: String,
    pub settings: Value,
    pub enabled: bool,
    pub timeout_secs: i32,
    pub max_age_hours: i32,
    pub from_config: bool,
    pub cursor: Option<String>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub failures: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What an instance is doing, for the `connectors` listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorStatus {
    Idle,
    Running,
    Failed,
    Disabled,
}

/// A row of `connector_runs`.
#[derive(Debug, Clone, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = connector_runs)]
pub struct RunRow {
    pub id: i64,
    pub connector_id: i64,
    pub status: String,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub heartbeat_at: DateTime<Utc>,
    pub records_ingested: i64,
    pub records_rejected: i64,
    pub record_kinds: Vec<String>,
    pub error: Option<String>,
}

/// An instance with what the listing shows about its runs.
#[derive(Debug, Clone)]
pub struct InstanceOverview {
    pub instance: ConnectorInstance,
    pub status: ConnectorStatus,
    pub last_run: Option<RunRow>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// Records ingested by all runs of the instance.
    pub records_ingested: i64,
}

/// A new instance. Unset fields take the config file's defaults.
#[derive(Debug, Clone, Default)]
pub struct NewConnector {
    pub name: String,
    pub plugin: String,
    pub schedule: Option<String>,
    pub settings: Option<Value>,
    pub enabled: Option<bool>,
    pub timeout_secs: Option<i32>,
    pub max_age_hours: Option<i32>,
}

/// Changes to an instance; `None` leaves a field as is.
#[derive(Debug, Clone, Default)]
pub struct ConnectorPatch {
    pub plugin: Option<String>,
    pub schedule: Option<String>,
    pub settings: Option<Value>,
    pub enabled: Option<bool>,
    pub timeout_secs: Option<i32>,
    pub max_age_hours: Option<i32>,
    /// Forget the saved cursor: the next run starts from scratch (upserts make that harmless).
    pub reset_cursor: bool,
}

/// Instance names: 1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "name `{name}` must be 1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        )))
    }
}

fn validate_limits(timeout_secs: i32, max_age_hours: i32) -> Result<(), RuntimeError> {
    if timeout_secs < 1 {
        return Err(RuntimeError::Invalid(
            "timeoutSecs must be at least 1".into(),
        ));
    }
    if max_age_hours < 1 {
        return Err(RuntimeError::Invalid(
            "maxAgeHours must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Checks the plugin exists and the settings match its schema; returns the settings with defaults.
pub fn check_plugin(
    registry: &PluginRegistry,
    plugin: &str,
    settings: &Value,
) -> Result<(), RuntimeError> {
    let Some(loaded) = registry.get(plugin) else {
        let names: Vec<String> = registry.list().into_iter().map(|p| p.name).collect();
        return Err(RuntimeError::UnknownPlugin {
            plugin: plugin.to_string(),
            installed: if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        });
    };
    loaded.validate_settings(settings)?;
    Ok(())
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Creates an instance; its first run is due at once. With a registry, the plugin must be
/// installed and the settings must match its schema.
pub async fn create(
    pool: &DbPool,
    registry: Option<&PluginRegistry>,
    new: NewConnector,
) -> Result<ConnectorInstance, RuntimeError> {
    let name = new.name.trim().to_string();
    validate_name(&name)?;
    let schedule_text = new
        .schedule
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
    Schedule::parse(&schedule_text)?;
    let settings = new.settings.unwrap_or_else(empty_object);
    let timeout_secs = new.timeout_secs.unwrap_or(3600);
    let max_age_hours = new.max_age_hours.unwrap_or(48);
    validate_limits(timeout_secs, max_age_hours)?;
    if let Some(registry) = registry {
        check_plugin(registry, &new.plugin, &settings)?;
    }
    let mut conn = pool.get().await?;
    let inserted = diesel::insert_into(connectors::table)
        .values((
            connectors::name.eq(&name),
            connectors::plugin.eq(&new.plugin),
            connectors::schedule.eq(&schedule_text),
            connectors::settings.eq(&settings),
            connectors::enabled.eq(new.enabled.unwrap_or(true)),
            connectors::timeout_secs.eq(timeout_secs),
            connectors::max_age_hours.eq(max_age_hours),
            connectors::next_run_at.eq(Some(Utc::now())),
        ))
        .on_conflict(connectors::name)
        .do_nothing()
        .returning(ConnectorInstance::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    inserted.ok_or(RuntimeError::AlreadyExists(name))
}

/// Applies a patch. A new schedule takes effect from now; a new plugin forgets the cursor.
pub async fn update(
    pool: &DbPool,
    registry: Option<&PluginRegistry>,
    name: &str,
    patch: ConnectorPatch,
) -> Result<ConnectorInstance, RuntimeError> {
    let current = get(pool, name).await?;
    let plugin = patch.plugin.clone().unwrap_or(current.plugin.clone());
    let settings = patch.settings.clone().unwrap_or(current.settings.clone());
    let timeout_secs = patch.timeout_secs.unwrap_or(current.timeout_secs);
    let max_age_hours = patch.max_age_hours.unwrap_or(current.max_age_hours);
    validate_limits(timeout_secs, max_age_hours)?;
    let (schedule_text, next_run_at) = match &patch.schedule {
        Some(s) if s.trim() != current.schedule => {
            let text = if s.trim().is_empty() {
                DEFAULT_SCHEDULE.to_string()
            } else {
                s.trim().to_string()
            };
            let parsed = Schedule::parse(&text)?;
            (text, Some(parsed.next_after(Utc::now())))
        }
        _ => (current.schedule.clone(), current.next_run_at),
    };
    if let Some(registry) = registry {
        if patch.plugin.is_some() || patch.settings.is_some() {
            check_plugin(registry, &plugin, &settings)?;
        }
    }
    let reset_cursor = patch.reset_cursor || plugin != current.plugin;
    let cursor = if reset_cursor {
        None
    } else {
        current.cursor.clone()
    };
    let mut conn = pool.get().await?;
    let updated = diesel::update(connectors::table.filter(connectors::id.eq(current.id)))
        .set((
            connectors::plugin.eq(&plugin),
            connectors::schedule.eq(&schedule_text),
            connectors::settings.eq(&settings),
            connectors::enabled.eq(patch.enabled.unwrap_or(current.enabled)),
            connectors::timeout_secs.eq(timeout_secs),
            connectors::max_age_hours.eq(max_age_hours),
            connectors::cursor.eq(cursor),
            connectors::next_run_at.eq(next_run_at),
            connectors::updated_at.eq(Utc::now()),
        ))
        .returning(ConnectorInstance::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    updated.ok_or_else(|| RuntimeError::NotFound(name.to_string()))
}

/// Enables or disables an instance. Enabling makes it due at once if it was overdue.
pub async fn set_enabled(
    pool: &DbPool,
    name: &str,
    enabled: bool,
) -> Result<ConnectorInstance, RuntimeError> {
    let mut conn = pool.get().await?;
    let updated = diesel::update(connectors::table.filter(connectors::name.eq(name)))
        .set((
            connectors::enabled.eq(enabled),
            connectors::updated_at.eq(Utc::now()),
        ))
        .returning(ConnectorInstance::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    updated.ok_or_else(|| RuntimeError::NotFound(name.to_string()))
}

/// Deletes an instance and its run history. The data it ingested stays (it is customer data);
/// its identities stay too, so re-creating the instance under the same name maps the same accounts.
pub async fn delete(pool: &DbPool, name: &str) -> Result<bool, RuntimeError> {
    let mut conn = pool.get().await?;
    let n = diesel::delete(connectors::table.filter(connectors::name.eq(name)))
        .execute(&mut conn)
        .await?;
    Ok(n > 0)
}

/// The instance with this name.
pub async fn get(pool: &DbPool, name: &str) -> Result<ConnectorInstance, RuntimeError> {
    let mut conn = pool.get().await?;
    connectors::table
        .filter(connectors::name.eq(name))
        .select(ConnectorInstance::as_select())
        .first(&mut conn)
        .await
        .optional()?
        .ok_or_else(|| RuntimeError::NotFound(name.to_string()))
}

/// Every instance, by name.
pub async fn list(pool: &DbPool) -> Result<Vec<ConnectorInstance>, RuntimeError> {
    let mut conn = pool.get().await?;
    Ok(connectors::table
        .order(connectors::name.asc())
        .select(ConnectorInstance::as_select())
        .load(&mut conn)
        .await?)
}

/// Every instance with its status, last run, last success and total records. Totals are kept on
/// the instance row; last runs are one index probe per instance: the run history is never scanned.
pub async fn overview(pool: &DbPool) -> Result<Vec<InstanceOverview>, RuntimeError> {
    use diesel::sql_types::{BigInt, Nullable, Timestamptz};

    #[derive(diesel::QueryableByName)]
    struct Totals {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = BigInt)]
        records_ingested: i64,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        last_success_at: Option<DateTime<Utc>>,
        #[diesel(sql_type = Nullable<BigInt>)]
        last_run_id: Option<i64>,
    }

    let instances = list(pool).await?;
    let mut conn = pool.get().await?;
    let totals: Vec<Totals> = diesel::sql_query(
        "SELECT c.id, c.records_ingested, c.last_success_at, \
                (SELECT r.id FROM connector_runs r WHERE r.connector_id = c.id \
                 ORDER BY r.id DESC LIMIT 1) AS last_run_id \
         FROM connectors c",
    )
    .load(&mut conn)
    .await?;
    let run_ids: Vec<i64> = totals.iter().filter_map(|t| t.last_run_id).collect();
    let last_runs: Vec<RunRow> = connector_runs::table
        .filter(connector_runs::id.eq_any(&run_ids))
        .select(RunRow::as_select())
        .load(&mut conn)
        .await?;
    let totals: std::collections::HashMap<i64, Totals> =
        totals.into_iter().map(|t| (t.id, t)).collect();
    let mut last: std::collections::HashMap<i64, RunRow> =
        last_runs.into_iter().map(|r| (r.connector_id, r)).collect();
    Ok(instances
        .into_iter()
        .map(|instance| {
            let last_run = last.remove(&instance.id);
            let t = totals.get(&instance.id);
            let status = status_of(instance.enabled, last_run.as_ref());
            InstanceOverview {
                status,
                last_run,
                last_success_at: t.and_then(|t| t.last_success_at),
                records_ingested: t.map_or(0, |t| t.records_ingested),
                instance,
            }
        })
        .collect())
}

/// Running wins over disabled (a disabled instance may finish a run it started).
pub fn status_of(enabled: bool, last_run: Option<&RunRow>) -> ConnectorStatus {
    match last_run.map(|r| r.status.as_str()) {
        Some("running") => ConnectorStatus::Running,
        _ if !enabled => ConnectorStatus::Disabled,
        Some("failed") => ConnectorStatus::Failed,
        _ => ConnectorStatus::Idle,
    }
}

/// The runs of an instance, newest first.
pub async fn runs(pool: &DbPool, name: &str, first: i64) -> Result<Vec<RunRow>, RuntimeError> {
    let instance = get(pool, name).await?;
    let mut conn = pool.get().await?;
    Ok(connector_runs::table
        .filter(connector_runs::connector_id.eq(instance.id))
        .order(connector_runs::id.desc())
        .limit(first.clamp(1, 1000))
        .select(RunRow::as_select())
        .load(&mut conn)
        .await?)
}

/// One run by id.
pub async fn run_by_id(pool: &DbPool, run_id: i64) -> Result<Option<RunRow>, RuntimeError> {
    let mut conn = pool.get().await?;
    Ok(connector_runs::table
        .filter(connector_runs::id.eq(run_id))
        .select(RunRow::as_select())
        .first(&mut conn)
        .await
        .optional()?)
}

/// A rejected record of a run.
#[derive(Debug, Clone, diesel::Queryable)]
pub struct RejectionRow {
    pub file: Option<String>,
    pub line: Option<i64>,
    pub reason: String,
}

/// The first `first` rejections of a run, in the order they were reported.
pub async fn rejections(
    pool: &DbPool,
    run_id: i64,
    first: i64,
) -> Result<Vec<RejectionRow>, RuntimeError> {
    use crate::db::schema::connector_run_rejections as r;
    let mut conn = pool.get().await?;
    Ok(r::table
        .filter(r::run_id.eq(run_id))
        .order(r::seq.asc())
        .limit(first.clamp(0, 10_000))
        .select((r::file, r::line, r::reason))
        .load(&mut conn)
        .await?)
}

/// What [`sync_config`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    /// Instances from an earlier config that the file no longer declares: disabled.
    pub disabled: Vec<String>,
}

/// Makes the `connectors` table match the `[[connector]]` entries of the config file: creates
/// missing instances, updates changed ones (keeping their cursor unless the plugin changed) and
/// disables instances an earlier config declared but this one does not. Unknown plugins or bad
/// settings are logged, not fatal: the instance's runs fail with the reason until it is fixed.
pub async fn sync_config(
    pool: &DbPool,
    registry: Option<&PluginRegistry>,
    entries: &[ConnectorConfig],
) -> Result<ConfigSyncReport, RuntimeError> {
    let mut report = ConfigSyncReport::default();
    let mut seen = std::collections::HashSet::new();
    for entry in entries {
        validate_name(&entry.name)?;
        if !seen.insert(entry.name.clone()) {
            return Err(RuntimeError::Invalid(format!(
                "the config file declares connector `{}` twice",
                entry.name
            )));
        }
        let schedule = Schedule::parse(&entry.schedule)?;
        validate_limits(entry.timeout_secs, entry.max_age_hours)?;
        if let Some(registry) = registry {
            if let Err(e) = check_plugin(registry, &entry.plugin, &entry.settings) {
                tracing::warn!(connector = %entry.name, "connector from the config file is not usable yet: {e}");
            }
        }
        let mut conn = pool.get().await?;
        let existing: Option<ConnectorInstance> = connectors::table
            .filter(connectors::name.eq(&entry.name))
            .select(ConnectorInstance::as_select())
            .first(&mut conn)
            .await
            .optional()?;
        match existing {
            None => {
                diesel::insert_into(connectors::table)
                    .values((
                        connectors::name.eq(&entry.name),
                        connectors::plugin.eq(&entry.plugin),
                        connectors::schedule.eq(entry.schedule.trim()),
                        connectors::settings.eq(&entry.settings),
                        connectors::enabled.eq(entry.enabled),
                        connectors::timeout_secs.eq(entry.timeout_secs),
                        connectors::max_age_hours.eq(entry.max_age_hours),
                        connectors::from_config.eq(true),
                        connectors::next_run_at.eq(Some(Utc::now())),
                    ))
                    .on_conflict(connectors::name)
                    .do_nothing()
                    .execute(&mut conn)
                    .await?;
                report.created.push(entry.name.clone());
            }
            Some(cur) => {
                let unchanged = cur.plugin == entry.plugin
                    && cur.schedule == entry.schedule.trim()
                    && cur.settings == entry.settings
                    && cur.enabled == entry.enabled
                    && cur.timeout_secs == entry.timeout_secs
                    && cur.max_age_hours == entry.max_age_hours
                    && cur.from_config;
                if unchanged {
                    continue;
                }
                let cursor = if cur.plugin == entry.plugin {
                    cur.cursor.clone()
                } else {
                    None
                };
                let next_run_at = if cur.schedule == entry.schedule.trim() {
                    cur.next_run_at.or(Some(Utc::now()))
                } else {
                    Some(schedule.next_after(Utc::now()))
                };
                diesel::update(connectors::table.filter(connectors::id.eq(cur.id)))
                    .set((
                        connectors::plugin.eq(&entry.plugin),
                        connectors::schedule.eq(entry.schedule.trim()),
                        connectors::settings.eq(&entry.settings),
                        connectors::enabled.eq(entry.enabled),
                        connectors::timeout_secs.eq(entry.timeout_secs),
                        connectors::max_age_hours.eq(entry.max_age_hours),
                        connectors::from_config.eq(true),
                        connectors::cursor.eq(cursor),
                        connectors::next_run_at.eq(next_run_at),
                        connectors::updated_at.eq(Utc::now()),
                    ))
                    .execute(&mut conn)
                    .await?;
                report.updated.push(entry.name.clone());
            }
        }
    }
    let mut conn = pool.get().await?;
    let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    report.disabled = diesel::update(
        connectors::table
            .filter(connectors::from_config.eq(true))
            .filter(connectors::enabled.eq(true))
            .filter(connectors::name.ne_all(&names)),
    )
    .set((
        connectors::enabled.eq(false),
        connectors::updated_at.eq(Utc::now()),
    ))
    .returning(connectors::name)
    .get_results(&mut conn)
    .await?;
    for name in &report.disabled {
        tracing::info!(connector = %name, "connector no longer in the config file: disabled");
    }
    Ok(report)
}
