//! Fault-injection suite: the processor against a faulty front (tests/support/fault.rs) before
//! the real ingest server. Each test waits on signals (requests seen, stats), never on sleeps.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callscope::{CallSpanProcessor, Compression, Config, ConfigBuilder, Stats, StatsHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use support::fault::{Fault, FaultProxy, Ingest, Req, all_faults, emit_call};

const WAIT: Duration = Duration::from_secs(60);

fn start(
    url: &str,
    f: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (SdkTracerProvider, StatsHandle) {
    support::init_logs();
    let cfg = f(Config::builder()
        .without_env()
        .endpoint(url)
        .agent_id("faults")
        .compression(Compression::None)
        .queue_size(1 << 20))
    .build()
    .unwrap();
    let p = CallSpanProcessor::from_config(cfg).unwrap();
    let stats = p.stats_handle();
    (
        SdkTracerProvider::builder().with_span_processor(p).build(),
        stats,
    )
}

fn delivered(stats: &StatsHandle, calls: u64, spans: u64) -> bool {
    let s = stats.snapshot();
    s.summaries_sent == calls && s.detail_spans_sent == spans
}

/// Every call's summary and spans stored exactly once, and complete.
fn assert_stored(ingest: &Ingest, calls: usize, spans: usize) {
    assert_eq!(ingest.calls(), calls as u64);
    assert_eq!(ingest.total_spans(), (calls * spans) as u64);
    assert_eq!(ingest.duplicates(), 0);
    for c in 0..calls {
        let id = format!("call-{c}");
        assert_eq!(ingest.spans(&id), spans as u64, "spans of {id}");
        let call = ingest.call(&id).unwrap();
        assert_eq!(call["complete"], true, "{id} not complete: {call}");
    }
}

#[test]
fn a_5xx_burst_is_retried_and_stored_once() {
    let ingest = Ingest::start();
    let proxy = FaultProxy::start(Some(&ingest.url), |r: &Req| match r.n {
        0 => Fault::Status(500),
        1 => Fault::Status(502),
        2 => Fault::Status(503),
        3 => Fault::Status(504),
        _ => Fault::Pass,
    });
    let (provider, stats) = start(&proxy.url(), |b| b);
    emit_call(&provider, "call-0", 20, 100);
    assert!(proxy.wait_for(WAIT, |_, _| delivered(&stats, 1, 20)));
    assert!(stats.snapshot().requests_retried >= 4);
    assert_stored(&ingest, 1, 20);
    provider.shutdown().unwrap();
}

#[test]
fn retry_after_of_a_429_is_honoured() {
    let ingest = Ingest::start();
    let proxy = FaultProxy::start(Some(&ingest.url), |r: &Req| {
        if r.n == 0 {
            Fault::StatusWith(429, vec![("retry-after".into(), "1".into())])
        } else {
            Fault::Pass
        }
    });
    let (provider, stats) = start(&proxy.url(), |b| b);
    emit_call(&provider, "call-0", 5, 10);
    assert!(proxy.wait_for(WAIT, |_, _| delivered(&stats, 1, 5)));
    let seen = proxy.seen();
    let first = &seen[0];
    let again = seen[1..]
        .iter()
        .find(|s| s.req.key == first.req.key)
        .unwrap();
    assert!(
        again.at.duration_since(first.at) >= Duration::from_millis(950),
        "retried after {:?}",
        again.at.duration_since(first.at)
    );
    assert_stored(&ingest, 1, 5);
    provider.shutdown().unwrap();
}

#[test]
fn a_413_splits_batches_and_numbering_stays_complete() {
    // The receiver refuses bodies above 12 KB; the sender batches up to 64 KB.
    let ingest = Ingest::with_max_body(12_000);
    let proxy = FaultProxy::start(Some(&ingest.url), |_| Fault::Pass);
    let (provider, stats) = start(&proxy.url(), |b| b.max_request_bytes(64 * 1024));
    emit_call(&provider, "call-0", 60, 1_000);
    // One lone span above the receiver's limit: shortened, marked, counted, still stored.
    emit_call(&provider, "call-1", 2, 30_000);
    assert!(
        proxy.wait_for(Duration::from_secs(15), |_, _| delivered(&stats, 2, 62)),
        "{:?} {:?}",
        stats.snapshot(),
        proxy
            .seen()
            .iter()
            .map(|s| (s.req.key.clone(), s.req.wire_len, s.status))
            .collect::<Vec<_>>()
    );
    let s = stats.snapshot();
    assert!(s.batches_split >= 3, "{s:?}");
    assert!(s.attributes_truncated >= 1, "{s:?}");
    assert_eq!(s.spans_dropped(), 0);
    // The final batch's total_batches counts every half: the call is complete.
    assert_eq!(ingest.spans("call-0"), 60);
    assert_eq!(ingest.spans("call-1"), 2);
    for id in ["call-0", "call-1"] {
        assert_eq!(ingest.call(id).unwrap()["complete"], true, "{id}");
    }
    assert_eq!(ingest.duplicates(), 0);
    let finals = proxy
        .seen()
        .iter()
        .filter(|s| s.ok() && s.req.key.starts_with("call-0:detail:"))
        .count();
    assert!(finals >= 6, "{finals} batches");
    provider.shutdown().unwrap();
}

#[test]
fn a_connection_reset_mid_body_is_retried() {
    let ingest = Ingest::start();
    let proxy = FaultProxy::start(Some(&ingest.url), |r: &Req| {
        if r.n < 3 { Fault::Reset } else { Fault::Pass }
    });
    let (provider, stats) = start(&proxy.url(), |b| b);
    emit_call(&provider, "call-0", 30, 2_000);
    assert!(proxy.wait_for(WAIT, |_, _| delivered(&stats, 1, 30)));
    assert_stored(&ingest, 1, 30);
    provider.shutdown().unwrap();
}

#[test]
fn a_response_slower_than_the_timeout_is_retried_and_stored_once() {
    let ingest = Ingest::start();
    // Every first attempt is answered after the sender gave up (but stored upstream).
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let proxy = FaultProxy::start(Some(&ingest.url), move |r: &Req| {
        if seen.lock().unwrap().insert(r.key.clone()) {
            Fault::Slow(Duration::from_millis(900))
        } else {
            Fault::Pass
        }
    });
    let (provider, stats) = start(&proxy.url(), |b| b.timeout(Duration::from_millis(300)));
    emit_call(&provider, "call-0", 10, 100);
    assert!(proxy.wait_for(WAIT, |_, _| delivered(&stats, 1, 10)));
    assert!(stats.snapshot().requests_retried >= 2);
    assert_stored(&ingest, 1, 10);
    provider.shutdown().unwrap();
}

#[test]
fn down_then_up_delivers_summaries_before_detail() {
    // More calls than summary uploads run at once (128): the rest wait for a slot, and detail
    // must wait for them too.
    const CALLS: usize = 200;
    let ingest = Ingest::start();
    let proxy = FaultProxy::start(Some(&ingest.url), |_| Fault::Pass);
    proxy.set_down(true);
    let (provider, stats) = start(&proxy.url(), |b| b);
    for c in 0..CALLS {
        emit_call(&provider, &format!("call-{c}"), 40, 500);
    }
    // Let the outage be seen (as many summary attempts refused as there are calls), then
    // come back.
    assert!(proxy.wait_for(WAIT, |_, refused| refused >= CALLS));
    proxy.set_down(false);
    assert!(proxy.wait_for(WAIT, |_, _| delivered(
        &stats,
        CALLS as u64,
        CALLS as u64 * 40
    )));
    let seen = proxy.seen();
    let last_core = seen
        .iter()
        .filter(|s| s.req.is_core())
        .map(|s| s.at)
        .max()
        .unwrap();
    let first_detail = seen
        .iter()
        .filter(|s| !s.req.is_core())
        .map(|s| s.at)
        .min()
        .unwrap();
    assert!(
        last_core <= first_detail,
        "a detail batch went before every summary was in"
    );
    assert_stored(&ingest, CALLS, 40);
    provider.shutdown().unwrap();
}

// ---- kill -9 and restart with the same spool ------------------------------------------------

const CHILD_ENV: &str = "CALLSCOPE_FAULTS_CHILD";
const KILL_CALLS: usize = 8;
const KILL_SPANS: usize = 20;

/// In the child: emit the calls with a spool, then wait to be killed.
fn child_emit(dir: &str, url: &str) {
    let (provider, _stats) = start(url, |b| {
        b.spool_dir(dir)
            .max_concurrent_detail(64)
            .retry_max_elapsed(Duration::from_secs(3600))
    });
    for c in 0..KILL_CALLS {
        emit_call(&provider, &format!("call-{c}"), KILL_SPANS, 200);
    }
    loop {
        std::thread::park();
    }
}

/// Re-executes this test binary as `test_name` in the child role (the spool directory and the
/// receiver's URL in `CHILD_ENV`), its stdin a pipe the parent may write to.
fn spawn_child(test_name: &str, spool: &Path, url: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture"])
        .env(CHILD_ENV, format!("{}|{url}", spool.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_then_restart_with_the_same_spool_delivers_everything() {
    kill_9_then_restart(
        "kill_9_then_restart_with_the_same_spool_delivers_everything",
        false,
    );
}

/// The child dies with its summaries undelivered too: the restart replays them first.
#[test]
fn kill_9_with_undelivered_summaries_replays_them_after_restart() {
    kill_9_then_restart(
        "kill_9_with_undelivered_summaries_replays_them_after_restart",
        true,
    );
}

/// Runs the calls in a child process (re-executing this test binary as `test_name`) whose
/// detail — and, with `refuse_cores`, summaries — the receiver refuses (503) while it lives,
/// kills it with SIGKILL once every payload was tried (so it is on disk), tears the spool's
/// newest segment, and restarts on the same spool: everything is stored exactly once.
fn kill_9_then_restart(test_name: &str, refuse_cores: bool) {
    if let Ok(v) = std::env::var(CHILD_ENV) {
        let (dir, url) = v.split_once('|').unwrap();
        child_emit(dir, url);
        return;
    }
    let ingest = Ingest::start();
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r2 = refuse.clone();
    let proxy = FaultProxy::start(Some(&ingest.url), move |r: &Req| {
        if (refuse_cores || !r.is_core()) && r2.load(std::sync::atomic::Ordering::SeqCst) {
            Fault::Status(503)
        } else {
            Fault::Pass
        }
    });
    let spool = tempfile::tempdir().unwrap();
    let mut child = spawn_child(test_name, spool.path(), &proxy.url());
    // Every call's summary, or its only batch (the final, sent after the summary), was tried
    // once: it is on disk, synced.
    let tried = proxy.wait_for(WAIT, |seen, _| {
        let keys: HashSet<&str> = seen.iter().map(|s| s.req.key.as_str()).collect();
        (0..KILL_CALLS).all(|c| {
            let key = if refuse_cores {
                format!("call-{c}:core")
            } else {
                format!("call-{c}:detail:0")
            };
            keys.contains(key.as_str())
        })
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(tried, "the child never tried every payload");
    assert_eq!(ingest.total_spans(), 0);
    if refuse_cores {
        assert_eq!(ingest.calls(), 0);
    }
    // A torn write at the end of the newest segment, as a crash mid-append leaves it.
    tear_newest_segment(spool.path());
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let (provider, stats) = start(&proxy.url(), |b| b.spool_dir(spool.path()));
    assert!(proxy.wait_for(WAIT, |_, _| {
        let s = stats.snapshot();
        s.detail_spans_sent == (KILL_CALLS * KILL_SPANS) as u64
            && (!refuse_cores || s.summaries_sent == KILL_CALLS as u64)
    }));
    let s = stats.snapshot();
    assert!(s.spool_records_replayed >= KILL_CALLS as u64, "{s:?}");
    assert_eq!(s.spool_corrupt_tails, 1);
    assert_stored(&ingest, KILL_CALLS, KILL_SPANS);
    provider.shutdown().unwrap();
    // Everything acknowledged: nothing is replayed again.
    let (provider, stats) = start(&proxy.url(), |b| b.spool_dir(spool.path()));
    assert_eq!(stats.snapshot().spool_records_replayed, 0);
    provider.shutdown().unwrap();
}

/// The call of the restart-numbering test: batch 0 (five children), its final (the sixth
/// child and the root) and, once the call is finished, one late span.
const LATE_CALL: &str = "late-call";

/// In the child: the call ends, then (when the parent says the call was finished) a late span.
fn child_late(dir: &str, url: &str) {
    use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
    let (provider, stats) = start(url, |b| {
        b.spool_dir(dir)
            .max_request_bytes(16 * 1024)
            .batch_timeout(Duration::from_secs(3600))
            .retry_max_elapsed(Duration::from_secs(3600))
    });
    let tracer = provider.tracer("faults");
    let cx = support::open_root(&tracer, LATE_CALL);
    for _ in 0..6 {
        tracer
            .build_with_context(
                tracer.span_builder("llm_request").with_attributes(vec![
                    opentelemetry::KeyValue::new("payload", "p".repeat(2_800)),
                ]),
                &cx,
            )
            .end();
    }
    cx.span().end();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    tracer.start_with_context("tts_request", &cx).end();
    // A flush sends the late span's open batch now (and then waits on batch 0, refused).
    let flushing = provider.clone();
    std::thread::spawn(move || flushing.force_flush());
    // The late batch is the one detail batch acknowledged: the worker wrote its ack to the
    // spool in the same step. Whatever the worker does next comes after that, such as sending
    // the summary of a call that ends now: the parent kills this process on seeing it.
    let deadline = std::time::Instant::now() + WAIT;
    while stats.snapshot().detail_batches_sent < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    support::open_root(&tracer, "probe").span().end();
    loop {
        std::thread::park();
    }
}

/// A late batch (2) is acknowledged while the call's batch 0 is refused and its final (1)
/// held; the process is killed. After the restart batch 0 meets a 413 and is split: the half
/// takes the final's number and the final the next free one, 3, not the late batch's 2 (the
/// receiver would answer "already stored" and the final, its spans and the call's
/// completeness would be lost).
#[test]
fn a_split_after_kill_9_numbers_past_a_late_batch_acknowledged_before_it() {
    const NAME: &str = "a_split_after_kill_9_numbers_past_a_late_batch_acknowledged_before_it";
    if let Ok(v) = std::env::var(CHILD_ENV) {
        let (dir, url) = v.split_once('|').unwrap();
        child_late(dir, url);
        return;
    }
    let key = |n: u32| format!("{LATE_CALL}:detail:{n}");
    let ingest = Ingest::start();
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r2 = restarted.clone();
    let batch_0 = key(0);
    let proxy = FaultProxy::start(Some(&ingest.url), move |r: &Req| {
        let after = r2.load(std::sync::atomic::Ordering::SeqCst);
        match (r.key == batch_0, after) {
            (true, false) => Fault::Status(503),
            // The whole batch is too large; its halves are not.
            (true, true) if r.wire_len > 10_000 => Fault::Status(413),
            _ => Fault::Pass,
        }
    });
    let spool = tempfile::tempdir().unwrap();
    let mut child = spawn_child(NAME, spool.path(), &proxy.url());
    // The core went when the call was finished (its final is held behind batch 0).
    let core = format!("{LATE_CALL}:core");
    let finished = proxy.wait_for(WAIT, |seen, _| {
        seen.iter().any(|s| s.req.key == core && s.ok()) && seen.iter().any(|s| s.req.key == key(0))
    });
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"late\n").unwrap();
    }
    let late_stored = proxy.wait_for(WAIT, |seen, _| {
        seen.iter().any(|s| s.req.key == key(2) && s.ok())
            && seen.iter().any(|s| s.req.key == "probe:core")
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(finished && late_stored, "{:?}", proxy.seen());
    assert!(
        !proxy.seen().iter().any(|s| s.req.key == key(1)),
        "the final went before batch 0"
    );
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);
    let (provider, stats) = start(&proxy.url(), |b| b.spool_dir(spool.path()));
    let complete = proxy.wait_for(WAIT, |_, _| {
        ingest
            .call(LATE_CALL)
            .is_some_and(|c| c["complete"] == true)
    });
    let call = ingest.call(LATE_CALL);
    assert!(
        complete,
        "{call:?} {:?} {:?}",
        stats.snapshot(),
        proxy.seen()
    );
    let call = call.unwrap();
    assert_eq!(call["total_batches"], 4, "{call}");
    // Root, six children and the late span, each once.
    assert_eq!(ingest.spans(LATE_CALL), 8);
    assert_eq!(ingest.duplicates(), 0);
    assert!(stats.snapshot().batches_split >= 1);
    provider.shutdown().unwrap();
}

fn tear_newest_segment(dir: &Path) {
    use std::io::Write;
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let last = segs.last().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    f.write_all(&[200, 0, 0, 0, 7, 7, 7, 7, 1, 2, 3]).unwrap();
}

// ---- acceptance ------------------------------------------------------------------------------

/// Sizes of the acceptance run: small in `cargo test` (debug build); `examples/faults.rs` runs
/// the full 200 × 500 (see RELIABILITY.md).
const CALLS: usize = 40;
const SPANS: usize = 100;

/// The acceptance schedule: a spooled processor (`configure` sets the rest) behind a proxy
/// with every fault; `emit` sends call `c` through the provider, with the receiver down for
/// the second quarter of the calls. Waits for every call and span, checks that nothing was
/// dropped or failed, that the faults were met (retries and 413 splits) and that the ingest
/// server stored each span once; returns the counters.
fn run_acceptance(
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    mut emit: impl FnMut(&SdkTracerProvider, usize),
) -> Stats {
    let ingest = Ingest::start();
    let timeout = Duration::from_millis(400);
    let proxy = FaultProxy::start(Some(&ingest.url), all_faults(timeout));
    let spool = tempfile::tempdir().unwrap();
    let (provider, stats) = start(&proxy.url(), |b| {
        configure(b.spool_dir(spool.path()).timeout(timeout))
    });
    for c in 0..CALLS {
        if c == CALLS / 4 {
            proxy.set_down(true);
        }
        if c == CALLS / 2 {
            proxy.set_down(false);
        }
        emit(&provider, c);
    }
    proxy.set_down(false);
    let ok = proxy.wait_for(Duration::from_secs(120), |_, _| {
        delivered(&stats, CALLS as u64, (CALLS * SPANS) as u64)
    });
    let s = stats.snapshot();
    assert!(ok, "not all delivered: {s:?}");
    assert_eq!(s.spans_dropped(), 0, "{s:?}");
    assert_eq!(s.summaries_failed, 0);
    assert!(s.requests_retried > 0 && s.batches_split > 0, "{s:?}");
    assert_stored(&ingest, CALLS, SPANS);
    provider.shutdown().unwrap();
    s
}

#[test]
fn acceptance_every_fault_with_the_spool_stores_everything_once() {
    run_acceptance(
        |b| b.max_request_bytes(48 * 1024).max_buffer_bytes(256 * 1024),
        |provider, c| emit_call(provider, &format!("call-{c}"), SPANS, 150),
    );
}

/// The acceptance schedule on gzip bodies, which are compressed off the worker thread while
/// it batches: payloads of random hex (about 2:1 in gzip) so that a call's 100 spans still
/// meet the 413 above 24 KB on the wire, and every other fault with them.
#[test]
fn acceptance_every_fault_on_gzip_bodies_stores_everything_once() {
    use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
    let mut rng = fastrand::Rng::with_seed(7);
    let s = run_acceptance(
        |b| {
            b.compression(Compression::Gzip)
                .max_request_bytes(96 * 1024)
                .max_buffer_bytes(512 * 1024)
        },
        |provider, c| {
            let tracer = provider.tracer("faults-gzip");
            let cx = support::fault::open_root(&tracer, &format!("call-{c}"));
            for _ in 1..SPANS {
                let payload: String = (0..600)
                    .map(|_| char::from(b"0123456789abcdef"[rng.usize(..16)]))
                    .collect();
                let mut s = tracer.build_with_context(
                    tracer
                        .span_builder("llm_request")
                        .with_attributes(vec![opentelemetry::KeyValue::new("payload", payload)]),
                    &cx,
                );
                s.end();
            }
            cx.span().end();
        },
    );
    assert!(s.bytes_sent < s.bytes_uncompressed, "{s:?}");
}

#[test]
fn acceptance_without_a_spool_every_loss_is_counted_exactly() {
    let ingest = Ingest::start();
    let firsts = Arc::new(Mutex::new(HashSet::new()));
    // Summaries only meet transient faults; some detail batches are refused for good (400),
    // others fail until the short retry budget runs out, and a slow receiver fills the buffer.
    let proxy = FaultProxy::start(Some(&ingest.url), move |r: &Req| {
        let first = firsts.lock().unwrap().insert(r.key.clone());
        if r.is_core() {
            return if first && r.n.is_multiple_of(3) {
                Fault::Status(503)
            } else {
                Fault::Pass
            };
        }
        match r.n % 11 {
            2 => Fault::Status(400),
            5 => Fault::Status(503),
            _ if r.n < 30 => Fault::Slow(Duration::from_millis(150)),
            _ => Fault::Pass,
        }
    });
    let (provider, stats) = start(&proxy.url(), |b| {
        b.retry_max_elapsed(Duration::from_millis(800))
            .timeout(Duration::from_secs(5))
            .max_request_bytes(16 * 1024)
            .max_buffer_bytes(512 * 1024)
            .max_concurrent_detail(1)
    });
    let total = (CALLS * SPANS) as u64;
    for c in 0..CALLS {
        emit_call(&provider, &format!("call-{c}"), SPANS, 150);
    }
    let settled = proxy.wait_for(Duration::from_secs(120), |_, _| {
        let s = stats.snapshot();
        s.summaries_sent == CALLS as u64 && s.detail_spans_sent + s.spans_dropped() == total
    });
    provider.shutdown().unwrap();
    let s = stats.snapshot();
    assert!(settled, "{s:?}");
    assert!(s.spans_dropped_send_failed > 0, "{s:?}");
    assert!(s.spans_dropped_buffer_full > 0, "{s:?}");
    assert_eq!(ingest.calls(), CALLS as u64);
    assert_eq!(ingest.duplicates(), 0);
    // No more and no fewer: what is not stored is exactly what stats() counts as dropped.
    assert_eq!(ingest.total_spans() + s.spans_dropped(), total, "{s:?}");
    assert_eq!(s.detail_spans_sent, ingest.total_spans());
}
