//! Fault injection: a scriptable faulty HTTP/1.1 front (`FaultProxy`) that can forward to the
//! real ingest server (`Ingest`, SQLite in a temp dir) or answer by itself. Each request is
//! answered by `script(&Req)`: pass, a status (with headers), a connection reset mid-body, a
//! response slower than the sender's timeout, or "down" (connections dropped at once).
//! Everything runs on runtimes owned here, so tests stay plain blocking `#[test]`s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use callscope_ingest::{IngestConfig, RunningServer, Store};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The real ingest server on 127.0.0.1:0 with a temporary SQLite file.
pub struct Ingest {
    rt: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    store: Store,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Ingest {
    pub fn start() -> Self {
        Self::with_max_body(callscope_ingest::DEFAULT_MAX_BODY_BYTES)
    }

    /// With a request body limit (larger bodies get 413 from the server itself).
    pub fn with_max_body(max_body_bytes: usize) -> Self {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = IngestConfig::new(format!(
            "sqlite://{}",
            dir.path().join("ingest.db").display()
        ));
        cfg.addr = "127.0.0.1:0".parse().unwrap();
        cfg.no_auth = true;
        cfg.max_body_bytes = max_body_bytes;
        let server = rt.block_on(callscope_ingest::serve(cfg)).unwrap();
        let url = server.endpoint();
        let store = server.store.clone();
        Ingest {
            rt,
            server: Some(server),
            store,
            url,
            _dir: dir,
        }
    }

    pub fn spans(&self, call_id: &str) -> u64 {
        self.rt.block_on(self.store.span_count(call_id)).unwrap()
    }
    pub fn total_spans(&self) -> u64 {
        self.rt.block_on(self.store.total_span_count()).unwrap()
    }
    pub fn duplicates(&self) -> u64 {
        self.rt.block_on(self.store.duplicate_span_rows()).unwrap()
    }
    pub fn calls(&self) -> u64 {
        self.rt.block_on(self.store.call_count()).unwrap()
    }
    pub fn call(&self, call_id: &str) -> Option<Value> {
        self.rt.block_on(self.store.get_call(call_id)).unwrap()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown());
        }
    }
}

/// A two-thread runtime for the servers of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the proxy knows of a request when it decides.
#[derive(Debug, Clone)]
pub struct Req {
    /// Arrival order (0-based).
    pub n: usize,
    pub key: String,
    pub wire_len: usize,
}

impl Req {
    pub fn is_core(&self) -> bool {
        self.key.ends_with(":core")
    }
}

/// How to answer one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward to the upstream (or answer 200 without one).
    Pass,
    /// Answer this status without forwarding.
    Status(u16),
    /// Answer this status with headers (e.g. `Retry-After`).
    StatusWith(u16, Vec<(String, String)>),
    /// Read half the body, then reset the connection.
    Reset,
    /// Wait this long, then forward (the sender has timed out by then).
    Slow(Duration),
}

/// One request the proxy saw, with what it did.
#[derive(Debug, Clone)]
pub struct Seen {
    pub req: Req,
    pub fault: Fault,
    /// The status the sender got (`None`: reset, dropped, or too late).
    pub status: Option<u16>,
    pub at: Instant,
}

impl Seen {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
            && !matches!(self.fault, Fault::Slow(_))
    }
}

type Script = Box<dyn FnMut(&Req) -> Fault + Send>;

struct Shared {
    log: Mutex<Vec<Seen>>,
    changed: Condvar,
    script: Mutex<Script>,
    down: AtomicBool,
    /// Connections dropped while down.
    refused: Mutex<usize>,
    upstream: Option<String>,
    client: reqwest::Client,
}

/// The faulty front.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// In front of `upstream` (the ingest server's endpoint URL), or alone (`None`: `Pass` = 200).
    pub fn start(
        upstream: Option<&str>,
        script: impl FnMut(&Req) -> Fault + Send + 'static,
    ) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), upstream, script)
    }

    /// The same on a given address (to come up late on a port the sender already uses).
    pub fn start_on(
        addr: SocketAddr,
        upstream: Option<&str>,
        script: impl FnMut(&Req) -> Fault + Send + 'static,
    ) -> Self {
        let rt = runtime();
        let listener = rt.block_on(TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            script: Mutex::new(Box::new(script)),
            down: AtomicBool::new(false),
            refused: Mutex::new(0),
            upstream: upstream.map(str::to_owned),
            client: reqwest::Client::new(),
        });
        let s = shared.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = conn(stream, s).await;
                });
            }
        });
        FaultProxy { addr, shared, rt }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/calls", self.addr)
    }

    /// While down, every connection is dropped at once (the sender sees a reset).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Connections dropped while down.
    pub fn refused(&self) -> usize {
        *self.shared.refused.lock().unwrap()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Blocks until `cond(log, refused)` holds (woken by each request), at most `timeout`.
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&[Seen], usize) -> bool) -> bool {
        wait_until(&self.shared.log, &self.shared.changed, timeout, |log| {
            cond(log, self.refused())
        })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the runtime ends the accept loop and every connection.
        let _ = &self.rt;
    }
}

fn note(s: &Shared, seen: Seen) {
    let mut log = s.log.lock().unwrap();
    log.push(seen);
    s.changed.notify_all();
}

async fn conn(mut stream: TcpStream, s: Arc<Shared>) -> std::io::Result<()> {
    if s.down.load(Ordering::SeqCst) {
        *s.refused.lock().unwrap() += 1;
        s.changed.notify_all();
        reset(stream);
        return Ok(());
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut len = 0usize;
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                }
                headers.push((k, v));
            }
        }
        let key = headers
            .iter()
            .find(|(k, _)| k == "idempotency-key")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let n = s.log.lock().unwrap().len();
        let req = Req {
            n,
            key,
            wire_len: len,
        };
        let fault = (s.script.lock().unwrap())(&req);
        if fault == Fault::Reset {
            // Read part of the body, then reset.
            while buf.len() < head_end + len / 2 {
                let mut chunk = [0u8; 16 * 1024];
                if stream.read(&mut chunk).await? == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..]);
            }
            note(
                &s,
                Seen {
                    req,
                    fault,
                    status: None,
                    at: Instant::now(),
                },
            );
            reset(stream);
            return Ok(());
        }
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 64 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let (status, extra, resp_body) = match &fault {
            Fault::Pass | Fault::Slow(_) => {
                if let Fault::Slow(d) = &fault {
                    tokio::time::sleep(*d).await;
                }
                forward(&s, &headers, body).await
            }
            Fault::Status(c) => (*c, vec![], br#"{"error":"injected"}"#.to_vec()),
            Fault::StatusWith(c, h) => (*c, h.clone(), br#"{"error":"injected"}"#.to_vec()),
            Fault::Reset => unreachable!(),
        };
        note(
            &s,
            Seen {
                req,
                fault,
                status: Some(status),
                at: Instant::now(),
            },
        );
        let mut out = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            resp_body.len()
        );
        for (k, v) in extra {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&resp_body);
        stream.write_all(&bytes).await?;
    }
}

async fn forward(
    s: &Shared,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let Some(up) = &s.upstream else {
        return (200, vec![], br#"{"ok":true}"#.to_vec());
    };
    let mut rb = s.client.post(up).body(body);
    for (k, v) in headers {
        if matches!(
            k.as_str(),
            "content-type" | "content-encoding" | "idempotency-key" | "authorization"
        ) {
            rb = rb.header(k.as_str(), v.as_str());
        }
    }
    match rb.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (status, vec![], body)
        }
        Err(_) => (502, vec![], br#"{"error":"upstream"}"#.to_vec()),
    }
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: closing sends a RST instead of a FIN.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One call: an `agent_session` root and `spans - 1` children with `pad` bytes of text each.
pub fn emit_call(provider: &SdkTracerProvider, call_id: &str, spans: usize, pad: usize) {
    let tracer = provider.tracer("faults");
    let cx = open_root(&tracer, call_id);
    for i in 1..spans {
        let mut s = tracer.build_with_context(
            tracer
                .span_builder(if i % 2 == 0 {
                    "llm_request"
                } else {
                    "tts_request"
                })
                .with_attributes(vec![KeyValue::new("payload", "p".repeat(pad))]),
            &cx,
        );
        s.end();
    }
    cx.span().end();
}

/// The acceptance schedule (tests/faults.rs, examples/faults.rs). Every fault in turn, by request number: 5xx, 429 + Retry-After, resets, slow answers, 413
/// above 24 KB; plus an outage while the calls are emitted.
pub fn all_faults(timeout: Duration) -> impl FnMut(&Req) -> Fault + Send + 'static {
    move |r: &Req| {
        if r.wire_len > 24_000 {
            return Fault::Status(413);
        }
        match r.n % 23 {
            1 => Fault::Status(503),
            4 => Fault::Status(500),
            7 => Fault::StatusWith(429, vec![("retry-after".into(), "1".into())]),
            10 => Fault::Reset,
            13 => Fault::Slow(timeout * 2),
            16 => Fault::Status(502),
            _ => Fault::Pass,
        }
    }
}

/// Starts an `agent_session` root span carrying `call_id` and returns its context (not ended).
pub fn open_root<T: opentelemetry::trace::Tracer>(
    tracer: &T,
    call_id: &str,
) -> opentelemetry::Context
where
    T::Span: Send + Sync + 'static,
{
    use opentelemetry::trace::TraceContextExt;
    let root =
        tracer.build_with_context(
            tracer.span_builder("agent_session").with_attributes(vec![
                opentelemetry::KeyValue::new("call_id", call_id.to_owned()),
            ]),
            &opentelemetry::Context::new(),
        );
    opentelemetry::Context::new().with_span(root)
}

/// Blocks until `cond(log)` holds, woken by `changed` (each request) and at least every 200 ms
/// (conditions may also read counters nothing signals), at most `timeout`.
pub fn wait_until<T>(
    log: &Mutex<Vec<T>>,
    changed: &Condvar,
    timeout: Duration,
    cond: impl Fn(&[T]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut guard = log.lock().unwrap();
    loop {
        if cond(&guard) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        guard = changed
            .wait_timeout(guard, (deadline - now).min(Duration::from_millis(200)))
            .unwrap()
            .0;
    }
}
