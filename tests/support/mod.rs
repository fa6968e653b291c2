//! Test support: a recording, scriptable HTTP receiver on 127.0.0.1:0 (its own thread and
//! runtime, so tests stay plain `#[test]`s that may block), and helpers to build providers.
#![allow(dead_code, clippy::unwrap_used)]

pub mod fault;
#[allow(unused_imports)] // not every test binary opens calls by hand
pub use fault::open_root;
#[path = "../../examples/support/voice.rs"]
pub mod voice;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Arrival order.
    pub n: usize,
    pub arrived: Instant,
    /// When the answer was sent (after any scripted delay).
    pub answered: Instant,
    pub status: u16,
    pub idempotency_key: Option<String>,
    pub content_encoding: Option<String>,
    pub authorization: Option<String>,
    /// Body size on the wire.
    pub wire_len: usize,
    /// Body size decoded.
    pub json_len: usize,
    pub json: Value,
}

impl Recorded {
    pub fn is_core(&self) -> bool {
        self.json.get("update_type").is_none()
    }
    pub fn call_id(&self) -> &str {
        self.json["call_id"].as_str().unwrap_or("")
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn ok() -> Self {
        Reply {
            status: 200,
            delay: Duration::ZERO,
            headers: vec![],
        }
    }
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            ..Reply::ok()
        }
    }
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn header(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
}

/// Decides the reply from the request number and its decoded body.
pub type Script = Arc<dyn Fn(usize, &Value, usize) -> Reply + Send + Sync>;

struct Shared {
    log: Mutex<Vec<Recorded>>,
    changed: Condvar,
    script: Script,
}

/// The recording receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Answers 200 to everything.
    pub fn start() -> Self {
        Self::scripted(|_, _, _| Reply::ok())
    }

    /// Answers by `script(request_number, body, wire_len)`.
    pub fn scripted(
        script: impl Fn(usize, &Value, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            script: Arc::new(script),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().route("/v1/calls", post(handle)).with_state(s);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = rx.recv().unwrap();
        Receiver {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/calls", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Acknowledged core summaries.
    pub fn cores(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_core() && r.ok())
            .collect()
    }

    /// Acknowledged detail batches.
    pub fn details(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.is_core() && r.ok())
            .collect()
    }

    pub fn core_of(&self, call_id: &str) -> Option<Value> {
        self.cores()
            .into_iter()
            .find(|r| r.call_id() == call_id)
            .map(|r| r.json)
    }

    /// Blocks until `cond(requests)` holds (woken by each request), at most `timeout`.
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&[Recorded]) -> bool) -> bool {
        fault::wait_until(&self.shared.log, &self.shared.changed, timeout, cond)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = Instant::now();
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let encoding = h("content-encoding");
    let decoded = if encoding.as_deref() == Some("gzip") {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return (StatusCode::BAD_REQUEST, "bad gzip").into_response();
        }
        out
    } else {
        body.to_vec()
    };
    let json: Value = match serde_json::from_slice(&decoded) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")).into_response(),
    };
    let n = s.log.lock().unwrap().len();
    let reply = (s.script)(n, &json, body.len());
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let rec = Recorded {
        n,
        arrived,
        answered: Instant::now(),
        status: reply.status,
        idempotency_key: h("idempotency-key"),
        content_encoding: encoding,
        authorization: h("authorization"),
        wire_len: body.len(),
        json_len: decoded.len(),
        json,
    };
    {
        let mut log = s.log.lock().unwrap();
        log.push(rec);
        s.changed.notify_all();
    }
    let mut resp = (
        StatusCode::from_u16(reply.status).unwrap(),
        r#"{"ok":true}"#,
    )
        .into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

/// Every span id in the acknowledged detail batches of `call_id`, with repeats.
pub fn detail_span_ids(details: &[Recorded], call_id: &str) -> Vec<String> {
    details
        .iter()
        .filter(|r| r.call_id() == call_id)
        .flat_map(|r| {
            r.json["telemetry_data"]["session_traces"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|s| s["span_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Installs a tracing subscriber once (RUST_LOG controls it), so library logs show in tests.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
