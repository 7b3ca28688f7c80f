//! Connectors over GraphQL: installed plugins, instances and their runs, identity mapping.
//! Reading needs the viewer role (settings, which may hold secrets, only for admins); every
//! change needs the admin role. Resolvers are thin: the work is in `crate::connectors`.

use std::time::Duration;

use async_graphql::{ComplexObject, Context, Enum, InputObject, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::app::AppState;
use crate::auth::{self, Role};
use crate::connectors::instances::{self, InstanceOverview, RunRow};
use crate::connectors::progress::Progress;
use crate::connectors::{
    identities, ConnectorPatch, ConnectorRuntime, ConnectorStatus as Status, NewConnector,
    RunTrigger, RuntimeError,
};
use crate::db::DbPool;

use super::errors::{bad_input, internal, not_found};

/// How long `syncConnector` waits for the run to finish before returning it as RUNNING.
const SYNC_WAIT: Duration = Duration::from_secs(5);

fn map_err(e: RuntimeError) -> async_graphql::Error {
    match e {
        RuntimeError::NotFound(_)
        | RuntimeError::UnknownAccount(_)
        | RuntimeError::UnknownIdentity { .. } => not_found(e.to_string()),
        e if e.is_client_error() => bad_input(e.to_string()),
        RuntimeError::Plugin(p @ crate::plugins::PluginError::InvalidSettings { .. }) => {
            bad_input(p.to_string())
        }
        e => internal(e),
    }
}

/// What an instance is doing.
#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "ConnectorStatus")]
pub enum ConnectorStatusGql {
    /// Waiting for its next run.
    Idle,
    /// A run is in progress.
    Running,
    /// Its last run failed (it is retried with backoff).
    Failed,
    /// Disabled: it does not run on its schedule.
    Disabled,
}

impl From<Status> for ConnectorStatusGql {
    fn from(s: Status) -> Self {
        match s {
            Status::Idle => ConnectorStatusGql::Idle,
            Status::Running => ConnectorStatusGql::Running,
            Status::Failed => ConnectorStatusGql::Failed,
            Status::Disabled => ConnectorStatusGql::Disabled,
        }
    }
}

/// State of one run.
#[derive(Enum, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorRunStatus {
    Running,
    Succeeded,
    Failed,
}

/// A connector plugin library found in the plugin directories: loaded, or refused with the reason.
#[derive(SimpleObject)]
pub struct ConnectorPlugin {
    /// Manifest name (what `plugin = "..."` refers to); the file name for a refused library.
    pub name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    /// Kinds of records it may emit (`accounts`, `usage`, `support`, `billing`, `churn`).
    pub record_kinds: Vec<String>,
    /// JSON Schema of its settings.
    pub settings_schema: Option<Json<Value>>,
    /// The library file.
    pub path: String,
    /// The plugin-api version it was built against.
    pub api_version: Option<String>,
    /// False when the library was refused.
    pub loaded: bool,
    /// Why it was refused.
    pub error: Option<String>,
}

/// A rejected record of a run.
#[derive(SimpleObject)]
pub struct RunRejection {
    /// The source file, if any.
    pub file: Option<String>,
    /// The 1-based line in that file (the CSV header is line 1), if any.
    pub line: Option<i64>,
    pub reason: String,
}

/// One run of a connector instance.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct ConnectorRun {
    pub id: ID,
    pub status: ConnectorRunStatus,
    /// `schedule`, `manual` or `cli`.
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Last sign of life of a running run.
    pub heartbeat_at: DateTime<Utc>,
    /// Records saved so far (live while running).
    pub records_ingested: i64,
    pub records_rejected: i64,
    /// Kinds of records the run saved.
    pub record_kinds: Vec<String>,
    pub error: Option<String>,
    #[graphql(skip)]
    pub run_id: i64,
}

impl From<RunRow> for ConnectorRun {
    fn from(r: RunRow) -> Self {
        ConnectorRun {
            id: ID(r.id.to_string()),
            status: match r.status.as_str() {
                "running" => ConnectorRunStatus::Running,
                "succeeded" => ConnectorRunStatus::Succeeded,
                _ => ConnectorRunStatus::Failed,
            },
            trigger: r.trigger,
            started_at: r.started_at,
            finished_at: r.finished_at,
            heartbeat_at: r.heartbeat_at,
            records_ingested: r.records_ingested,
            records_rejected: r.records_rejected,
            record_kinds: r.record_kinds,
            error: r.error,
            run_id: r.id,
        }
    }
}

#[ComplexObject]
impl ConnectorRun {
    /// Records saved per second, so far (running) or over the whole run.
    async fn records_per_second(&self) -> f64 {
        let end = self.finished_at.unwrap_or_else(Utc::now);
        let secs = (end - self.started_at).num_milliseconds() as f64 / 1000.0;
        if secs <= 0.0 {
            0.0
        } else {
            self.records_ingested as f64 / secs
        }
    }

    /// Rejected records in the order reported (at most 10,000 are kept per run).
    async fn rejections(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 100)] first: i32,
    ) -> async_graphql::Result<Vec<RunRejection>> {
        let pool = ctx.data::<DbPool>()?;
        let rows = instances::rejections(pool, self.run_id, first.into())
            .await
            .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|r| RunRejection {
                file: r.file,
                line: r.line,
                reason: r.reason,
            })
            .collect())
    }
}

/// A configured connector instance.
pub struct Connector(InstanceOverview);

#[Object]
impl Connector {
    /// Instance name; also the `source` of everything it ingests.
    async fn name(&self) -> &str {
        &self.0.instance.name
    }
    /// Manifest name of the plugin it runs.
    async fn plugin(&self) -> &str {
        &self.0.instance.plugin
    }
    /// `every 15m`, `every 1h`, a cron expression...
    async fn schedule(&self) -> &str {
        &self.0.instance.schedule
    }
    async fn status(&self) -> ConnectorStatusGql {
        self.0.status.into()
    }
    async fn enabled(&self) -> bool {
        self.0.instance.enabled
    }
    /// The most recent run (in progress or finished).
    async fn last_run(&self) -> Option<ConnectorRun> {
        self.0.last_run.clone().map(Into::into)
    }
    async fn last_success_at(&self) -> Option<DateTime<Utc>> {
        self.0.last_success_at
    }
    async fn next_run_at(&self) -> Option<DateTime<Utc>> {
        self.0.instance.next_run_at
    }
    /// Records ingested by all runs of this instance.
    async fn records_ingested(&self) -> i64 {
        self.0.records_ingested
    }
    /// The error of the last run, when it failed.
    async fn last_error(&self) -> Option<&str> {
        self.0
            .last_run
            .as_ref()
            .filter(|r| r.status == "failed")
            .and_then(|r| r.error.as_deref())
    }
    /// Consecutive failed runs.
    async fn failures(&self) -> i32 {
        self.0.instance.failures
    }
    async fn timeout_secs(&self) -> i32 {
        self.0.instance.timeout_secs
    }
    /// Data older than this marks scores stale.
    async fn max_age_hours(&self) -> i32 {
        self.0.instance.max_age_hours
    }
    /// Declared in the config file (changes made here are overwritten at the next start).
    async fn from_config(&self) -> bool {
        self.0.instance.from_config
    }
    /// The plugin settings. They may hold secrets: null unless the caller is an admin.
    async fn settings(&self, ctx: &Context<'_>) -> Option<Json<Value>> {
        let admin = auth::require(ctx, Role::Admin).is_ok();
        admin.then(|| Json(self.0.instance.settings.clone()))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.instance.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.instance.updated_at
    }
}

/// Which account a source's key maps to.
#[derive(SimpleObject)]
pub struct AccountIdentity {
    /// The connector instance name.
    pub source: String,
    /// The account key in that source.
    pub external_key: String,
    /// Key of the account it maps to.
    pub account_key: String,
    pub account_name: String,
    /// `key`, `domain` or `admin`.
    pub matched_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<identities::IdentityRow> for AccountIdentity {
    fn from(r: identities::IdentityRow) -> Self {
        AccountIdentity {
            source: r.source,
            external_key: r.external_key,
            account_key: r.account_key,
            account_name: r.account_name,
            matched_by: r.matched_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(InputObject)]
pub struct CreateConnectorInput {
    pub name: String,
    /// Manifest name of an installed plugin.
    pub plugin: String,
    /// Default: daily.
    pub schedule: Option<String>,
    /// Checked against the plugin's settings schema.
    pub settings: Option<Json<Value>>,
    pub enabled: Option<bool>,
    pub timeout_secs: Option<i32>,
    pub max_age_hours: Option<i32>,
}

#[derive(InputObject)]
pub struct UpdateConnectorInput {
    pub plugin: Option<String>,
    pub schedule: Option<String>,
    pub settings: Option<Json<Value>>,
    pub enabled: Option<bool>,
    pub timeout_secs: Option<i32>,
    pub max_age_hours: Option<i32>,
    /// Forget the saved cursor so the next run starts from scratch (harmless: upserts).
    #[graphql(default)]
    pub reset_cursor: bool,
}

async fn connector_by_name(pool: &DbPool, name: &str) -> async_graphql::Result<Connector> {
    let all = instances::overview(pool).await.map_err(map_err)?;
    all.into_iter()
        .find(|o| o.instance.name == name)
        .map(Connector)
        .ok_or_else(|| not_found(format!("no connector named `{name}`")))
}

#[derive(Default)]
pub struct ConnectorsQuery;

#[Object]
impl ConnectorsQuery {
    /// Connector plugin libraries found at start, loaded or refused (with the reason).
    async fn connector_plugins(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ConnectorPlugin>> {
        auth::require(ctx, Role::Viewer)?;
        let state = ctx.data::<AppState>()?;
        let mut out: Vec<ConnectorPlugin> = state
            .plugins
            .list()
            .into_iter()
            .map(|p| ConnectorPlugin {
                name: p.name,
                version: Some(p.version),
                description: Some(p.description),
                record_kinds: p
                    .record_kinds
                    .iter()
                    .map(|k| k.as_str().to_string())
                    .collect(),
                settings_schema: Some(Json(p.settings_schema)),
                path: p.path.display().to_string(),
                api_version: Some(p.api_version),
                loaded: true,
                error: None,
            })
            .collect();
        out.extend(state.plugins.refused().into_iter().map(|(path, reason)| {
            ConnectorPlugin {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                version: None,
                description: None,
                record_kinds: Vec::new(),
                settings_schema: None,
                path: path.display().to_string(),
                api_version: None,
                loaded: false,
                error: Some(reason),
            }
        }));
        Ok(out)
    }

    /// Every connector instance with its status, last run and next run.
    async fn connectors(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Connector>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        let all = instances::overview(pool).await.map_err(map_err)?;
        Ok(all.into_iter().map(Connector).collect())
    }

    /// One connector instance by name.
    async fn connector(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Option<Connector>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        let all = instances::overview(pool).await.map_err(map_err)?;
        Ok(all
            .into_iter()
            .find(|o| o.instance.name == name)
            .map(Connector))
    }

    /// The runs of an instance, newest first (default 20).
    async fn connector_runs(
        &self,
        ctx: &Context<'_>,
        name: String,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<ConnectorRun>> {
        auth::require(ctx, Role::Viewer)?;
        let pool = ctx.data::<DbPool>()?;
        let runs = instances::runs(pool, &name, first.unwrap_or(20).into())
            .await
            .map_err(map_err)?;
        Ok(runs.into_iter().map(Into::into).collect())
    }

    /// Which account each source key maps to, filtered by source (instance name) and/or by the
    /// account's key. Admin only.
    async fn account_identities(
        &self,
        ctx: &Context<'_>,
        source: Option<String>,
        account_key: Option<String>,
        #[graphql(default = 100)] first: i32,
    ) -> async_graphql::Result<Vec<AccountIdentity>> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        let rows = identities::list(
            pool,
            source.as_deref(),
            account_key.as_deref(),
            first.into(),
        )
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}

#[derive(Default)]
pub struct ConnectorsMutation;

#[Object]
impl ConnectorsMutation {
    /// Creates a connector instance; its first run is due at once. Admin only.
    async fn create_connector(
        &self,
        ctx: &Context<'_>,
        input: CreateConnectorInput,
    ) -> async_graphql::Result<Connector> {
        auth::require(ctx, Role::Admin)?;
        let state = ctx.data::<AppState>()?;
        let created = instances::create(
            &state.pool,
            Some(&state.plugins),
            NewConnector {
                name: input.name,
                plugin: input.plugin,
                schedule: input.schedule,
                settings: input.settings.map(|j| j.0),
                enabled: input.enabled,
                timeout_secs: input.timeout_secs,
                max_age_hours: input.max_age_hours,
            },
        )
        .await
        .map_err(map_err)?;
        connector_by_name(&state.pool, &created.name).await
    }

    /// Changes a connector instance. Admin only.
    async fn update_connector(
        &self,
        ctx: &Context<'_>,
        name: String,
        input: UpdateConnectorInput,
    ) -> async_graphql::Result<Connector> {
        auth::require(ctx, Role::Admin)?;
        let state = ctx.data::<AppState>()?;
        instances::update(
            &state.pool,
            Some(&state.plugins),
            &name,
            ConnectorPatch {
                plugin: input.plugin,
                schedule: input.schedule,
                settings: input.settings.map(|j| j.0),
                enabled: input.enabled,
                timeout_secs: input.timeout_secs,
                max_age_hours: input.max_age_hours,
                reset_cursor: input.reset_cursor,
            },
        )
        .await
        .map_err(map_err)?;
        connector_by_name(&state.pool, &name).await
    }

    /// Lets the instance run on its schedule again. Admin only.
    async fn enable_connector(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Connector> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        instances::set_enabled(pool, &name, true)
            .await
            .map_err(map_err)?;
        connector_by_name(pool, &name).await
    }

    /// Stops scheduled runs of the instance (a run in progress finishes). Admin only.
    async fn disable_connector(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Connector> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        instances::set_enabled(pool, &name, false)
            .await
            .map_err(map_err)?;
        connector_by_name(pool, &name).await
    }

    /// Deletes the instance and its run history; the data it ingested stays. Admin only.
    async fn delete_connector(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<bool> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        instances::delete(pool, &name).await.map_err(map_err)
    }

    /// Runs the instance now. Returns the finished run, or the run with status RUNNING when it
    /// takes longer than a few seconds (follow it with `connectorRuns`). Admin only.
    async fn sync_connector(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<ConnectorRun> {
        auth::require(ctx, Role::Admin)?;
        let state = ctx.data::<AppState>()?;
        let runtime = ConnectorRuntime::from_state(state);
        let (instance, run_id) = runtime
            .start_run(&name, RunTrigger::Manual)
            .await
            .map_err(map_err)?;
        // The run belongs to the process, not to this request: it goes on if the client leaves.
        let rt = runtime.clone();
        let mut handle =
            tokio::spawn(async move { rt.execute_run(instance, run_id, Progress::Silent).await });
        let _ = tokio::time::timeout(SYNC_WAIT, &mut handle).await;
        let run = instances::run_by_id(&state.pool, run_id)
            .await
            .map_err(map_err)?
            .ok_or_else(|| internal(format!("run {run_id} vanished")))?;
        Ok(run.into())
    }

    /// Points a source's account key at another account (by the account's key). Data that source
    /// already ingested for the key moves along when it can be told apart. Admin only.
    async fn remap_account_identity(
        &self,
        ctx: &Context<'_>,
        source: String,
        external_key: String,
        account_key: String,
    ) -> async_graphql::Result<AccountIdentity> {
        auth::require(ctx, Role::Admin)?;
        let pool = ctx.data::<DbPool>()?;
        let outcome = identities::remap(pool, &source, &external_key, &account_key)
            .await
            .map_err(map_err)?;
        crate::connectors::runner::rescore_accounts(pool, outcome.affected_accounts).await;
        Ok(outcome.identity.into())
    }
}
