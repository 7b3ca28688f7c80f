//! The private PostgreSQL cluster healthd runs when no database URL is configured.
//!
//! Layout under the data directory (default `./.healthd`): `pg/` holds the cluster, `pg.log` the
//! server's output, `run/` its Unix socket (or a private `/tmp/healthd-<hash>` when that path
//! would be too long for a socket), `pg.owner` the healthd process that started the server and
//! will stop it, `pg.lock` serialises concurrent starts. The server listens on its Unix socket
//! only (`listen_addresses = ''`), in a directory only its user can enter, with trust
//! authentication for the superuser `healthd`.
//!
//! A second healthd process on the same data directory attaches to the running server instead of
//! starting one, and leaves it running when it exits. A server left behind by a healthd that was
//! killed is adopted (and later stopped) by the next one.

mod access;
mod binaries;
mod process;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::sql_types::{Integer, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid};

pub use access::RunAs;
pub use binaries::ServerBinaries;

use process::{Owner, PostmasterPid};

/// Superuser created by `initdb`; connections over the private socket use it without password.
pub const SUPERUSER: &str = "healthd";
/// Database created at start unless [`Options::database`] says otherwise.
pub const DEFAULT_DATABASE: &str = "healthd";
/// Port number in the socket's name (`.s.PGSQL.<port>`); no TCP port is opened, and the socket
/// directory is private, so the usual port cannot clash with another server.
pub const DEFAULT_PORT: u16 = 5432;

/// Log files larger than this are moved to `pg.log.1` at start.
const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Environment variables that would silently change what `initdb`/`postgres` operate on.
const CLEARED_ENV: &[&str] = &[
    "PGDATA",
    "PGPORT",
    "PGHOST",
    "PGHOSTADDR",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGTZ",
    "PGCLIENTENCODING",
];

/// How to find and run the server. `Options::default()` is what `healthd` uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Look for `initdb` and `postgres` only in these directories instead of `PATH`,
    /// `pg_config --bindir` and `/usr/lib/postgresql/*/bin`.
    pub bin_dirs: Option<Vec<PathBuf>>,
    /// Port number of the socket. Default: the number in `<data_dir>/pg.port` if that file
    /// exists, else [`DEFAULT_PORT`].
    pub port: Option<u16>,
    /// How long to wait for the server to accept connections.
    pub start_timeout: Duration,
    /// `false` turns off fsync (initdb `--no-sync`, `fsync=off`): faster, for throwaway
    /// clusters only, since an OS crash can then corrupt the cluster.
    pub durable: bool,
    /// Database created at start if missing; `None` creates none.
    pub database: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dirs: None,
            port: None,
            start_timeout: Duration::from_secs(30),
            durable: true,
            database: Some(DEFAULT_DATABASE.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no PostgreSQL server binaries (initdb, postgres) found {searched}; install them (Debian/Ubuntu: apt-get install postgresql) or set HEALTHD_DATABASE_URL")]
    NoServerBinaries { searched: String },
    #[error("the PostgreSQL cluster in {} was created by PostgreSQL {cluster_version}, but {found}; install the PostgreSQL {cluster_version} server binaries (Debian/Ubuntu: apt-get install postgresql-{cluster_version}) or upgrade the cluster with pg_upgrade", cluster.display())]
    VersionMismatch {
        cluster: PathBuf,
        cluster_version: String,
        found: String,
    },
    #[error("healthd runs as root, which PostgreSQL refuses, and there is neither a `postgres` nor a `nobody` user to run it as; create a `postgres` system user or run healthd as an unprivileged user")]
    NoUnprivilegedUser,
    #[error("PostgreSQL runs as user {user} (uid {uid}) because healthd runs as root, but it cannot reach {}: directory {} is not searchable by that user; allow it (e.g. chmod o+x {}) or set HEALTHD_DATA_DIR to a directory it can reach", target.display(), blocked.display(), blocked.display())]
    NotReachable {
        user: String,
        uid: u32,
        target: PathBuf,
        blocked: PathBuf,
    },
    #[error("the PostgreSQL cluster in {} belongs to {owner}, but healthd runs as uid {uid}; run healthd as {owner} or as root, or set HEALTHD_DATA_DIR to another directory", cluster.display())]
    WrongOwner {
        cluster: PathBuf,
        owner: String,
        uid: u32,
    },
    #[error("unsafe socket directory {}: {reason}", path.display())]
    UnsafeSocketDir { path: PathBuf, reason: String },
    #[error("{} exists but is not a PostgreSQL cluster (no PG_VERSION) and is not empty; move it away so healthd can create a new cluster there", path.display())]
    NotACluster { path: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed for {} ({status}): {output}", cluster.display())]
    Initdb {
        cluster: PathBuf,
        status: String,
        output: String,
    },
    #[error("PostgreSQL exited during startup ({status}); last lines of {}:\n{tail}", log.display())]
    ExitedEarly {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("PostgreSQL did not accept connections on {} within {} s ({last_error}); last lines of {}:\n{tail}", socket.display(), timeout.as_secs(), log.display())]
    NotReady {
        socket: PathBuf,
        timeout: Duration,
        last_error: String,
        log: PathBuf,
        tail: String,
    },
    #[error("a PostgreSQL server (pid {pid}) is running on {} but did not accept connections on {} within {} s ({last_error}); stop it or check {}", cluster.display(), socket.display(), timeout.as_secs(), log.display())]
    AttachFailed {
        pid: i32,
        cluster: PathBuf,
        socket: PathBuf,
        timeout: Duration,
        last_error: String,
        log: PathBuf,
    },
    #[error("cannot connect to the private PostgreSQL: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("cannot create database {name}: {source}")]
    CreateDatabase {
        name: String,
        #[source]
        source: diesel::result::Error,
    },
    #[error("PostgreSQL (pid {pid}) did not stop: {reason}")]
    StopFailed { pid: i32, reason: String },
    #[error("the PostgreSQL server in {} kept shutting down while healthd tried to use it; is another program stopping it?", cluster.display())]
    KeptStopping { cluster: PathBuf },
    #[error("private PostgreSQL setup task failed: {0}")]
    Task(String),
}

impl EmbeddedError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How this process relates to the running server.
#[derive(Debug)]
enum Role {
    /// Spawned here: stop it, then reap it.
    Spawned(Child),
    /// Started by a healthd that has died: stop it (its new parent reaps it).
    Adopted,
    /// Run by another live process: leave it alone.
    Attached,
    /// Already stopped (or handed back).
    Stopped,
}

/// A running private cluster. Stop it with [`EmbeddedPostgres::stop`]; dropping an owned one
/// stops it too (synchronously, as a safety net for early returns and panics).
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    cluster_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    pid: i32,
    version: Option<String>,
    role: Role,
}

/// Outcome of the blocking preparation step.
enum Prepared {
    Spawned(EmbeddedPostgres),
    /// A live postmaster already runs on the cluster.
    Running(PostmasterPid),
}

struct Paths {
    data_dir: PathBuf,
    cluster_dir: PathBuf,
    log_path: PathBuf,
    owner_path: PathBuf,
}

impl Paths {
    fn new(data_dir: PathBuf) -> Self {
        Self {
            cluster_dir: data_dir.join("pg"),
            log_path: data_dir.join("pg.log"),
            owner_path: data_dir.join("pg.owner"),
            data_dir,
        }
    }
}

impl EmbeddedPostgres {
    /// Starts (creating it on first use) or attaches to the cluster under `data_dir`, waits until
    /// it accepts connections and creates the `healthd` database if missing.
    pub async fn start(data_dir: &Path) -> Result<Self, EmbeddedError> {
        Self::start_with(data_dir, Options::default()).await
    }

    pub async fn start_with(data_dir: &Path, options: Options) -> Result<Self, EmbeddedError> {
        let data_dir = data_dir.to_path_buf();
        // A server we found running may be on its way down (another healthd stopping it): then
        // wait for it to go and start our own, a bounded number of times.
        for _ in 0..3 {
            let (dir, opts) = (data_dir.clone(), options.clone());
            let (lock, paths, prepared) = tokio::task::spawn_blocking(move || prepare(&dir, &opts))
                .await
                .map_err(|e| EmbeddedError::Task(e.to_string()))??;
            let pg = match prepared {
                Prepared::Spawned(mut pg) => {
                    if let Err(e) = pg.wait_ready(options.start_timeout).await {
                        let _ = pg.stop().await;
                        return Err(e);
                    }
                    tracing::info!(
                        "started private PostgreSQL {} at {} (cluster {}, pid {})",
                        pg.version.as_deref().unwrap_or(""),
                        pg.socket_dir.display(),
                        pg.cluster_dir.display(),
                        pg.pid
                    );
                    pg
                }
                Prepared::Running(pm) => match attach(&paths, pm, options.start_timeout).await? {
                    Some(pg) => pg,
                    None => continue,
                },
            };
            if let Some(name) = &options.database {
                if let Err(e) = pg.ensure_database(name).await {
                    let _ = pg.stop().await;
                    return Err(e);
                }
            }
            drop(lock);
            return Ok(pg);
        }
        Err(EmbeddedError::KeptStopping {
            cluster: data_dir.join("pg"),
        })
    }

    /// Connection URL for `dbname` over the private socket, understood by libpq (sync diesel)
    /// and tokio-postgres (diesel-async): `postgres://healthd@%2Fsocket%2Fdir:5432/dbname`.
    pub fn database_url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{}:{}/{}",
            percent_encode(&self.socket_dir.to_string_lossy()),
            self.port,
            percent_encode(dbname)
        )
    }

    /// True when this process started (or adopted) the server and [`stop`](Self::stop) will
    /// shut it down; false when attached to a server another process runs.
    pub fn owned(&self) -> bool {
        matches!(self.role, Role::Spawned(_) | Role::Adopted)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn cluster_dir(&self) -> &Path {
        &self.cluster_dir
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the postmaster.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Server version (e.g. `15.14`); `None` when attached to a server started elsewhere.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Creates database `name` if it does not exist (safe against concurrent creation).
    pub async fn ensure_database(&self, name: &str) -> Result<(), EmbeddedError> {
        let url = self.database_url("postgres");
        let name = name.to_string();
        tokio::task::spawn_blocking(move || create_database_if_missing(&url, &name))
            .await
            .map_err(|e| EmbeddedError::Task(e.to_string()))?
    }

    /// Shuts an owned server down (fast shutdown: open sessions are ended, then a checkpoint) and
    /// waits for it to exit; does nothing when attached to another process's server.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        let (pid, dirs) = (self.pid, self.stop_dirs());
        if let Role::Attached = role {
            tracing::info!(
                "leaving PostgreSQL (pid {pid}) running for the process that started it"
            );
            return Ok(());
        }
        tokio::task::spawn_blocking(move || shut_down(role, pid, &dirs, Duration::from_secs(60)))
            .await
            .map_err(|e| EmbeddedError::Task(e.to_string()))?
    }

    fn stop_dirs(&self) -> (PathBuf, PathBuf) {
        (self.data_dir.clone(), self.socket_dir.clone())
    }

    /// Waits until the freshly spawned server accepts connections.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), EmbeddedError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let url = self.database_url("postgres");
        let mut last_error = String::from("not ready yet");
        loop {
            if let Role::Spawned(child) = &mut self.role {
                if let Ok(Some(status)) = child.try_wait() {
                    self.role = Role::Stopped;
                    return Err(EmbeddedError::ExitedEarly {
                        status: status.to_string(),
                        log: self.log_path.clone(),
                        tail: log_tail(&self.log_path),
                    });
                }
            }
            // The server writes `ready` into postmaster.pid once it accepts connections: wait for
            // that before connecting, so the log does not fill with "the database system is
            // starting up". Connect anyway after a while, in case the status is never written.
            let announced = PostmasterPid::read(&self.cluster_dir)
                .ok()
                .flatten()
                .is_some_and(|pm| pm.pid == self.pid && pm.status.as_deref() == Some("ready"));
            if announced || started.elapsed() > Duration::from_secs(3) {
                match try_connect(&url).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last_error = e,
                }
            }
            if Instant::now() >= deadline {
                return Err(EmbeddedError::NotReady {
                    socket: self.socket_dir.clone(),
                    timeout,
                    last_error: last_error.clone(),
                    log: self.log_path.clone(),
                    tail: log_tail(&self.log_path),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        if matches!(role, Role::Spawned(_) | Role::Adopted) {
            tracing::warn!(
                "stopping private PostgreSQL (pid {}) because its handle was dropped without stop()",
                self.pid
            );
            if let Err(e) = shut_down(role, self.pid, &self.stop_dirs(), Duration::from_secs(15)) {
                tracing::error!("{e}");
            }
        }
    }
}

/// Blocking part of the start: directories, lock, run-as user, finding a running server or
/// binaries, initdb, spawning `postgres`.
fn prepare(
    data_dir: &Path,
    options: &Options,
) -> Result<(Flock<File>, Paths, Prepared), EmbeddedError> {
    let data_dir = std::path::absolute(data_dir)
        .map_err(|e| EmbeddedError::io("cannot resolve", data_dir, e))?;
    let created = access::create_private_dir(&data_dir)?;
    let data_dir = std::fs::canonicalize(&data_dir)
        .map_err(|e| EmbeddedError::io("cannot resolve", &data_dir, e))?;
    let paths = Paths::new(data_dir);
    let lock = lock_data_dir(&paths.data_dir)?;

    let run_as = access::choose_run_as(&paths.cluster_dir)?;
    if run_as.is_none() {
        access::check_cluster_owner(&paths.cluster_dir)?;
    }
    if let Some(r) = &run_as {
        if created {
            // Our own new directory: let the server's user through (search only), nobody else.
            nix::unistd::chown(&paths.data_dir, None, Some(Gid::from_raw(r.gid))).map_err(|e| {
                EmbeddedError::io("cannot change group of", &paths.data_dir, e.into())
            })?;
            access::set_mode(&paths.data_dir, 0o710)?;
        }
        access::check_reachable(&paths.data_dir, r)?;
    }

    if let Some(pm) = PostmasterPid::read(&paths.cluster_dir).map_err(|e| {
        EmbeddedError::io("cannot read", &paths.cluster_dir.join("postmaster.pid"), e)
    })? {
        if process::alive(pm.pid) && process::may_be_postmaster_of(pm.pid, &paths.cluster_dir) {
            return Ok((lock, paths, Prepared::Running(pm)));
        }
        if process::alive(pm.pid) {
            // The pid was reused by an unrelated program (typical after a reboot or container
            // restart); postgres would refuse to start while the file names a live process.
            tracing::warn!(
                "removing stale postmaster.pid in {}: pid {} is now another program",
                paths.cluster_dir.display(),
                pm.pid
            );
            remove_if_exists(&paths.cluster_dir.join("postmaster.pid"))?;
            if let (Some(dir), Some(port)) = (&pm.socket_dir, pm.port) {
                remove_if_exists(&dir.join(format!(".s.PGSQL.{port}.lock")))?;
            }
        } else {
            tracing::info!(
                "PostgreSQL (pid {}) in {} did not shut down cleanly; starting it again",
                pm.pid,
                paths.cluster_dir.display()
            );
        }
    }

    let bins = find_binaries(options, &paths.cluster_dir)?;
    let port = match options.port {
        Some(p) => p,
        None => read_port_file(&paths.data_dir.join("pg.port"))?,
    };
    let socket_dir = access::socket_dir_for(&paths.data_dir, port);
    access::prepare_socket_dir(
        &socket_dir,
        socket_dir.starts_with(&paths.data_dir),
        run_as.as_ref(),
    )?;

    if !paths.cluster_dir.join("PG_VERSION").exists() {
        initdb(&bins, &paths.cluster_dir, run_as.as_ref(), options.durable)?;
    }

    let log = open_log(&paths.log_path)?;
    let mut cmd = Command::new(bins.postgres());
    cmd.arg("-D")
        .arg(&paths.cluster_dir)
        .arg("-k")
        .arg(&socket_dir)
        .arg("-p")
        .arg(port.to_string())
        .args(["-c", "listen_addresses="]);
    if !options.durable {
        cmd.args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]);
    }
    let log_err = log
        .try_clone()
        .map_err(|e| EmbeddedError::io("cannot open", &paths.log_path, e))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    configure_child(&mut cmd, &paths.cluster_dir, run_as.as_ref());
    let child = cmd
        .spawn()
        .map_err(|e| EmbeddedError::io("cannot run", &bins.postgres(), e))?;
    let pg = EmbeddedPostgres {
        pid: child.id() as i32,
        data_dir: paths.data_dir.clone(),
        cluster_dir: paths.cluster_dir.clone(),
        socket_dir,
        log_path: paths.log_path.clone(),
        port,
        version: Some(bins.version.clone()),
        role: Role::Spawned(child),
    };
    Owner::current()
        .write(&paths.owner_path)
        .map_err(|e| EmbeddedError::io("cannot write", &paths.owner_path, e))?;
    Ok((lock, paths, Prepared::Spawned(pg)))
}

/// Waits for a server found running to accept connections and decides whether we own it.
/// `Ok(None)` means it went away meanwhile (e.g. it was stopping): the caller starts afresh.
async fn attach(
    paths: &Paths,
    mut pm: PostmasterPid,
    timeout: Duration,
) -> Result<Option<EmbeddedPostgres>, EmbeddedError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("its postmaster.pid does not name a socket yet");
    loop {
        if !process::alive(pm.pid) {
            return Ok(None);
        }
        if let (Some(dir), Some(port)) = (&pm.socket_dir, pm.port) {
            let probe = EmbeddedPostgres {
                data_dir: paths.data_dir.clone(),
                cluster_dir: paths.cluster_dir.clone(),
                socket_dir: dir.clone(),
                log_path: paths.log_path.clone(),
                port,
                pid: pm.pid,
                version: None,
                role: Role::Attached,
            };
            match try_connect(&probe.database_url("postgres")).await {
                Ok(()) => return Ok(Some(take_ownership_if_orphaned(paths, probe)?)),
                Err(e) => last_error = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(EmbeddedError::AttachFailed {
                pid: pm.pid,
                cluster: paths.cluster_dir.clone(),
                socket: pm.socket_dir.clone().unwrap_or_default(),
                timeout,
                last_error,
                log: paths.log_path.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        match PostmasterPid::read(&paths.cluster_dir) {
            Ok(Some(fresh)) if fresh.pid == pm.pid => pm = fresh,
            _ => return Ok(None),
        }
    }
}

fn take_ownership_if_orphaned(
    paths: &Paths,
    mut pg: EmbeddedPostgres,
) -> Result<EmbeddedPostgres, EmbeddedError> {
    match Owner::read(&paths.owner_path) {
        Some(owner) if !owner.is_alive() => {
            tracing::info!(
                "adopting private PostgreSQL (pid {}) at {}: the healthd that started it (pid {}) is gone",
                pg.pid,
                pg.socket_dir.display(),
                owner.pid
            );
            Owner::current()
                .write(&paths.owner_path)
                .map_err(|e| EmbeddedError::io("cannot write", &paths.owner_path, e))?;
            pg.role = Role::Adopted;
        }
        owner => tracing::info!(
            "reusing running PostgreSQL (pid {}) at {}{}",
            pg.pid,
            pg.socket_dir.display(),
            match owner {
                Some(o) => format!(", started by healthd pid {}", o.pid),
                None => String::from(", not started by healthd"),
            }
        ),
    }
    Ok(pg)
}

fn find_binaries(options: &Options, cluster_dir: &Path) -> Result<ServerBinaries, EmbeddedError> {
    let (candidates, searched) = match &options.bin_dirs {
        Some(dirs) => (
            binaries::filter_candidates(dirs.iter().cloned()),
            format!(
                "in {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        None => (
            binaries::default_candidates(),
            String::from("on PATH, via pg_config --bindir or in /usr/lib/postgresql/*/bin"),
        ),
    };
    let cluster_version = match std::fs::read_to_string(cluster_dir.join("PG_VERSION")) {
        Ok(v) => Some(v.trim().to_string()),
        Err(_) => None,
    };
    match binaries::select(&candidates, cluster_version.as_deref()) {
        Ok(bins) => Ok(bins),
        Err(seen) => match (cluster_version, seen.is_empty()) {
            (Some(cluster_version), false) => Err(EmbeddedError::VersionMismatch {
                cluster: cluster_dir.to_path_buf(),
                cluster_version,
                found: format!(
                    "only server binaries of version {} were found",
                    seen.iter()
                        .map(|b| b.version.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
            _ => Err(EmbeddedError::NoServerBinaries { searched }),
        },
    }
}

/// Creates the cluster in `<cluster_dir>.initdb` and renames it into place when complete, so an
/// interrupted initdb (healthd killed meanwhile) never leaves a half-made cluster behind.
fn initdb(
    bins: &ServerBinaries,
    cluster_dir: &Path,
    run_as: Option<&RunAs>,
    durable: bool,
) -> Result<(), EmbeddedError> {
    if cluster_dir.exists() {
        // An empty directory (e.g. made by hand) is fine; anything else is not ours to replace.
        std::fs::remove_dir(cluster_dir).map_err(|_| EmbeddedError::NotACluster {
            path: cluster_dir.to_path_buf(),
        })?;
    }
    let scratch = cluster_dir.with_extension("initdb");
    if scratch.exists() {
        tracing::info!("removing unfinished cluster {}", scratch.display());
        std::fs::remove_dir_all(&scratch)
            .map_err(|e| EmbeddedError::io("cannot remove", &scratch, e))?;
    }
    access::create_private_dir(&scratch)?;
    if let Some(r) = run_as {
        access::chown(&scratch, r)?;
    }
    tracing::info!(
        "creating private PostgreSQL {} cluster in {}{}",
        bins.version,
        cluster_dir.display(),
        run_as
            .map(|r| format!(" (runs as user {})", r.name))
            .unwrap_or_default()
    );
    let mut cmd = Command::new(bins.initdb());
    cmd.arg("-D")
        .arg(&scratch)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .stdin(Stdio::null());
    if !durable {
        cmd.arg("--no-sync");
    }
    configure_child(&mut cmd, &scratch, run_as);
    let out = cmd
        .output()
        .map_err(|e| EmbeddedError::io("cannot run", &bins.initdb(), e))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        return Err(EmbeddedError::Initdb {
            cluster: cluster_dir.to_path_buf(),
            status: out.status.to_string(),
            output: last_chars(text.trim(), 2000),
        });
    }
    // Also when someone starts the cluster by hand: socket only, reachable only by its user.
    let conf = scratch.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(|e| EmbeddedError::io("cannot open", &conf, e))?;
    std::io::Write::write_all(
        &mut file,
        b"\n# Added by healthd: private cluster, Unix socket only.\nlisten_addresses = ''\nunix_socket_permissions = 0700\n",
    )
    .map_err(|e| EmbeddedError::io("cannot write", &conf, e))?;
    std::fs::rename(&scratch, cluster_dir)
        .map_err(|e| EmbeddedError::io("cannot rename", &scratch, e))
}

/// Common settings for `initdb` and `postgres`: own process group (a Ctrl-C in the terminal
/// reaches healthd only, which then stops the server in order), unprivileged user when root,
/// a working directory the user can enter, no inherited PG* variables.
fn configure_child(cmd: &mut Command, cluster_dir: &Path, run_as: Option<&RunAs>) {
    cmd.current_dir(cluster_dir).process_group(0);
    for var in CLEARED_ENV {
        cmd.env_remove(var);
    }
    if let Some(r) = run_as {
        // std also calls setgroups(0) when dropping from root, so no supplementary group of
        // root's survives.
        cmd.uid(r.uid).gid(r.gid);
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, EmbeddedError> {
    let path = data_dir.join("pg.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| EmbeddedError::io("cannot open", &path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| EmbeddedError::io("cannot lock", &path, errno.into()))
}

fn read_port_file(path: &Path) -> Result<u16, EmbeddedError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            EmbeddedError::io(
                "invalid port number in",
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_string()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DEFAULT_PORT),
        Err(e) => Err(EmbeddedError::io("cannot read", path, e)),
    }
}

fn open_log(path: &Path) -> Result<File, EmbeddedError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() > MAX_LOG_BYTES {
            let _ = std::fs::rename(path, path.with_extension("log.1"));
        }
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| EmbeddedError::io("cannot open", path, e))
}

fn remove_if_exists(path: &Path) -> Result<(), EmbeddedError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(EmbeddedError::io("cannot remove", path, e))
        }
        _ => Ok(()),
    }
}

/// One connection attempt, bounded so a wedged server cannot hang the start.
/// One connection attempt, bounded so a wedged server cannot hang the start. Uses libpq (sync
/// diesel), which says goodbye properly on close, so the server log is not littered with
/// "connection to client lost" (diesel-async drops the socket without a Terminate message).
async fn try_connect(url: &str) -> Result<(), String> {
    let url = format!("{url}?connect_timeout=5");
    tokio::task::spawn_blocking(move || {
        PgConnection::establish(&url)
            .map(drop)
            .map_err(|e| e.to_string().trim().to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Blocking body of [`EmbeddedPostgres::ensure_database`].
fn create_database_if_missing(url: &str, name: &str) -> Result<(), EmbeddedError> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Integer)]
        #[allow(dead_code)]
        found: i32,
    }
    fn exists(conn: &mut PgConnection, name: &str) -> Result<bool, diesel::result::Error> {
        let rows: Vec<Found> =
            diesel::sql_query("SELECT 1 AS found FROM pg_database WHERE datname = $1")
                .bind::<Text, _>(name)
                .load(conn)?;
        Ok(!rows.is_empty())
    }
    let err = |source| EmbeddedError::CreateDatabase {
        name: name.to_string(),
        source,
    };
    let mut conn = PgConnection::establish(url)?;
    if exists(&mut conn, name).map_err(err)? {
        return Ok(());
    }
    match diesel::sql_query(format!("CREATE DATABASE {}", quote_ident(name))).execute(&mut conn) {
        Ok(_) => {
            tracing::info!("created database {name} in the private PostgreSQL");
            Ok(())
        }
        // Lost a race with another process creating it: fine.
        Err(e) => match exists(&mut conn, name) {
            Ok(true) => Ok(()),
            _ => Err(err(e)),
        },
    }
}

/// Stops an owned server: SIGINT (fast shutdown), then SIGQUIT (immediate) and SIGKILL if it
/// hangs. Blocking.
fn shut_down(
    role: Role,
    pid: i32,
    (data_dir, socket_dir): &(PathBuf, PathBuf),
    fast_timeout: Duration,
) -> Result<(), EmbeddedError> {
    let mut exited: Box<dyn FnMut() -> bool> = match role {
        Role::Spawned(mut child) => Box::new(move || !matches!(child.try_wait(), Ok(None))),
        Role::Adopted => Box::new(move || !process::alive(pid)),
        Role::Attached | Role::Stopped => return Ok(()),
    };
    let wait = |exited: &mut dyn FnMut() -> bool, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            if exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Ok(true): we stopped it; Ok(false): it had already exited (crashed or killed).
    let result = if exited() {
        Ok(false)
    } else {
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        let mut stopped = wait(&mut *exited, fast_timeout);
        if !stopped {
            tracing::warn!("PostgreSQL (pid {pid}) ignored fast shutdown; sending SIGQUIT");
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            stopped = wait(&mut *exited, Duration::from_secs(10));
        }
        if !stopped {
            tracing::warn!("PostgreSQL (pid {pid}) ignored immediate shutdown; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            stopped = wait(&mut *exited, Duration::from_secs(5));
        }
        if stopped {
            Ok(true)
        } else {
            Err(EmbeddedError::StopFailed {
                pid,
                reason: "it survived SIGKILL".into(),
            })
        }
    };
    let owner_path = data_dir.join("pg.owner");
    if Owner::read(&owner_path).is_some_and(|o| o == Owner::current()) {
        let _ = std::fs::remove_file(&owner_path);
    }
    let stopped = result?;
    if !socket_dir.starts_with(data_dir) {
        // Do not leave empty /tmp/healthd-* directories behind; skip it if a start is in
        // progress (it holds the lock and may be about to use the directory).
        if let Ok(lock) = File::open(data_dir.join("pg.lock")) {
            if let Ok(_held) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
                let _ = std::fs::remove_dir(socket_dir);
            }
        }
    }
    if stopped {
        tracing::info!("stopped private PostgreSQL (pid {pid})");
    } else {
        tracing::info!("private PostgreSQL (pid {pid}) had already exited");
    }
    Ok(())
}

/// The last lines of the server log, for error messages.
fn log_tail(path: &Path) -> String {
    const MAX: u64 = 4096;
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.size()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn last_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    s.chars().skip(count.saturating_sub(n)).collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL host/path parts.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes an SQL identifier (`my"db` -> `"my""db"`).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_socket_urls() {
        assert_eq!(percent_encode("/tmp/a b"), "%2Ftmp%2Fa%20b");
        assert_eq!(percent_encode("healthd_test-1"), "healthd_test-1");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn missing_binaries_message_says_what_to_install() {
        let err = EmbeddedError::NoServerBinaries {
            searched: "on PATH, via pg_config --bindir or in /usr/lib/postgresql/*/bin".into(),
        };
        let msg = err.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("apt-get install postgresql"));
        assert!(msg.contains("HEALTHD_DATABASE_URL"));
    }
}
