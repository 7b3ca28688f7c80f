//! Database access: the connection pool, embedded migrations and the private cluster.

pub mod embedded;
pub mod schema;

use diesel_async::pooled_connection::bb8::{Pool, PooledConnection, RunError};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// Migrations compiled into the binary, applied at start and by `healthd migrate`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

pub type DbPool = Pool<AsyncPgConnection>;
pub type DbConn = PooledConnection<'static, AsyncPgConnection>;

/// Errors from the data access layer. Their `Display` is safe to log, never shown to API clients.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database connection unavailable: {0}")]
    Pool(#[from] RunError),
    #[error("cannot connect to database: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("cannot build connection pool: {0}")]
    PoolBuild(#[from] diesel_async::pooled_connection::PoolError),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Builds the shared pool. `max_size` bounds connections per healthd process.
pub async fn connect(url: &str, max_size: u32) -> Result<DbPool, DbError> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    let pool = Pool::builder()
        .max_size(max_size)
        .connection_timeout(std::time::Duration::from_secs(10))
        .build(manager)
        .await?;
    // Fail early with a clear error instead of on the first request.
    drop(pool.get().await?);
    Ok(pool)
}

/// Applies pending migrations on a blocking thread (the harness is synchronous).
/// Serialised across processes with an advisory lock so concurrent starts do not race.
pub async fn run_migrations(url: &str) -> Result<Vec<String>, DbError> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        use diesel::RunQueryDsl;
        let mut conn = diesel::PgConnection::establish(&url)?;
        diesel::sql_query("SELECT pg_advisory_lock(7368500001)").execute(&mut conn)?;
        let result = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>())
            .map_err(|e| DbError::Migration(e.to_string()));
        let _ = diesel::sql_query("SELECT pg_advisory_unlock(7368500001)").execute(&mut conn);
        result
    })
    .await
    .map_err(|e| DbError::Migration(format!("migration task failed: {e}")))?
}

/// True when the database answers and has every embedded migration applied (for `/readyz`).
pub async fn schema_is_current(pool: &DbPool) -> Result<bool, DbError> {
    use diesel::migration::MigrationSource;
    use diesel::QueryableByName;
    use diesel_async::RunQueryDsl;

    #[derive(QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let mut conn = pool.get().await?;
    let applied: Vec<Applied> =
        match diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
            .load(&mut conn)
            .await
        {
            Ok(rows) => rows,
            // No migrations table yet: reachable, not ready.
            Err(diesel::result::Error::DatabaseError(_, _)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
    let applied: std::collections::HashSet<String> =
        applied.into_iter().map(|a| a.version).collect();
    let embedded = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(embedded
        .iter()
        .all(|m| applied.contains(&m.name().version().to_string())))
}
