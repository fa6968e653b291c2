//! Caller cost per span (start + end, 8 attributes, voice-agent span names) as the app sees it,
//! with no processor, the SDK's `BatchSpanProcessor` + a no-op exporter, `CallSpanProcessor`
//! whose I/O stage consumes into a no-op sink (the comparison), and `CallSpanProcessor`
//! with its full pipeline (JSON, gzip, HTTP) into a null HTTP receiver on 127.0.0.1 — all in the
//! same run, on one thread and on two threads. Spans belong to calls of 500 spans (a root `agent_session` with a
//! `call_id`, children under it); the root's start and end are part of the measured cost.
//!
//! `cargo bench --bench hot_path` (60 s on 2 cores on 2026-12-01). For steadier ratios on a
//! shared machine see `HOT_PATH_ROUNDS` below; for instruction counts, `HOT_PATH_PROFILE`.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]

#[path = "../examples/support/null_sink.rs"]
mod null_sink;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use callscope::{CallSpanProcessor, Config, DetailMode, StatsHandle};
use criterion::{Criterion, Throughput, criterion_group};
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};

/// Spans per simulated call (root included).
const SPANS_PER_CALL: u64 = 500;

/// LiveKit Agents span names, in the mix a turn produces.
const NAMES: [&str; 9] = [
    "user_turn",
    "stt",
    "eou_detection",
    "agent_turn",
    "llm_node",
    "llm_request",
    "tts_node",
    "tts_request",
    "function_tool",
];

/// Eight attributes, as an agent sets them on an LLM/TTS span.
fn attrs(i: u64) -> Vec<KeyValue> {
    vec![
        KeyValue::new("gen_ai.request.model", "gpt-4o-mini"),
        KeyValue::new("gen_ai.usage.input_tokens", 300 + (i % 97) as i64),
        KeyValue::new("gen_ai.usage.output_tokens", 40 + (i % 13) as i64),
        KeyValue::new("lk.response.ttft", 0.12_f64),
        KeyValue::new("lk.speech_id", "speech_5f2c1a9e"),
        KeyValue::new("lk.room_name", "room-support-0042"),
        KeyValue::new("lk.participant_identity", "sip_+15550100"),
        KeyValue::new("lk.agent_name", "support-bot"),
    ]
}

/// Spans emitted by all callers since the last reset (added up when a caller finishes).
static EMITTED: AtomicU64 = AtomicU64::new(0);

/// Numbers calls across all callers and runs: a call id used again after its call ended would
/// make its spans late spans (by design), which is not what is measured here.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// A no-op exporter that counts what reaches it, so the SDK's drops can be reported.
#[derive(Debug, Default)]
struct CountingNoop(Arc<AtomicU64>);

impl SpanExporter for CountingNoop {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// One app thread emitting the spans of consecutive calls.
struct Caller<'t> {
    tracer: &'t SdkTracer,
    thread: u64,
    n: u64,
    calls: u64,
    root: Option<Context>,
}

impl<'t> Caller<'t> {
    fn new(tracer: &'t SdkTracer, thread: u64) -> Self {
        Caller {
            tracer,
            thread,
            n: 0,
            calls: 0,
            root: None,
        }
    }

    fn span(&mut self) {
        if self.n.is_multiple_of(SPANS_PER_CALL) {
            self.end_call();
            self.calls = CALLS.fetch_add(1, Ordering::Relaxed);
            let root = self
                .tracer
                .span_builder("agent_session")
                .with_attributes([KeyValue::new(
                    "call_id",
                    format!("call-{}-{}", self.thread, self.calls),
                )])
                .start_with_context(self.tracer, &Context::new());
            self.root = Some(Context::new().with_span(root));
            self.n += 1;
        }
        let Some(root) = &self.root else { return };
        let i = self.n;
        let mut s = self
            .tracer
            .span_builder(NAMES[(i % NAMES.len() as u64) as usize])
            .with_attributes(attrs(i))
            .start_with_context(self.tracer, root);
        s.end();
        self.n += 1;
    }

    fn end_call(&mut self) {
        if let Some(root) = self.root.take() {
            root.span().end();
        }
    }

    /// Ends the open call and counts this caller's spans into [`EMITTED`].
    fn finish(mut self) {
        self.end_call();
        EMITTED.fetch_add(self.n, Ordering::Relaxed);
    }
}

/// This thread's time on a CPU so far (`/proc/thread-self/schedstat`, nanoseconds), or zero
/// where that file is not there.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The CPU time of this process's live threads (`/proc/self/task/*/schedstat`), or zero where
/// those files are not there. Threads that exit between two readings are not in their
/// difference: [`run`] adds its own app threads' time itself.
fn live_threads_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

/// What a run took: wall-clock time of the slowest thread, the most CPU time one of the app
/// threads was given (a thread also waits while other threads, workers included, run), and
/// the CPU time of the app threads `run` spawned (they exit before the caller can read them).
#[derive(Debug, Clone, Copy, Default)]
struct Took {
    wall: Duration,
    cpu: Duration,
    spawned_cpu: Duration,
}

/// Each of `threads` threads emits `iters` spans.
fn run(tracer: &SdkTracer, threads: u64, iters: u64) -> Took {
    let one = |th: u64, barrier: Option<&Barrier>| {
        let mut c = Caller::new(tracer, th);
        if let Some(b) = barrier {
            b.wait();
        }
        let (t, cpu) = (Instant::now(), thread_cpu());
        for _ in 0..iters {
            c.span();
        }
        let took = Took {
            wall: t.elapsed(),
            cpu: thread_cpu().saturating_sub(cpu),
            spawned_cpu: Duration::ZERO,
        };
        c.finish();
        took
    };
    if threads == 1 {
        return one(0, None);
    }
    let barrier = Barrier::new(threads as usize);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|th| {
                let barrier = &barrier;
                s.spawn(move || one(th, Some(barrier)))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .fold(Took::default(), |a, b| Took {
                wall: a.wall.max(b.wall),
                cpu: a.cpu.max(b.cpu),
                spawned_cpu: a.spawned_cpu + b.cpu,
            })
    })
}

enum Pipeline {
    None,
    Bsp,
    /// The worker consumes into a no-op sink (no JSON, gzip or HTTP): the counterpart of the
    /// SDK's batch processor with a no-op exporter.
    CallscopeNullSink,
    /// The full pipeline: JSON, gzip and HTTP to the null receiver, on the same 2 cores.
    Callscope,
    /// `CALLSCOPE_DETAIL=none`: aggregation and summaries only, no detail hand-off; shows the
    /// hot path without the worker's JSON/gzip/HTTP work competing for the 2 cores.
    CallscopeSummaryOnly,
}

/// What a pipeline can tell about drops: callscope's counters, or the SDK exporter's count.
enum Seen {
    Nothing,
    Callscope(StatsHandle),
    Exported(Arc<AtomicU64>),
}

fn provider(p: &Pipeline, sink: &null_sink::NullSink) -> (SdkTracerProvider, Seen) {
    let b = SdkTracerProvider::builder();
    match p {
        Pipeline::None => (b.build(), Seen::Nothing),
        Pipeline::Bsp => {
            let exported = Arc::new(AtomicU64::new(0));
            let bsp = BatchSpanProcessor::builder(CountingNoop(exported.clone())).build();
            (b.with_span_processor(bsp).build(), Seen::Exported(exported))
        }
        Pipeline::CallscopeNullSink => {
            let config = Config::builder()
                .without_env()
                .endpoint(&sink.url)
                .agent_id("bench")
                .build()
                .unwrap();
            let cs = callscope::__bench::null_sink_processor(config).unwrap();
            let stats = cs.stats_handle();
            (b.with_span_processor(cs).build(), Seen::Callscope(stats))
        }
        Pipeline::Callscope | Pipeline::CallscopeSummaryOnly => {
            let detail = if matches!(p, Pipeline::Callscope) {
                DetailMode::All
            } else {
                DetailMode::None
            };
            let cs = CallSpanProcessor::builder()
                .without_env()
                .endpoint(&sink.url)
                .agent_id("bench")
                .detail(detail)
                .build()
                .unwrap();
            let stats = cs.stats_handle();
            (b.with_span_processor(cs).build(), Seen::Callscope(stats))
        }
    }
}

fn caller_cost(c: &mut Criterion) {
    let sink = null_sink::NullSink::start(1).unwrap();
    for threads in [1u64, 2] {
        let mut g = c.benchmark_group(format!("caller_cost/{threads}_thread"));
        g.throughput(Throughput::Elements(1));
        for (name, p) in [
            ("no_processor", Pipeline::None),
            ("sdk_batch_noop", Pipeline::Bsp),
            ("callscope_null_sink", Pipeline::CallscopeNullSink),
            ("callscope_null_http", Pipeline::Callscope),
            ("callscope_summary_only", Pipeline::CallscopeSummaryOnly),
        ] {
            let (provider, seen) = provider(&p, &sink);
            let tracer = provider.tracer("bench");
            EMITTED.store(0, Ordering::Relaxed);
            g.bench_function(name, |b| {
                b.iter_custom(|iters| black_box(run(&tracer, threads, iters).wall))
            });
            let _ = provider.force_flush();
            let emitted = EMITTED.load(Ordering::Relaxed);
            match seen {
                Seen::Callscope(s) => {
                    let s = s.snapshot();
                    eprintln!(
                        "  {name}/{threads}t: emitted={emitted} queue_full_drops={} detail_spans_sent={} summaries_sent={} wire_bytes={}",
                        s.spans_dropped_queue_full,
                        s.detail_spans_sent,
                        s.summaries_sent,
                        s.bytes_sent
                    );
                }
                Seen::Exported(n) => {
                    let n = n.load(Ordering::Relaxed);
                    eprintln!(
                        "  {name}/{threads}t: emitted={emitted} exported={n} dropped={}",
                        emitted.saturating_sub(n)
                    );
                }
                Seen::Nothing => {}
            }
            let _ = provider.shutdown();
        }
        g.finish();
    }
}

/// `HOT_PATH_PROFILE=<none|bsp|null|callscope|summary> HOT_PATH_SPANS=<n> [HOT_PATH_THREADS=<t>]`:
/// emit n spans on each of t threads (default 1) and exit, for `valgrind --tool=callgrind`
/// (instruction counts per span are repeatable, unlike time) or `perf record`.
fn profile(which: &str) {
    let spans = std::env::var("HOT_PATH_SPANS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000u64);
    let threads = std::env::var("HOT_PATH_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1u64);
    let p = match which {
        "none" => Pipeline::None,
        "bsp" => Pipeline::Bsp,
        "summary" => Pipeline::CallscopeSummaryOnly,
        "null" => Pipeline::CallscopeNullSink,
        _ => Pipeline::Callscope,
    };
    let sink = null_sink::NullSink::start(1).unwrap();
    let (provider, seen) = provider(&p, &sink);
    let tracer = provider.tracer("bench");
    let took = run(&tracer, threads, spans);
    let _ = provider.force_flush();
    eprintln!(
        "{which}: {spans} spans x {threads} thread(s) in {:?} (app thread on CPU {:?})",
        took.wall, took.cpu
    );
    if let Seen::Callscope(s) = seen {
        eprintln!("  {:?}", s.snapshot());
    }
    let _ = provider.shutdown();
}

/// `HOT_PATH_ROUNDS=<r> [HOT_PATH_SPANS=<n>] [HOT_PATH_THREADS=<t>]`: the pipelines take turns,
/// `r` rounds of `n` spans each on `t` threads, and the median time per span and the median of
/// the per-round ratios to the SDK are printed. Taking turns round by round puts every
/// pipeline under the same background load, which on this shared machine moves by ±30 % over
/// the minutes a criterion run takes; the ratios are then far steadier than criterion's.
fn rounds(r: usize) {
    let spans = std::env::var("HOT_PATH_SPANS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000u64);
    let threads = std::env::var("HOT_PATH_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1u64);
    let sink = null_sink::NullSink::start(1).unwrap();
    let lines = [
        ("no_processor", Pipeline::None),
        ("sdk_batch_noop", Pipeline::Bsp),
        ("callscope_null_sink", Pipeline::CallscopeNullSink),
        ("callscope_summary_only", Pipeline::CallscopeSummaryOnly),
    ];
    let built: Vec<_> = lines
        .iter()
        .map(|(name, p)| {
            let (provider, seen) = provider(p, &sink);
            let tracer = provider.tracer("bench");
            (*name, provider, seen, tracer)
        })
        .collect();
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); built.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); built.len()];
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); built.len()];
    for _ in 0..r {
        for (i, (_, provider, _, tracer)) in built.iter().enumerate() {
            let before = live_threads_cpu();
            let took = run(tracer, threads, spans);
            // Let each worker catch up before the next pipeline's turn (its work for these
            // spans counts in the process's CPU).
            let _ = provider.force_flush();
            let process = live_threads_cpu().saturating_sub(before) + took.spawned_cpu;
            let per = |d: Duration| d.as_nanos() as f64 / (spans * threads) as f64;
            ns[i].push(took.wall.as_nanos() as f64 / spans as f64);
            cpu[i].push(took.cpu.as_nanos() as f64 / spans as f64);
            all[i].push(per(process));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let sdk = ns[1].clone();
    let sdk_cpu = cpu[1].clone();
    let sdk_all = all[1].clone();
    eprintln!(
        "{r} rounds x {spans} spans, {threads} thread(s); median wall ns/span and median per-round ratio to sdk_batch_noop; the same for the app thread's CPU time, and for the whole process's CPU time (every thread, the processor's own included, until its flush) per span emitted:"
    );
    for (i, (name, provider, seen, _)) in built.into_iter().enumerate() {
        let mut ratios: Vec<f64> = ns[i].iter().zip(&sdk).map(|(a, b)| a / b).collect();
        let mut cpu_ratios: Vec<f64> = cpu[i].iter().zip(&sdk_cpu).map(|(a, b)| a / b).collect();
        let mut all_ratios: Vec<f64> = all[i].iter().zip(&sdk_all).map(|(a, b)| a / b).collect();
        let drops = match &seen {
            Seen::Callscope(s) => {
                let s = s.snapshot();
                format!(
                    "queue_full_drops={} detail_spans_sent={}",
                    s.spans_dropped_queue_full, s.detail_spans_sent
                )
            }
            Seen::Exported(n) => format!("exported={}", n.load(Ordering::Relaxed)),
            Seen::Nothing => String::new(),
        };
        eprintln!(
            "  {name:<24} {:>7.1} ns  ratio {:.2}   cpu {:>7.1} ns  ratio {:.2}   process {:>7.1} ns  ratio {:.2}  {drops}",
            median(&mut ns[i].clone()),
            median(&mut ratios),
            median(&mut cpu[i].clone()),
            median(&mut cpu_ratios),
            median(&mut all[i].clone()),
            median(&mut all_ratios)
        );
        let _ = provider.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    targets = caller_cost
}
fn main() {
    if let Ok(which) = std::env::var("HOT_PATH_PROFILE") {
        profile(&which);
        return;
    }
    if let Some(r) = std::env::var("HOT_PATH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        rounds(r);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
