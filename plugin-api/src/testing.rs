//! Running a connector in memory, for connector unit tests (no library loading, no database).
//!
//! ```
//! use healthd_plugin_api::testing::MemoryHost;
//! # use healthd_plugin_api::*;
//! # struct Nothing;
//! # impl Connector for Nothing {
//! #     fn manifest() -> Manifest { Manifest { name: "nothing".into(), version: "0".into(),
//! #         description: String::new(), record_kinds: vec![], settings_schema: serde_json::json!({"type": "object"}) } }
//! #     fn new(_: serde_json::Value) -> Result<Self, ConnectorError> { Ok(Nothing) }
//! #     fn sync(&mut self, ctx: &mut SyncContext<'_>) -> Result<(), ConnectorError> { ctx.emit(vec![], Some("done".into())) }
//! # }
//! let mut host = MemoryHost::default();
//! host.run::<Nothing>(serde_json::json!({}), None).unwrap();
//! assert_eq!(host.cursor.as_deref(), Some("done"));
//! ```

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::connector::{Batch, Connector, ConnectorError, LogLevel, SyncContext, SyncHost};
use crate::records::Record;
use crate::Rejection;

/// A [`SyncHost`] that keeps every batch in memory.
#[derive(Debug, Default)]
pub struct MemoryHost {
    /// Every batch received, in order.
    pub batches: Vec<Batch>,
    /// The latest cursor received (what the host would save).
    pub cursor: Option<String>,
    /// Log lines received.
    pub logs: Vec<(LogLevel, String)>,
    /// A fixed clock; the system clock when `None`.
    pub now: Option<DateTime<Utc>>,
    /// When true, `is_cancelled` reports true and `emit` fails.
    pub cancelled: bool,
}

impl MemoryHost {
    /// A host whose clock is fixed at `now`.
    pub fn at(now: DateTime<Utc>) -> Self {
        MemoryHost {
            now: Some(now),
            ..Default::default()
        }
    }

    /// Like the real host: validates the settings against the manifest (filling in defaults),
    /// builds the connector and runs one sync with `cursor` (pass `self.cursor.clone()` to
    /// continue where the last run stopped).
    pub fn run<C: Connector>(
        &mut self,
        settings: Value,
        cursor: Option<&str>,
    ) -> Result<(), ConnectorError> {
        let settings =
            crate::settings::validate_settings(&C::manifest().settings_schema, &settings)
                .map_err(|e| ConnectorError::Settings(e.join("; ")))?;
        let mut connector = C::new(settings)?;
        let mut ctx = SyncContext::new(cursor, self);
        connector.sync(&mut ctx)?;
        ctx.finish()
    }

    /// All records received, in order.
    pub fn records(&self) -> Vec<&Record> {
        self.batches.iter().flat_map(|b| b.records.iter()).collect()
    }

    /// All rejections received, in order.
    pub fn rejections(&self) -> Vec<&Rejection> {
        self.batches
            .iter()
            .flat_map(|b| b.rejections.iter())
            .collect()
    }
}

impl SyncHost for MemoryHost {
    fn emit(&mut self, batch: Batch) -> Result<(), ConnectorError> {
        if self.cancelled {
            return Err(ConnectorError::Cancelled);
        }
        if let Some(c) = &batch.cursor {
            self.cursor = Some(c.clone());
        }
        self.batches.push(batch);
        Ok(())
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    fn now(&self) -> DateTime<Utc> {
        self.now.unwrap_or_else(Utc::now)
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}
