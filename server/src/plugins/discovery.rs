//! Where plugins are looked for.
//!
//! Directories, in order (the first plugin with a given name wins):
//! 1. the configured `plugin_dirs`,
//! 2. `HEALTHD_PLUGIN_DIR` (colon-separated, `;` on Windows),
//! 3. the directory holding the `healthd` executable; for a test binary in `target/<profile>/deps`
//!    its parent instead, where cargo puts the workspace's connector libraries (`deps` itself
//!    also holds proc-macro libraries that are not plugins).
//!
//! Files considered: `lib*.so`, `*.dylib`, `*.dll`.

use std::path::{Path, PathBuf};

/// Environment variable listing extra plugin directories.
pub const PLUGIN_DIR_ENV: &str = "HEALTHD_PLUGIN_DIR";

/// The directories to search: `configured`, then `HEALTHD_PLUGIN_DIR`, then the executable's
/// directory; duplicates removed, order kept.
pub fn plugin_dirs(configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.to_vec();
    if let Some(env) = std::env::var_os(PLUGIN_DIR_ENV) {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs.extend(executable_dir());
    dedup_dirs(dirs)
}

/// The directory holding the running executable (the parent of `deps` for cargo test binaries).
pub fn executable_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let dir = exe.parent()?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf);
    }
    Some(dir)
}

/// Whether a file name looks like a shared library that may hold a plugin.
pub fn is_library_name(name: &str) -> bool {
    (name.starts_with("lib") && name.ends_with(".so"))
        || name.ends_with(".dylib")
        || name.ends_with(".dll")
}

/// The library files in `dir`, sorted by name. A missing directory yields an error.
pub fn library_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_library_name(name) {
            continue;
        }
        // Follow symlinks: installed plugins are often links into a package directory.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn dedup_dirs(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for d in dirs {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        for yes in [
            "libhealthd_connector_csv.so",
            "healthd_connector_csv.dll",
            "libx.dylib",
        ] {
            assert!(is_library_name(yes), "{yes}");
        }
        for no in [
            "healthd",
            "libx.rlib",
            "libx.so.d",
            "x.so",
            "libx.a",
            "libx.d",
        ] {
            assert!(!is_library_name(no), "{no}");
        }
    }

    #[test]
    fn test_binaries_look_next_to_the_workspace_artifacts() {
        let dir = executable_dir().unwrap();
        assert_ne!(dir.file_name().unwrap(), "deps");
        assert!(plugin_dirs(&[]).contains(&dir));
    }

    #[test]
    fn duplicate_dirs_are_removed() {
        let d = std::env::temp_dir();
        let dirs = dedup_dirs(vec![d.clone(), d.join("."), d.clone()]);
        assert_eq!(dirs, vec![d]);
    }
}
