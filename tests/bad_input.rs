//! Bad input, each with a defined outcome: a clear error or a counted drop, never a panic, a
//! hang or unbounded memory.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callscope::{CallSpanProcessor, Compression, Config, ConfigBuilder, DetailMode};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks, SpanProcessor};
use support::Receiver;
use support::fault::{Fault, FaultProxy};

const WAIT: Duration = Duration::from_secs(30);

fn processor(url: &str, f: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> CallSpanProcessor {
    support::init_logs();
    let cfg = f(Config::builder()
        .without_env()
        .endpoint(url)
        .agent_id("bad-input")
        .compression(Compression::None))
    .build()
    .unwrap();
    CallSpanProcessor::from_config(cfg).unwrap()
}

fn t(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000 + s)
}

/// A span as the SDK hands it to `on_end`. `parent: None` = a root span.
fn span(
    trace: u128,
    id: u64,
    parent: Option<u64>,
    name: &'static str,
    attrs: Vec<KeyValue>,
) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Borrowed(name),
        start_time: t(0),
        end_time: t(1),
        attributes: attrs,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("bad-input").build(),
    }
}

#[test]
fn a_50_mb_attribute_value_is_shortened_and_counted() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b);
    let mut s = span(
        1,
        2,
        Some(1),
        "llm_request",
        vec![
            KeyValue::new("call_id", "big"),
            KeyValue::new("prompt", "x".repeat(50 << 20)),
        ],
    );
    s.attributes.push(KeyValue::new("n", 1));
    p.on_end(s);
    p.on_end(span(
        1,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "big")],
    ));
    p.force_flush().unwrap();
    let st = p.stats();
    assert!(st.attributes_truncated >= 1, "{st:?}");
    assert_eq!(st.spans_dropped(), 0);
    let details = rx.details();
    let spans = support::detail_span_ids(&details, "big");
    assert_eq!(spans.len(), 2);
    assert!(
        details
            .iter()
            .all(|r| r.json_len <= callscope::env::DEFAULT_MAX_REQUEST_BYTES)
    );
    assert!(rx.core_of("big").is_some());
    p.shutdown().unwrap();
}

/// Every call's one span is also sent as detail: an evicted call's packed span travels with its
/// end, so when the end is dropped (backlog) the span is counted as dropped too.
#[test]
fn many_distinct_call_ids_stay_bounded_by_eviction() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b.max_open_calls(20));
    let n = 3_000u64;
    for i in 0..n {
        // A child span (never a root): the call stays open until evicted.
        let id = format!("caller-{i}");
        p.on_end(span(
            u128::from(i) + 10,
            5,
            Some(4),
            "llm_request",
            vec![KeyValue::new("call_id", id)],
        ));
        assert!(p.stats().calls_open <= 20);
    }
    p.force_flush().unwrap();
    let st = p.stats();
    assert_eq!(st.calls_started, n);
    assert_eq!(st.calls_ended_evicted, n - st.calls_open);
    // Every evicted call's summary arrives, or was dropped and counted because more than
    // the backlog bound of ended calls waited for the worker (ids arriving in a tight loop).
    let dropped = p.stats().summaries_dropped_backlog;
    assert!(
        rx.wait_for(WAIT, |r| r.iter().filter(|r| r.is_core()).count() as u64
            + dropped
            >= n - 20)
    );
    p.shutdown().unwrap();
    let st = p.stats();
    assert_eq!(st.calls_ended(), n);
    assert_eq!(st.detail_spans_sent + st.spans_dropped(), n, "{st:?}");
}

/// A million distinct call ids over time, through the real call table and worker (the I/O
/// stage is the no-op sink, so a million summaries need no HTTP): open calls never pass
/// `max_open_calls`, every eviction is counted, and every summary is delivered or counted as
/// dropped. (Live heap stays flat: measured with valgrind's massif, see RELIABILITY.md — the
/// process RSS is not a usable measure here, glibc keeps freed memory.)
#[test]
fn a_million_call_ids_keep_memory_bounded() {
    support::init_logs();
    let cfg = Config::builder()
        .without_env()
        .endpoint("http://127.0.0.1:9/v1/calls")
        .max_open_calls(1_000)
        .detail(DetailMode::None)
        .build()
        .unwrap();
    let p = callscope::__bench::null_sink_processor(cfg).unwrap();
    // MILLION_N overrides the count (for measuring the live heap under massif with fewer ids)
    let n: u64 = std::env::var("MILLION_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    for i in 0..n {
        p.on_end(span(
            u128::from(i) + 1,
            5,
            Some(4),
            "llm_request",
            vec![KeyValue::new("call_id", format!("caller-{i}"))],
        ));
        assert!(p.stats().calls_open <= 1_000);
    }
    p.force_flush().unwrap();
    let st = p.stats();
    assert!(st.calls_open <= 1_000, "{st:?}");
    assert_eq!(st.calls_started, n);
    assert_eq!(st.calls_ended_evicted, n - st.calls_open);
    p.shutdown().unwrap();
    let st = p.stats();
    assert_eq!(st.calls_ended(), n);
    // every summary is accounted for: delivered (to the no-op sink) or dropped and counted
    // because call ends arrived faster than the worker built summaries
    assert_eq!(
        st.summaries_sent + st.summaries_dropped_backlog,
        n,
        "{st:?}"
    );
    assert_eq!(st.summaries_failed, st.summaries_dropped_backlog);
}

#[test]
fn a_span_ending_before_it_starts_has_zero_duration() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b);
    let mut s = span(
        7,
        2,
        Some(1),
        "tts_request",
        vec![KeyValue::new("call_id", "backwards")],
    );
    s.start_time = t(100);
    s.end_time = t(50);
    p.on_end(s);
    p.on_end(span(
        7,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "backwards")],
    ));
    p.force_flush().unwrap();
    let details = rx.details();
    let d = details.iter().find(|r| r.call_id() == "backwards").unwrap();
    let spans = d.json["telemetry_data"]["session_traces"]
        .as_array()
        .unwrap();
    let tts = spans.iter().find(|s| s["name"] == "tts_request").unwrap();
    assert_eq!(tts["duration_ms"].as_f64(), Some(0.0));
    p.shutdown().unwrap();
}

/// Timestamps are the app's to set (`SpanBuilder::with_start_time`): one before 1970 or past the
/// year 9999 must neither stop the worker nor lose the call; the summary states the nearest
/// time RFC 3339 can write.
#[test]
fn timestamps_before_1970_and_after_9999_are_written_not_fatal() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b);
    let mut old = span(
        9,
        2,
        Some(1),
        "llm_request",
        vec![KeyValue::new("call_id", "timeless")],
    );
    old.start_time = UNIX_EPOCH - Duration::from_secs(86_400 * 365 * 3000);
    old.end_time = UNIX_EPOCH - Duration::from_millis(1500);
    p.on_end(old);
    let mut future = span(
        9,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "timeless")],
    );
    future.end_time = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
    p.on_end(future);
    p.force_flush().unwrap();
    let core = rx.core_of("timeless").expect("the summary arrives");
    assert_eq!(core["call_started_at"], "0000-01-01T00:00:00.000000000Z");
    assert_eq!(core["call_ended_at"], "9999-12-31T23:59:59.999999999Z");
    let details = rx.details();
    let d = details.iter().find(|r| r.call_id() == "timeless").unwrap();
    let spans = d.json["telemetry_data"]["session_traces"]
        .as_array()
        .unwrap();
    assert_eq!(spans.len(), 2);
    // A later call still goes through: the worker is alive.
    p.on_end(span(
        10,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "after")],
    ));
    p.force_flush().unwrap();
    assert!(rx.core_of("after").is_some());
    p.shutdown().unwrap();
}

#[test]
fn spans_without_a_call_id_are_grouped_by_trace() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b);
    let trace: u128 = 0xabc;
    p.on_end(span(trace, 2, Some(1), "llm_request", vec![]));
    p.on_end(span(trace, 1, None, "agent_session", vec![]));
    p.force_flush().unwrap();
    let hex = format!("{trace:032x}");
    let core = rx.core_of(&hex).unwrap();
    assert_eq!(core["telemetry_summary"]["total_spans"], 2);
    p.shutdown().unwrap();
}

#[test]
fn spans_after_shutdown_are_counted() {
    let rx = Receiver::start();
    let p = processor(&rx.url(), |b| b);
    p.shutdown().unwrap();
    p.on_end(span(
        9,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "late")],
    ));
    assert_eq!(p.stats().spans_dropped_after_shutdown, 1);
    assert_eq!(p.stats().spans_seen, 0);
}

#[test]
fn an_endpoint_down_at_start_catches_up() {
    // An endpoint that is not serving yet: it takes connections and closes them at once. Its
    // second connection is the summary's retry (counted before it is made), which is the signal
    // to bring the receiver up on the same port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (retried_tx, retried) = std::sync::mpsc::channel();
    let refuser = std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            drop(conn);
            if i == 1 {
                let _ = retried_tx.send(());
                break;
            }
        }
    });
    let p = processor(&format!("http://{addr}/v1/calls"), |b| b);
    p.on_end(span(
        3,
        2,
        Some(1),
        "llm_request",
        vec![KeyValue::new("call_id", "early")],
    ));
    p.on_end(span(
        3,
        1,
        None,
        "agent_session",
        vec![KeyValue::new("call_id", "early")],
    ));
    retried
        .recv_timeout(WAIT)
        .expect("the summary was not retried");
    refuser.join().unwrap();
    assert!(p.stats().requests_retried >= 1);
    assert_eq!(p.stats().summaries_sent, 0);
    // The receiver comes up later on that port.
    let proxy = FaultProxy::start_on(addr, None, |_| Fault::Pass);
    assert!(proxy.wait_for(WAIT, |_, _| {
        let s = p.stats();
        s.summaries_sent == 1 && s.detail_spans_sent == 2
    }));
    p.shutdown().unwrap();
}

// ---- invalid environment values, through from_env in a child process -------------------------

const CHILD_ENV: &str = "CALLSCOPE_BAD_INPUT_CHILD";

#[test]
fn invalid_env_values_are_clear_errors() {
    if let Ok(var) = std::env::var(CHILD_ENV) {
        let err = CallSpanProcessor::from_env().unwrap_err().to_string();
        assert!(
            err.contains(&var),
            "error for {var} does not name it: {err}"
        );
        return;
    }
    use callscope::env::*;
    let bad = [
        (ENV_ENDPOINT, "not a url"),
        (ENV_DETAILED_ENDPOINT, "ftp://x"),
        (ENV_TIMEOUT_MS, "soon"),
        (ENV_QUEUE_SIZE, "-1"),
        (ENV_MAX_OPEN_CALLS, "0"),
        (ENV_MAX_REQUEST_BYTES, "12"),
        (ENV_MAX_SUMMARY_BYTES, "x"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "0"),
        (ENV_BATCH_TIMEOUT_MS, "1e99"),
        (ENV_RETRY_MAX_ELAPSED_MS, "forever"),
        (ENV_MAX_CONCURRENT_DETAIL, "0"),
        (ENV_MAX_BUFFER_BYTES, "1"),
        (ENV_SPOOL_MAX_BYTES, "0"),
        (ENV_DETAIL, "some"),
        (ENV_COMPRESSION, "zstd"),
        (ENV_CRITICAL_MS, "slow"),
        (ENV_DISABLED, "maybe"),
        (ENV_HEADERS, "no-equals-sign"),
    ];
    for (var, value) in bad {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "invalid_env_values_are_clear_errors", "--quiet"])
            .env(CHILD_ENV, var)
            .env(var, value);
        if var != ENV_ENDPOINT {
            cmd.env(ENV_ENDPOINT, "http://127.0.0.1:9/v1/calls");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{var}={value:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// An app that drops the processor without `shutdown` (and without ending its call) still gets
/// the spans packed in the open call's chunk delivered: the worker takes every chunk when it
/// stops.
#[test]
fn a_processor_dropped_without_shutdown_delivers_open_calls_spans() {
    let rx = Receiver::start();
    // The batch timeout is far away and the call never ends: only the stop can send these.
    let p = processor(&rx.url(), |b| b.batch_timeout(Duration::from_secs(3600)));
    for id in 2..7 {
        p.on_end(span(
            9,
            id,
            Some(1),
            "llm_request",
            vec![KeyValue::new("call_id", "dropped")],
        ));
    }
    assert_eq!(p.stats().detail_spans_sent, 0);
    drop(p);
    assert!(
        rx.wait_for(Duration::from_secs(20), |r| support::detail_span_ids(
            &r.iter().filter(|r| r.ok()).cloned().collect::<Vec<_>>(),
            "dropped"
        )
        .len()
            == 5),
        "the open call's packed spans were not delivered when the processor was dropped"
    );
}
