//! The private PostgreSQL cluster (`healthd::db::embedded`) with the real server binaries:
//! create, reuse, attach, adopt, stale pid files, crash recovery, socket paths and errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::sql_types::{Integer, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use healthd::db::embedded::{EmbeddedError, EmbeddedPostgres, Options};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A directory removed at the end of the test, searchable by others (like most real parents of
/// a data directory) so the root path of the cluster can run as the `postgres` user.
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path, tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = base.join(format!("hd-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fast() -> Options {
    Options {
        durable: false,
        ..Options::default()
    }
}

/// True once `pid` has exited (a zombie child of this test process counts as exited).
fn gone(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(true),
    }
}

fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pids.iter().all(|p| gone(*p)) {
        assert!(Instant::now() < deadline, "processes {pids:?} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Children of `pid` (the server's background processes and backends).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    v: String,
}

async fn rows(url: &str) -> Vec<String> {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query("SELECT v FROM kept ORDER BY v")
        .load::<Row>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.v)
        .collect()
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lifecycle_under_target_dir() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let tmp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "life");
    let data = tmp.0.join("data");

    // Fresh directory: initdb, start, database `healthd` created.
    let pg = EmbeddedPostgres::start(&data).await.unwrap();
    assert!(pg.owned());
    let data = std::fs::canonicalize(&data).unwrap();
    assert_eq!(pg.socket_dir(), data.join("run"));
    assert_eq!(pg.cluster_dir(), data.join("pg"));
    let url = pg.database_url("healthd");
    {
        let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
        diesel::sql_query("CREATE TABLE kept (v text)")
            .execute(&mut conn)
            .await
            .unwrap();
        diesel::sql_query("INSERT INTO kept VALUES ('first')")
            .execute(&mut conn)
            .await
            .unwrap();
        #[derive(QueryableByName)]
        struct Setting {
            #[diesel(sql_type = Text)]
            setting: String,
        }
        let listen: Vec<Setting> =
            diesel::sql_query("SELECT setting FROM pg_settings WHERE name = 'listen_addresses'")
                .load(&mut conn)
                .await
                .unwrap();
        assert_eq!(listen[0].setting, "", "no TCP listener");
    }
    if is_root() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(pg.cluster_dir()).unwrap().uid();
        assert_ne!(owner, 0, "the cluster must belong to an unprivileged user");
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o710
        );
    }

    // A second start on the same directory attaches and leaves the server running.
    let pid = pg.pid();
    let second = EmbeddedPostgres::start(&data).await.unwrap();
    assert!(!second.owned());
    assert_eq!(second.pid(), pid);
    assert_eq!(second.database_url("healthd"), url);
    second.stop().await.unwrap();
    assert!(!gone(pid));
    assert_eq!(rows(&url).await, ["first"]);

    // Stop: the postmaster and its background processes exit, postmaster.pid is removed.
    let pid_file = pg.cluster_dir().join("postmaster.pid");
    let pid_text = std::fs::read_to_string(&pid_file).unwrap();
    assert!(pid_text.starts_with(&format!("{pid}\n")));
    let helpers = children_of(pid);
    assert!(!helpers.is_empty());
    pg.stop().await.unwrap();
    assert!(gone(pid));
    wait_gone(&helpers);
    assert!(!pid_file.exists());

    // A stale postmaster.pid (its process is dead) does not prevent the next start.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id() as i32;
    dead.wait().unwrap();
    let stale = pid_text.replacen(&pid.to_string(), &dead_pid.to_string(), 1);
    std::fs::write(&pid_file, stale).unwrap();
    let pg = EmbeddedPostgres::start(&data).await.unwrap();
    assert!(pg.owned());
    assert_ne!(pg.pid(), pid);
    assert_eq!(rows(&url).await, ["first"], "data survives a restart");

    // A postmaster.pid naming a live process that is not this cluster's server (pid reuse after
    // a reboot or container restart) does not prevent the next start either.
    let pid_text = std::fs::read_to_string(&pid_file).unwrap();
    let pid = pg.pid();
    pg.stop().await.unwrap();
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let reused = pid_text.replacen(&pid.to_string(), &other.id().to_string(), 1);
    std::fs::write(&pid_file, reused).unwrap();
    let pg = EmbeddedPostgres::start(&data).await.unwrap();
    other.kill().unwrap();
    other.wait().unwrap();
    assert!(pg.owned());
    assert_eq!(rows(&url).await, ["first"]);

    // A crash (postmaster killed): the next start recovers, committed data is kept.
    {
        let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
        diesel::sql_query("INSERT INTO kept VALUES ('second')")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let pid = pg.pid();
    let helpers = children_of(pid);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_gone(&helpers);
    pg.stop().await.unwrap(); // reaps the killed child
    assert!(pid_file.exists(), "a crash leaves postmaster.pid behind");
    let pg = EmbeddedPostgres::start(&data).await.unwrap();
    assert!(pg.owned());
    assert_eq!(rows(&url).await, ["first", "second"]);

    // More databases for test support.
    pg.ensure_database("healthd_extra").await.unwrap();
    pg.ensure_database("healthd_extra").await.unwrap();
    AsyncPgConnection::establish(&pg.database_url("healthd_extra"))
        .await
        .unwrap();
    let pid = pg.pid();
    let conf = pg.cluster_dir().join("postgresql.conf");
    pg.stop().await.unwrap();
    assert!(gone(pid));

    // A server that cannot start: the error quotes its log, nothing is left running.
    let good_conf = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good_conf}\nshared_buffers = 'plenty'\n")).unwrap();
    let err = EmbeddedPostgres::start(&data).await.unwrap_err();
    assert!(matches!(err, EmbeddedError::ExitedEarly { .. }), "{err:?}");
    assert!(err.to_string().contains("shared_buffers"), "{err}");
    assert!(!pid_file.exists());
    std::fs::write(&conf, good_conf).unwrap();
}

/// Long data directory paths under /tmp: the socket moves to a short private directory, and the
/// URL works with both client stacks. Also: concurrent starts and adopting an orphaned server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_path_concurrent_start_and_adoption_under_tmp() {
    let tmp = TempDir::new(Path::new("/tmp"), "long");
    let data = tmp
        .0
        .join("a-rather-long-directory-name-to-push-the-socket-path")
        .join("beyond-the-unix-socket-limit");

    // Leftover of an initdb interrupted by a killed healthd: cleaned up and redone.
    std::fs::create_dir_all(data.join("pg.initdb").join("global")).unwrap();
    std::fs::write(data.join("pg.initdb").join("PG_VERSION"), "15\n").unwrap();

    // Two starts at once on a fresh directory: one creates and owns the server, the other
    // waits for it and attaches.
    let (a, b) = tokio::join!(
        EmbeddedPostgres::start_with(&data, fast()),
        EmbeddedPostgres::start_with(&data, fast())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let socket_dir = a.socket_dir().to_path_buf();
    assert!(!data.join("pg.initdb").exists());
    assert_eq!(a.pid(), b.pid());
    assert!(a.owned() != b.owned(), "exactly one owns the server");
    let (pg, other) = if a.owned() { (a, b) } else { (b, a) };
    other.stop().await.unwrap();

    assert!(
        socket_dir.to_string_lossy().starts_with("/tmp/healthd-"),
        "{}",
        socket_dir.display()
    );
    assert_eq!(
        std::fs::metadata(&socket_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Both URL forms, with tokio-postgres (diesel-async) and libpq (sync diesel).
    let encoded = pg.database_url("healthd");
    let query_form = format!(
        "postgres:///healthd?host={}&port={}&user=healthd",
        socket_dir.display(),
        pg.port()
    );
    for url in [encoded.clone(), query_form] {
        AsyncPgConnection::establish(&url)
            .await
            .unwrap_or_else(|e| panic!("tokio-postgres with {url}: {e}"));
        let sync_url = url.clone();
        tokio::task::spawn_blocking(move || {
            use diesel::Connection;
            #[derive(QueryableByName)]
            struct One {
                #[diesel(sql_type = Integer)]
                one: i32,
            }
            let mut conn = diesel::PgConnection::establish(&sync_url)
                .unwrap_or_else(|e| panic!("libpq with {sync_url}: {e}"));
            let r: Vec<One> =
                diesel::RunQueryDsl::load(diesel::sql_query("SELECT 1 AS one"), &mut conn).unwrap();
            assert_eq!(r[0].one, 1);
        })
        .await
        .unwrap();
    }

    // The healthd that started the server dies without stopping it (simulated: its handle is
    // leaked and pg.owner names a dead process). The next start adopts and stops it.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let owner_file = std::fs::canonicalize(&data).unwrap().join("pg.owner");
    std::fs::write(&owner_file, format!("{dead_pid} 1\n")).unwrap();
    let pid = pg.pid();
    std::mem::forget(pg);
    let adopted = EmbeddedPostgres::start_with(&data, fast()).await.unwrap();
    assert!(adopted.owned());
    assert_eq!(adopted.pid(), pid);
    AsyncPgConnection::establish(&encoded).await.unwrap();
    adopted.stop().await.unwrap();
    assert!(gone(pid));
    assert!(!owner_file.exists());
    assert!(
        !socket_dir.exists(),
        "the /tmp socket directory is removed at stop"
    );
    // Reap the leaked child.
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
}

#[tokio::test]
async fn missing_binaries_give_one_clear_line() {
    let tmp = TempDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "nobin");
    let empty = tmp.0.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let err = EmbeddedPostgres::start_with(
        &tmp.0.join("data"),
        Options {
            bin_dirs: Some(vec![empty.clone()]),
            ..Options::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, EmbeddedError::NoServerBinaries { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("initdb, postgres"), "{msg}");
    assert!(msg.contains(&empty.display().to_string()), "{msg}");
    assert!(msg.contains("apt-get install postgresql"), "{msg}");
    assert!(msg.contains("HEALTHD_DATABASE_URL"), "{msg}");
}

/// As root the server runs as an unprivileged user, which must be able to reach the data
/// directory: a private (0700) parent is reported by name instead of failing later.
#[tokio::test]
async fn unreachable_data_dir_is_named() {
    if !is_root() {
        return;
    }
    let tmp = TempDir::new(Path::new("/tmp"), "priv");
    let private = tmp.0.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = EmbeddedPostgres::start_with(&private.join("data"), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, EmbeddedError::NotReachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "directory {} is not searchable",
            private.display()
        )),
        "{msg}"
    );
    // Nothing was changed on the user's directory.
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

/// Run in a child process by `cluster_outlives_a_killed_healthd_and_is_adopted`: starts the
/// cluster, reports its pid, then waits to be killed like a healthd interrupted in a terminal.
#[tokio::test]
#[ignore = "helper process for cluster_outlives_a_killed_healthd_and_is_adopted"]
async fn helper_start_and_wait() {
    let Ok(dir) = std::env::var("EMBEDDED_PG_HELPER_DIR") else {
        return;
    };
    let pg = EmbeddedPostgres::start_with(Path::new(&dir), fast())
        .await
        .unwrap();
    println!("READY {}", pg.pid());
    std::future::pending::<()>().await;
}

/// Ctrl-C in a terminal signals the whole foreground process group. The server runs in its own
/// group, so it is not hit mid-flight; if healthd dies without stopping it, the next healthd on
/// the data directory adopts the server and stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_outlives_a_killed_healthd_and_is_adopted() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let tmp = TempDir::new(Path::new("/tmp"), "orphan");
    let data = tmp.0.join("data");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_start_and_wait",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("EMBEDDED_PG_HELPER_DIR", &data)
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let helper_pid = helper.id() as i32;
    let stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
    let pid = tokio::task::spawn_blocking(move || {
        for line in stdout.lines() {
            if let Some(pid) = line.unwrap().strip_prefix("READY ") {
                return pid.trim().parse::<i32>().unwrap();
            }
        }
        panic!("helper exited before the cluster was ready");
    })
    .await
    .unwrap();

    nix::sys::signal::killpg(Pid::from_raw(helper_pid), Signal::SIGINT).unwrap();
    let status = helper.wait().unwrap();
    assert!(!status.success());
    assert!(!gone(pid), "the server survives the Ctrl-C of its healthd");

    let pg = EmbeddedPostgres::start_with(&data, fast()).await.unwrap();
    assert!(pg.owned(), "the orphaned server is adopted");
    assert_eq!(pg.pid(), pid);
    AsyncPgConnection::establish(&pg.database_url("healthd"))
        .await
        .unwrap();
    pg.stop().await.unwrap();
    assert!(gone(pid));
}
