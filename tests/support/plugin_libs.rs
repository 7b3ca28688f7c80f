//! Finding and building the real plugin libraries from tests (shared by the test binaries that
//! load them). Included with `#[path]`; not every test binary uses every helper.

use std::path::{Path, PathBuf};
use std::process::Command;

use healthd::plugins::PluginRegistry;

/// target/<profile>, where cargo puts the healthd binary and the workspace's connector libraries.
pub fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_healthd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cargo build --quiet ARGS` in the workspace, in the profile the tests run in.
pub fn cargo_build(args: &[&str], target_dir: Option<&Path>) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.arg("build")
        .arg("--quiet")
        .args(args)
        .current_dir(workspace_dir());
    if let Some(t) = target_dir {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("run cargo").success(),
        "cargo build {args:?} failed"
    );
}

/// The platform's file name for library `stem` in `dir` (`libstem.so` on Linux).
pub fn lib_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// A registry holding exactly these libraries.
pub fn registry_of(paths: &[PathBuf]) -> PluginRegistry {
    let mut r = PluginRegistry::new();
    for path in paths {
        assert!(
            PluginRegistry::load(&mut r, path).is_some(),
            "cannot load {}",
            path.display()
        );
    }
    r
}

/// A registry with the real csv connector, built first if needed.
pub fn csv_registry() -> PluginRegistry {
    cargo_build(&["-p", "healthd-connector-csv"], None);
    registry_of(&[lib_path(&profile_dir(), "healthd_connector_csv")])
}
