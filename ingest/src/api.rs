//! The HTTP API: router, handlers, authentication and error responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Instrument;

use crate::body::{self, BodyBudget, BodyError};
use crate::config::IngestConfig;
use crate::error::IngestError;
use crate::payload::{self, BadRequest, Incoming};
use crate::store::{CallListQuery, Store};

/// Header carrying the sender's idempotency key (`<call_id>:core`, `<call_id>:detail:<seq>`).
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Alternative to `Authorization: Bearer`.
const X_API_KEY: &str = "x-api-key";
/// Longest accepted Idempotency-Key, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 1024;
/// Page size of `GET /v1/calls` when `limit` is absent, and its maximum.
const CALLS_PAGE: (i64, i64) = (50, 500);
/// Page size of `GET /v1/calls/{id}/spans` when `limit` is absent, and its maximum.
const SPANS_PAGE: (i64, i64) = (500, 5000);

/// Shared state of the router: the store plus the auth and size settings of an
/// [`IngestConfig`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    api_keys: Vec<String>,
    no_auth: bool,
    max_body_bytes: usize,
    max_decompressed_bytes: usize,
    body_timeout: std::time::Duration,
    admission: Admission,
    bodies: Arc<BodyBudget>,
}

/// Places for `POST /v1/calls` requests in flight, from reading the body to the end of the
/// write: a general pool, and a reserve only core call logs may take once the general pool is
/// full.
#[derive(Debug)]
struct Admission {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    max: usize,
    /// Requests refused because no place was free.
    refused: AtomicU64,
}

impl Admission {
    fn new(max: usize) -> Self {
        // `serve` refuses a value out of range; a router built directly gets the nearest one.
        let max = max.clamp(1, crate::config::MAX_MAX_IN_FLIGHT);
        // A quarter, and at least one place when there are two.
        let reserved = if max >= 2 { (max / 4).max(1) } else { 0 };
        Self {
            general: Arc::new(Semaphore::new(max - reserved)),
            reserve: Arc::new(Semaphore::new(reserved)),
            max,
            refused: AtomicU64::new(0),
        }
    }

    /// A place for a request, if one is free to it: any request takes one from the general
    /// pool, a core also from the reserve.
    fn admit(&self, core: bool) -> Result<OwnedSemaphorePermit, ApiError> {
        let general = self.general.clone().try_acquire_owned();
        let taken = match general {
            Err(_) if core => self.reserve.clone().try_acquire_owned(),
            taken => taken,
        };
        taken.map_err(|_| {
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                max_in_flight = self.max,
                core,
                refused,
                "request refused: the server is handling as many requests as it takes"
            );
            ApiError::Overloaded { max: self.max }
        })
    }

    fn in_flight(&self) -> usize {
        self.max - self.general.available_permits() - self.reserve.available_permits()
    }
}

impl AppState {
    /// State for [`app`]: takes `api_keys`, `no_auth` and the size limits from `config`.
    ///
    /// With no keys and `no_auth == false` every API request is refused with 401 (the router
    /// never runs open by accident; [`serve`](crate::serve) refuses to start instead).
    pub fn new(store: Store, config: &IngestConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                api_keys: config.api_keys.clone(),
                no_auth: config.no_auth,
                max_body_bytes: config.max_body_bytes,
                max_decompressed_bytes: config.max_decompressed_bytes,
                body_timeout: config.body_timeout,
                admission: Admission::new(config.max_in_flight),
                bodies: BodyBudget::new(config.max_buffered_bytes.max(1)),
            }),
        }
    }

    /// The store requests are written to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

/// The ingest router: `POST /v1/calls`, `GET /v1/calls`, `GET /v1/calls/{call_id}`,
/// `GET /v1/calls/{call_id}/spans` (all behind the API key) and `GET /healthz` (open), with
/// request ids (`x-request-id`, generated when absent) and request tracing.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/calls", post(post_call).get(list_calls))
        .route("/v1/calls/{call_id}", get(get_call))
        .route("/v1/calls/{call_id}/spans", get(list_spans))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!(
                "request",
                method = %req.method(),
                uri = %req.uri(),
                request_id = %request_id,
            )
        })
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Everything a handler can answer other than success.
#[derive(Debug)]
enum ApiError {
    BadRequest(BadRequest),
    Body(BodyError),
    Unauthorized,
    NotFound(String),
    Store(IngestError),
    /// No place for the request ([`IngestConfig::max_in_flight`]).
    Overloaded {
        max: usize,
    },
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        Self::BadRequest(e)
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        Self::Body(e)
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        Self::Store(e)
    }
}

fn error_body(status: StatusCode, error: String, field: Option<&str>) -> Response {
    (status, Json(json!({"error": error, "field": field}))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(b) => {
                error_body(StatusCode::BAD_REQUEST, b.message, b.field.as_deref())
            }
            Self::Body(e) => {
                let status = match e {
                    BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    BodyError::BadGzip(_) | BodyError::Read(_) => StatusCode::BAD_REQUEST,
                    BodyError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
                    BodyError::Busy { .. } => return busy(e.to_string()),
                };
                error_body(status, e.to_string(), Some("body"))
            }
            Self::Unauthorized => {
                let mut r = error_body(
                    StatusCode::UNAUTHORIZED,
                    "missing or unknown API key: send Authorization: Bearer <key> or \
                     x-api-key: <key> with a key from CALLSCOPE_INGEST_API_KEYS"
                        .to_owned(),
                    None,
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Self::NotFound(what) => error_body(StatusCode::NOT_FOUND, what, Some("call_id")),
            Self::Store(e) => store_error_response(e),
            Self::Overloaded { max } => busy(format!(
                "the server is handling as many requests as it takes ({max} places, \
                 CALLSCOPE_INGEST_MAX_IN_FLIGHT, a quarter of them kept for core call logs); \
                 retry after the Retry-After delay"
            )),
        }
    }
}

/// 503 with `Retry-After: 1` and `message`: the sender waits and retries.
fn busy(message: String) -> Response {
    let mut r = error_body(StatusCode::SERVICE_UNAVAILABLE, message, None);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Busy database → 503 with Retry-After (the sender waits and retries); a value the database
/// refuses (e.g. a NUL character in PostgreSQL text) → 400; anything else → 500 (retried).
fn store_error_response(e: IngestError) -> Response {
    let code = match &e {
        IngestError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    let is_busy = matches!(
        &e,
        IngestError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
    ) || matches!(
        code.as_deref(),
        Some("5" | "6" | "261" | "262" | "517" | "773" | "40001" | "40P01" | "53300")
    );
    if is_busy {
        tracing::warn!(error = %e, "database busy");
        return busy("the database is busy; retry after the Retry-After delay".to_owned());
    }
    if code.as_deref().is_some_and(|c| c.starts_with("22")) {
        return error_body(
            StatusCode::BAD_REQUEST,
            format!(
                "the database refused a value ({e}); send values it can store (no NUL characters in text, numbers within PostgreSQL's numeric range)"
            ),
            Some("body"),
        );
    }
    tracing::error!(error = %e, "storage failed");
    error_body(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage failed; retry later (the server log has the cause)".to_owned(),
        None,
    )
}

/// Compares without an early exit, so response timing does not reveal key prefixes.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key presented by `Authorization: Bearer <key>` or `x-api-key: <key>`, if any.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let auth = auth.trim();
        if let Some((scheme, key)) = auth.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some(key.trim());
        }
    }
    headers
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

async fn require_api_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.inner.no_auth {
        return Ok(next.run(req).await);
    }
    let ok = presented_key(req.headers()).is_some_and(|k| {
        state
            .inner
            .api_keys
            .iter()
            .any(|valid| constant_time_eq(valid.as_bytes(), k.as_bytes()))
    });
    if !ok {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(req).await)
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.store().ping().await {
        Ok(()) => {
            let a = &state.inner.admission;
            let b = &state.inner.bodies;
            Json(json!({
                "ok": true,
                "database": state.store().backend_name(),
                "requests_in_flight": a.in_flight(),
                "requests_refused_busy": a.refused.load(Ordering::Relaxed),
                "body_bytes_held": b.used(),
                "requests_refused_bytes": b.refused(),
            }))
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"ok": false, "error": "database unreachable"})),
            )
                .into_response()
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES => Ok(Some(k.to_owned())),
        _ => Err(ApiError::BadRequest(BadRequest {
            message: "Idempotency-Key must be 1 to 1024 visible ASCII characters, e.g. \
                      <call_id>:core or <call_id>:detail:<batch_seq>"
                .to_owned(),
            field: Some("Idempotency-Key".to_owned()),
        })),
    }
}

async fn post_call(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let max_body = state.inner.max_body_bytes;
    let too_large = BodyError::TooLarge {
        limit: max_body,
        stage: "on the wire",
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(max_body).unwrap_or(u64::MAX)) {
        return Err(too_large.into());
    }
    let key = idempotency_key(&headers)?;
    // Before the body is read: a refused request costs no memory. The place is held until
    // the write is over, also when the sender hangs up before.
    let core = key.as_deref().is_some_and(|k| k.ends_with(":core"));
    let place = state.inner.admission.admit(core)?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(not ASCII)").to_owned());
    // The body's bytes, from its declared length (and what it is expected to decode to) on;
    // they go back with the place.
    let max_decompressed = state.inner.max_decompressed_bytes;
    let declared = declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut held = state.inner.bodies.hold(core);
    let decoded = body::expected_decoded(declared, encoding.as_deref(), max_decompressed);
    held.grow(declared.saturating_add(decoded))?;
    let raw = body::read_limited(
        body,
        max_body,
        state.inner.body_timeout,
        &mut held,
        declared,
    )
    .await?;
    // Decompression and parsing of up to tens of MB are CPU work: keep them off the reactor.
    let (incoming, holds) = tokio::task::spawn_blocking(move || {
        let incoming = decode_and_parse(raw, encoding.as_deref(), max_decompressed, &mut held)?;
        // The bytes go back before the place (the tuple drops in order).
        Ok::<_, ApiError>((incoming, (held, place)))
    })
    .await
    .map_err(|e| ApiError::Store(IngestError::Task(e)))??;

    // The write runs in a task of its own, so a sender hanging up does not cut a transaction
    // short: SQLite would then roll it back only after the next writer was let in (which
    // would find the lock taken and sleep in SQLite's busy handler). A retry of a write that
    // completed after the hang-up is answered as a duplicate.
    let store = state.store().clone();
    // In the request's tracing span, so its logs keep the request id; a failure is answered
    // (and logged) in the task, also when nobody is left to read the answer.
    let write = async move {
        let answer = match store_incoming(&store, incoming, key).await {
            Ok(reply) => Json(reply).into_response(),
            Err(e) => e.into_response(),
        };
        drop(holds);
        answer
    };
    tokio::spawn(write.instrument(tracing::Span::current()))
        .await
        .map_err(|e| ApiError::Store(IngestError::Task(e)))
}

/// Decodes and parses a body read under `held`, which then holds the parsed rows' estimate
/// until the write is over. While it is parsed, the body and its rows are both held: the rows'
/// usual most ([`payload::PARSE_EXPANSION`] times the body) is taken first, so that parsing
/// does not go past the budget.
fn decode_and_parse(
    raw: axum::body::Bytes,
    encoding: Option<&str>,
    max_decompressed: usize,
    held: &mut body::Held,
) -> Result<Incoming, ApiError> {
    let bytes = body::decode(raw, encoding, max_decompressed, held)?;
    held.set(bytes.len().saturating_mul(1 + payload::PARSE_EXPANSION))?;
    let incoming = payload::parse(&bytes)?;
    drop(bytes);
    held.set(incoming.heap_bytes())?;
    Ok(incoming)
}

/// Stores a parsed request; the reply's JSON.
async fn store_incoming(
    store: &Store,
    incoming: Incoming,
    key: Option<String>,
) -> Result<Value, ApiError> {
    Ok(match incoming {
        Incoming::Core(core) => {
            let stored = store.insert_core(&core, key.as_deref(), now_us()).await?;
            tracing::info!(call_id = %core.call_id, duplicate = !stored, "core stored");
            json!({"ok": true, "call_id": core.call_id, "kind": "core", "duplicate": !stored})
        }
        Incoming::Detail(batch) => {
            let outcome = store
                .insert_detail(&batch, key.as_deref(), now_us())
                .await?;
            tracing::info!(
                call_id = %batch.call_id,
                batch_seq = batch.batch_seq,
                spans = outcome.spans_inserted,
                duplicate = outcome.duplicate,
                "detail batch stored"
            );
            json!({
                "ok": true, "call_id": batch.call_id, "kind": "detail",
                "batch_seq": batch.batch_seq, "duplicate": outcome.duplicate,
                "spans_stored": outcome.spans_inserted,
            })
        }
    })
}

/// Query string of `GET /v1/calls` (all optional; validated by hand for field-naming errors).
#[derive(Debug, Deserialize)]
struct ListParams {
    agent_id: Option<String>,
    limit: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

fn bad_param(field: &str, message: &str) -> ApiError {
    ApiError::BadRequest(BadRequest {
        message: message.to_owned(),
        field: Some(field.to_owned()),
    })
}

fn page_limit(raw: Option<&str>, (default, max): (i64, i64)) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad_param(
                "limit",
                &format!("limit must be an integer from 1 to {max}"),
            )),
        },
    }
}

/// The cursor of the next page: `field` of the last item when the page is full, else `None`.
fn next_cursor(items: &[Value], limit: i64, field: &str) -> Option<Value> {
    let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit;
    full.then(|| items.last().and_then(|item| item.get(field)).cloned())
        .flatten()
}

fn params(q: Result<Query<ListParams>, QueryRejection>) -> Result<ListParams, ApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| bad_param("query", &format!("malformed query string: {e}")))
}

async fn list_calls(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let limit = page_limit(p.limit.as_deref(), CALLS_PAGE)?;
    let before = match p.before.as_deref() {
        None | Some("") => None,
        Some(cursor) => {
            let parsed = cursor
                .split_once(':')
                .and_then(|(us, id)| Some((us.parse::<i64>().ok()?, id.to_owned())));
            Some(parsed.ok_or_else(|| {
                bad_param(
                    "before",
                    "before must be a cursor from a previous page (next_before or a call's cursor)",
                )
            })?)
        }
    };
    let query = CallListQuery {
        agent_id: p.agent_id.filter(|a| !a.is_empty()),
        before,
        limit,
    };
    let calls = state.store().list_calls(&query).await?;
    let next_before = next_cursor(&calls, limit, "cursor");
    Ok(Json(json!({"calls": calls, "next_before": next_before})).into_response())
}

async fn get_call(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store().get_call(&call_id).await? {
        Some(call) => Ok(Json(call).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no call {call_id:?} is stored; check the call_id (list calls with GET /v1/calls)"
        ))),
    }
}

async fn list_spans(
    State(state): State<AppState>,
    Path(call_id): Path<String>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = params(q)?;
    let limit = page_limit(p.limit.as_deref(), SPANS_PAGE)?;
    let after = match p.after.as_deref() {
        None | Some("") => 0,
        Some(s) => s.parse::<i64>().map_err(|_| {
            bad_param(
                "after",
                "after must be the next_after value of a previous page",
            )
        })?,
    };
    let spans = state.store().list_spans(&call_id, after, limit).await?;
    let next_after = next_cursor(&spans, limit, "id");
    Ok(Json(json!({"call_id": call_id, "spans": spans, "next_after": next_after})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_both_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(X_API_KEY, HeaderValue::from_static(" k1 "));
        assert_eq!(presented_key(&h), Some("k1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k2"));
        assert_eq!(presented_key(&h), Some("k2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h), Some("k1"));
    }

    #[test]
    fn a_parse_that_would_go_past_the_budget_is_refused_before_it_starts() {
        let batch = serde_json::to_vec(&json!({
            "schema_version": 1, "call_id": "c", "update_type": "detailed_telemetry",
            "batch_seq": 0, "telemetry_data": {"session_traces": [{
                "trace_id": "t", "span_id": "s", "name": "stt",
                "attributes": {"lk.debug.payload": "x".repeat(5000)}
            }]}
        }))
        .expect("JSON");
        let parsed = payload::parse(&batch).expect("valid");
        let (json_len, rows) = (batch.len(), parsed.heap_bytes());
        assert!(rows < 2 * json_len, "{rows} for {json_len}");
        // Room for the rows (and the body while they are made), not for the parse's most.
        let budget = body::BodyBudget::new(4 * (json_len * 5));
        let mut other = budget.hold(true);
        other
            .grow(4 * (json_len * 5) * 3 / 4 - 3 * json_len)
            .expect("another request");
        let mut held = budget.hold(false);
        let raw = axum::body::Bytes::from(batch.clone());
        let refused = decode_and_parse(raw, None, usize::MAX, &mut held);
        assert!(
            matches!(refused, Err(ApiError::Body(BodyError::Busy { .. }))),
            "{refused:?}"
        );
        // With that room, the parse goes through and its rows are what is held after.
        drop(other);
        let parsed = decode_and_parse(axum::body::Bytes::from(batch), None, usize::MAX, &mut held)
            .expect("room now");
        assert_eq!(held.bytes(), parsed.heap_bytes());
    }

    #[test]
    fn constant_time_eq_matches_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn a_write_goes_on_when_its_sender_hangs_up() {
        use std::time::{Duration, Instant};
        use tower::ServiceExt;

        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("hang-up.db").display());
        let store = Store::connect(&url).await.expect("SQLite store");
        let mut config = IngestConfig::new(&url);
        config.no_auth = true;
        let state = AppState::new(store.clone(), &config);
        let router = app(state.clone());
        let core = crate::payload::tests::core_body("hang-up-1");
        let req = Request::post("/v1/calls")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(core.to_string()))
            .expect("request");

        // Another write holds the lock; the sender gives up while its write waits for it.
        let held = store.hold_write_lock().await;
        let answer = tokio::time::timeout(Duration::from_secs(2), router.oneshot(req)).await;
        assert!(answer.is_err(), "answered while the write lock was held");
        // The write keeps its place while it waits: writes of senders that hung up are
        // bounded by CALLSCOPE_INGEST_MAX_IN_FLIGHT.
        assert_eq!(state.inner.admission.in_flight(), 1);
        drop(held);

        // The write, in a task of its own, stores the core all the same.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.get_call("hang-up-1").await.expect("read").is_none() {
            assert!(
                Instant::now() < deadline,
                "the core of a sender that hung up was never stored"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ... and gives it back once the write is over.
        while state.inner.admission.in_flight() > 0 {
            assert!(Instant::now() < deadline, "the write kept its place");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn a_quarter_of_the_places_wait_for_cores() {
        // Places kept for cores, for 1 to 9 places: a quarter, at least one given two.
        let kept = [0, 1, 1, 1, 1, 1, 1, 2, 2];
        for (max, reserved) in (1..=9).zip(kept) {
            let a = Admission::new(max);
            let mut held = Vec::new();
            // Detail (and anything not keyed as a core) fills the places but the reserve.
            while let Ok(p) = a.admit(false) {
                held.push(p);
                assert!(held.len() <= max, "max {max}: more places than there are");
            }
            assert_eq!(held.len(), max - reserved, "max {max}");
            assert_eq!(a.in_flight(), max - reserved, "max {max}");
            // Cores take the rest, then they too are refused.
            while let Ok(p) = a.admit(true) {
                held.push(p);
                assert!(held.len() <= max, "max {max}: more places than there are");
            }
            assert_eq!(held.len(), max, "max {max}");
            assert_eq!(a.in_flight(), max, "max {max}");
            assert_eq!(a.refused.load(Ordering::Relaxed), 2, "max {max}");
            // Once the places are given back, detail gets in again.
            held.clear();
            assert_eq!(a.in_flight(), 0, "max {max}");
            assert!(a.admit(false).is_ok(), "max {max}");
        }
    }

    #[test]
    fn page_limits_are_bounded() {
        assert_eq!(page_limit(None, (50, 500)).ok(), Some(50));
        assert_eq!(page_limit(Some("7"), (50, 500)).ok(), Some(7));
        assert!(page_limit(Some("0"), (50, 500)).is_err());
        assert!(page_limit(Some("501"), (50, 500)).is_err());
        assert!(page_limit(Some("x"), (50, 500)).is_err());
    }
}
