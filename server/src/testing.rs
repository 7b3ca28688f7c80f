//! Test support: each test gets its own database, created from a migrated template.
//!
//! The server is `HEALTHD_TEST_DATABASE_URL` when set (a maintenance database URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`), otherwise a private cluster under
//! `$TMPDIR/healthd-test-pg-<hash of target dir>`, started on first use, shared by the test
//! binaries and left running for the next test run (stop it with `pg_ctl -D <dir>/pg stop`).

use std::path::PathBuf;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::OnceCell;

use crate::db::embedded::EmbeddedPostgres;
use crate::db::DbPool;

struct Server {
    /// URL of a maintenance database on the test server (where CREATE DATABASE runs).
    admin_url: String,
    template: String,
    _embedded: Option<EmbeddedPostgres>,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

/// The directory of test artefacts (`target/`), found from the test executable.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    while dir.file_name().is_some_and(|n| n != "target") {
        if !dir.pop() {
            return std::env::temp_dir();
        }
    }
    dir
}

/// Replaces the database name (last path segment) of a PostgreSQL URL, keeping any query string.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            let (admin_url, embedded) = match std::env::var("HEALTHD_TEST_DATABASE_URL") {
                Ok(url) if !url.is_empty() => (url, None),
                _ => {
                    // Under the temp dir, not target/: when tests run as root the cluster runs as an
                    // unprivileged user, who must be able to reach its directory.
                    let dir = std::env::temp_dir().join(format!(
                        "healthd-test-pg-{}",
                        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                            target_dir().to_string_lossy().as_bytes()
                        ))[..12]
                    ));
                    let options = crate::db::embedded::Options {
                        durable: false,
                        ..Default::default()
                    };
                    let pg = EmbeddedPostgres::start_with(&dir, options)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("cannot start test PostgreSQL in {}: {e}", dir.display())
                        });
                    (pg.database_url("postgres"), Some(pg))
                }
            };
            let template = ensure_template(&admin_url).await;
            Server {
                admin_url,
                template,
                // Statics are never dropped: the shared cluster keeps running for the other
                // test binaries (and the next `cargo test`, which reuses it).
                _embedded: embedded,
            }
        })
        .await
}

/// Creates (once per migration set) a migrated template database; concurrent test binaries
/// serialise on an advisory lock.
async fn ensure_template(admin_url: &str) -> String {
    use diesel::migration::MigrationSource;
    let versions: Vec<String> =
        MigrationSource::<diesel::pg::Pg>::migrations(&crate::db::MIGRATIONS)
            .expect("embedded migrations")
            .iter()
            .map(|m| m.name().to_string())
            .collect();
    let digest = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for v in &versions {
            h.update(v.as_bytes());
        }
        // Migration contents matter too: an edited migration must produce a new template.
        for dir in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in ["up.sql"] {
                if let Ok(text) = std::fs::read(dir.path().join(file)) {
                    h.update(&text);
                }
            }
        }
        hex::encode(h.finalize())
    };
    let template = format!("healthd_tpl_{}", &digest[..16]);
    let mut conn = AsyncPgConnection::establish(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database server: {e}"));
    diesel::sql_query("SELECT pg_advisory_lock(7368500002)")
        .execute(&mut conn)
        .await
        .expect("lock");
    let exists = database_exists(&mut conn, &template).await;
    if !exists {
        let building = format!("{template}_build");
        let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {building}"))
            .execute(&mut conn)
            .await;
        diesel::sql_query(format!("CREATE DATABASE {building}"))
            .execute(&mut conn)
            .await
            .expect("create template");
        crate::db::run_migrations(&with_database(admin_url, &building))
            .await
            .expect("migrate template");
        diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(&mut conn)
            .await
            .expect("rename template");
    }
    diesel::sql_query("SELECT pg_advisory_unlock(7368500002)")
        .execute(&mut conn)
        .await
        .expect("unlock");
    template
}

async fn database_exists(conn: &mut AsyncPgConnection, name: &str) -> bool {
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let found: Found =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS found")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result(conn)
            .await
            .expect("query pg_database");
    found.found
}

/// A fresh, migrated database for one test; dropped when the value is dropped.
pub struct TestDb {
    name: String,
    url: String,
    pool: DbPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = server().await;
        let name = format!("healthd_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = AsyncPgConnection::establish(&server.admin_url)
            .await
            .expect("connect to test server");
        // CREATE DATABASE ... TEMPLATE fails while another session is connected to the template;
        // nothing connects to it after it is built, but retry briefly to be safe.
        let mut attempt = 0;
        loop {
            match diesel::sql_query(format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                server.template
            ))
            .execute(&mut conn)
            .await
            {
                Ok(_) => break,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "retrying CREATE DATABASE");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        let url = with_database(&server.admin_url, &name);
        let pool = crate::db::connect(&url, 8).await.expect("test pool");
        TestDb { name, url, pool }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, off the async runtime: the test is over.
        let admin_url = match SERVER.get() {
            Some(s) => s.admin_url.clone(),
            None => return,
        };
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            use diesel::Connection;
            if let Ok(mut conn) = diesel::PgConnection::establish(&admin_url) {
                let drop =
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                let _ = diesel::RunQueryDsl::execute(drop, &mut conn);
            }
        })
        .join();
    }
}
