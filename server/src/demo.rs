//! `healthd demo`: everything needed to see healthd work, in one command.
//!
//! It starts (or reuses) the private PostgreSQL under the data dir unless a database URL is
//! configured, creates a `synthetic` connector instance scheduled every minute (if missing),
//! backfills it at once, computes every score, creates an admin token named `demo-admin`, and
//! serves the API with the background jobs (so the synthetic data keeps moving every minute).

use std::time::Duration;

use anyhow::Context as _;

use crate::auth::Role;
use crate::cli::{self, Database};
use crate::config::Config;
use crate::connectors::instances::{self, NewConnector};
use crate::connectors::progress::Progress;
use crate::connectors::scheduler::{recover_stale_runs, SchedulerOptions};
use crate::connectors::{ConnectorRuntime, RunTrigger, RuntimeError};

/// Name of the connector instance the demo creates.
pub const DEMO_CONNECTOR: &str = "synthetic";

/// Runs the demo until SIGINT/SIGTERM. `config.listen` is where the API listens.
pub async fn demo(config: Config) -> anyhow::Result<()> {
    let db = Database::open(&config).await?;
    let result = demo_with(config, &db).await;
    db.close().await;
    result
}

async fn demo_with(config: Config, db: &Database) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    let state = cli::start_app(config, db).await?;
    let pool = &state.pool;
    if state.plugins.get("synthetic").is_none() {
        let refused: Vec<String> = state
            .plugins
            .refused()
            .into_iter()
            .map(|(p, why)| format!("\n  {}: {why}", p.display()))
            .collect();
        anyhow::bail!(
            "the `synthetic` connector plugin was not found next to the healthd executable or in \
             the plugin directories; build the whole workspace (`cargo build --release --workspace`) \
             or set HEALTHD_PLUGIN_DIR{}",
            refused.concat()
        );
    }
    instances::sync_config(pool, Some(&state.plugins), &state.config.connectors).await?;
    match instances::get(pool, DEMO_CONNECTOR).await {
        Ok(existing) => {
            if !existing.enabled {
                instances::set_enabled(pool, DEMO_CONNECTOR, true).await?;
            }
        }
        Err(RuntimeError::NotFound(_)) => {
            instances::create(
                pool,
                Some(&state.plugins),
                NewConnector {
                    name: DEMO_CONNECTOR.into(),
                    plugin: "synthetic".into(),
                    schedule: Some("every 1m".into()),
                    ..Default::default()
                },
            )
            .await?;
        }
        Err(e) => return Err(e.into()),
    }
    // A demo killed mid-sync left a run marked running; its process is gone.
    let startup = SchedulerOptions {
        lock_check_after: Duration::ZERO,
        ..Default::default()
    };
    recover_stale_runs(pool, &startup).await?;

    println!("backfilling the `{DEMO_CONNECTOR}` connector...");
    let runtime = ConnectorRuntime::from_state(&state);
    match runtime
        .sync_now(
            DEMO_CONNECTOR,
            RunTrigger::Cli,
            Progress::for_terminal(DEMO_CONNECTOR),
        )
        .await
    {
        Ok(summary) => {
            println!("{}", summary.render());
            if !summary.succeeded {
                anyhow::bail!("the demo backfill failed");
            }
        }
        Err(RuntimeError::AlreadyRunning(_) | RuntimeError::StillRunning { .. }) => {
            println!(
                "another healthd process is already syncing `{DEMO_CONNECTOR}`; not waiting for it"
            );
        }
        Err(e) => return Err(e.into()),
    }
    let scored = crate::scoring::rescore(pool, crate::scoring::RescoreScope::All)
        .await
        .context("computing scores")?;
    println!("scored {} accounts", scored.accounts_scored);
    let (_, token) = crate::auth::create_token(pool, "demo-admin", Role::Admin).await?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    crate::jobs::spawn_all(&state);
    println!(
        "\nhealthd demo is running\n\
         \n  GraphiQL:     http://{addr}/graphql\
         \n  admin token:  {token}\
         \n\nIn GraphiQL, add the header  {{\"Authorization\": \"Bearer {token}\"}}  and try\
         \n  {{ connectors {{ name status lastSuccessAt nextRunAt recordsIngested }} }}\
         \nor from a shell:\
         \n  curl -s http://{addr}/graphql -H 'Authorization: Bearer {token}' \\\
         \n    -H 'Content-Type: application/json' -d '{{\"query\":\"{{ connectors {{ name status }} }}\"}}'\
         \n\nThe `{DEMO_CONNECTOR}` connector appends new activity every minute. Ctrl-C stops.\n"
    );
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        cli::shutdown_signal().await;
        shutdown.cancel();
    });
    crate::http::serve(state.clone(), listener).await?;
    state.shutdown.cancel();
    crate::jobs::wait_all(&state).await;
    Ok(())
}
