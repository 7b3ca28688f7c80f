//! # healthd-plugin-api
//!
//! The interface between [healthd](https://github.com/) and its **connector plugins**: shared
//! libraries that pull customer data (accounts, product usage, support tickets, billing, churn)
//! from a source system and hand it to healthd as [`Record`]s.
//!
//! A connector is a `cdylib` crate that implements [`Connector`] and exports it with
//! [`export_connector!`]:
//!
//! ```no_run
//! use healthd_plugin_api::*;
//! use serde_json::{json, Value};
//!
//! struct Hello { account: String }
//!
//! impl Connector for Hello {
//!     fn manifest() -> Manifest {
//!         Manifest {
//!             name: "hello".into(),
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             description: "Says hello to one account".into(),
//!             record_kinds: vec![RecordKind::Accounts],
//!             settings_schema: json!({
//!                 "type": "object",
//!                 "properties": { "account": { "type": "string", "default": "acme" } }
//!             }),
//!         }
//!     }
//!
//!     fn new(settings: Value) -> Result<Self, ConnectorError> {
//!         Ok(Hello { account: settings["account"].as_str().unwrap_or_default().to_string() })
//!     }
//!
//!     fn sync(&mut self, ctx: &mut SyncContext<'_>) -> Result<(), ConnectorError> {
//!         if ctx.cursor().is_some() {
//!             return Ok(()); // already done in an earlier run
//!         }
//!         let account = Account { key: self.account.clone(), ..Default::default() };
//!         ctx.emit(vec![Record::Account(account)], Some("done".into()))
//!     }
//! }
//!
//! export_connector!(Hello);
//! ```
//!
//! What the host guarantees, and what it does not, is described in the crate README
//! (the connector author's guide).
//!
//! Modules: [`records`] (the data), [`settings`] (the settings schema subset and validator),
//! [`abi`] (the C ABI, generated for you), [`testing`] (run a connector in memory in unit tests).

#![warn(missing_docs)]

pub mod abi;
mod connector;
pub mod limits;
pub mod records;
pub mod settings;
pub mod testing;

pub use connector::{
    Batch, Connector, ConnectorError, LogLevel, Manifest, Rejection, SyncContext, SyncHost,
};
pub use records::{
    Account, Churn, Invoice, InvoiceStatus, Money, Priority, Record, RecordKind, Subscription,
    SubscriptionStatus, Ticket, TicketStatus, UsageDaily, UsageEvent,
};
pub use settings::{validate_schema, validate_settings};

/// Re-exported so connectors and the host agree on the exact versions.
pub use chrono;
/// Re-exported so connectors and the host agree on the exact versions.
pub use serde_json;

/// Major version of this crate (part of the ABI compatibility check).
pub const API_VERSION_MAJOR: u32 = parse_u32(env!("CARGO_PKG_VERSION_MAJOR"));
/// Minor version of this crate (part of the ABI compatibility check).
pub const API_VERSION_MINOR: u32 = parse_u32(env!("CARGO_PKG_VERSION_MINOR"));
/// Patch version of this crate (informational).
pub const API_VERSION_PATCH: u32 = parse_u32(env!("CARGO_PKG_VERSION_PATCH"));
/// The full version of this crate, e.g. `0.1.0`.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n: u32 = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "version component is not a number");
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}
