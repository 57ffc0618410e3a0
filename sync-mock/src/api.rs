//! The HTTP face of the mock: Sync's routes on axum, and the admin endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Endpoint;
use crate::state::{CreateRequest, Refusal, State, Status};
use tower::Layer;
use tower_quota::presets::sync;

type Shared = Arc<State>;

/// The mock's routes.
pub(crate) fn router(state: Shared) -> Router {
    let stated = |endpoint: Endpoint| {
        axum::middleware::from_fn_with_state((state.clone(), endpoint), state_limits)
    };
    Router::new()
        .route("/v2/generate", post(create).layer(stated(Endpoint::Create)))
        .route(
            "/v2/generate/{id}",
            get(generation).layer(stated(Endpoint::Get)),
        )
        .route("/v2/generations", get(list).layer(stated(Endpoint::List)))
        .route(
            "/v2/generations/count",
            get(count).layer(stated(Endpoint::Count)),
        )
        .route("/_mock/stats", get(stats))
        .with_state(state)
}

/// With [`Config::state_limits`](crate::Config::state_limits), the route's limit for the
/// request's key, stated on its response in the chosen dialect.
async fn state_limits(
    Extract((state, endpoint)): Extract<(Shared, Endpoint)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(dialect) = state.config.dialect else {
        return next.run(request).await;
    };
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut response = next.run(request).await;
    // What the route's counter holds after this request: a rate refusal leaves it full, a
    // concurrency refusal leaves the room it has.
    if let Some((limit, left, reset)) = key.and_then(|k| state.statement(endpoint, &k)) {
        write_limits(response.headers_mut(), dialect, limit, left, reset);
    }
    response
}

/// A limit of `limit`, `left` of it until `reset` from now, in `dialect`'s fields. Times of
/// the wall clock are rounded up to whole seconds, as those dialects write them.
fn write_limits(
    fields: &mut HeaderMap,
    dialect: tower_quota::headers::Dialect,
    limit: crate::config::Limit,
    left: u32,
    reset: Duration,
) {
    use tower_quota::headers::Dialect;
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            fields.insert(name, value);
        }
    };
    let count = limit.count;
    let secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
    let wall = || {
        let at = std::time::SystemTime::now() + reset;
        at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() + 1)
    };
    match dialect {
        Dialect::Ietf => {
            let window = limit.period.as_secs();
            set(
                "ratelimit-policy",
                format!(r#""route";q={count};w={window}"#),
            );
            set("ratelimit", format!(r#""route";r={left};t={secs}"#));
        }
        Dialect::IetfTriple => {
            set("ratelimit-limit", count.to_string());
            set("ratelimit-remaining", left.to_string());
            set("ratelimit-reset", secs.to_string());
        }
        Dialect::OpenAi => {
            set("x-ratelimit-limit-requests", count.to_string());
            set("x-ratelimit-remaining-requests", left.to_string());
            set(
                "x-ratelimit-reset-requests",
                format!("{}ms", reset.as_millis() + 1),
            );
        }
        Dialect::Anthropic => {
            set("anthropic-ratelimit-requests-limit", count.to_string());
            set("anthropic-ratelimit-requests-remaining", left.to_string());
            let at = std::time::UNIX_EPOCH + Duration::from_secs(wall());
            set(
                "anthropic-ratelimit-requests-reset",
                humantime::format_rfc3339_seconds(at).to_string(),
            );
        }
        Dialect::GitHub => {
            set("x-ratelimit-limit", count.to_string());
            set("x-ratelimit-remaining", left.to_string());
            set("x-ratelimit-used", (count - left.min(count)).to_string());
            set("x-ratelimit-reset", wall().to_string());
            set("x-ratelimit-resource", "core".into());
        }
        // X-RateLimit, and any dialect added later.
        _ => {
            set("x-ratelimit-limit", count.to_string());
            set("x-ratelimit-remaining", left.to_string());
            set("x-ratelimit-reset", secs.to_string());
        }
    }
}

/// An answer other than success, in Sync's error body:
/// `{"statusCode", "errorCode"?, "message", "error"}`.
enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound,
    TooMany {
        refusal: Refusal,
        error_codes: bool,
        retry_after: bool,
    },
}

impl ApiError {
    fn refused(state: &State, refusal: Refusal) -> Self {
        if let Refusal::UnknownKey = refusal {
            return Self::Unauthorized;
        }
        Self::TooMany {
            refusal,
            error_codes: state.config.error_codes,
            retry_after: state.config.retry_after,
        }
    }
}

fn body(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    let mut body = json!({
        "statusCode": status.as_u16(),
        "message": message,
        "error": status.canonical_reason().unwrap_or(""),
    });
    if let Some(code) = code {
        body["errorCode"] = Value::from(code);
    }
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(message) => body(StatusCode::BAD_REQUEST, None, &message),
            Self::Unauthorized => body(
                StatusCode::UNAUTHORIZED,
                None,
                "Missing or invalid API key.",
            ),
            Self::NotFound => body(StatusCode::NOT_FOUND, None, "Generation not found."),
            Self::TooMany {
                refusal,
                error_codes,
                retry_after,
            } => {
                let (code, message, wait) = match refusal {
                    Refusal::Rate(wait) => (
                        "rate_limit_exceeded",
                        "Rate limit exceeded. Please slow down your requests.",
                        wait,
                    ),
                    Refusal::Concurrency(wait) => (
                        "concurrency_limit_reached",
                        "Concurrency limit reached for your plan. Wait for a generation to finish.",
                        wait,
                    ),
                    Refusal::UnknownKey => return Self::Unauthorized.into_response(),
                };
                let code = error_codes.then_some(code);
                let mut response = body(StatusCode::TOO_MANY_REQUESTS, code, message);
                if retry_after {
                    // Whole seconds, rounded up, never 0.
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from(secs.max(1)));
                }
                response
            }
        }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Counts the request, checks its key and the route's rate. The key on success.
async fn gate(state: &State, headers: &HeaderMap, endpoint: Endpoint) -> Result<String, ApiError> {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    match state.admit(endpoint, key).await {
        Ok(true) => Ok(key.unwrap_or_default().to_owned()),
        Ok(false) => Err(ApiError::Unauthorized),
        Err(refusal) => Err(ApiError::refused(state, refusal)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let valid = |key: &str| {
        (1..=128).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    };
    match value.to_str() {
        Ok(key) if valid(key) => Ok(Some(key.to_owned())),
        _ => Err(bad_request(
            "Idempotency-Key must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ -",
        )),
    }
}

fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    let request: CreateRequest = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("Invalid request body: {e}")))?;
    if request.model.is_empty() {
        return Err(bad_request("model must not be empty"));
    }
    let inputs = request
        .input
        .as_array()
        .filter(|inputs| !inputs.is_empty())
        .ok_or_else(|| bad_request("input must be a non-empty array"))?;
    for input in inputs {
        let kind = input.get("type").and_then(Value::as_str);
        if !matches!(kind, Some("video" | "audio" | "image" | "text")) {
            return Err(bad_request(
                "each input needs a type: video, audio, image or text",
            ));
        }
    }
    Ok(request)
}

async fn create(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = gate(&state, &headers, Endpoint::Create).await?;
    let idempotency_key = idempotency_key(&headers)?;
    let request = parse_create(&body)?;
    if let Some(generation) = state.replay(&key, idempotency_key.as_deref()) {
        return Ok((
            StatusCode::CREATED,
            [("idempotent-replayed", "true")],
            Json(generation),
        )
            .into_response());
    }
    // The plan's concurrency is `tower-quota`'s server mode: the create goes through the
    // layer, which refuses it past the key's plan or holds a slot for the job its answer
    // shows, until the job ends (`State::set_status` completes it).
    let args = Arc::new(std::sync::Mutex::new(Some((idempotency_key, request))));
    let make = {
        let (state, key) = (state.clone(), key.clone());
        tower::service_fn(move |request: axum::extract::Request| {
            let (state, key) = (state.clone(), key.clone());
            async move {
                let args = request
                    .extensions()
                    .get::<CreateArgs>()
                    .and_then(|args| args.0.lock().ok()?.take());
                let answer = match args {
                    Some((idempotency_key, body)) => {
                        match state.create(&key, idempotency_key, body) {
                            Ok((generation, false)) => {
                                (StatusCode::CREATED, Json(generation)).into_response()
                            }
                            Ok((generation, true)) => (
                                StatusCode::CREATED,
                                [("idempotent-replayed", "true")],
                                Json(generation),
                            )
                                .into_response(),
                            Err(refusal) => ApiError::refused(&state, refusal).into_response(),
                        }
                    }
                    None => ApiError::BadRequest("no create".into()).into_response(),
                };
                Ok::<_, std::convert::Infallible>(answer)
            }
        })
    };
    let mut through = axum::extract::Request::new(axum::body::Body::empty());
    *through.method_mut() = axum::http::Method::POST;
    *through.uri_mut() = Uri::from_static("/v2/generate");
    if let Ok(value) = HeaderValue::from_str(&key) {
        through.headers_mut().insert(sync::API_KEY_HEADER, value);
    }
    through.extensions_mut().insert(CreateArgs(args));
    let Ok(response) = tower::ServiceExt::oneshot(state.jobs.layer(make), through).await;
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        state.concurrency_limited();
        let wait = state.frees_in(&key);
        return Err(ApiError::refused(&state, Refusal::Concurrency(wait)));
    }
    // Read here, whole, so that the layer has bound the job before anyone can see it end.
    let (parts, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(Response::from_parts(parts, axum::body::Body::from(body)))
}

/// A create's `Idempotency-Key` and body.
type Args = (Option<String>, CreateRequest);

/// A create's arguments, for the service behind the plan's layer (taken once).
#[derive(Clone)]
struct CreateArgs(Arc<std::sync::Mutex<Option<Args>>>);

#[derive(Deserialize)]
struct GetQuery {
    wait: Option<bool>,
    timeout: Option<u64>,
}

async fn generation(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let key = gate(&state, &headers, Endpoint::Get).await?;
    let Query(query) = Query::<GetQuery>::try_from_uri(&uri)
        .map_err(|e| bad_request(format!("Invalid query: {e}")))?;
    let timeout = match query.timeout {
        None => 10,
        Some(t @ 1..=10) => t,
        Some(_) => return Err(bad_request("timeout must be between 1 and 10 seconds")),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let changed = state.changed.notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let generation = state.generation(&key, &id).ok_or(ApiError::NotFound)?;
        if query.wait != Some(true) || !generation.status.is_active() {
            return Ok(Json(generation).into_response());
        }
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep_until(deadline) => return Ok(Json(generation).into_response()),
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn list_query(uri: &Uri) -> Result<(ListQuery, Vec<Status>), ApiError> {
    let Query(query) = Query::<ListQuery>::try_from_uri(uri)
        .map_err(|e| bad_request(format!("Invalid query: {e}")))?;
    let statuses = match &query.status {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| {
                Status::parse(s.trim()).ok_or_else(|| bad_request(format!("Unknown status {s:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok((query, statuses))
}

async fn list(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let key = gate(&state, &headers, Endpoint::List).await?;
    let (query, statuses) = list_query(&uri)?;
    let limit = match query.limit {
        None => 20,
        Some(n @ 1..=100) => n,
        Some(_) => return Err(bad_request("limit must be between 1 and 100")),
    };
    let generations = state
        .list(&key, &statuses, query.cursor.as_deref(), limit)
        .ok_or_else(|| bad_request("Unknown cursor"))?;
    Ok(Json(generations).into_response())
}

async fn count(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let key = gate(&state, &headers, Endpoint::Count).await?;
    let (_, statuses) = list_query(&uri)?;
    let count = state.count(&key, &statuses);
    Ok(Json(json!({ "count": count })).into_response())
}

async fn stats(Extract(state): Extract<Shared>) -> Response {
    Json(state.stats()).into_response()
}
