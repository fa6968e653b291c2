//! A null HTTP receiver on 127.0.0.1:0 for the benches and the load tool (included with
//! `#[path]`): answers 200 to every POST at once, counts requests and bytes, and notes when each
//! call's core (`Idempotency-Key: <call_id>:core`) arrived, for phase-1 latency.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};

/// What the sink saw.
#[derive(Debug, Default)]
pub struct SinkState {
    pub requests: AtomicU64,
    /// Request body bytes as received (compressed if the sender compressed).
    pub bytes: AtomicU64,
    /// Arrival time of each call's core, by call id.
    pub cores: Mutex<HashMap<String, Instant>>,
}

impl SinkState {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// When the core of `call_id` arrived, if it did.
    pub fn core_arrival(&self, call_id: &str) -> Option<Instant> {
        self.cores.lock().ok()?.get(call_id).copied()
    }

    pub fn cores_seen(&self) -> usize {
        self.cores.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// A running sink; stops when dropped.
pub struct NullSink {
    pub url: String,
    pub state: Arc<SinkState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn take(
    state: axum::extract::State<Arc<SinkState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    state.requests.fetch_add(1, Ordering::Relaxed);
    state.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if let Some(call) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|k| k.strip_suffix(":core"))
        && let Ok(mut c) = state.cores.lock()
    {
        c.entry(call.to_owned()).or_insert(now);
    }
    StatusCode::OK
}

impl NullSink {
    /// Starts the sink on its own thread with a current-thread runtime (`threads == 1`) or a
    /// multi-thread runtime of `threads` workers.
    pub fn start(threads: usize) -> std::io::Result<NullSink> {
        let state = Arc::new(SinkState::default());
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("null-sink".into())
            .spawn(move || {
                let rt = if threads <= 1 {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(threads)
                        .enable_all()
                        .build()
                };
                let Ok(rt) = rt else { return };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let app = axum::Router::new()
                        .fallback(take)
                        .layer(axum::extract::DefaultBodyLimit::disable())
                        .with_state(st);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })?;
        Ok(NullSink {
            url: format!("http://{addr}/v1/calls"),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>` without a path (for OTLP exporters, which add their own).
    pub fn base(&self) -> &str {
        self.url.trim_end_matches("/v1/calls")
    }
}

impl Drop for NullSink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
