//! The HTTP surface: `/graphql` (POST queries, GET GraphiQL), `/healthz`, `/readyz`, `/metrics`.

mod graphql;
mod probes;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;

use crate::app::AppState;
use crate::graphql::HealthdSchema;

/// Everything a handler needs.
#[derive(Clone)]
pub struct HttpState {
    pub app: AppState,
    pub schema: HealthdSchema,
}

pub fn router(app: AppState) -> Router {
    let schema = crate::graphql::build_schema(Some(app.clone()));
    let body_limit = app.config.limits.max_body_bytes;
    let state = HttpState { app, schema };
    Router::new()
        .route(
            "/graphql",
            get(graphql::graphiql_or_websocket).post(graphql::execute),
        )
        .route("/graphql/ws", get(graphql::websocket))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .with_state(state)
}

/// Serves until `app.shutdown` is cancelled, then drains in-flight requests (bounded).
pub async fn serve(app: AppState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let shutdown = app.shutdown.clone();
    let router = router(app);
    let server = axum::serve(listener, router).with_graceful_shutdown({
        let shutdown = shutdown.clone();
        async move { shutdown.cancelled().await }
    });
    // WebSocket subscribers would otherwise hold graceful shutdown open forever.
    tokio::select! {
        result = server => result,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        } => {
            tracing::warn!("connections still open 10 s after shutdown began; closing them");
            Ok(())
        }
    }
}
