//! Load tool: paced voice-agent spans into callscope and, in the same run, into the SDK's
//! `BatchSpanProcessor` + the OTLP/HTTP exporter, both sending to local receivers on 127.0.0.1.
//! Every scenario is bounded in span count and in time; each pipeline runs in its own child
//! process so that peak RSS (VmHWM) is its own.
//!
//! ```text
//! cargo run --release --example loadgen -- --quick                  # smoke run, ~1 min
//! cargo run --release --example loadgen -- --scenario throughput    # one scenario
//! cargo run --release --example loadgen                             # all scenarios
//! ```
//! Scenarios: `throughput` (highest paced spans/s with zero drops), `latency` (phase-1 latency
//! while 100 calls stream ~15 MB of detail each), `rss` (1,000 concurrent calls × 500 spans ×
//! 10 KB), `wire` (bytes on the wire / raw JSON, as fast as possible and paced), `ingest`
//! (callscope-ingest on SQLite and PostgreSQL: core logs/s, spans stored/s, and phase-1
//! latency to the stored core while other calls' detail is being stored). PostgreSQL is skipped with a message when
//! `--postgres-url` is unreachable; a fresh database is created and dropped.
//!
//! Compression: callscope gzips (its default) and the SDK's exporter sends raw protobuf (its
//! default); `--cs-no-gzip` and `--sdk-gzip` make the comparison like for like either way.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    missing_docs
)]

#[path = "support/null_sink.rs"]
mod null_sink;
#[path = "support/observed_ingest.rs"]
mod observed_ingest;
#[path = "support/voice.rs"]
mod voice;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use callscope::{CallSpanProcessor, DetailMode, StatsHandle};
use clap::{Parser, ValueEnum};
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use serde_json::{Value as Json, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Throughput,
    Latency,
    Rss,
    Wire,
    Ingest,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pipe {
    /// CallSpanProcessor → null HTTP receiver.
    Callscope,
    /// SDK BatchSpanProcessor + opentelemetry-otlp HTTP/protobuf → null HTTP receiver.
    Sdk,
}

#[derive(Debug, Clone, Parser)]
#[command(about = "callscope load tool (loopback only, bounded in count and time)")]
struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Small sizes for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Time limit of each child run, in seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// PostgreSQL server for the ingest scenario (a fresh database is created in it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres_url: String,
    /// Payload bytes per span in the throughput scenario.
    #[arg(long, default_value_t = 1000)]
    span_bytes: usize,
    /// callscope's CALLSCOPE_BATCH_TIMEOUT_MS for the run (default: the library's).
    #[arg(long)]
    cs_batch_timeout_ms: Option<u64>,
    /// callscope's CALLSCOPE_MAX_BUFFER_BYTES for the run, in MiB (default: the library's).
    #[arg(long)]
    cs_max_buffer_mib: Option<usize>,
    /// callscope's CALLSCOPE_MAX_REQUEST_BYTES for the run, in KiB (default: the library's).
    #[arg(long)]
    cs_max_request_kib: Option<usize>,
    /// Send callscope's bodies uncompressed (CALLSCOPE_COMPRESSION=none), as the SDK's OTLP
    /// exporter sends its protobuf here.
    #[arg(long)]
    cs_no_gzip: bool,
    /// callscope's CALLSCOPE_COMPRESSION=auto: gzip, but detail bodies go uncompressed while
    /// deflate costs more time than sending the bytes it saves would and pending detail is past
    /// 7/8 of its bound.
    #[arg(long, conflicts_with = "cs_no_gzip")]
    cs_auto_gzip: bool,
    /// callscope's CALLSCOPE_GZIP_LEVEL for the run (set alone, it is also the maximum: a
    /// fixed level; default: the library's, 1 raised to 5 while compression has CPU to spare).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=9))]
    cs_gzip_level: Option<u32>,
    /// callscope's CALLSCOPE_GZIP_LEVEL_MAX for the run (default: the library's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=9))]
    cs_gzip_level_max: Option<u32>,
    /// Give callscope a disk spool (CALLSCOPE_SPOOL_DIR) in a fresh temporary directory: every
    /// payload is written and fsynced before it is sent, and bodies past the memory bound wait
    /// on disk instead of being dropped.
    #[arg(long)]
    cs_spool: bool,
    /// Have the SDK's OTLP exporter gzip its protobuf (opentelemetry-otlp's `gzip-http`, at
    /// flate2's default level), for a comparison where both pipelines compress.
    #[arg(long)]
    sdk_gzip: bool,
    /// Internal: run one scenario for one pipeline and print its result as JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

// ---- span generation ----------------------------------------------------------------------

const NAMES: [&str; 8] = [
    "stt",
    "eou_detection",
    "llm_request",
    "llm_node",
    "tts_request",
    "tts_node",
    "function_tool",
    "agent_turn",
];

/// Payload strings shared by spans (generating 10 KB of text per span would dominate the
/// generator's time); 256 distinct texts, so deflate rarely sees a repeat within its window.
fn payload_pool(bytes: usize) -> Vec<Value> {
    (0..256u64)
        .map(|i| Value::String(StringValue::from(voice::text(i * 7919 + 1, bytes))))
        .collect()
}

/// Sleeps so that `done` items since `start` do not run ahead of `rate` per second.
fn pace(start: Instant, done: u64, rate: f64) {
    if rate <= 0.0 {
        return;
    }
    let due = start + Duration::from_secs_f64(done as f64 / rate);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// A LiveKit-shaped call of `turns` turns with `span_bytes` of payload text per span.
fn shape(turns: u32, span_bytes: usize) -> voice::CallShape {
    voice::CallShape {
        turns,
        span_bytes,
        ..voice::CallShape::default()
    }
}

/// Emits call `i` of a series (`<prefix>-<i>`, virtual start an hour after the previous call);
/// returns its span count.
fn series_call<T>(tracer: &T, prefix: &str, i: u64, shape: &voice::CallShape) -> u64
where
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i * 3600);
    voice::livekit_call(tracer, &format!("{prefix}-{i}"), shape, t0, i + 1).total_spans
}

/// A tracer that starts spans at most `rate` per second, as an agent's calls emit them over
/// their minutes rather than all at once.
struct Paced<'a> {
    inner: &'a SdkTracer,
    start: Instant,
    rate: f64,
    started: AtomicU64,
}

impl Tracer for Paced<'_> {
    type Span = <SdkTracer as Tracer>::Span;

    fn build_with_context(
        &self,
        builder: opentelemetry::trace::SpanBuilder,
        parent_cx: &Context,
    ) -> Self::Span {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        pace(self.start, n, self.rate);
        self.inner.build_with_context(builder, parent_cx)
    }
}

/// Emits calls `0..n` of a series back to back, stopping at `deadline`; returns spans emitted.
fn series(
    tracer: &SdkTracer,
    prefix: &str,
    n: u64,
    shape: &voice::CallShape,
    deadline: Instant,
) -> u64 {
    let mut spans = 0;
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        spans += series_call(tracer, prefix, i, shape);
    }
    spans
}

/// Many calls open at once, each emitting `spans_per_call` children round-robin; call `c`
/// starts at step `c × stagger` so calls end while others still stream. Returns spans emitted
/// and, per call, the instant its root span ended.
struct Interleaved {
    calls: usize,
    spans_per_call: usize,
    span_bytes: usize,
    stagger: usize,
    rate: f64,
}

impl Interleaved {
    fn new(
        calls: usize,
        spans_per_call: usize,
        span_bytes: usize,
        stagger: usize,
        rate: f64,
    ) -> Self {
        Interleaved {
            calls,
            spans_per_call,
            span_bytes,
            stagger,
            rate,
        }
    }
}

fn emit_interleaved(
    tracer: &SdkTracer,
    w: &Interleaved,
    deadline: Instant,
) -> (u64, Vec<(String, Instant)>) {
    let pool = payload_pool(w.span_bytes);
    let mut open: Vec<Option<(Context, usize)>> = vec![None; w.calls];
    let mut ended = Vec::with_capacity(w.calls);
    let start = Instant::now();
    let mut emitted = 0u64;
    let steps = w.spans_per_call + w.stagger * w.calls;
    'steps: for step in 0..steps {
        for (c, slot) in open.iter_mut().enumerate() {
            if step == c * w.stagger {
                let root = tracer
                    .span_builder("agent_session")
                    .with_attributes([KeyValue::new("call_id", format!("lg-call-{c}"))])
                    .start_with_context(tracer, &Context::new());
                *slot = Some((Context::new().with_span(root), 1));
                emitted += 1;
            }
            let Some((cx, n)) = slot else { continue };
            let i = emitted as usize;
            let mut s = tracer
                .span_builder(NAMES[i % NAMES.len()])
                .with_attributes([
                    KeyValue::new("gen_ai.request.model", "gpt-4o-mini"),
                    KeyValue::new("gen_ai.usage.input_tokens", 300_i64),
                    KeyValue::new("lk.speech_id", "speech_5f2c1a9e"),
                    KeyValue::new("lk.debug.payload", pool[i % pool.len()].clone()),
                ])
                .start_with_context(tracer, cx);
            s.end();
            *n += 1;
            emitted += 1;
            if *n >= w.spans_per_call {
                cx.span().end();
                ended.push((format!("lg-call-{c}"), Instant::now()));
                *slot = None;
            }
            if emitted.is_multiple_of(64) {
                pace(start, emitted, w.rate);
                if Instant::now() > deadline {
                    break 'steps;
                }
            }
        }
    }
    // Cut short by the deadline: end what is open.
    for (c, slot) in open.iter_mut().enumerate() {
        if let Some((cx, _)) = slot.take() {
            cx.span().end();
            ended.push((format!("lg-call-{c}"), Instant::now()));
        }
    }
    (emitted, ended)
}

// ---- the SDK pipeline ---------------------------------------------------------------------

/// reqwest's async client run on a tokio runtime, for the BatchSpanProcessor's own thread
/// (which polls exports with a plain executor) — what `reqwest-blocking-client` does inside.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        self.rt
            .spawn(
                async move { opentelemetry_http::HttpClient::send_bytes(&client, request).await },
            )
            .await?
    }
}

/// Counts exported spans and notes when each root span's batch was acknowledged.
#[derive(Debug)]
struct Counting {
    inner: opentelemetry_otlp::SpanExporter,
    exported: Arc<AtomicU64>,
    roots_acked: Arc<Mutex<HashMap<String, Instant>>>,
}

impl SpanExporter for Counting {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let roots: Vec<String> = batch
            .iter()
            .filter(|s| s.name == "agent_session")
            .filter_map(|s| {
                s.attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "call_id")
                    .map(|kv| kv.value.as_str().into_owned())
            })
            .collect();
        let r = self.inner.export(batch).await;
        if r.is_ok() {
            self.exported.fetch_add(n, Ordering::Relaxed);
            let now = Instant::now();
            if let Ok(mut m) = self.roots_acked.lock() {
                for id in roots {
                    m.entry(id).or_insert(now);
                }
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
}

/// One pipeline under load, with its receiver.
struct Pipeline {
    pipe: Pipe,
    provider: SdkTracerProvider,
    sink: null_sink::NullSink,
    stats: Option<StatsHandle>,
    exported: Arc<AtomicU64>,
    roots_acked: Arc<Mutex<HashMap<String, Instant>>>,
    _rt: Option<tokio::runtime::Runtime>,
    /// callscope's spool directory, removed with the pipeline.
    _spool: Option<tempfile::TempDir>,
}

/// Pipeline settings a run may override (callscope's, and the SDK exporter's compression).
#[derive(Debug, Clone, Copy, Default)]
struct Tuning {
    batch_timeout_ms: Option<u64>,
    max_buffer_mib: Option<usize>,
    max_request_kib: Option<usize>,
    no_gzip: bool,
    auto_gzip: bool,
    gzip_level: Option<u32>,
    gzip_level_max: Option<u32>,
    spool: bool,
    sdk_gzip: bool,
}

impl Tuning {
    fn of(a: &Args) -> Self {
        Tuning {
            batch_timeout_ms: a.cs_batch_timeout_ms,
            max_buffer_mib: a.cs_max_buffer_mib,
            max_request_kib: a.cs_max_request_kib,
            no_gzip: a.cs_no_gzip,
            auto_gzip: a.cs_auto_gzip,
            gzip_level: a.cs_gzip_level,
            gzip_level_max: a.cs_gzip_level_max,
            spool: a.cs_spool,
            sdk_gzip: a.sdk_gzip,
        }
    }
}

fn pipeline(pipe: Pipe, endpoint: Option<String>, detail: DetailMode, t: Tuning) -> Pipeline {
    let sink = null_sink::NullSink::start(1).unwrap();
    let exported = Arc::new(AtomicU64::new(0));
    let roots_acked = Arc::new(Mutex::new(HashMap::new()));
    match pipe {
        Pipe::Callscope => {
            let mut b = CallSpanProcessor::builder()
                .without_env()
                .endpoint(endpoint.unwrap_or_else(|| sink.url.clone()))
                .agent_id("loadgen")
                .detail(detail);
            if let Some(ms) = t.batch_timeout_ms {
                b = b.batch_timeout(Duration::from_millis(ms));
            }
            if let Some(mib) = t.max_buffer_mib {
                b = b.max_buffer_bytes(mib << 20);
            }
            if let Some(kib) = t.max_request_kib {
                b = b.max_request_bytes(kib << 10);
            }
            if t.no_gzip {
                b = b.compression(callscope::Compression::None);
            }
            if t.auto_gzip {
                b = b.compression(callscope::Compression::Auto);
            }
            if let Some(level) = t.gzip_level {
                b = b.gzip_level(level);
            }
            if let Some(level) = t.gzip_level_max {
                b = b.gzip_level_max(level);
            }
            let spool = t.spool.then(|| tempfile::tempdir().unwrap());
            if let Some(dir) = &spool {
                b = b.spool_dir(dir.path());
            }
            let p = b.build().unwrap();
            let stats = Some(p.stats_handle());
            Pipeline {
                pipe,
                provider: SdkTracerProvider::builder().with_span_processor(p).build(),
                sink,
                stats,
                exported,
                roots_acked,
                _rt: None,
                _spool: spool,
            }
        }
        Pipe::Sdk => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let client = OnRuntime {
                client: reqwest::Client::new(),
                rt: rt.handle().clone(),
            };
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(format!("{}/v1/traces", sink.base()));
            if t.sdk_gzip {
                builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
            }
            let inner = builder.build().unwrap();
            let exporter = Counting {
                inner,
                exported: exported.clone(),
                roots_acked: roots_acked.clone(),
            };
            let bsp = BatchSpanProcessor::builder(exporter).build();
            Pipeline {
                pipe,
                provider: SdkTracerProvider::builder()
                    .with_span_processor(bsp)
                    .build(),
                sink,
                stats: None,
                exported,
                roots_acked,
                _rt: Some(rt),
                _spool: None,
            }
        }
    }
}

impl Pipeline {
    fn tracer(&self) -> SdkTracer {
        self.provider.tracer("loadgen")
    }

    /// Flushes, shuts down, and reports drops, wire bytes and (for callscope) raw JSON bytes.
    fn finish(self, emitted: u64) -> Json {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
        let wire = self.sink.state.bytes();
        match (self.pipe, &self.stats) {
            (Pipe::Callscope, Some(s)) => {
                let s = s.snapshot();
                json!({
                    "emitted": emitted,
                    "delivered": s.detail_spans_sent,
                    "drops": s.spans_dropped(),
                    "queue_full_drops": s.spans_dropped_queue_full,
                    "wire_bytes": wire,
                    "raw_json_bytes": s.bytes_uncompressed,
                    "summaries_sent": s.summaries_sent,
                    "stats": format!("{s:?}"),
                })
            }
            _ => {
                let exported = self.exported.load(Ordering::Relaxed);
                json!({
                    "emitted": emitted,
                    "delivered": exported,
                    "drops": emitted.saturating_sub(exported),
                    "wire_bytes": wire,
                })
            }
        }
    }

    /// Root end → core arrival (callscope) or root batch acknowledged (SDK), in ms.
    fn latencies(&self, ended: &[(String, Instant)]) -> Vec<f64> {
        let acked = self
            .roots_acked
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        ended
            .iter()
            .filter_map(|(id, t)| {
                let at = match self.pipe {
                    Pipe::Callscope => self.sink.state.core_arrival(id),
                    Pipe::Sdk => acked.get(id).copied(),
                }?;
                Some(at.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            })
            .collect()
    }
}

fn percentiles(mut v: Vec<f64>) -> Json {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({"n": v.len(), "p50_ms": p(0.5), "p90_ms": p(0.9), "p99_ms": p(0.99), "max_ms": p(1.0)})
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

// ---- scenarios (run in a child process) --------------------------------------------------

/// Highest paced rate (spans/s) each pipeline sustains with zero drops: a ladder of rates,
/// each held for a few seconds with fresh pipelines; stops at the first rate that drops or
/// that the generator cannot reach.
fn throughput(pipe: Pipe, a: &Args, deadline: Instant) -> Json {
    let hold = if a.quick { 1.5 } else { 4.0 };
    let rates: &[f64] = if a.quick {
        &[10_000.0, 40_000.0]
    } else {
        &[
            10_000.0, 20_000.0, 40_000.0, 80_000.0, 120_000.0, 160_000.0, 200_000.0, 240_000.0,
            280_000.0, 320_000.0, 400_000.0,
        ]
    };
    let shape = shape(50, a.span_bytes);
    let mut best = 0.0;
    let mut steps = Vec::new();
    for &rate in rates {
        if Instant::now() > deadline {
            break;
        }
        let p = pipeline(pipe, None, DetailMode::All, Tuning::of(a));
        let tracer = p.tracer();
        let start = Instant::now();
        let mut emitted = 0u64;
        let mut calls = 0u64;
        while start.elapsed().as_secs_f64() < hold && Instant::now() < deadline {
            emitted += series_call(&tracer, "tp", calls, &shape);
            calls += 1;
            pace(start, emitted, rate);
        }
        let achieved = emitted as f64 / start.elapsed().as_secs_f64();
        let r = p.finish(emitted);
        let ok = r["drops"] == 0 && achieved >= 0.95 * rate;
        steps.push(json!({"target": rate, "achieved": achieved.round(), "ok": ok, "result": r}));
        if !ok {
            break;
        }
        best = achieved;
    }
    json!({"sustained_spans_per_s": best.round(), "steps": steps})
}

/// Phase-1 latency while many calls stream large detail at once.
fn latency(pipe: Pipe, a: &Args, deadline: Instant) -> Json {
    let w = if a.quick {
        Interleaved::new(10, 100, 30_000, 5, 4_000.0)
    } else {
        // 100 calls × 500 spans × 30 KB ≈ 15 MB of detail per call.
        Interleaved::new(100, 500, 30_000, 5, 5_000.0)
    };
    let p = pipeline(pipe, None, DetailMode::All, Tuning::of(a));
    let tracer = p.tracer();
    let started = Instant::now();
    let (emitted, ended) = emit_interleaved(&tracer, &w, deadline);
    let took = started.elapsed().as_secs_f64();
    // Wait for the last cores / root batches to arrive on their own (no flush: a flush would
    // shorten the SDK's 5 s schedule delay), at most 7 s.
    let wait_until = Instant::now() + Duration::from_secs(7);
    while p.latencies(&ended).len() < ended.len() && Instant::now() < wait_until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lat = p.latencies(&ended);
    let r = p.finish(emitted);
    json!({"calls": w.calls, "spans_per_call": w.spans_per_call, "span_bytes": w.span_bytes,
           "spans_per_s": (emitted as f64 / took).round(), "phase1": percentiles(lat),
           "result": r, "vm_hwm_kib": vm_hwm_kib()})
}

/// Peak RSS with many concurrent calls of large spans.
fn rss(pipe: Pipe, a: &Args, deadline: Instant) -> Json {
    let w = if a.quick {
        Interleaved::new(100, 50, 10_000, 0, 20_000.0)
    } else {
        Interleaved::new(1_000, 500, 10_000, 0, 20_000.0)
    };
    let base = vm_hwm_kib();
    let p = pipeline(pipe, None, DetailMode::All, Tuning::of(a));
    let tracer = p.tracer();
    let started = Instant::now();
    let (emitted, _) = emit_interleaved(&tracer, &w, deadline);
    let took = started.elapsed().as_secs_f64();
    let r = p.finish(emitted);
    json!({"calls": w.calls, "spans_per_call": w.spans_per_call, "span_bytes": w.span_bytes,
           "spans_per_s": (emitted as f64 / took).round(), "vm_hwm_kib": vm_hwm_kib(),
           "vm_hwm_before_kib": base, "result": r})
}

/// Bytes on the wire per raw JSON byte, on LiveKit-shaped calls with 10 KB spans: emitted as
/// fast as the app thread can (`result`), and paced (`paced`): agents' calls of 100 spans/s
/// each (1 MB/s of span JSON), started a second apart, five at a time (500 spans/s) at most.
fn wire(pipe: Pipe, a: &Args, deadline: Instant) -> Json {
    const AGENT_RATE: f64 = 100.0;
    let calls = if a.quick { 4 } else { 20 };
    let p = pipeline(pipe, None, DetailMode::All, Tuning::of(a));
    let emitted = series(&p.tracer(), "wire", calls, &shape(50, 10_000), deadline);
    let r = p.finish(emitted);

    let (threads, per_thread) = if a.quick { (2_u64, 1_u64) } else { (5, 2) };
    let p = pipeline(pipe, None, DetailMode::All, Tuning::of(a));
    let tracer = p.tracer();
    let started = Instant::now();
    let emitted: u64 = std::thread::scope(|s| {
        let agents: Vec<_> = (0..threads)
            .map(|k| {
                let tracer = &tracer;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_secs(k));
                    let paced = Paced {
                        inner: tracer,
                        start: Instant::now(),
                        rate: AGENT_RATE,
                        started: AtomicU64::new(0),
                    };
                    let mut spans = 0;
                    for j in 0..per_thread {
                        if Instant::now() > deadline {
                            break;
                        }
                        let i = 1_000 + k * per_thread + j;
                        spans += series_call(&paced, "wire-paced", i, &shape(50, 10_000));
                    }
                    spans
                })
            })
            .collect();
        agents.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let took = started.elapsed().as_secs_f64();
    let paced = p.finish(emitted);
    json!({"calls": calls, "result": r,
           "paced": {"calls": threads * per_thread, "agents": threads,
                     "spans_per_s": (emitted as f64 / took).round(), "result": paced}})
}

/// callscope-ingest on `db`: core logs/s (summary-only calls) and spans stored/s.
fn ingest_on(db_url: &str, a: &Args, deadline: Instant) -> Json {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = match rt.block_on(observed_ingest::start(db_url, None)) {
        Ok(s) => s,
        Err(e) => return json!({"skipped": format!("ingest server did not start: {e}")}),
    };
    let wait_for = |what: &dyn Fn() -> u64, want: u64| -> (u64, f64) {
        let t = Instant::now();
        loop {
            let n = what();
            if n >= want || Instant::now() > deadline {
                return (n, t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // A: core logs/s — summary-only calls of 3 turns.
    let cores = if a.quick { 200 } else { 2_000 };
    let p = pipeline(
        Pipe::Callscope,
        Some(server.endpoint.clone()),
        DetailMode::None,
        Tuning::of(a),
    );
    let t = Instant::now();
    series(&p.tracer(), "core", cores, &shape(3, 0), deadline);
    let store = server.store.clone();
    let (stored_calls, _) = wait_for(&|| rt.block_on(store.call_count()).unwrap_or(0), cores);
    let core_secs = t.elapsed().as_secs_f64();
    let _ = p.finish(0);
    // B: spans stored/s — full calls, 1 KB spans.
    let calls = if a.quick { 4 } else { 40 };
    let p = pipeline(
        Pipe::Callscope,
        Some(server.endpoint.clone()),
        DetailMode::All,
        Tuning::of(a),
    );
    let before = rt.block_on(store.total_span_count()).unwrap_or(0);
    let t = Instant::now();
    let spans = series(&p.tracer(), "detail", calls, &shape(50, 1000), deadline);
    let _ = p.provider.force_flush();
    let (stored, _) = wait_for(
        &|| {
            rt.block_on(store.total_span_count())
                .unwrap_or(0)
                .saturating_sub(before)
        },
        spans,
    );
    let span_secs = t.elapsed().as_secs_f64();
    let r = p.finish(spans);
    // C: phase-1 latency into this receiver (root end -> core stored and acknowledged) while
    // the other calls' detail is being stored: staggered calls of 10 KB spans.
    let w = if a.quick {
        Interleaved::new(10, 100, 10_000, 10, 2_000.0)
    } else {
        Interleaved::new(100, 150, 10_000, 2, 3_000.0)
    };
    let p = pipeline(
        Pipe::Callscope,
        Some(server.endpoint.clone()),
        DetailMode::All,
        Tuning::of(a),
    );
    let (streamed, ended) = emit_interleaved(&p.tracer(), &w, deadline);
    let acked = || {
        ended
            .iter()
            .filter_map(|(id, _)| server.core_acked(id))
            .count()
    };
    wait_for(&|| acked() as u64, ended.len() as u64);
    let phase1: Vec<f64> = ended
        .iter()
        .filter_map(|(id, t)| {
            let at = server.core_acked(id)?;
            Some(at.saturating_duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    let streaming = p.finish(streamed);
    let dups = rt.block_on(store.duplicate_span_rows()).unwrap_or(0);
    let busy = server.busy_answers();
    server.stop();
    json!({"backend": if db_url.starts_with("postgres") {"postgres"} else {"sqlite"},
           "core_logs": stored_calls, "core_logs_per_s": (stored_calls as f64 / core_secs).round(),
           "spans_stored": stored, "spans_stored_per_s": (stored as f64 / span_secs).round(),
           "phase1_while_streaming": {"calls": w.calls, "spans_per_call": w.spans_per_call,
               "span_bytes": w.span_bytes, "ended": ended.len(), "cores_acked": phase1.len(),
               "phase1": percentiles(phase1), "drops": streaming["drops"],
               "past_deadline": Instant::now() > deadline},
           "duplicate_span_rows": dups, "busy_answers": busy, "sender": r})
}

fn ingest(a: &Args, deadline: Instant) -> Json {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("loadgen.db").display());
    let mut out = vec![ingest_on(&sqlite, a, deadline)];
    out.push(match fresh_postgres(&a.postgres_url) {
        Ok((url, drop)) => {
            let r = ingest_on(&url, a, deadline);
            drop();
            r
        }
        Err(e) => {
            eprintln!("PostgreSQL skipped: {e}");
            json!({"backend": "postgres", "skipped": e})
        }
    });
    json!(out)
}

/// Creates a fresh database on the server of `url`; returns its URL and a function dropping it.
fn fresh_postgres(url: &str) -> Result<(String, impl FnOnce()), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let name = format!(
        "callscope_loadgen_{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    rt.block_on(async {
        use sqlx::Connection;
        let mut c = tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(url))
            .await
            .map_err(|_| format!("{url} did not answer within 3 s"))?
            .map_err(|e| format!("{url} unreachable: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .map_err(|e| format!("could not create a database: {e}"))?;
        Ok::<_, String>(())
    })?;
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    let fresh = format!("{base}/{name}");
    let url = url.to_owned();
    Ok((fresh, move || {
        let _ = rt.block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut c)
            .await
        });
    }))
}

fn run_child(spec: &str, a: &Args) -> Json {
    let deadline = Instant::now() + Duration::from_secs(a.max_seconds);
    let (scenario, pipe) = spec.split_once(':').unwrap_or((spec, "callscope"));
    let pipe = if pipe == "sdk" {
        Pipe::Sdk
    } else {
        Pipe::Callscope
    };
    let t = Instant::now();
    let mut r = match scenario {
        "throughput" => throughput(pipe, a, deadline),
        "latency" => latency(pipe, a, deadline),
        "rss" => rss(pipe, a, deadline),
        "wire" => wire(pipe, a, deadline),
        "ingest" => ingest(a, deadline),
        other => json!({"error": format!("unknown scenario {other}")}),
    };
    if let Some(o) = r.as_object_mut() {
        o.insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
        o.insert("timed_out".into(), json!(Instant::now() > deadline));
    }
    r
}

// ---- the parent: one child per (scenario, pipeline), a summary at the end -----------------

fn spawn_child(spec: &str, a: &Args) -> Json {
    let Ok(exe) = std::env::current_exe() else {
        return json!({"error": "no current_exe"});
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--child")
        .arg(spec)
        .arg("--max-seconds")
        .arg(a.max_seconds.to_string())
        .arg("--postgres-url")
        .arg(&a.postgres_url)
        .arg("--span-bytes")
        .arg(a.span_bytes.to_string())
        .stdout(std::process::Stdio::piped());
    if a.quick {
        cmd.arg("--quick");
    }
    if a.cs_no_gzip {
        cmd.arg("--cs-no-gzip");
    }
    if a.cs_auto_gzip {
        cmd.arg("--cs-auto-gzip");
    }
    if a.cs_spool {
        cmd.arg("--cs-spool");
    }
    if a.sdk_gzip {
        cmd.arg("--sdk-gzip");
    }
    for (flag, v) in [
        (
            "--cs-batch-timeout-ms",
            a.cs_batch_timeout_ms.map(|v| v as usize),
        ),
        ("--cs-max-buffer-mib", a.cs_max_buffer_mib),
        ("--cs-max-request-kib", a.cs_max_request_kib),
        ("--cs-gzip-level", a.cs_gzip_level.map(|v| v as usize)),
        (
            "--cs-gzip-level-max",
            a.cs_gzip_level_max.map(|v| v as usize),
        ),
    ] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v.to_string());
        }
    }
    let Ok(mut child) = cmd.spawn() else {
        return json!({"error": "could not start the child"});
    };
    // The child stops itself at max_seconds; this is the backstop.
    let limit = Instant::now() + Duration::from_secs(a.max_seconds + 60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return json!({"error": "child killed at the time limit"});
            }
        }
    }
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut so, &mut out);
    }
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| json!({"error": "child printed no result"}))
}

fn mib(kib: &Json) -> f64 {
    kib.as_f64().unwrap_or(0.0) / 1024.0
}

fn ratio(a: &Json, b: &Json) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
        _ => "n/a".into(),
    }
}

fn report(scenario: &str, cs: &Json, sdk: &Json, a: &Args) {
    let gz = |on: bool| if on { "gzip" } else { "uncompressed" };
    println!(
        "\n== {scenario} ==  (callscope bodies {}{}, sdk otlp protobuf {})",
        if a.cs_auto_gzip {
            "gzip, uncompressed while deflate costs more than it saves (auto)"
        } else {
            gz(!a.cs_no_gzip)
        },
        if a.cs_spool { ", spooled to disk" } else { "" },
        gz(a.sdk_gzip)
    );
    match scenario {
        "throughput" => {
            let (c, s) = (&cs["sustained_spans_per_s"], &sdk["sustained_spans_per_s"]);
            println!(
                "sustained spans/s, zero drops: callscope {c}  sdk bsp+otlp {s}  ratio {}",
                ratio(c, s)
            );
        }
        "latency" => {
            println!(
                "phase-1 latency (callscope: root end -> core at receiver): {}",
                cs["phase1"]
            );
            println!(
                "sdk bsp+otlp (root end -> root's batch acked): {}",
                sdk["phase1"]
            );
            println!(
                "p99 ratio callscope/sdk: {}   drops callscope {} sdk {}",
                ratio(&cs["phase1"]["p99_ms"], &sdk["phase1"]["p99_ms"]),
                cs["result"]["drops"],
                sdk["result"]["drops"]
            );
        }
        "rss" => {
            println!(
                "peak RSS (VmHWM): callscope {:.0} MiB  sdk bsp+otlp {:.0} MiB  ratio {}  (drops callscope {} sdk {})",
                mib(&cs["vm_hwm_kib"]),
                mib(&sdk["vm_hwm_kib"]),
                ratio(&cs["vm_hwm_kib"], &sdk["vm_hwm_kib"]),
                cs["result"]["drops"],
                sdk["result"]["drops"]
            );
        }
        "wire" => {
            let r = &cs["result"];
            // Per delivered span: the two pipelines drop different shares of this burst.
            let per_span = |r: &Json| {
                r["wire_bytes"].as_f64().unwrap_or(0.0)
                    / r["delivered"].as_f64().unwrap_or(0.0).max(1.0)
            };
            let (c, s) = (per_span(r), per_span(&sdk["result"]));
            println!(
                "callscope wire/raw JSON: {} ({} / {} bytes); wire bytes per delivered span: callscope {:.0}, sdk otlp protobuf {:.0} ({} of {} spans delivered); ratio callscope/sdk {}",
                ratio(&r["wire_bytes"], &r["raw_json_bytes"]),
                r["wire_bytes"],
                r["raw_json_bytes"],
                c,
                s,
                sdk["result"]["delivered"],
                sdk["result"]["emitted"],
                ratio(&json!(c), &json!(s))
            );
            let (r, sr) = (&cs["paced"]["result"], &sdk["paced"]["result"]);
            let (c, s) = (per_span(r), per_span(sr));
            println!(
                "paced ({} agents, {} spans/s on average): callscope wire/raw JSON: {} ({} / {} bytes, drops {}); wire bytes per delivered span: callscope {:.0}, sdk otlp protobuf {:.0} ({} of {} delivered); ratio callscope/sdk {}",
                cs["paced"]["agents"],
                cs["paced"]["spans_per_s"],
                ratio(&r["wire_bytes"], &r["raw_json_bytes"]),
                r["wire_bytes"],
                r["raw_json_bytes"],
                r["drops"],
                c,
                s,
                sr["delivered"],
                sr["emitted"],
                ratio(&json!(c), &json!(s))
            );
        }
        _ => {}
    }
    println!("callscope: {cs}");
    println!("sdk:       {sdk}");
}

fn main() {
    let a = Args::parse();
    // callscope's own logs on stderr: warnings by default (drops, at powers of two), RUST_LOG
    // for more (`callscope::worker=debug` shows CALLSCOPE_COMPRESSION=auto going plain).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    if let Some(spec) = a.child.clone() {
        let r = run_child(&spec, &a);
        println!("RESULT {r}");
        return;
    }
    let all = [
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Rss,
        Scenario::Wire,
        Scenario::Ingest,
    ];
    let chosen: Vec<Scenario> = if a.scenario == Scenario::All {
        all.to_vec()
    } else {
        vec![a.scenario]
    };
    for s in chosen {
        let name = format!("{s:?}").to_lowercase();
        eprintln!(
            "running {name}{} ...",
            if a.quick { " (quick)" } else { "" }
        );
        if s == Scenario::Ingest {
            let r = spawn_child("ingest:callscope", &a);
            println!("\n== ingest ==");
            for b in r.as_array().into_iter().flatten() {
                let backend = b["backend"].as_str().unwrap_or("?");
                if let Some(why) = b["skipped"].as_str() {
                    println!("{backend}: skipped ({why})");
                    continue;
                }
                let c = &b["phase1_while_streaming"];
                let ms = |k: &str| {
                    c["phase1"][k]
                        .as_f64()
                        .map_or("-".into(), |v| format!("{v:.1}"))
                };
                println!(
                    "{backend}: core logs/s {}  spans stored/s {}  phase-1 while streaming (root end -> core stored and acked) p50 {} ms p99 {} ms, {} of {} cores acked, {} spans dropped, {} requests answered busy (503){}",
                    b["core_logs_per_s"],
                    b["spans_stored_per_s"],
                    ms("p50_ms"),
                    ms("p99_ms"),
                    c["cores_acked"],
                    c["ended"],
                    c["drops"],
                    b["busy_answers"],
                    if c["past_deadline"] == true {
                        "  (CUT SHORT by --max-seconds: figures are incomplete)"
                    } else {
                        ""
                    }
                );
            }
            println!("{r}");
            continue;
        }
        let cs = spawn_child(&format!("{name}:callscope"), &a);
        let sdk = spawn_child(&format!("{name}:sdk"), &a);
        report(&name, &cs, &sdk, &a);
    }
}
