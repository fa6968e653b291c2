//! The full acceptance run of RELIABILITY.md: CALLS calls × SPANS spans through every injected
//! fault (5xx, 429 + Retry-After, resets mid-body, answers slower than the timeout, 413 above
//! 24 KB, an outage while the calls are emitted) into the real ingest server, with the spool on
//! and then off. Prints the figures.
//!
//! `cargo run --release --example faults -- [calls] [spans]` (default 200 500).
#![allow(clippy::unwrap_used, missing_docs, clippy::print_stdout)]

#[allow(dead_code)]
#[path = "../tests/support/fault.rs"]
mod fault;

use std::time::{Duration, Instant};

use callscope::{CallSpanProcessor, Compression, Config, Stats};
use fault::{FaultProxy, Ingest, all_faults};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// What one run left: counters, time to settle, and in the ingest server the calls, the
/// calls marked complete, the spans and the duplicate span rows.
type Outcome = (Stats, Duration, u64, usize, u64, u64);

fn run(calls: usize, spans: usize, spool: bool) -> Outcome {
    let ingest = Ingest::start();
    let timeout = Duration::from_millis(400);
    let proxy = FaultProxy::start(Some(&ingest.url), all_faults(timeout));
    let dir = tempfile::tempdir().unwrap();
    let mut b = Config::builder()
        .without_env()
        .endpoint(proxy.url())
        .agent_id("faults-example")
        .compression(Compression::None)
        .queue_size(1 << 20)
        .timeout(timeout)
        .max_request_bytes(48 * 1024)
        .max_buffer_bytes(1 << 20)
        .retry_max_elapsed(Duration::from_secs(20));
    if spool {
        b = b.spool_dir(dir.path());
    }
    let p = CallSpanProcessor::from_config(b.build().unwrap()).unwrap();
    let stats = p.stats_handle();
    let provider = SdkTracerProvider::builder().with_span_processor(p).build();
    let started = Instant::now();
    for c in 0..calls {
        if c == calls / 4 {
            proxy.set_down(true);
        }
        if c == calls / 2 {
            proxy.set_down(false);
        }
        fault::emit_call(&provider, &format!("call-{c}"), spans, 150);
    }
    proxy.set_down(false);
    let total = (calls * spans) as u64;
    proxy.wait_for(Duration::from_secs(900), |_, _| {
        let s = stats.snapshot();
        s.summaries_sent + s.summaries_failed == calls as u64
            && s.detail_spans_sent + s.spans_dropped() == total
    });
    let took = started.elapsed();
    let _ = provider.shutdown();
    // Complete: every batch numbered below the final's total_batches arrived.
    let complete = (0..calls)
        .filter(|c| {
            ingest
                .call(&format!("call-{c}"))
                .is_some_and(|v| v["complete"] == true)
        })
        .count();
    (
        stats.snapshot(),
        took,
        ingest.calls(),
        complete,
        ingest.total_spans(),
        ingest.duplicates(),
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let spans: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    for spool in [true, false] {
        let (s, took, stored_calls, complete, stored_spans, dups) = run(calls, spans, spool);
        println!("== spool {}", if spool { "on" } else { "off" });
        println!(
            "emitted: {calls} calls, {} spans; settled in {took:.1?}",
            calls * spans
        );
        println!(
            "stored: {stored_calls} calls ({complete} complete), {stored_spans} spans, {dups} duplicate span rows"
        );
        println!(
            "stats: summaries_sent {} summaries_failed {} detail_spans_sent {} spans_dropped {} (buffer_full {}, send_failed {}, spool_full {})",
            s.summaries_sent,
            s.summaries_failed,
            s.detail_spans_sent,
            s.spans_dropped(),
            s.spans_dropped_buffer_full,
            s.spans_dropped_send_failed,
            s.spans_dropped_spool_full
        );
        println!(
            "faults met: requests_retried {} requests_rejected {} batches_split {} spool_records_written {} spool_spills {}",
            s.requests_retried,
            s.requests_rejected,
            s.batches_split,
            s.spool_records_written,
            s.spool_spills
        );
        println!(
            "stored + counted lost = {} of {}",
            stored_spans + s.spans_dropped(),
            calls * spans
        );
    }
}
