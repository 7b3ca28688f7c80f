//! Loading one connector library and calling it across the C ABI of `healthd_plugin_api::abi`.

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use healthd_plugin_api::abi::{
    self, BufferRef, ConnectorVTable, HostCallbacks, OwnedBuffer, ABI_VERSION, ENTRY_SYMBOL,
    STATUS_CANCELLED, STATUS_ERROR, STATUS_OK,
};
use healthd_plugin_api::{
    Batch, LogLevel, Manifest, RecordKind, API_VERSION_MAJOR, API_VERSION_MINOR,
};
use serde_json::Value;

/// Why a plugin could not be loaded or a sync did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The dynamic loader refused the file (missing, not a library, wrong architecture...).
    #[error("cannot load {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// A library, but without the connector entry point.
    #[error("{path} is not a healthd connector (no symbol `{symbol}`)")]
    NotAConnector { path: PathBuf, symbol: &'static str },
    /// Built for another layout of the function table.
    #[error("{path} speaks connector ABI {found} (built against plugin-api {api}), this healthd speaks ABI {expected}")]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
        api: String,
    },
    /// Built against an incompatible plugin-api version.
    #[error("{path} was built against plugin-api {plugin}, this healthd speaks {host}: rebuild the connector against plugin-api {host}")]
    ApiMismatch {
        path: PathBuf,
        plugin: String,
        host: String,
    },
    /// The manifest could not be read or is invalid.
    #[error("{path} has an invalid manifest: {message}")]
    BadManifest { path: PathBuf, message: String },
    /// Settings do not match the plugin's schema.
    #[error("invalid settings for plugin `{plugin}`: {}", .errors.join("; "))]
    InvalidSettings { plugin: String, errors: Vec<String> },
    /// The connector refused to start (bad settings beyond the schema, or it panicked).
    #[error("connector `{plugin}` could not start: {message}")]
    Create { plugin: String, message: String },
    /// The sync returned an error or panicked (`message` starts with `connector panicked:`).
    #[error("connector `{plugin}` failed: {message}")]
    Sync { plugin: String, message: String },
    /// The host cancelled the run (timeout, shutdown) and the connector stopped.
    #[error("connector `{plugin}` was cancelled (timeout or shutdown)")]
    Cancelled { plugin: String },
    /// The sink could not save a batch; the run stopped there.
    #[error("saving a batch from connector `{plugin}` failed: {message}")]
    Sink { plugin: String, message: String },
    /// The connector sent bytes that are not a valid batch.
    #[error("connector `{plugin}` sent an invalid batch: {message}")]
    Protocol { plugin: String, message: String },
    /// The connector did not return within its timeout plus grace period, even after being
    /// told to stop; its thread is abandoned and keeps running until it returns.
    #[error("connector `{plugin}` did not stop within {timeout:?} (abandoned)")]
    TimedOut { plugin: String, timeout: Duration },
}

impl PluginError {
    /// Whether the connector panicked (the process is fine; the run failed).
    pub fn is_panic(&self) -> bool {
        matches!(self, PluginError::Sync { message, .. } | PluginError::Create { message, .. } if message.starts_with("connector panicked"))
    }
}

/// Receives the batches of one sync. The connector runtime implements it: each batch, with its
/// rejections and cursor, saved in one transaction.
pub trait BatchSink {
    /// Saves one batch. An `Err` stops the run: the plugin's `emit` fails, later batches are
    /// refused, and `run_sync` returns [`PluginError::Sink`] with this message.
    fn batch(&mut self, batch: Batch) -> Result<(), String>;
}

impl<F: FnMut(Batch) -> Result<(), String>> BatchSink for F {
    fn batch(&mut self, batch: Batch) -> Result<(), String> {
        self(batch)
    }
}

/// A cheap, clonable cancellation flag, optionally with a deadline. The plugin sees it through
/// `is_cancelled()`, and `emit` fails once it is set.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels this token and every clone of it.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// True once cancelled or past the deadline.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// A clone sharing the flag that also counts as cancelled from `deadline` on.
    pub fn with_deadline(&self, deadline: Instant) -> Self {
        let deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        CancelToken {
            flag: Arc::clone(&self.flag),
            deadline,
        }
    }

    /// A clone sharing the flag that counts as cancelled after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        self.with_deadline(Instant::now() + timeout)
    }
}

/// The clock a connector sees through `ctx.now()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A fixed instant (tests, reproducible demos and benchmarks).
    Fixed(DateTime<Utc>),
}

impl Clock {
    fn now(self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => t,
        }
    }
}

/// What a successful sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The cursor after the run: the last one a committed batch carried, else the one given.
    pub cursor: Option<String>,
    /// Batches committed.
    pub batches: u64,
    /// Records committed.
    pub records: u64,
    /// Rejections committed.
    pub rejections: u64,
    /// Kinds of the records committed.
    pub record_kinds: BTreeSet<RecordKind>,
}

/// A loaded connector library. The library stays loaded for the life of the process (it is
/// never unloaded, so nothing it made can outlive its code).
pub struct LoadedPlugin {
    path: PathBuf,
    vtable: &'static ConnectorVTable,
    manifest: Manifest,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.manifest.name)
            .field("path", &self.path)
            .field("api_version", &self.api_version())
            .finish()
    }
}

/// The version header every ABI version keeps at the start of the table.
#[repr(C)]
struct VersionHeader {
    abi_version: u32,
    api_major: u32,
    api_minor: u32,
}

impl LoadedPlugin {
    /// Loads a connector library: dlopen, look up the entry symbol, check the ABI and plugin-api
    /// versions before calling anything else, then read and validate the manifest.
    pub fn open(path: impl AsRef<Path>) -> Result<LoadedPlugin, PluginError> {
        let path = path.as_ref().to_path_buf();
        // SAFETY: loading a library runs its initializers; plugin directories are trusted
        // (documented). The library is never unloaded.
        let library =
            unsafe { libloading::Library::new(&path) }.map_err(|e| PluginError::Load {
                path: path.clone(),
                message: dl_message(e),
            })?;
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: the symbol's type is fixed by the plugin ABI; it is only called below after
        // the lookup succeeded.
        let entry = unsafe {
            library.get::<unsafe extern "C" fn() -> *const ConnectorVTable>(ENTRY_SYMBOL.as_bytes())
        }
        .map_err(|_| PluginError::NotAConnector {
            path: path.clone(),
            symbol: ENTRY_SYMBOL,
        })?;
        // SAFETY: the entry point returns a pointer to a static table; it takes no arguments.
        let table = unsafe { entry() };
        if table.is_null() {
            return Err(PluginError::BadManifest {
                path,
                message: "the entry point returned no table".into(),
            });
        }
        // SAFETY: every ABI version starts with this header; nothing beyond it is read before the
        // versions are known to match.
        let header = unsafe { std::ptr::read(table.cast::<VersionHeader>()) };
        let plugin_api = format!("{}.{}", header.api_major, header.api_minor);
        if header.abi_version != ABI_VERSION {
            return Err(PluginError::AbiMismatch {
                path,
                found: header.abi_version,
                expected: ABI_VERSION,
                api: plugin_api,
            });
        }
        if !abi::api_compatible(
            header.api_major,
            header.api_minor,
            API_VERSION_MAJOR,
            API_VERSION_MINOR,
        ) {
            return Err(PluginError::ApiMismatch {
                path,
                plugin: plugin_api,
                host: format!("{API_VERSION_MAJOR}.{API_VERSION_MINOR}"),
            });
        }
        // SAFETY: same ABI version: the full table layout is ours; it is static in a library we
        // never unload.
        let vtable: &'static ConnectorVTable = unsafe { &*table };
        let mut out = OwnedBuffer::EMPTY;
        // SAFETY: manifest writes one buffer into `out`.
        let status = unsafe { (vtable.manifest)(&mut out) };
        let bytes = take_buffer(vtable, out);
        if status != STATUS_OK {
            return Err(PluginError::BadManifest {
                path,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| PluginError::BadManifest {
                path: path.clone(),
                message: e.to_string(),
            })?;
        manifest
            .validate()
            .map_err(|errs| PluginError::BadManifest {
                path: path.clone(),
                message: errs.join("; "),
            })?;
        tracing::debug!(plugin = %manifest.name, path = %path.display(), "loaded connector plugin");
        Ok(LoadedPlugin {
            path,
            vtable,
            manifest,
        })
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the connector says about itself.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest name (what `plugin = "..."` refers to).
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The plugin-api version the library was built against (`major.minor.patch`).
    pub fn api_version(&self) -> String {
        format!(
            "{}.{}.{}",
            self.vtable.api_major, self.vtable.api_minor, self.vtable.api_patch
        )
    }

    /// Validates settings against the plugin's schema; returns them with defaults filled in.
    pub fn validate_settings(&self, settings: &Value) -> Result<Value, PluginError> {
        healthd_plugin_api::validate_settings(&self.manifest.settings_schema, settings).map_err(
            |errors| PluginError::InvalidSettings {
                plugin: self.manifest.name.clone(),
                errors,
            },
        )
    }

    /// Runs one sync on the calling thread (blocking): validate settings, create an instance,
    /// sync from `cursor`, hand every batch to `sink`, destroy the instance.
    pub fn run_sync(
        &self,
        settings: &Value,
        cursor: Option<&str>,
        sink: &mut dyn BatchSink,
        cancel: &CancelToken,
    ) -> Result<SyncOutcome, PluginError> {
        self.run_sync_with_clock(settings, cursor, sink, cancel, Clock::System)
    }

    /// [`LoadedPlugin::run_sync`] with the clock the connector sees.
    pub fn run_sync_with_clock(
        &self,
        settings: &Value,
        cursor: Option<&str>,
        sink: &mut dyn BatchSink,
        cancel: &CancelToken,
        clock: Clock,
    ) -> Result<SyncOutcome, PluginError> {
        let plugin = self.manifest.name.clone();
        let settings = self.validate_settings(settings)?;
        let settings_bytes = serde_json::to_vec(&settings).expect("JSON values serialize");
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut error = OwnedBuffer::EMPTY;
        // SAFETY: per the ABI; settings are borrowed for the call.
        let status = unsafe {
            (self.vtable.create)(
                BufferRef::from_slice(&settings_bytes),
                &mut handle,
                &mut error,
            )
        };
        let message = take_buffer(self.vtable, error);
        if status != STATUS_OK || handle.is_null() {
            return Err(PluginError::Create {
                plugin,
                message: text(&message, "no message"),
            });
        }

        let mut state = RunState {
            sink,
            cancel,
            clock,
            plugin: &plugin,
            error_text: String::new(),
            failure: None,
            outcome: SyncOutcome {
                cursor: cursor.map(str::to_string),
                ..Default::default()
            },
        };
        let callbacks = HostCallbacks {
            ctx: (&mut state as *mut RunState<'_>).cast(),
            emit: host_emit,
            is_cancelled: host_is_cancelled,
            now_micros: host_now_micros,
            log: host_log,
        };
        let cursor_ref = cursor.map_or(BufferRef::NONE, |c| BufferRef::from_slice(c.as_bytes()));
        let mut error = OwnedBuffer::EMPTY;
        // SAFETY: per the ABI; `handle` came from `create` and is used on this thread only;
        // `callbacks` and `state` outlive the call (the plugin must not keep them).
        let status = unsafe { (self.vtable.sync)(handle, cursor_ref, &callbacks, &mut error) };
        let message = take_buffer(self.vtable, error);
        // SAFETY: destroyed exactly once, after the sync returned.
        unsafe { (self.vtable.destroy)(handle) };

        match state.failure.take() {
            Some(Failure::Sink(message)) => return Err(PluginError::Sink { plugin, message }),
            Some(Failure::Protocol(message)) => {
                return Err(PluginError::Protocol { plugin, message })
            }
            None => {}
        }
        match status {
            STATUS_OK => Ok(state.outcome),
            STATUS_CANCELLED => Err(PluginError::Cancelled { plugin }),
            // However the connector words it, a run that failed (without panicking) after it was
            // cancelled was cancelled.
            _ if status != abi::STATUS_PANICKED && cancel.is_cancelled() => {
                Err(PluginError::Cancelled { plugin })
            }
            _ => Err(PluginError::Sync {
                plugin,
                message: text(&message, "failed without a message"),
            }),
        }
    }
}

/// Runs a sync on a blocking thread with a timeout: at `timeout` the token is cancelled (the
/// plugin sees `is_cancelled()`, and `emit` fails); if the plugin has still not returned after
/// `grace`, the run is reported as [`PluginError::TimedOut`] and its thread abandoned (it cannot
/// be killed; it stops at its next call into the host).
pub async fn run_sync_with_timeout<S>(
    plugin: Arc<LoadedPlugin>,
    settings: Value,
    cursor: Option<String>,
    mut sink: S,
    cancel: CancelToken,
    timeout: Duration,
    grace: Duration,
) -> Result<SyncOutcome, PluginError>
where
    S: BatchSink + Send + 'static,
{
    let name = plugin.name().to_string();
    let token = cancel.with_timeout(timeout);
    let run_token = token.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        plugin.run_sync(&settings, cursor.as_deref(), &mut sink, &run_token)
    });
    let joined = match tokio::time::timeout(timeout, &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            token.cancel();
            match tokio::time::timeout(grace, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(PluginError::TimedOut {
                        plugin: name,
                        timeout: timeout + grace,
                    })
                }
            }
        }
    };
    joined.unwrap_or_else(|e| {
        Err(PluginError::Sync {
            plugin: name,
            message: format!("sync thread failed: {e}"),
        })
    })
}

/// `healthd plugin inspect PATH`: loads a library and describes it (or says why it was refused).
pub fn inspect(path: impl AsRef<Path>) -> Result<Value, PluginError> {
    let plugin = LoadedPlugin::open(path)?;
    Ok(serde_json::json!({
        "path": plugin.path().display().to_string(),
        "abi_version": plugin.vtable.abi_version,
        "plugin_api_version": plugin.api_version(),
        "manifest": plugin.manifest(),
    }))
}

fn dl_message(e: libloading::Error) -> String {
    // libloading wraps dlerror(); its source carries the loader's own words.
    match std::error::Error::source(&e) {
        Some(src) => src.to_string(),
        None => e.to_string(),
    }
}

/// Copies a plugin-owned buffer and gives it back to the plugin to free.
fn take_buffer(vtable: &ConnectorVTable, buffer: OwnedBuffer) -> Vec<u8> {
    if buffer.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the buffer was written by the plugin and is freed exactly once, by the plugin.
    let bytes = unsafe { buffer.as_slice() }.to_vec();
    unsafe { (vtable.free_buffer)(buffer) };
    bytes
}

fn text(bytes: &[u8], default: &str) -> String {
    if bytes.is_empty() {
        default.to_string()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

enum Failure {
    Sink(String),
    Protocol(String),
}

/// Host state for one sync, reached by the callbacks through `HostCallbacks::ctx`.
struct RunState<'a> {
    sink: &'a mut dyn BatchSink,
    cancel: &'a CancelToken,
    clock: Clock,
    plugin: &'a str,
    /// Backing storage for the message handed to the plugin by a failed `emit`.
    error_text: String,
    failure: Option<Failure>,
    outcome: SyncOutcome,
}

enum EmitRefusal {
    Cancelled,
    Failed(String),
}

impl RunState<'_> {
    fn emit(&mut self, bytes: &[u8]) -> Result<(), EmitRefusal> {
        // After a failure nothing more is saved: a later batch's cursor would skip the failed one.
        if let Some(Failure::Sink(m) | Failure::Protocol(m)) = &self.failure {
            return Err(EmitRefusal::Failed(m.clone()));
        }
        if self.cancel.is_cancelled() {
            return Err(EmitRefusal::Cancelled);
        }
        let batch: Batch = match abi::decode_batch(bytes) {
            Ok(b) => b,
            Err(e) => {
                let m = e.to_string();
                self.failure = Some(Failure::Protocol(m.clone()));
                return Err(EmitRefusal::Failed(m));
            }
        };
        let records = batch.records.len() as u64;
        let rejections = batch.rejections.len() as u64;
        let cursor = batch.cursor.clone();
        let mut kinds = BTreeSet::new();
        for r in &batch.records {
            kinds.insert(r.kind());
        }
        if let Err(m) = self.sink.batch(batch) {
            self.failure = Some(Failure::Sink(m.clone()));
            return Err(EmitRefusal::Failed(m));
        }
        let o = &mut self.outcome;
        o.batches += 1;
        o.records += records;
        o.rejections += rejections;
        o.record_kinds.extend(kinds);
        if cursor.is_some() {
            o.cursor = cursor;
        }
        Ok(())
    }
}

unsafe extern "C" fn host_emit(ctx: *mut c_void, batch: BufferRef, error: *mut BufferRef) -> i32 {
    // SAFETY: `ctx` is the RunState of the sync in progress on this thread.
    let state = unsafe { &mut *ctx.cast::<RunState<'_>>() };
    // SAFETY: the plugin lends the batch for this call.
    let bytes = unsafe { batch.as_slice() }.unwrap_or(&[]);
    let result = catch_unwind(AssertUnwindSafe(|| state.emit(bytes)));
    let message = match result {
        Ok(Ok(())) => return STATUS_OK,
        Ok(Err(EmitRefusal::Cancelled)) => return STATUS_CANCELLED,
        Ok(Err(EmitRefusal::Failed(m))) => m,
        Err(payload) => {
            let m = format!("the batch sink panicked: {}", abi::panic_message(&*payload));
            state.failure = Some(Failure::Sink(m.clone()));
            m
        }
    };
    state.error_text = message;
    if !error.is_null() {
        // SAFETY: `error` is the plugin's out slot; the text lives until the next callback.
        unsafe { error.write(BufferRef::from_slice(state.error_text.as_bytes())) };
    }
    STATUS_ERROR
}

unsafe extern "C" fn host_is_cancelled(ctx: *mut c_void) -> u32 {
    // SAFETY: `ctx` is the RunState of the sync in progress on this thread.
    let state = unsafe { &*ctx.cast::<RunState<'_>>() };
    u32::from(state.failure.is_some() || state.cancel.is_cancelled())
}

unsafe extern "C" fn host_now_micros(ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the RunState of the sync in progress on this thread.
    let state = unsafe { &*ctx.cast::<RunState<'_>>() };
    state.clock.now().timestamp_micros()
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, message: BufferRef) {
    // SAFETY: `ctx` is the RunState of the sync in progress; the message is lent for the call.
    let state = unsafe { &*ctx.cast::<RunState<'_>>() };
    let bytes = unsafe { message.as_slice() }.unwrap_or(&[]);
    let text = String::from_utf8_lossy(bytes);
    let plugin = state.plugin;
    // tracing macros do not unwind in practice; guard anyway so nothing crosses extern "C".
    let _ = catch_unwind(AssertUnwindSafe(|| match LogLevel::from_u32(level) {
        LogLevel::Debug => tracing::debug!(target: "healthd::plugins", plugin, "{text}"),
        LogLevel::Info => tracing::info!(target: "healthd::plugins", plugin, "{text}"),
        LogLevel::Warn => tracing::warn!(target: "healthd::plugins", plugin, "{text}"),
    }));
}
