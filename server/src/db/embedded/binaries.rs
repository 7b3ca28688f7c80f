//! Finding the PostgreSQL server binaries (`initdb`, `postgres`) to run the private cluster with.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory holding both `initdb` and `postgres`, with the server's version.
#[derive(Debug, Clone)]
pub struct ServerBinaries {
    pub bin_dir: PathBuf,
    /// Full version string, e.g. `15.14`.
    pub version: String,
    /// Major version as written in a cluster's `PG_VERSION` file, e.g. `15` (or `9.6`).
    pub major: String,
}

impl ServerBinaries {
    pub fn initdb(&self) -> PathBuf {
        self.bin_dir.join("initdb")
    }

    pub fn postgres(&self) -> PathBuf {
        self.bin_dir.join("postgres")
    }
}

/// Candidate directories in search order, without duplicates: `PATH`, then `pg_config --bindir`,
/// then `/usr/lib/postgresql/*/bin` with the highest version first. Only directories holding
/// both binaries are returned.
pub fn default_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|d| d.is_absolute()));
    }
    if let Some(dir) = pg_config_bindir() {
        dirs.push(dir);
    }
    dirs.extend(versioned_dirs(Path::new("/usr/lib/postgresql")));
    filter_candidates(dirs)
}

/// Keeps the directories that hold both server binaries, dropping duplicates (by resolved path).
pub fn filter_candidates(dirs: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for dir in dirs {
        if !(is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))) {
            continue;
        }
        // /usr/local/bin/postgres is often a symlink into /usr/lib/postgresql/N/bin: compare the
        // resolved binary so the same installation is only probed once.
        let key = std::fs::canonicalize(dir.join("postgres")).unwrap_or_else(|_| dir.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(dir);
        }
    }
    out
}

/// Picks the first candidate whose version can run a cluster of major version `want`
/// (any version when `want` is `None`, i.e. for a new cluster). Returns the versions seen when
/// none matches.
pub fn select(
    candidates: &[PathBuf],
    want: Option<&str>,
) -> Result<ServerBinaries, Vec<ServerBinaries>> {
    let mut seen = Vec::new();
    for dir in candidates {
        let Some(bins) = probe(dir) else { continue };
        match want {
            Some(major) if bins.major != major => seen.push(bins),
            _ => return Ok(bins),
        }
    }
    Err(seen)
}

/// Runs `postgres --version` (allowed as root) and parses `postgres (PostgreSQL) 15.14 (...)`.
fn probe(dir: &Path) -> Option<ServerBinaries> {
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text)?;
    Some(ServerBinaries {
        bin_dir: dir.to_path_buf(),
        major: major_of(&version),
        version,
    })
}

pub(crate) fn parse_version(text: &str) -> Option<String> {
    let rest = text.split("(PostgreSQL)").nth(1)?;
    let token = rest.split_whitespace().next()?;
    // Development builds print e.g. `17devel` or `16beta2`: keep the numeric prefix.
    let numeric: String = token
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let numeric = numeric.trim_end_matches('.');
    (!numeric.is_empty()).then(|| numeric.to_string())
}

/// `15.14` -> `15`; before PostgreSQL 10 the major version had two parts (`9.6.24` -> `9.6`).
pub(crate) fn major_of(version: &str) -> String {
    let parts: Vec<&str> = version.split('.').collect();
    match parts.first().and_then(|p| p.parse::<u32>().ok()) {
        Some(n) if n < 10 && parts.len() >= 2 => format!("{}.{}", parts[0], parts[1]),
        _ => parts[0].to_string(),
    }
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(dir.trim());
    dir.is_absolute().then_some(dir)
}

/// `<root>/<version>/bin` for every numeric version directory, highest version first.
fn versioned_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, e.path().join("bin")))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = parse_version("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n").unwrap();
        assert_eq!(v, "15.14");
        assert_eq!(major_of(&v), "15");
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17devel").as_deref(),
            Some("17")
        );
        assert_eq!(major_of("9.6.24"), "9.6");
        assert_eq!(major_of("16"), "16");
        assert!(parse_version("something else").is_none());
    }

    #[test]
    fn versioned_dirs_sort_highest_first() {
        let root = std::env::temp_dir().join(format!("healthd-bins-{}", std::process::id()));
        for v in ["9.6", "15", "13", "notaversion"] {
            std::fs::create_dir_all(root.join(v).join("bin")).unwrap();
        }
        let dirs = versioned_dirs(&root);
        let names: Vec<String> = dirs
            .iter()
            .map(|d| {
                d.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["15", "13", "9.6"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
