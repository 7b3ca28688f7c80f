//! Process-wide state shared by the HTTP layer and the background jobs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::DbPool;
use crate::plugins::PluginRegistry;

#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    /// The URL the pool connects to (LISTEN connections and blocking COPY paths open their own).
    pub database_url: Arc<str>,
    pub config: Arc<Config>,
    /// Connector plugins found at start; libraries stay loaded for the process lifetime.
    pub plugins: Arc<PluginRegistry>,
    /// Cancelled on SIGINT/SIGTERM: long-running tasks stop taking work.
    pub shutdown: CancellationToken,
    /// Background jobs of this process, awaited (bounded) at shutdown.
    pub tasks: TaskTracker,
}

impl AppState {
    /// State with the plugins discovered from the configured directories (and the executable's).
    pub fn new(pool: DbPool, database_url: &str, config: Config) -> Self {
        let dirs = crate::plugins::discovery::plugin_dirs(&config.plugin_dirs);
        let plugins = PluginRegistry::discover(&dirs);
        Self::with_plugins(pool, database_url, config, plugins)
    }

    pub fn with_plugins(
        pool: DbPool,
        database_url: &str,
        config: Config,
        plugins: PluginRegistry,
    ) -> Self {
        AppState {
            pool,
            database_url: Arc::from(database_url),
            config: Arc::new(config),
            plugins: Arc::new(plugins),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}
