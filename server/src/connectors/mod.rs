//! The connector runtime: configured instances of connector plugins, their schedules, their runs
//! and the bulk ingest of what they emit.
//!
//! * [`instances`]: CRUD, and the `[[connector]]` config entries synced into the table at start.
//! * [`schedule`]: `every 15m` intervals and cron expressions; retry backoff.
//! * [`scheduler`]: the background loop claiming due instances exactly once across processes.
//! * [`runner`]: one run (plugin on a blocking thread, timeout, bookkeeping, rescoring).
//! * [`ingest`]: the batch sink (each batch and the cursor after it in one transaction).
//! * [`identities`]: (source, external key) -> account.
//! * [`progress`]: live progress of a run (run row, terminal progress bar).

pub mod identities;
pub mod ingest;
pub mod instances;
pub mod progress;
pub mod runner;
pub mod schedule;
pub mod scheduler;

pub use instances::{ConnectorInstance, ConnectorPatch, ConnectorStatus, NewConnector};
pub use runner::{sync_from_cli, ConnectorRuntime, RunSummary, RunTrigger};
pub use schedule::Schedule;
pub use scheduler::{run_connector_jobs, run_scheduler, SchedulerOptions};

use crate::db::DbError;
use crate::plugins::PluginError;

/// Errors of the connector runtime. `Display` is meant for the admin who configured the connector.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no connector named `{0}`")]
    NotFound(String),
    #[error("a connector named `{0}` already exists")]
    AlreadyExists(String),
    #[error("invalid connector: {0}")]
    Invalid(String),
    #[error(transparent)]
    Schedule(#[from] schedule::ScheduleError),
    #[error("no plugin named `{plugin}` is installed (installed: {installed})")]
    UnknownPlugin { plugin: String, installed: String },
    #[error("connector `{0}` is already running")]
    AlreadyRunning(String),
    #[error(
        "connector `{name}` is already running (run {run_id}, last heartbeat {heartbeat_secs} s ago; \
         if its process stopped, the run is recovered once its heartbeat is {recover_after_secs} s old)"
    )]
    StillRunning {
        name: String,
        run_id: i64,
        heartbeat_secs: u64,
        recover_after_secs: u64,
    },
    #[error("no account with key `{0}`")]
    UnknownAccount(String),
    #[error("no identity `{external_key}` from source `{source_name}`")]
    UnknownIdentity {
        source_name: String,
        external_key: String,
    },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for RuntimeError {
    fn from(e: diesel::result::Error) -> Self {
        RuntimeError::Db(e.into())
    }
}

impl From<diesel_async::pooled_connection::bb8::RunError> for RuntimeError {
    fn from(e: diesel_async::pooled_connection::bb8::RunError) -> Self {
        RuntimeError::Db(e.into())
    }
}

impl RuntimeError {
    /// Whether the caller (not the server) is at fault: shown as is to API clients.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, RuntimeError::Db(_) | RuntimeError::Plugin(_))
    }
}
