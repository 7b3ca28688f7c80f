//! Connector plugins: loading shared libraries that implement `healthd_plugin_api::Connector`,
//! finding them in plugin directories, and running their syncs.
//!
//! * [`loader`]: [`LoadedPlugin`] (dlopen, ABI/API version checks, manifest, settings
//!   validation, blocking [`LoadedPlugin::run_sync`] feeding a [`BatchSink`]).
//! * [`discovery`]: which directories and files are searched.
//! * [`registry`]: [`PluginRegistry`], the loaded plugins by manifest name.
//!
//! A plugin runs in the healthd process: panics are caught at the boundary, but a plugin can
//! still abort the process or exhaust its memory. Untrusted connectors need a subprocess.

pub mod discovery;
pub mod loader;
pub mod registry;

pub use discovery::{plugin_dirs, PLUGIN_DIR_ENV};
pub use loader::{
    inspect, run_sync_with_timeout, BatchSink, CancelToken, Clock, LoadedPlugin, PluginError,
    SyncOutcome,
};
pub use registry::{PluginInfo, PluginRegistry};

pub use healthd_plugin_api::{Batch, Manifest, Record, RecordKind, Rejection};
