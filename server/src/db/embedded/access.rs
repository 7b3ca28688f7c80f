//! Who the cluster runs as, and making sure that user can reach its files.
//!
//! PostgreSQL refuses to run as root. When healthd is root, `initdb` and `postgres` run as an
//! unprivileged system user; every directory on the way to the cluster must then be searchable
//! by that user, which we check up front instead of letting `postgres` fail with a vague error.

use std::fs::{DirBuilder, Metadata};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};
use sha2::{Digest, Sha256};

use super::EmbeddedError;

/// The unprivileged identity the server processes run as (only when healthd is root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// `None` when healthd is not root (the cluster runs as healthd's own user). As root: the owner
/// of an existing cluster directory, else the `postgres` system user, else `nobody`.
pub fn choose_run_as(cluster_dir: &Path) -> Result<Option<RunAs>, EmbeddedError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if let Ok(meta) = std::fs::symlink_metadata(cluster_dir) {
        if meta.is_dir() && meta.uid() != 0 {
            let user = User::from_uid(Uid::from_raw(meta.uid())).ok().flatten();
            return Ok(Some(match user {
                Some(u) => RunAs {
                    name: u.name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                },
                None => RunAs {
                    name: format!("uid {}", meta.uid()),
                    uid: meta.uid(),
                    gid: meta.gid(),
                },
            }));
        }
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(u)) = User::from_name(name) {
            if !u.uid.is_root() {
                return Ok(Some(RunAs {
                    name: u.name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                }));
            }
        }
    }
    Err(EmbeddedError::NoUnprivilegedUser)
}

/// Without root the cluster runs as healthd's own user, which must then own it (PostgreSQL
/// refuses a data directory owned by anyone else); say so up front.
pub fn check_cluster_owner(cluster_dir: &Path) -> Result<(), EmbeddedError> {
    let Ok(meta) = std::fs::metadata(cluster_dir) else {
        return Ok(());
    };
    let me = Uid::effective().as_raw();
    if meta.uid() == me {
        return Ok(());
    }
    let owner = User::from_uid(Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {}", meta.uid()));
    Err(EmbeddedError::WrongOwner {
        cluster: cluster_dir.to_path_buf(),
        owner,
        uid: me,
    })
}

/// Whether `run_as` may search (traverse) a directory with these permissions. The server
/// processes keep only their primary group (std drops supplementary groups with `setgroups(0)`
/// when changing uid), so supplementary groups are deliberately not considered.
pub fn searchable_by(meta: &Metadata, run_as: &RunAs) -> bool {
    let mode = meta.permissions().mode();
    if meta.uid() == run_as.uid {
        mode & 0o100 != 0
    } else if meta.gid() == run_as.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Fails with a message naming the first directory on the way to `dir` (inclusive) that
/// `run_as` cannot search.
pub fn check_reachable(dir: &Path, run_as: &RunAs) -> Result<(), EmbeddedError> {
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    for path in ancestors {
        let meta =
            std::fs::metadata(path).map_err(|e| EmbeddedError::io("cannot inspect", path, e))?;
        if !searchable_by(&meta, run_as) {
            return Err(EmbeddedError::NotReachable {
                user: run_as.name.clone(),
                uid: run_as.uid,
                target: dir.to_path_buf(),
                blocked: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if missing; returns whether it was created here.
pub fn create_private_dir(dir: &Path) -> Result<bool, EmbeddedError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| EmbeddedError::io("cannot create directory", parent, e))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(EmbeddedError::io("cannot create directory", dir, e)),
    }
}

pub fn chown(path: &Path, run_as: &RunAs) -> Result<(), EmbeddedError> {
    nix::unistd::chown(
        path,
        Some(Uid::from_raw(run_as.uid)),
        Some(Gid::from_raw(run_as.gid)),
    )
    .map_err(|e| EmbeddedError::io("cannot change owner of", path, e.into()))
}

pub fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| EmbeddedError::io("cannot change permissions of", path, e))
}

/// Longest socket directory we use: `<dir>/.s.PGSQL.<port>` must fit in `sun_path` (108 bytes
/// with the terminating NUL); keep a margin.
const MAX_SOCKET_PATH: usize = 100;

/// The directory for the server's Unix socket: `<data_dir>/run` when its socket path is short
/// enough and free of characters `unix_socket_directories` treats specially, else a private
/// `/tmp/healthd-<hash of data dir>`.
pub fn socket_dir_for(data_dir: &Path, port: u16) -> PathBuf {
    let preferred = data_dir.join("run");
    if socket_dir_usable(&preferred, port) {
        return preferred;
    }
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    PathBuf::from(format!("/tmp/healthd-{}", &hex::encode(digest)[..16]))
}

fn socket_dir_usable(dir: &Path, port: u16) -> bool {
    let Some(s) = dir.to_str() else { return false };
    let socket_len = s.len() + "/.s.PGSQL.".len() + port.to_string().len();
    socket_len <= MAX_SOCKET_PATH
        && !s
            .chars()
            .any(|c| c == ',' || c == '"' || c == '\\' || c == '\'' || c.is_whitespace())
}

/// Creates or validates the socket directory: a real directory (not a symlink), owned by the
/// server's user, mode 0700. Only the server's user (and root) can then connect, which matters
/// because the cluster uses trust authentication.
pub fn prepare_socket_dir(
    dir: &Path,
    in_data_dir: bool,
    run_as: Option<&RunAs>,
) -> Result<(), EmbeddedError> {
    let expected_uid = run_as
        .map(|r| r.uid)
        .unwrap_or_else(|| Uid::effective().as_raw());
    create_private_dir(dir)?;
    let meta =
        std::fs::symlink_metadata(dir).map_err(|e| EmbeddedError::io("cannot inspect", dir, e))?;
    if !meta.is_dir() {
        return Err(EmbeddedError::UnsafeSocketDir {
            path: dir.to_path_buf(),
            reason: "it is not a directory".into(),
        });
    }
    if meta.uid() != expected_uid {
        // Inside our data directory it is ours to fix; a directory under /tmp owned by someone
        // else could be a trap, so refuse it.
        match run_as {
            Some(r) if in_data_dir || meta.uid() == 0 => chown(dir, r)?,
            _ => {
                return Err(EmbeddedError::UnsafeSocketDir {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "it is owned by uid {} instead of uid {expected_uid}; remove it",
                        meta.uid()
                    ),
                })
            }
        }
    } else if let Some(r) = run_as {
        if meta.gid() != r.gid {
            chown(dir, r)?;
        }
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        set_mode(dir, 0o700)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_odd_data_dirs_get_a_short_socket_dir() {
        let short = socket_dir_for(Path::new("/srv/healthd"), 5432);
        assert_eq!(short, Path::new("/srv/healthd/run"));
        let long_dir = PathBuf::from(format!("/srv/{}", "x".repeat(90)));
        let fallback = socket_dir_for(&long_dir, 5432);
        assert!(fallback.to_string_lossy().starts_with("/tmp/healthd-"));
        assert_eq!(
            fallback,
            socket_dir_for(&long_dir, 5432),
            "stable per data dir"
        );
        assert_ne!(fallback, socket_dir_for(Path::new("/srv/a,b"), 5432));
        assert!(socket_dir_for(Path::new("/srv/with space"), 5432).starts_with("/tmp"));
    }
}
