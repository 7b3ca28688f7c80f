//! Liveness, readiness and metrics endpoints.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::HttpState;

/// The process is up.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The database answers and every embedded migration is applied.
pub async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    match crate::db::schema_is_current(&state.app.pool).await {
        Ok(true) => (StatusCode::OK, "ready\n".to_string()),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database migrations pending\n".to_string(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: database unreachable\n".to_string(),
            )
        }
    }
}

/// Prometheus text format.
pub async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let pool = state.app.pool.state();
    metrics::gauge!("healthd_db_pool_connections").set(pool.connections as f64);
    metrics::gauge!("healthd_db_pool_idle_connections").set(pool.idle_connections as f64);
    metrics::gauge!("healthd_db_pool_max_connections").set(state.app.config.pool_size as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics_handle().render(),
    )
}
