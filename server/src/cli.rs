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
#[command(name = "healthd", version, about = "Customer health scores from usage, support and billing data")]
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
            println!("created {} token `{}` (id {})", token.role, token.name, token.id);
            println!("{secret}");
            Ok(())
        }
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                config.listen = listen;
            }
            serve(config).await
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
