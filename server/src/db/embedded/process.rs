//! Process bookkeeping: is a postmaster alive, who started it, and the files that record it.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// What `postmaster.pid` tells about a (possibly dead) server. Lines: pid, data dir, start time,
/// port, first socket directory, listen address, shared memory key, status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostmasterPid {
    pub pid: i32,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    /// `starting`, `ready`, `stopping` or `standby`; absent while the postmaster initialises.
    pub status: Option<String>,
}

impl PostmasterPid {
    pub fn read(cluster_dir: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read_to_string(cluster_dir.join("postmaster.pid")) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let lines: Vec<&str> = text.lines().collect();
        let pid = lines
            .first()?
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)?;
        let line = |i: usize| lines.get(i).map(|l| l.trim()).filter(|l| !l.is_empty());
        Some(Self {
            pid,
            port: line(3).and_then(|p| p.parse().ok()),
            socket_dir: line(4).map(PathBuf::from),
            status: line(7).map(str::to_string),
        })
    }
}

/// True while `pid` names a live process (a zombie counts as exited).
pub fn alive(pid: i32) -> bool {
    let exists = match kill(Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(Errno::EPERM) => true,
        Err(_) => false,
    };
    exists && proc_state(pid) != Some('Z')
}

/// The process's short command name from `/proc` (Linux), if readable.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// False only when we can tell that `pid` is not the postmaster of `cluster_dir` (pid reuse
/// after a reboot or a container restart), so a stale `postmaster.pid` naming it may be removed.
/// A postmaster runs a `postgres` binary and works in its data directory.
pub fn may_be_postmaster_of(pid: i32, cluster_dir: &Path) -> bool {
    if let Some(name) = comm(pid) {
        if !(name.starts_with("postgres") || name.starts_with("postmaster")) {
            return false;
        }
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => std::fs::canonicalize(cluster_dir).is_ok_and(|c| c == cwd),
        Err(_) => true,
    }
}

/// Fields of `/proc/<pid>/stat` after the parenthesised command name (which may hold spaces).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn proc_state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with the pid it
/// identifies a process even when pids are reused.
pub fn start_time(pid: i32) -> Option<u64> {
    // Field 22 overall; `stat_fields` starts at field 3 (state).
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// `<data_dir>/pg.owner`: which healthd process started the running cluster and will stop it.
/// A cluster whose owner has died (killed without a chance to stop it) is adopted by the next
/// healthd that starts on the data directory, so it does not run forever unowned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: i32,
    pub start_time: Option<u64>,
}

impl Owner {
    pub fn current() -> Self {
        let pid = std::process::id() as i32;
        Self {
            pid,
            start_time: start_time(pid),
        }
    }

    pub fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut parts = text.split_whitespace();
        let pid = parts.next()?.parse().ok()?;
        let start_time = parts.next().and_then(|s| s.parse().ok());
        Some(Self { pid, start_time })
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = match self.start_time {
            Some(t) => format!("{} {}\n", self.pid, t),
            None => format!("{}\n", self.pid),
        };
        let tmp = path.with_extension("owner.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    pub fn is_alive(&self) -> bool {
        if !alive(self.pid) {
            return false;
        }
        match (self.start_time, start_time(self.pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postmaster_pid() {
        let text = "4242\n/data/pg\n1764150000\n5432\n/data/run\n\n  1234567     98765\nready   \n";
        let p = PostmasterPid::parse(text).unwrap();
        assert_eq!(p.pid, 4242);
        assert_eq!(p.port, Some(5432));
        assert_eq!(p.socket_dir.as_deref(), Some(Path::new("/data/run")));
        assert_eq!(p.status.as_deref(), Some("ready"));
        // Early in startup only the first lines exist.
        let p = PostmasterPid::parse("77\n/data/pg\n").unwrap();
        assert_eq!((p.pid, p.port, p.status), (77, None, None));
        assert!(PostmasterPid::parse("").is_none());
        assert!(PostmasterPid::parse("-5\n").is_none());
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = Owner::current();
        assert!(me.is_alive());
        assert!(me.start_time.is_some());
        let reused = Owner {
            pid: me.pid,
            start_time: me.start_time.map(|t| t + 1),
        };
        assert!(!reused.is_alive());
        // This test process is no postmaster.
        assert!(!may_be_postmaster_of(me.pid, Path::new("/")));
    }
}
