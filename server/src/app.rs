//! Process-wide state shared by the HTTP layer and the background jobs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::DbPool;

#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    /// The URL the pool connects to (LISTEN connections and blocking COPY paths open their own).
    pub database_url: Arc<str>,
    pub config: Arc<Config>,
    /// Cancelled on SIGINT/SIGTERM: long-running tasks stop taking work.
    pub shutdown: CancellationToken,
}

impl AppState {
    pub fn new(pool: DbPool, database_url: &str, config: Config) -> Self {
        AppState {
            pool,
            database_url: Arc::from(database_url),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
    }
}
