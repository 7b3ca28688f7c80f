//! The `healthd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::app::AppState;
use crate::auth::Role;
use crate::config::{Config, LogFormat};
use crate::db::embedded::EmbeddedPostgres;

#[derive(Debug, Parser)]
#[command(
    name = "healthd",
    version,
    about = "Customer health scores from usage, support and billing data"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "HEALTHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API server and the background jobs (connector schedules, rescoring, webhooks).
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run a ready-to-explore instance: private PostgreSQL, live synthetic data, scores, server.
    Demo {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Connector plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Run one connector instance once, now, with live progress.
    Sync {
        /// Instance name (from the config file or created over GraphQL).
        name: String,
        /// No progress bar, only the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Recompute every account's score now.
    Score,
    /// Fit weights against churn outcomes; stores the proposal as an inactive model version.
    Calibrate {
        /// Signals are computed this many days before each churn (or matching) date.
        #[arg(long, default_value_t = 30)]
        lookback_days: i64,
    },
    /// Scoring model versions: list, show, preview before switching, activate.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Benchmarks (not part of the test suite; small runs of each are).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Every version, newest first.
    List,
    /// One version's weights (points of 100), tiers and notes.
    Show { version: i32 },
    /// Scores every account with this version without writing anything: tier changes, biggest
    /// movers with their drivers, and its AUC on past churn.
    Preview { version: i32 },
    /// Makes this version active. It takes effect at the next rescore, or now with `--rescore`.
    Activate {
        version: i32,
        /// Rescore every account now.
        #[arg(long)]
        rescore: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Print a library's manifest as JSON, or say why it is refused.
    Inspect { path: PathBuf },
    /// List the plugins found in the plugin directories.
    List,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// CSV drop through the real csv plugin vs PostgreSQL COPY of the same rows.
    Ingest {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Where the drop folder is written (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Full rescore vs one bare SQL aggregate pass over the same rows.
    Scoring {
        #[arg(long, default_value_t = 100_000)]
        accounts: usize,
        #[arg(long, default_value_t = 10_000_000)]
        events: usize,
    },
    /// Commit-to-message latency of `scoreChanged` subscriptions on a running healthd.
    Subscriptions {
        /// Base URL of the running server.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// A viewer (or higher) token for that server.
        #[arg(long, env = "HEALTHD_TOKEN")]
        token: String,
        #[arg(long, default_value_t = 5000)]
        subscribers: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Pause between committed changes, in milliseconds.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once, as the last line.
    Create {
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long)]
        name: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role `{s}`: expected viewer, editor or admin"))
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("healthd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("healthd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(format) = cli.log_format {
        config.log_format = format;
    }
    crate::telemetry::init_logging(config.log_format);
    match cli.command {
        Command::Schema => {
            print!("{}", crate::graphql::sdl());
            Ok(())
        }
        Command::Migrate => {
            let db = Database::open(&config).await?;
            let result = db.migrate().await;
            db.close().await;
            let applied = result?;
            if applied.is_empty() {
                println!("database schema is up to date");
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { role, name },
        } => {
            let db = Database::open(&config).await?;
            let result = async {
                db.migrate().await?;
                let pool = crate::db::connect(&db.url, 2).await?;
                let (token, secret) = crate::auth::create_token(&pool, &name, role).await?;
                anyhow::Ok((token, secret))
            }
            .await;
            db.close().await;
            let (token, secret) = result?;
            println!(
                "created {} token `{}` (id {})",
                token.role, token.name, token.id
            );
            println!("{secret}");
            Ok(())
        }
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                config.listen = listen;
            }
            serve(config).await
        }
        Command::Demo { listen } => {
            if let Some(listen) = listen {
                config.listen = listen;
            }
            crate::demo::demo(config).await
        }
        Command::Plugin {
            command: PluginCommand::Inspect { path },
        } => {
            let manifest = crate::plugins::loader::inspect(&path)
                .map_err(|e| anyhow::anyhow!("refused: {e}"))?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::List,
        } => {
            let dirs = crate::plugins::discovery::plugin_dirs(&config.plugin_dirs);
            let registry = crate::plugins::PluginRegistry::discover(&dirs);
            for dir in &dirs {
                println!("searched {}", dir.display());
            }
            for info in registry.list() {
                println!("{}", serde_json::to_string(&info)?);
            }
            for (path, reason) in registry.refused() {
                println!("refused {}: {reason}", path.display());
            }
            Ok(())
        }
        Command::Sync { name, quiet } => {
            with_app(config, |state| async move {
                let progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
                let summary =
                    crate::connectors::runner::sync_from_cli(&state, &name, progress).await?;
                println!("{}", summary.render());
                if !summary.succeeded {
                    anyhow::bail!("sync of `{name}` failed");
                }
                Ok(())
            })
            .await
        }
        Command::Score => {
            with_app(config, |state| async move {
                let summary = crate::scoring::recompute_now(&state.pool).await?;
                println!(
                    "scored {} accounts ({} changed, {} without data) with model version {}",
                    summary.accounts_scored,
                    summary.changed_account_ids.len(),
                    summary.accounts_without_data,
                    summary.model_version
                );
                Ok(())
            })
            .await
        }
        Command::Calibrate { lookback_days } => {
            with_app(config, |state| async move {
                let report =
                    crate::scoring::calibration::calibrate(&state.pool, lookback_days).await?;
                print!("{}", crate::scoring::report::calibration_text(&report));
                Ok(())
            })
            .await
        }
        Command::Model { command } => with_app(config, |state| run_model(state, command)).await,
        Command::Bench { command } => run_bench(config, command).await,
    }
}

/// Opens the database, runs `f` with an app state (no server, no background jobs), closes it.
async fn with_app<F, Fut>(config: Config, f: F) -> anyhow::Result<()>
where
    F: FnOnce(AppState) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let db = Database::open(&config).await?;
    let result = async {
        let state = start_app(config, &db).await?;
        f(state).await
    }
    .await;
    db.close().await;
    result
}

async fn run_model(state: AppState, command: ModelCommand) -> anyhow::Result<()> {
    use crate::scoring::{model, preview, report};
    match command {
        ModelCommand::List => {
            for m in model::list_models(&state.pool).await? {
                println!("{}", report::model_line(&m));
            }
        }
        ModelCommand::Show { version } => {
            let m = model::get_model(&state.pool, Some(version))
                .await?
                .ok_or(crate::scoring::ScoringError::ModelNotFound(version))?;
            print!("{}", report::model_text(&m));
        }
        ModelCommand::Preview { version } => {
            let p = preview::preview(&state.pool, version, chrono::Utc::now()).await?;
            print!("{}", report::preview_text(&p));
        }
        ModelCommand::Activate { version, rescore } => {
            let m = model::activate(&state.pool, version).await?;
            println!("model version {} ({}) is now active", m.version, m.name);
            if rescore {
                let s = crate::scoring::recompute_now(&state.pool).await?;
                println!(
                    "rescored {} accounts ({} changed) with it",
                    s.accounts_scored,
                    s.changed_account_ids.len()
                );
            } else {
                println!(
                    "it takes effect at the next rescore (the daily job, a connector run or `healthd score`); add --rescore to rescore now"
                );
            }
        }
    }
    Ok(())
}

async fn run_bench(config: Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest { rows, dir } => {
            with_app(config, |state| async move {
                let tmp = tempfile::tempdir()?;
                let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
                let report = crate::bench::ingest::run_ingest_bench(
                    &state.database_url,
                    state.plugins.clone(),
                    rows,
                    &dir,
                )
                .await?;
                println!("{report}");
                Ok(())
            })
            .await
        }
        BenchCommand::Scoring { accounts, events } => {
            with_app(config, |state| async move {
                let report =
                    crate::bench::scoring::run_scoring_bench(&state.pool, accounts, events).await?;
                println!("{report}");
                Ok(())
            })
            .await
        }
        BenchCommand::Subscriptions {
            url,
            token,
            subscribers,
            changes,
            interval_ms,
        } => {
            let db = Database::open(&config).await?;
            let options = crate::bench::subscriptions::SubscriptionBenchOptions {
                url,
                token,
                database_url: db.url.clone(),
                subscribers,
                changes,
                interval: std::time::Duration::from_millis(interval_ms),
                server_pid: None,
                timeout: std::time::Duration::from_secs(120),
            };
            let result = crate::bench::subscriptions::run_subscription_bench(&options).await;
            db.close().await;
            println!("{}", result?);
            Ok(())
        }
    }
}

/// The database healthd talks to: the configured server, or its own private cluster.
pub struct Database {
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    pub async fn open(config: &Config) -> anyhow::Result<Database> {
        if let Some(url) = &config.database_url {
            return Ok(Database {
                url: url.clone(),
                embedded: None,
            });
        }
        let embedded = EmbeddedPostgres::start(&config.data_dir).await?;
        Ok(Database {
            url: embedded.database_url("healthd"),
            embedded: Some(embedded),
        })
    }

    pub async fn migrate(&self) -> anyhow::Result<Vec<String>> {
        crate::db::run_migrations(&self.url)
            .await
            .context("applying database migrations")
    }

    /// Stops the private cluster if this process started it.
    pub async fn close(self) {
        if let Some(embedded) = self.embedded {
            if let Err(e) = embedded.stop().await {
                tracing::warn!(error = %e, "stopping the private PostgreSQL failed");
            }
        }
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Starts everything `serve` runs and returns the state; used by `serve` and `demo`.
pub async fn start_app(config: Config, db: &Database) -> anyhow::Result<AppState> {
    // Install the metrics recorder before anything records.
    crate::telemetry::metrics_handle();
    // A bad [alerts] section fails the start instead of silently falling back to defaults.
    crate::alerts::rules::install_file_config(&config.alerts)
        .map_err(|e| anyhow::anyhow!("invalid [alerts] configuration: {e}"))?;
    db.migrate().await?;
    let pool = crate::db::connect(&db.url, config.pool_size)
        .await
        .context("connecting to the database")?;
    Ok(AppState::new(pool, &db.url, config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let db = Database::open(&config).await?;
    let result = serve_with(config, &db).await;
    db.close().await;
    result
}

async fn serve_with(config: Config, db: &Database) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    let state = start_app(config, db).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    crate::jobs::spawn_all(&state);
    tracing::info!("healthd listening on http://{addr}/graphql");
    println!("healthd listening on http://{addr}/graphql");
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.cancel();
    });
    crate::http::serve(state.clone(), listener).await?;
    state.shutdown.cancel();
    crate::jobs::wait_all(&state).await;
    Ok(())
}
