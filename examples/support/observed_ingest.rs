//! `callscope-ingest` in-process on 127.0.0.1:0, behind an observer that notes, per call (from
//! the Idempotency-Key), when its core was answered and how large each request was on the wire.
//! For the demo and the load tool (included with `#[path]`): phase-1 latency into the real
//! receiver, up to the moment its handler has stored the core (before the response is written,
//! so a little less than the sender sees).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use callscope_ingest::{AppState, IngestConfig, IngestError, Store, app};

/// What the server saw of one call.
#[derive(Default, Debug, Clone)]
pub struct Seen {
    /// When its core was answered with a success.
    pub core_acked: Option<Instant>,
    /// Its core's request body, as received.
    pub core_bytes: u64,
    /// Requests for the call (core and detail, retries included).
    pub requests: u64,
    /// Their bodies, as received.
    pub wire_bytes: u64,
    /// The largest of them.
    pub largest: u64,
    /// Requests answered 503 (busy database, no place free: `CALLSCOPE_INGEST_MAX_IN_FLIGHT`,
    /// or no room for the body: `CALLSCOPE_INGEST_MAX_BUFFERED_BYTES`).
    pub busy: u64,
}

pub type SeenMap = Arc<Mutex<HashMap<String, Seen>>>;

async fn observe(
    seen: SeenMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let header = |req: &axum::extract::Request, name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = header(&req, "idempotency-key");
    let len = header(&req, "content-length")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let resp = next.run(req).await;
    if let Some(key) = key {
        let (call, is_core) = match key.strip_suffix(":core") {
            Some(c) => (c.to_owned(), true),
            None => (key.split(":detail:").next().unwrap_or("").to_owned(), false),
        };
        let mut m = seen.lock().unwrap();
        let s = m.entry(call).or_default();
        s.requests += 1;
        s.wire_bytes += len;
        s.largest = s.largest.max(len);
        s.busy += u64::from(resp.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE);
        if is_core && resp.status().is_success() {
            s.core_acked = Some(Instant::now());
            s.core_bytes = len;
        }
    }
    resp
}

/// A running observed server; [`stop`](Self::stop) it (or drop it) to stop serving.
pub struct Server {
    /// `http://127.0.0.1:<port>/v1/calls`.
    pub endpoint: String,
    pub store: Store,
    pub seen: SeenMap,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    /// When the core of `call_id` was acknowledged, if it was.
    pub fn core_acked(&self, call_id: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(call_id)?.core_acked
    }

    /// Requests answered 503 so far, over all calls.
    pub fn busy_answers(&self) -> u64 {
        self.seen.lock().unwrap().values().map(|s| s.busy).sum()
    }

    /// Stops accepting requests (the store stays readable).
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Opens `database_url` and serves the ingest router on the current tokio runtime; `api_key`
/// `None` serves without authentication.
pub async fn start(database_url: &str, api_key: Option<&str>) -> Result<Server, IngestError> {
    let mut config = IngestConfig::new(database_url);
    match api_key {
        Some(k) => config.api_keys = vec![k.to_owned()],
        None => config.no_auth = true,
    }
    let store = Store::connect(database_url).await?;
    let seen = SeenMap::default();
    let observer = seen.clone();
    let router = app(AppState::new(store.clone(), &config)).layer(axum::middleware::from_fn(
        move |req, next| observe(observer.clone(), req, next),
    ));
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| IngestError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| IngestError::Bind { addr, source })?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Server {
        endpoint: format!("http://{addr}/v1/calls"),
        store,
        seen,
        stop,
    })
}
