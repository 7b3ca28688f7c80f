//! The loaded plugins, by manifest name.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use healthd_plugin_api::RecordKind;
use serde::Serialize;
use serde_json::Value;

use super::discovery::library_files;
use super::loader::LoadedPlugin;

/// A summary of one loaded plugin (for the API, the CLI and logs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginInfo {
    /// Manifest name.
    pub name: String,
    /// The connector's own version.
    pub version: String,
    /// One line for humans.
    pub description: String,
    /// Kinds of records it may emit.
    pub record_kinds: Vec<RecordKind>,
    /// JSON Schema of its settings.
    pub settings_schema: Value,
    /// The library file.
    pub path: PathBuf,
    /// The plugin-api version it was built against.
    pub api_version: String,
}

/// Plugins found in the plugin directories. Libraries that fail to load are kept in
/// [`PluginRegistry::refused`] with the reason and never stop the server.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    refused: Vec<(PathBuf, String)>,
}

impl PluginRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every library in `dirs` (see [`super::discovery::plugin_dirs`]). A library that
    /// fails to load is logged and refused; on duplicate names the first one found is kept.
    pub fn discover(dirs: &[PathBuf]) -> Self {
        let mut registry = Self::new();
        let mut seen_files = HashSet::new();
        for dir in dirs {
            let files = match library_files(dir) {
                Ok(files) => files,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot read plugin directory: {e}");
                    continue;
                }
            };
            for file in files {
                let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
                if seen_files.insert(canonical) {
                    registry.load(&file);
                }
            }
        }
        let names: Vec<&str> = registry.plugins.keys().map(String::as_str).collect();
        tracing::info!(plugins = ?names, refused = registry.refused.len(), "connector plugins discovered");
        registry
    }

    /// Loads one library into the registry; failures are recorded in [`PluginRegistry::refused`].
    /// Returns the plugin name when it was added.
    pub fn load(&mut self, path: &Path) -> Option<String> {
        match LoadedPlugin::open(path) {
            Ok(plugin) => self.insert(plugin),
            Err(e) => {
                tracing::warn!(path = %path.display(), "plugin refused: {e}");
                self.refused.push((path.to_path_buf(), e.to_string()));
                None
            }
        }
    }

    /// Adds a loaded plugin unless one with the same name exists (then it is refused with a
    /// warning). Returns the name when added.
    pub fn insert(&mut self, plugin: LoadedPlugin) -> Option<String> {
        let name = plugin.name().to_string();
        if let Some(existing) = self.plugins.get(&name) {
            let reason = format!(
                "duplicate plugin name `{name}`: already loaded from {}",
                existing.path().display()
            );
            tracing::warn!(path = %plugin.path().display(), "plugin refused: {reason}");
            self.refused.push((plugin.path().to_path_buf(), reason));
            return None;
        }
        self.plugins.insert(name.clone(), Arc::new(plugin));
        Some(name)
    }

    /// The plugin with this manifest name.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.get(name).cloned()
    }

    /// All loaded plugins, by name.
    pub fn list(&self) -> Vec<PluginInfo> {
        self.plugins
            .values()
            .map(|p| {
                let m = p.manifest();
                PluginInfo {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    description: m.description.clone(),
                    record_kinds: m.record_kinds.clone(),
                    settings_schema: m.settings_schema.clone(),
                    path: p.path().to_path_buf(),
                    api_version: p.api_version(),
                }
            })
            .collect()
    }

    /// Libraries that were found but not loaded, with the reason.
    pub fn refused(&self) -> Vec<(PathBuf, String)> {
        self.refused.clone()
    }

    /// Whether no plugin is loaded.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}
