//! Configuration: a TOML file (`--config` / `HEALTHD_CONFIG`) with environment overrides.
//!
//! Precedence, highest first: command-line flags, environment variables, the file, defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {name}: {message}")]
    Env { name: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL URL. When unset, healthd runs a private cluster under `data_dir`.
    pub database_url: Option<String>,
    /// Where the private cluster and other local state live.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: String,
    /// `human` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// Extra directories searched for connector plugins; `HEALTHD_PLUGIN_DIR` and the executable's
    /// own directory are added by `plugins::discovery::plugin_dirs`.
    pub plugin_dirs: Vec<PathBuf>,
    /// Connections per healthd process.
    pub pool_size: u32,
    /// Run connector schedules, daily rescoring and webhook delivery in this process.
    pub background_jobs: bool,
    pub limits: Limits,
    /// Connector instances declared in the file (`[[connector]]`); created or updated at start.
    #[serde(rename = "connector")]
    pub connectors: Vec<ConnectorConfig>,
    /// `[scoring]`: parsed by the scoring module (freshness, daily rescore time...).
    pub scoring: serde_json::Value,
    /// `[alerts]`: parsed by the alerts module (rule thresholds, cool-down...).
    pub alerts: serde_json::Value,
    /// `[[webhook]]`: receivers declared in the file.
    #[serde(rename = "webhook")]
    pub webhooks: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Bounds on what one API request may cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    pub max_body_bytes: usize,
    /// Largest `first:` a connection accepts.
    pub max_page_size: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_depth: 12,
            max_query_complexity: 20_000,
            max_body_bytes: 256 * 1024,
            max_page_size: 500,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Instance name, unique; also the `source` of everything it ingests.
    pub name: String,
    /// Manifest name of the plugin.
    pub plugin: String,
    /// `every 15m`, `every 1h`, `every 1d` or a cron expression. Default: daily.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A run that takes longer is cancelled and fails.
    #[serde(default = "default_timeout")]
    pub timeout_secs: i32,
    /// Data older than this marks scores stale.
    #[serde(default = "default_max_age")]
    pub max_age_hours: i32,
    #[serde(default = "empty_object")]
    pub settings: serde_json::Value,
}

fn default_schedule() -> String {
    "every 24h".into()
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> i32 {
    3600
}
fn default_max_age() -> i32 {
    48
}
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            data_dir: PathBuf::from(".healthd"),
            listen: "127.0.0.1:8080".into(),
            log_format: LogFormat::Human,
            plugin_dirs: Vec::new(),
            pool_size: 16,
            background_jobs: true,
            limits: Limits::default(),
            connectors: Vec::new(),
            scoring: empty_object(),
            alerts: empty_object(),
            webhooks: Vec::new(),
        }
    }
}

impl Config {
    /// Reads the file (if any) and applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.pool_size < 2 {
            return Err(format!(
                "pool_size = {} is too small: at least 2 connections are needed (a rescore loads on one while it writes on another)",
                config.pool_size
            ));
        }
        Ok(config)
    }

    /// Environment overrides; `lookup` is injectable for tests.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let non_empty = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(url) = non_empty("HEALTHD_DATABASE_URL").or_else(|| non_empty("DATABASE_URL")) {
            self.database_url = Some(url);
        }
        if let Some(dir) = non_empty("HEALTHD_DATA_DIR") {
            self.data_dir = PathBuf::from(dir);
        }
        if let Some(listen) = non_empty("HEALTHD_LISTEN") {
            self.listen = listen;
        }
        if let Some(format) = non_empty("HEALTHD_LOG_FORMAT") {
            self.log_format = match format.to_ascii_lowercase().as_str() {
                "json" => LogFormat::Json,
                "human" | "text" => LogFormat::Human,
                other => {
                    return Err(ConfigError::Env {
                        name: "HEALTHD_LOG_FORMAT".into(),
                        message: format!("expected `human` or `json`, got `{other}`"),
                    })
                }
            };
        }
        if let Some(jobs) = non_empty("HEALTHD_BACKGROUND_JOBS") {
            self.background_jobs = !matches!(jobs.as_str(), "0" | "false" | "no" | "off");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connectors_and_defaults() {
        let config = Config::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            [[connector]]
            name = "files"
            plugin = "csv"
            schedule = "every 1h"
            [connector.settings]
            dir = "/srv/drops"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000");
        assert_eq!(config.connectors.len(), 1);
        assert_eq!(config.connectors[0].settings["dir"], "/srv/drops");
        assert_eq!(config.connectors[0].timeout_secs, 3600);
        assert!(config.database_url.is_none());
    }

    #[test]
    fn a_pool_too_small_to_rescore_is_refused() {
        let e = Config::from_toml("pool_size = 1").unwrap_err();
        assert!(e.contains("at least 2"), "{e}");
        assert_eq!(Config::from_toml("pool_size = 2").unwrap().pool_size, 2);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("lisen = \"x\"").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn environment_overrides_file() {
        let mut config = Config::from_toml("database_url = \"postgres://file\"").unwrap();
        config
            .apply_env(|name| match name {
                "DATABASE_URL" => Some("postgres://env".into()),
                "HEALTHD_DATABASE_URL" => Some("postgres://healthd-env".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            config.database_url.as_deref(),
            Some("postgres://healthd-env")
        );
    }
}
