//! The [`Connector`] trait and what a sync run sees of the host.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::records::{Record, RecordKind};

/// What a connector says about itself. Returned by [`Connector::manifest`]; the host reads it
/// when it loads the plugin (`healthd plugin inspect PATH` prints it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The plugin name users put in `plugin = "..."` of a `[[connector]]` config section.
    /// Lower-case letters, digits, `-` and `_`. Must be unique among installed plugins.
    pub name: String,
    /// The connector's own version (e.g. `env!("CARGO_PKG_VERSION")`).
    pub version: String,
    /// One line for humans.
    pub description: String,
    /// The kinds of records it may emit.
    pub record_kinds: Vec<RecordKind>,
    /// JSON Schema (the subset documented in [`crate::settings`]) of its settings.
    pub settings_schema: Value,
}

impl Manifest {
    /// Checks the manifest is usable: a valid name, and a settings schema within the subset.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            errors.push(format!(
                "plugin name `{}` must be 1-64 lower-case letters, digits, `-` or `_`",
                self.name
            ));
        }
        if let Err(e) = crate::settings::validate_schema(&self.settings_schema) {
            errors.extend(e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// A source row or item the connector could not turn into a record. The host stores rejections
/// with the run so users can fix their data; they do not fail the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The file (or other source object) the item came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The 1-based line (for CSV: the header is line 1), if meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// What is wrong, in words the user can act on.
    pub reason: String,
}

/// What crosses to the host in one [`SyncContext::emit`] call. The host commits the records,
/// the rejections and the cursor in **one transaction**: either all of it is saved or none.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Batch {
    /// The records.
    #[serde(default)]
    pub records: Vec<Record>,
    /// Items refused since the previous batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejections: Vec<Rejection>,
    /// The cursor that is true once this batch is saved; `None` leaves the saved cursor as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Why a connector call failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The settings are unusable (beyond what the schema can say, e.g. a folder that does not exist).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// The host cancelled the run (timeout, shutdown): stop and return this error.
    #[error("sync cancelled by the host")]
    Cancelled,
    /// The host could not save a batch (e.g. the database is down): stop and return this error.
    #[error("host could not save the batch: {0}")]
    Host(String),
    /// Anything else: the message is shown to users as the reason the run failed.
    #[error("{0}")]
    Failed(String),
}

impl ConnectorError {
    /// A [`ConnectorError::Failed`] from anything displayable.
    pub fn failed(message: impl fmt::Display) -> Self {
        ConnectorError::Failed(message.to_string())
    }

    /// A [`ConnectorError::Settings`] from anything displayable.
    pub fn settings(message: impl fmt::Display) -> Self {
        ConnectorError::Settings(message.to_string())
    }
}

impl From<std::io::Error> for ConnectorError {
    fn from(e: std::io::Error) -> Self {
        ConnectorError::Failed(e.to_string())
    }
}

impl From<serde_json::Error> for ConnectorError {
    fn from(e: serde_json::Error) -> Self {
        ConnectorError::Failed(e.to_string())
    }
}

/// Severity of a [`SyncContext::log`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    /// Detail for debugging.
    Debug = 0,
    /// Progress worth seeing in the server log.
    Info = 1,
    /// Something looks wrong but the run goes on.
    Warn = 2,
}

impl LogLevel {
    /// From the number used across the plugin boundary (unknown numbers count as `Info`).
    pub fn from_u32(n: u32) -> LogLevel {
        match n {
            0 => LogLevel::Debug,
            2 => LogLevel::Warn,
            _ => LogLevel::Info,
        }
    }
}

/// The host's side of a sync run, as a connector sees it through [`SyncContext`].
///
/// The plugin boundary implements it over the C ABI; [`crate::testing::MemoryHost`] implements
/// it in memory for connector unit tests.
pub trait SyncHost {
    /// Saves one batch (records, rejections and cursor atomically). Fails with
    /// [`ConnectorError::Cancelled`] once the run is cancelled.
    fn emit(&mut self, batch: Batch) -> Result<(), ConnectorError>;
    /// Whether the host wants the run to stop.
    fn is_cancelled(&self) -> bool;
    /// The current time according to the host (tests and demos may fix it).
    fn now(&self) -> DateTime<Utc>;
    /// Writes a line to the host's log, attributed to this connector.
    fn log(&mut self, level: LogLevel, message: &str);
}

/// Everything a connector can do during [`Connector::sync`].
pub struct SyncContext<'a> {
    cursor: Option<&'a str>,
    host: &'a mut dyn SyncHost,
    pending: Vec<Rejection>,
    emitted: u64,
}

impl<'a> SyncContext<'a> {
    /// A context over a host; used by the plugin boundary and by test harnesses.
    pub fn new(cursor: Option<&'a str>, host: &'a mut dyn SyncHost) -> Self {
        SyncContext {
            cursor,
            host,
            pending: Vec::new(),
            emitted: 0,
        }
    }

    /// The cursor saved with the last batch the host committed, or `None` on the first run.
    /// Its content is yours (the host never interprets it): typically JSON or a timestamp.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor
    }

    /// Sends records to the host with the cursor that is true once they are saved
    /// (`None` keeps the previous cursor). Rejections recorded with [`SyncContext::reject`] since
    /// the last emit travel in the same batch. The host saves batches in order, each with its
    /// cursor in one transaction (it may still be saving this one when `emit` returns; a failed
    /// save fails the next `emit` or the run), so after a crash the next run starts from the last
    /// cursor that was saved together with its records.
    ///
    /// Keep batches to a few thousand records. An error means the host did not save the batch
    /// (cancelled, database failure): return it from `sync`.
    pub fn emit(
        &mut self,
        records: Vec<Record>,
        cursor: Option<String>,
    ) -> Result<(), ConnectorError> {
        let batch = Batch {
            records,
            rejections: std::mem::take(&mut self.pending),
            cursor,
        };
        let n = batch.records.len() as u64;
        self.host.emit(batch)?;
        self.emitted += n;
        Ok(())
    }

    /// Records that one source item was refused (delivered with the next [`SyncContext::emit`],
    /// or at the end of a successful sync).
    pub fn reject(&mut self, file: Option<&str>, line: Option<u64>, reason: impl Into<String>) {
        self.pending.push(Rejection {
            file: file.map(str::to_string),
            line,
            reason: reason.into(),
        });
    }

    /// Whether the host asked the run to stop (e.g. its timeout passed). Long loops should check
    /// it and return [`ConnectorError::Cancelled`]; `emit` fails once the run is cancelled anyway.
    pub fn is_cancelled(&self) -> bool {
        self.host.is_cancelled()
    }

    /// Returns `Err(ConnectorError::Cancelled)` if the run was cancelled: `ctx.check_cancelled()?;`.
    pub fn check_cancelled(&self) -> Result<(), ConnectorError> {
        if self.is_cancelled() {
            Err(ConnectorError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The current time (UTC) according to the host. Use it rather than the system clock so a
    /// fixed clock in tests and demos gives reproducible runs.
    pub fn now(&self) -> DateTime<Utc> {
        self.host.now()
    }

    /// Writes a line to the server log, attributed to this connector.
    pub fn log(&mut self, level: LogLevel, message: impl AsRef<str>) {
        self.host.log(level, message.as_ref());
    }

    /// Records emitted so far in this run.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Delivers rejections not yet sent (called by the plugin boundary after a successful sync).
    pub fn finish(&mut self) -> Result<(), ConnectorError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.emit(Vec::new(), None)
    }
}

/// A connector: the one trait a plugin implements. Export it with
/// [`export_connector!`](crate::export_connector).
///
/// The host calls, for each scheduled run, on a dedicated blocking thread:
/// 1. [`Connector::manifest`] (once, at load),
/// 2. [`Connector::new`] with the configured settings, validated against the manifest's schema
///    and with defaults filled in,
/// 3. [`Connector::sync`] once, then drops the value.
///
/// Do not start async runtimes or background threads that outlive `sync`: the host gives each run
/// a deadline and expects the call to return once [`SyncContext::is_cancelled`] turns true.
pub trait Connector: Sized + Send {
    /// Describes the connector. Must be cheap and must not fail.
    fn manifest() -> Manifest;

    /// Builds an instance from validated settings. Check what the schema cannot (e.g. that a
    /// folder exists) and return [`ConnectorError::Settings`] with a clear message.
    fn new(settings: Value) -> Result<Self, ConnectorError>;

    /// Fetches what is new since `ctx.cursor()` and hands it over with [`SyncContext::emit`],
    /// each batch with the cursor that follows it. Returning `Ok` marks the run succeeded.
    /// Running it again with the cursor of the last batch must not produce duplicates.
    fn sync(&mut self, ctx: &mut SyncContext<'_>) -> Result<(), ConnectorError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::UsageEvent;

    /// Measures what one batch costs to cross the boundary (encode in the plugin, decode in the
    /// host). Run with `cargo test --release -p healthd-plugin-api -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn batch_wire_throughput() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-26T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let records: Vec<Record> = (0..5000)
            .map(|i| {
                Record::UsageEvent(UsageEvent {
                    account_key: format!("acct-{:04}", i % 200),
                    user_id: Some(format!("u{:02}@acmelabs.com", i % 25)),
                    event: "page_view".into(),
                    feature: Some("dashboards".into()),
                    occurred_at: t0 + chrono::Duration::seconds(i),
                    count: 3,
                    event_id: Some(format!("acct-{:04}-20261126-{:02}-{}", i % 200, i % 25, i)),
                })
            })
            .collect();
        let batch = Batch {
            records,
            rejections: vec![],
            cursor: Some("{\"until\":\"x\"}".into()),
        };
        let rounds = 40;
        let start = std::time::Instant::now();
        let mut bytes = 0;
        for _ in 0..rounds {
            let wire = crate::abi::encode_batch(&batch).unwrap();
            bytes = wire.len();
            let back = crate::abi::decode_batch(&wire).unwrap();
            assert_eq!(back.records.len(), 5000);
        }
        let per_sec = f64::from(rounds * 5000) / start.elapsed().as_secs_f64();
        eprintln!("{bytes} bytes per 5000-record batch; {per_sec:.0} records/s encode + decode");
    }
}
