//! The daemon's HTTP API: `GET /v1/status`, `GET /v1/ready`, `GET /metrics`, `GET /healthz`,
//! and verification: `GET /v1/verify/latest` (the last pass's report) and `POST /v1/verify`
//! (run an anchored pass now and answer with its report; what `cutover verify` uses).
//!
//! Why HTTP and not a socket protocol: cutover scripts, load balancers, Kubernetes
//! probes and Prometheus all speak it already. The API is read-only; it serves what the
//! job publishes through its [`StatusHandle`] and never blocks the job (a request copies
//! the status under a short read lock).
//!
//! Authentication: when `[api] token_env` names a token, every endpoint except the
//! liveness probe `/healthz` needs `Authorization: Bearer <token>`. The comparison runs in
//! time independent of where the tokens differ, and the token never appears in logs or
//! answers. Errors are JSON `{"error": ..., "hint": ...}` in PostgreSQL's message style.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cutover_config::Secret;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::ready::{ReadyConfig, evaluate};
use crate::status::StatusHandle;

/// Path of the status document.
pub const STATUS_PATH: &str = "/v1/status";
/// Path of the readiness document.
pub const READY_PATH: &str = "/v1/ready";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the liveness probe (never needs a token).
pub const HEALTHZ_PATH: &str = "/healthz";
/// `POST`: run a verification pass now; answers with its report.
pub const VERIFY_PATH: &str = "/v1/verify";
/// The report of the last verification pass.
pub const VERIFY_LATEST_PATH: &str = "/v1/verify/latest";

/// What the API serves.
#[derive(Clone)]
pub struct ApiState {
    /// The job's live status.
    pub status: StatusHandle,
    /// The `[ready]` settings the readiness gates use.
    pub ready_config: ReadyConfig,
    /// Renders `GET /metrics` (see [`crate::metrics::install`]).
    pub prometheus: PrometheusHandle,
    /// The bearer token every endpoint but `/healthz` requires, if any. An empty token
    /// admits nobody (fail closed).
    pub token: Option<Secret>,
    /// The job's verifier (`None` in tests that serve only a status).
    pub verifier: Option<crate::verifier::VerifierHandle>,
}

/// An error answer: `{"error": ..., "hint": ...}`.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
    hint: String,
}

fn error_response(status: StatusCode, error: String, hint: &str) -> Response {
    let body = ErrorBody {
        error,
        hint: hint.to_string(),
    };
    (status, Json(body)).into_response()
}

/// The API's routes over `state`. [`serve`] uses it; exposed for embedding and tests.
pub fn router(state: ApiState) -> Router {
    let state = Arc::new(state);
    let protected = Router::new()
        .route(STATUS_PATH, get(status))
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics))
        .route(VERIFY_PATH, axum::routing::post(verify_now))
        .route(VERIFY_LATEST_PATH, get(verify_latest))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(protected)
        .route(HEALTHZ_PATH, get(healthz))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests
/// in flight and returns.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            "serving the HTTP API on http://{addr} (token {})",
            if state.token.is_some() {
                "required"
            } else {
                "not required"
            }
        );
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn status(State(state): State<Arc<ApiState>>) -> Response {
    Json(state.status.snapshot()).into_response()
}

async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let readiness = evaluate(&state.status.snapshot(), &state.ready_config);
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness)).into_response()
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    crate::metrics::record_status(&state.status.snapshot());
    state.prometheus.run_upkeep();
    let body = state.prometheus.render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn verify_now(State(state): State<Arc<ApiState>>) -> Response {
    let Some(verifier) = &state.verifier else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no verifier".into(),
            "run cutover run JOB.toml",
        );
    };
    match verifier.pass_now().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not verify: {e}"),
            "see cutover status: the job must be streaming",
        ),
    }
}

async fn verify_latest(State(state): State<Arc<ApiState>>) -> Response {
    let latest = match &state.verifier {
        Some(v) => v.latest().await,
        None => None,
    };
    match latest {
        Some(report) => Json(report).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "no verification pass has finished yet".into(),
            "passes run every [verify] every once the job streams; POST /v1/verify (cutover verify) runs one now",
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found(uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
        "the API serves GET /v1/status, /v1/ready, /v1/verify/latest, /metrics and /healthz, and POST /v1/verify",
    )
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let problem = match given {
        None => Some("missing bearer token"),
        Some(token) if constant_time_eq(token.as_bytes(), expected.expose().as_bytes()) => None,
        Some(_) => Some("invalid bearer token"),
    };
    let Some(problem) = problem else {
        return next.run(request).await;
    };
    tracing::warn!(path = %request.uri().path(), "rejected an API request: {problem}");
    let mut response = error_response(
        StatusCode::UNAUTHORIZED,
        problem.to_string(),
        "send \"Authorization: Bearer <token>\" with the token from the environment \
         variable named by [api] token_env",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"cutover\""),
    );
    response
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares `given` with `expected` in time that depends only on the length of `given`,
/// not on where they differ. An empty `expected` matches nothing.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != expected.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal_tokens() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret!", b"s3cret"));
        assert!(!constant_time_eq(b"s3cres", b"s3cret"));
        assert!(!constant_time_eq(b"s3crets3cret", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(!constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
