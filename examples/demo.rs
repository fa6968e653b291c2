//! The main job: concurrent voice calls through `CallSpanProcessor` into the ingest server.
//!
//! Starts `callscope-ingest` in-process on 127.0.0.1:0 with a SQLite file (or `--database-url`),
//! registers the processor in a tracer provider, simulates LiveKit-shaped calls on several
//! threads (virtual timestamps, so a 5-minute call takes milliseconds), then prints a table per
//! call and checks against the database that every emitted span was stored exactly once.
//!
//! ```sh
//! cargo run --release --example demo -- --calls 20 --spans 500 --span-bytes 10000 --turns 50
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    missing_docs
)]

#[path = "support/observed_ingest.rs"]
mod observed_ingest;
#[path = "support/voice.rs"]
mod voice;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use callscope::CallSpanProcessor;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

#[derive(Parser, Debug)]
#[command(about = "Concurrent simulated voice calls through callscope into callscope-ingest")]
struct Args {
    /// Number of calls.
    #[arg(long, default_value_t = 20)]
    calls: u32,
    /// Spans per call.
    #[arg(long, default_value_t = 500)]
    spans: u32,
    /// Payload bytes per span (prompts, chat contexts).
    #[arg(long, default_value_t = 10_000)]
    span_bytes: usize,
    /// Turns per call.
    #[arg(long, default_value_t = 50)]
    turns: u32,
    /// Calls running at once (one thread each).
    #[arg(long, default_value_t = 20)]
    concurrent: u32,
    /// Real seconds one call takes (a 5-minute call compressed; span timestamps stay realistic).
    #[arg(long, default_value_t = 3.0)]
    call_seconds: f64,
    /// Store in this database instead of a fresh SQLite file (e.g. postgres://postgres@127.0.0.1:5432/test).
    #[arg(long)]
    database_url: Option<String>,
    /// Send to an external receiver instead of starting one (no database check then).
    #[arg(long)]
    endpoint: Option<String>,
    /// API key for `--endpoint`.
    #[arg(long, env = "CALLSCOPE_API_KEY")]
    api_key: Option<String>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = format!("demo-{:016x}", fastrand::u64(..));

    let (endpoint, api_key, server) = match &args.endpoint {
        Some(e) => (e.clone(), args.api_key.clone(), None),
        None => {
            let url = args.database_url.clone().unwrap_or_else(|| {
                let path =
                    std::env::temp_dir().join(format!("callscope-demo-{}.db", std::process::id()));
                format!("sqlite://{}", path.display())
            });
            println!("ingest server: database {url}");
            let s = match rt.block_on(observed_ingest::start(&url, Some(&key))) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot start the ingest server on {url}: {e}");
                    return ExitCode::from(2);
                }
            };
            println!("ingest server: {}", s.endpoint);
            (s.endpoint.clone(), Some(key.clone()), Some(s))
        }
    };

    let mut builder = CallSpanProcessor::builder().endpoint(&endpoint);
    if let Some(k) = &api_key {
        builder = builder.api_key(k.clone());
    }
    let processor = match builder.build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stats = processor.stats_handle();
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name("demo-voice-agent")
                .build(),
        )
        .with_span_processor(processor)
        .build();
    let tracer = Arc::new(provider.tracer("demo"));

    let shape = voice::CallShape {
        turns: args.turns,
        span_bytes: args.span_bytes,
        tool_every: 4,
        mix_pii_names: true,
        target_spans: Some(args.spans),
        turn_pause: Duration::from_secs_f64(
            args.call_seconds.max(0.0) / f64::from(args.turns.max(1)),
        ),
    };
    let total = u64::from(args.calls) * shape.spans();
    println!(
        "simulating {} calls × {} spans × ~{} B ({:.1} MB of span payload), {} at once, {} s each",
        args.calls,
        shape.spans(),
        args.span_bytes,
        total as f64 * args.span_bytes as f64 / 1e6,
        args.concurrent,
        args.call_seconds
    );
    let bar = ProgressBar::new(u64::from(args.calls));
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} calls  {elapsed}").unwrap());
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let ends: Arc<Mutex<Vec<(String, u64, Instant)>>> = Arc::default();
    std::thread::scope(|s| {
        for _ in 0..args.concurrent.max(1) {
            let (tracer, shape, next, ends, bar) = (
                tracer.clone(),
                shape.clone(),
                next.clone(),
                ends.clone(),
                bar.clone(),
            );
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= args.calls {
                        break;
                    }
                    let id = format!("demo-call-{i:04}");
                    let t0 = UNIX_EPOCH
                        + Duration::from_secs(1_790_000_000)
                        + Duration::from_secs(u64::from(i) * 400);
                    let truth = voice::livekit_call(&*tracer, &id, &shape, t0, u64::from(i));
                    ends.lock()
                        .unwrap()
                        .push((id, truth.total_spans, Instant::now()));
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish();
    let emitted_in = started.elapsed();
    if let Err(e) = provider.force_flush() {
        eprintln!("warning: force_flush: {e}");
    }
    let delivered_in = started.elapsed();
    let _ = provider.shutdown();
    let s = stats.snapshot();

    // The per-call table.
    let mut ends = ends.lock().unwrap().clone();
    ends.sort();
    let seen = server
        .as_ref()
        .map(|srv| srv.seen.lock().unwrap().clone())
        .unwrap_or_default();
    let mut ok = s.spans_dropped() == 0 && s.summaries_failed == 0;
    let mut latencies = Vec::new();
    println!();
    println!(
        "{:<16} {:>6} {:>9} {:>10} {:>8} {:>11} {:>10} {:>7}",
        "call", "spans", "core B", "phase1 ms", "batches", "wire KB", "largest KB", "stored"
    );
    for (id, spans, ended) in &ends {
        let v = seen.get(id).cloned().unwrap_or_default();
        let p1 = v
            .core_acked
            .map(|a| a.saturating_duration_since(*ended).as_secs_f64() * 1000.0);
        if let Some(p) = p1 {
            latencies.push(p);
        }
        let stored = server
            .as_ref()
            .map(|srv| rt.block_on(srv.store.span_count(id)).unwrap_or(0));
        if let Some(n) = stored {
            ok &= n == *spans;
        }
        println!(
            "{:<16} {:>6} {:>9} {:>10} {:>8} {:>11.1} {:>10.1} {:>7}",
            id,
            spans,
            v.core_bytes,
            p1.map_or("-".into(), |p| format!("{p:.1}")),
            v.requests.saturating_sub(1),
            v.wire_bytes as f64 / 1024.0,
            v.largest as f64 / 1024.0,
            stored.map_or("-".into(), |n| if n == *spans {
                format!("{n} ✓")
            } else {
                format!("{n} ✗")
            }),
        );
    }
    // The processor counts what it put on the wire (retries included); the embedded server's
    // observer adds the largest single request.
    let wire = s.bytes_sent;
    let largest = seen.values().map(|v| v.largest).max();
    println!();
    println!(
        "emitted {} spans in {:.2} s; everything acknowledged after {:.2} s",
        s.spans_seen,
        emitted_in.as_secs_f64(),
        delivered_in.as_secs_f64()
    );
    println!(
        "summaries sent {} (failed {}), detail batches {} ({} spans), dropped {}",
        s.summaries_sent,
        s.summaries_failed,
        s.detail_batches_sent,
        s.detail_spans_sent,
        s.spans_dropped()
    );
    println!(
        "bytes on the wire {:.1} MB (uncompressed {:.1} MB, ratio {:.1}×), largest request {}",
        wire as f64 / 1e6,
        s.bytes_uncompressed as f64 / 1e6,
        s.bytes_uncompressed as f64 / wire.max(1) as f64,
        largest.map_or("not observed (external receiver)".into(), |l| format!(
            "{:.1} KB",
            l as f64 / 1024.0
        ))
    );
    if !latencies.is_empty() {
        println!(
            "phase-1 latency (root span end → core acknowledged): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(&mut latencies, 0.5),
            pct(&mut latencies, 0.99),
            pct(&mut latencies, 1.0)
        );
    }
    if let Some(srv) = server {
        let stored = rt.block_on(srv.store.total_span_count()).unwrap_or(0);
        let dups = rt
            .block_on(srv.store.duplicate_span_rows())
            .unwrap_or(u64::MAX);
        let calls = rt.block_on(srv.store.call_count()).unwrap_or(0);
        let emitted: u64 = ends.iter().map(|e| e.1).sum();
        println!(
            "database: {calls} calls, {stored} spans stored for {emitted} emitted, {dups} duplicates"
        );
        ok &= stored == emitted && dups == 0 && calls == u64::from(args.calls);
        srv.stop();
    }
    drop(stats);
    println!(
        "{}",
        if ok {
            "check: every emitted span stored exactly once ✓"
        } else {
            "check: FAILED ✗"
        }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
