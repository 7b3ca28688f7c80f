//! GraphQL over HTTP and WebSocket, with bearer-token authentication.

use std::time::Instant;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::extract::{FromRequestParts, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use super::HttpState;
use crate::auth::{self, Viewer};

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    bearer_from_str(value)
}

fn bearer_from_str(value: &str) -> Option<String> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": "UNAUTHENTICATED" } }]
    });
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        Json(body),
    )
        .into_response()
}

/// Authenticates a bearer token; `Err` is the response to send.
async fn authenticate(state: &HttpState, token: Option<String>) -> Result<Viewer, Response> {
    let Some(token) = token else {
        return Err(unauthorized(
            "authentication required: send `Authorization: Bearer <token>` (create one with `healthd token create`)",
        ));
    };
    match auth::authenticate(&state.app.pool, &token).await {
        Ok(Some(viewer)) => Ok(viewer),
        Ok(None) => Err(unauthorized("invalid or revoked API token")),
        Err(e) => {
            tracing::error!(error = %e, "token lookup failed");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "errors": [{ "message": "service unavailable: database unreachable", "extensions": { "code": "UNAVAILABLE" } }]
                })),
            )
                .into_response())
        }
    }
}

pub async fn execute(
    State(state): State<HttpState>,
    headers: HeaderMap,
    request: GraphQLRequest,
) -> Response {
    let viewer = match authenticate(&state, bearer(&headers)).await {
        Ok(viewer) => viewer,
        Err(response) => return response,
    };
    let request = request.into_inner();
    let operation = request
        .operation_name
        .clone()
        .unwrap_or_else(|| "anonymous".to_string());
    let request = crate::graphql::loaders::attach(request.data(viewer), &state.app.pool);
    let started = Instant::now();
    let response = state.schema.execute(request).await;
    let outcome = if response.errors.is_empty() {
        "ok"
    } else {
        "error"
    };
    metrics::counter!("healthd_graphql_requests_total", "operation" => operation.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!("healthd_graphql_request_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    GraphQLResponse::from(response).into_response()
}

/// GET /graphql: a WebSocket upgrade for subscriptions, otherwise the GraphiQL page.
pub async fn graphiql_or_websocket(
    State(state): State<HttpState>,
    request: axum::extract::Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    if parts.headers.contains_key(axum::http::header::UPGRADE) {
        return websocket_from_parts(state, &mut parts).await;
    }
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("healthd GraphiQL")
            .finish(),
    )
    .into_response()
}

pub async fn websocket(
    State(state): State<HttpState>,
    request: axum::extract::Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    websocket_from_parts(state, &mut parts).await
}

async fn websocket_from_parts(state: HttpState, parts: &mut Parts) -> Response {
    let protocol = match GraphQLProtocol::from_request_parts(parts, &state).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(parts, &state).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let header_token = bearer(&parts.headers);
    let schema = state.schema.clone();
    upgrade
        // tungstenite zero-fills its read buffer on every read: 128 KiB per connection per event
        // dominated CPU with thousands of subscribers; their messages are small.
        .read_buffer_size(8 * 1024)
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let init_state = state.clone();
            GraphQLWebSocket::new(socket, schema, protocol)
                .on_connection_init(move |payload: serde_json::Value| async move {
                    // The payload wins over the upgrade request's header (browsers cannot set headers).
                    let token = payload
                        .get("authorization")
                        .or_else(|| payload.get("Authorization"))
                        .and_then(|v| v.as_str())
                        .and_then(bearer_from_str)
                        .or(header_token);
                    match authenticate(&init_state, token).await {
                        Ok(viewer) => {
                            let mut data = async_graphql::Data::default();
                            data.insert(viewer);
                            Ok(data)
                        }
                        Err(_) => Err(async_graphql::Error::new(
                            "authentication failed: send {\"authorization\": \"Bearer <token>\"} in connection_init",
                        )),
                    }
                })
                .serve()
                .await
        })
}
