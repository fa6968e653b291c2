//! End-to-end tests of the processor against a real HTTP receiver on 127.0.0.1:0.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callscope::{CallSpanProcessor, CallSpanProcessorBuilder, DetailMode, StatsHandle};
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use support::fault::{Fault, FaultProxy};
use support::voice::{self, CallShape, Truth};
use support::{Receiver, Recorded, Reply, detail_span_ids};

const WAIT: Duration = Duration::from_secs(20);

fn setup(
    rx: &Receiver,
    f: impl FnOnce(CallSpanProcessorBuilder) -> CallSpanProcessorBuilder,
) -> (SdkTracerProvider, StatsHandle) {
    support::init_logs();
    let p = f(CallSpanProcessor::builder()
        .without_env()
        .endpoint(rx.url())
        .agent_id("test-agent"))
    .build()
    .unwrap();
    let stats = p.stats_handle();
    (
        SdkTracerProvider::builder().with_span_processor(p).build(),
        stats,
    )
}

fn t0(i: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i * 10_000)
}

fn approx(a: &Value, b: f64) {
    let a = a.as_f64().unwrap_or_else(|| panic!("{a} is not a number"));
    assert!((a - b).abs() < 1e-6, "{a} != {b}");
}

/// Every aggregate in a core summary equals the truth recorded while emitting.
fn assert_core_matches(core: &Value, truth: &Truth) {
    let ts = &core["telemetry_summary"];
    assert_eq!(core["call_id"], truth.call_id.as_str());
    assert_eq!(core["schema_version"], 1);
    assert_eq!(
        ts["total_spans"], truth.total_spans,
        "total_spans of {}",
        truth.call_id
    );
    assert_eq!(ts["error_count"], truth.errors);
    for (op, n) in &truth.op_counts {
        assert_eq!(ts["operation_counts"][op], *n, "count of {op}");
    }
    assert_eq!(
        ts["operation_counts"].as_object().unwrap().len(),
        truth.op_counts.len()
    );
    for (field, op) in [
        ("avg_llm_latency", "llm"),
        ("avg_tts_latency", "tts"),
        ("avg_stt_latency", "stt"),
    ] {
        match truth.avg(op) {
            Some(avg) => approx(&ts[field], avg),
            None => assert!(ts[field].is_null()),
        }
    }
    let top: Vec<f64> = ts["slowest_operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["duration_ms"].as_f64().unwrap())
        .collect();
    let want = truth.top5();
    assert_eq!(top.len(), want.len());
    for (a, b) in top.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "top-5 {top:?} != {want:?}");
    }
    for s in ts["slowest_operations"].as_array().unwrap() {
        assert_eq!(s["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(s["span_id"].as_str().unwrap().len(), 16);
        assert!(s["started_at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(core["summary_metrics"]["total_tokens"], truth.tokens);
    assert_eq!(core["summary_metrics"]["total_turns"], truth.turns);
    let lines: Vec<(String, String)> = core["transcript_json"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["role"].as_str().unwrap().to_owned(),
                l["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = truth
        .transcript
        .iter()
        .map(|(r, c)| ((*r).to_owned(), c.clone()))
        .collect();
    assert_eq!(lines, want, "transcript of {}", truth.call_id);
    assert_eq!(core["truncated"], false);
}

fn final_of<'a>(details: &'a [Recorded], call_id: &str) -> Vec<&'a Recorded> {
    details
        .iter()
        .filter(|r| r.call_id() == call_id && r.json["final"] == true)
        .collect()
}

#[test]
fn three_calls_interleaved_on_threads_get_three_exact_summaries() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b);
    let tracer = Arc::new(provider.tracer("voice"));
    let barrier = Arc::new(Barrier::new(3));
    let handles: Vec<_> = (0..3u64)
        .map(|i| {
            let tracer = tracer.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let shape = CallShape {
                    turns: 6 + i as u32 * 2,
                    tool_every: 2 + i as u32,
                    ..CallShape::default()
                };
                voice::livekit_call(&*tracer, &format!("call-{i}"), &shape, t0(i), i * 1000)
            })
        })
        .collect();
    let truths: Vec<Truth> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    provider.force_flush().unwrap();
    assert_eq!(rx.cores().len(), 3);
    for t in &truths {
        let core = rx.core_of(&t.call_id).unwrap();
        assert_core_matches(&core, t);
        assert_eq!(core["end_reason"], "root_span_ended");
        assert_eq!(core["agent_id"], "test-agent");
        // every span of the call arrived exactly once, under the right call
        let ids = detail_span_ids(&rx.details(), &t.call_id);
        assert_eq!(ids.len() as u64, t.total_spans);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    }
    let s = stats.snapshot();
    assert_eq!(s.calls_ended_root, 3);
    assert_eq!(s.summaries_sent, 3);
    assert_eq!(s.spans_dropped(), 0);
    assert_eq!(s.calls_open, 0);
    provider.shutdown().unwrap();
}

#[test]
fn livekit_session_with_old_and_new_attribute_names() {
    let rx = Receiver::start();
    let (provider, _stats) = setup(&rx, |b| b);
    let tracer = provider.tracer("livekit");
    let shape = CallShape {
        turns: 8,
        tool_every: 3,
        mix_pii_names: true,
        span_bytes: 0,
        ..CallShape::default()
    };
    let truth = voice::livekit_call(&tracer, "lk-room-1", &shape, t0(1), 7);
    provider.force_flush().unwrap();
    let core = rx.core_of("lk-room-1").unwrap();
    assert_core_matches(&core, &truth);
    assert_eq!(truth.errors, 1, "the fixture makes one tool fail");
    // agent response latency: from the end of each user turn to the start of the next tts
    assert!(core["summary_metrics"]["avg_latency"].as_f64().unwrap() > 0.0);
    // transcript_with_metrics on the final batch: one user and one assistant record per turn
    let details = rx.details();
    let finals = final_of(&details, "lk-room-1");
    assert_eq!(finals.len(), 1);
    let twm = finals[0].json["transcript_with_metrics"]
        .as_array()
        .unwrap();
    assert_eq!(twm.len(), 16);
    let assistant: Vec<&Value> = twm.iter().filter(|r| r["role"] == "assistant").collect();
    assert_eq!(assistant.len(), 8);
    for (i, r) in assistant.iter().enumerate() {
        assert_eq!(r["turn"], i as u64 + 1);
        assert!(
            r["content"]
                .as_str()
                .unwrap()
                .starts_with(&format!("agent line {i}:"))
        );
        assert!(r["llm_latency"].as_f64().unwrap() >= 200.0);
        assert!(r["tts_latency"].as_f64().unwrap() >= 150.0);
        approx(&r["ttft"], 120.0);
        assert_eq!(r["tokens"], 340 + i as u64 + i as u64 % 7);
    }
    for r in twm.iter().filter(|r| r["role"] == "user") {
        assert!(r["stt_latency"].as_f64().unwrap() >= 300.0);
    }
    provider.shutdown().unwrap();
}

#[test]
fn pipecat_session_maps_generic_keys() {
    let rx = Receiver::start();
    let (provider, _stats) = setup(&rx, |b| b);
    let tracer = provider.tracer("pipecat");
    let truth = voice::pipecat_call(&tracer, "conv-42", 4, t0(2));
    provider.force_flush().unwrap();
    let core = rx.core_of("conv-42").unwrap();
    assert_core_matches(&core, &truth);
    approx(&core["telemetry_summary"]["avg_llm_latency"], 300.0);
    approx(&core["telemetry_summary"]["avg_tts_latency"], 200.0);
    approx(&core["telemetry_summary"]["avg_stt_latency"], 250.0);
    // percentiles per operation: stt took 100, 200, 300 and 400 ms
    let stt = &core["telemetry_summary"]["latency_by_operation"]["stt"];
    let p50 = stt["p50"].as_f64().unwrap();
    assert!((p50 - 200.0).abs() <= 25.0, "p50 {p50}");
    approx(&stt["p99"], 400.0);
    approx(&stt["min"], 100.0);
    let details = rx.details();
    let twm = final_of(&details, "conv-42")[0].json["transcript_with_metrics"]
        .as_array()
        .unwrap()
        .clone();
    let a: Vec<&Value> = twm.iter().filter(|r| r["role"] == "assistant").collect();
    assert_eq!(a.len(), 4);
    assert_eq!(a[2]["turn"], 3);
    approx(&a[2]["ttft"], 200.0);
    assert_eq!(a[2]["tokens"], 110);
    provider.shutdown().unwrap();
}

/// Opens a root span that is not ended; ends `n` children under it.
fn open_call<T: Tracer>(tracer: &T, call_id: &str, n: usize) -> Context
where
    T::Span: Send + Sync + 'static,
{
    let cx = support::open_root(tracer, call_id);
    for i in 0..n {
        let mut s = tracer.start_with_context(
            if i % 2 == 0 {
                "llm_request"
            } else {
                "tts_request"
            },
            &cx,
        );
        s.end();
    }
    cx
}

#[test]
fn idle_timeout_ends_a_call_and_later_spans_are_late() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| {
        b.call_idle_timeout(Duration::from_millis(100))
            .batch_timeout(Duration::from_millis(50))
    });
    let tracer = provider.tracer("idle");
    let cx = open_call(&tracer, "idle-1", 3);
    assert!(
        rx.wait_for(WAIT, |r| r.iter().any(|r| r.is_core())),
        "no summary after the idle timeout"
    );
    let core = rx.core_of("idle-1").unwrap();
    assert_eq!(core["end_reason"], "idle_timeout");
    assert_eq!(core["telemetry_summary"]["total_spans"], 3);
    // the root ends after its call did: a late span, sent as late detail
    cx.span().end();
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.calls_ended_idle, 1);
    assert_eq!(s.late_spans, 1);
    // delivered once: in a `late` batch, or in the final one if the call was still finishing
    let ids = detail_span_ids(&rx.details(), "idle-1");
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4);
    provider.shutdown().unwrap();
}

#[test]
fn shutdown_ends_open_calls_and_delivers() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b);
    let tracer = provider.tracer("shutdown");
    let _a = open_call(&tracer, "open-a", 4);
    let _b = open_call(&tracer, "open-b", 2);
    provider.shutdown().unwrap();
    let a = rx.core_of("open-a").unwrap();
    assert_eq!(a["end_reason"], "shutdown");
    assert_eq!(a["telemetry_summary"]["total_spans"], 4);
    assert_eq!(
        rx.core_of("open-b").unwrap()["telemetry_summary"]["total_spans"],
        2
    );
    let details = rx.details();
    assert_eq!(final_of(&details, "open-a").len(), 1);
    assert_eq!(detail_span_ids(&details, "open-a").len(), 4);
    let s = stats.snapshot();
    assert_eq!(s.calls_ended_shutdown, 2);
    assert_eq!(s.summaries_sent, 2);
}

#[test]
fn eviction_ends_the_oldest_open_call() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.max_open_calls(2));
    let tracer = provider.tracer("evict");
    let _a = open_call(&tracer, "ev-a", 1);
    let _b = open_call(&tracer, "ev-b", 1);
    let _c = open_call(&tracer, "ev-c", 1);
    provider.force_flush().unwrap();
    assert_eq!(rx.core_of("ev-a").unwrap()["end_reason"], "evicted");
    assert!(rx.core_of("ev-b").is_none());
    let s = stats.snapshot();
    assert_eq!(s.calls_ended_evicted, 1);
    assert_eq!(s.calls_open, 2);
    provider.shutdown().unwrap();
}

#[test]
fn a_5mb_transcript_is_cut_to_the_summary_cap() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| {
        b.max_summary_bytes(500_000).max_request_bytes(1_000_000)
    });
    let tracer = provider.tracer("big");
    let cx = open_call(&tracer, "chatty", 0);
    for i in 0..100u64 {
        let mut s = tracer.build_with_context(
            tracer
                .span_builder("user_turn")
                .with_attributes(vec![KeyValue::new(
                    "lk.user_transcript",
                    voice::text(i, 50_000),
                )]),
            &cx,
        );
        s.end();
    }
    cx.span().end();
    provider.force_flush().unwrap();
    let cores: Vec<Recorded> = rx.cores();
    assert_eq!(cores.len(), 1);
    assert!(
        cores[0].json_len <= 500_000,
        "core is {} bytes",
        cores[0].json_len
    );
    assert_eq!(cores[0].json["truncated"], true);
    assert!(
        !cores[0].json["transcript_json"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(cores[0].json["telemetry_summary"]["total_spans"], 101);
    let s = stats.snapshot();
    assert_eq!(s.summaries_truncated, 1);
    assert!(s.text_truncations > 0);
    // every detail body fits its cap too, and all 101 spans arrived
    for d in rx.details() {
        assert!(d.json_len <= 1_000_000);
    }
    assert_eq!(detail_span_ids(&rx.details(), "chatty").len(), 101);
    provider.shutdown().unwrap();
}

#[test]
fn five_hundred_10kb_spans_stream_in_capped_batches_and_final_follows_the_core_ack() {
    const CAP: usize = 1_000_000;
    // The core answer is held back: the final batch must still come after it.
    let rx = Receiver::scripted(|_, body, _| {
        if body.get("update_type").is_none() {
            Reply::ok().delayed(Duration::from_millis(300))
        } else {
            Reply::ok()
        }
    });
    let (provider, stats) = setup(&rx, |b| b.max_request_bytes(CAP).api_key("k-123"));
    let tracer = provider.tracer("bulk");
    let shape = CallShape {
        turns: 50,
        span_bytes: 10_000,
        tool_every: 5,
        mix_pii_names: false,
        target_spans: Some(500),
        ..CallShape::default()
    };
    let truth = voice::livekit_call(&tracer, "bulk-1", &shape, t0(3), 5);
    assert_eq!(truth.total_spans, 500);
    provider.force_flush().unwrap();
    let all = rx.requests();
    let core = all.iter().find(|r| r.is_core()).unwrap();
    assert_eq!(core.idempotency_key.as_deref(), Some("bulk-1:core"));
    assert_eq!(core.authorization.as_deref(), Some("Bearer k-123"));
    let details: Vec<&Recorded> = all.iter().filter(|r| !r.is_core()).collect();
    assert!(
        details.len() >= 5,
        "10 KB × 500 spans under a 1 MB cap needs several batches, got {}: {:?}",
        details.len(),
        details
            .iter()
            .map(|d| (d.json_len, d.json["final"].clone()))
            .collect::<Vec<_>>()
    );
    for d in &details {
        assert!(
            d.wire_len <= CAP && d.json_len <= CAP,
            "batch of {} bytes",
            d.json_len
        );
        assert_eq!(d.content_encoding.as_deref(), Some("gzip"));
        let seq = d.json["batch_seq"].as_u64().unwrap();
        assert_eq!(
            d.idempotency_key.as_deref(),
            Some(format!("bulk-1:detail:{seq}").as_str())
        );
    }
    let recs: Vec<Recorded> = details.iter().map(|r| (*r).clone()).collect();
    let ids = detail_span_ids(&recs, "bulk-1");
    assert_eq!(ids.len() as u64, truth.total_spans);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "a span was sent twice"
    );
    let finals: Vec<&&Recorded> = details.iter().filter(|r| r.json["final"] == true).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].json["total_batches"], details.len() as u64);
    assert!(
        finals[0].arrived >= core.answered,
        "final batch sent before the core was acknowledged"
    );
    let mut seqs: Vec<u64> = details
        .iter()
        .map(|d| d.json["batch_seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..details.len() as u64).collect::<Vec<_>>());
    // gzip on realistic spans
    let wire: usize = details.iter().map(|d| d.wire_len).sum();
    let raw: usize = details.iter().map(|d| d.json_len).sum();
    assert!(wire * 3 < raw, "gzip ratio {raw}/{wire}");
    let s = stats.snapshot();
    assert_eq!(s.detail_spans_sent, truth.total_spans);
    assert_eq!(s.detail_batches_sent, details.len() as u64);
    provider.shutdown().unwrap();
}

/// Roots ending while the queue is full are recorded by the caller, but their calls end only
/// once the spans queued before them are recorded: no child becomes a late span.
#[test]
fn roots_recorded_past_a_full_queue_end_their_calls_after_their_children() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.queue_size(1));
    let tracer = Arc::new(provider.tracer("flood-roots"));
    let (calls, children) = (40, 10);
    std::thread::scope(|s| {
        for t in 0..2 {
            let tracer = tracer.clone();
            s.spawn(move || {
                for c in 0..calls / 2 {
                    open_call(&*tracer, &format!("fr-{t}-{c}"), children)
                        .span()
                        .end();
                }
            });
        }
    });
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    assert!(
        s.spans_dropped_queue_full > 0,
        "queue of 1 never filled: {s:?}"
    );
    assert_eq!(s.late_spans, 0, "{s:?}");
    assert_eq!(s.calls_ended_root, calls as u64, "{s:?}");
    let n = (calls * (children + 1)) as u64;
    assert_eq!(s.spans_seen, n);
    assert_eq!(s.detail_spans_sent + s.spans_dropped_queue_full, n, "{s:?}");
    assert!(rx.wait_for(WAIT, |r| r.iter().filter(|r| r.is_core()).count() == calls));
    for t in 0..2 {
        for c in 0..calls / 2 {
            let core = rx.core_of(&format!("fr-{t}-{c}")).unwrap();
            assert_eq!(core["end_reason"], "root_span_ended");
            assert_eq!(
                core["telemetry_summary"]["total_spans"],
                children as u64 + 1
            );
        }
    }
    provider.shutdown().unwrap();
}

/// Ends one `llm_request` span under `cx` whose `gen_ai.prompt` is `prompt`.
fn end_prompt_span<T: Tracer>(tracer: &T, cx: &Context, prompt: String) {
    tracer
        .build_with_context(
            tracer
                .span_builder("llm_request")
                .with_attributes(vec![KeyValue::new("gen_ai.prompt", prompt)]),
            cx,
        )
        .end();
}

/// Large spans are bounded in bytes while queued, not only in number: a burst of 256 KB spans
/// faster than the worker serialises them meets the bound on packed bytes (half of
/// `CALLSCOPE_MAX_BUFFER_BYTES`, here 1 MiB: a queue of 1,024 spans × 512 B is less) and the
/// rest of their detail is dropped and counted; the summary still counts every span.
#[test]
fn large_spans_are_bounded_in_bytes_while_queued() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.max_buffer_bytes(2 << 20).queue_size(1024));
    let tracer = provider.tracer("large");
    let cx = open_call(&tracer, "large-1", 0);
    let big = voice::text(7, 256 * 1024);
    let n = 120;
    for _ in 0..n {
        end_prompt_span(&tracer, &cx, big.clone());
    }
    cx.span().end();
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    let n = n as u64 + 1;
    assert!(
        s.spans_dropped_queue_full > 0,
        "{n} spans of 256 KB never met a 1 MiB queue bound: {s:?}"
    );
    assert_eq!(
        s.detail_spans_sent + s.spans_dropped_queue_full + s.spans_dropped_buffer_full,
        n,
        "{s:?}"
    );
    let core = rx.core_of("large-1").unwrap();
    assert_eq!(core["telemetry_summary"]["total_spans"], n);
    provider.shutdown().unwrap();
}

#[test]
fn a_full_queue_drops_detail_but_never_the_summary() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.queue_size(1));
    let tracer = Arc::new(provider.tracer("flood"));
    let cx = open_call(&*tracer, "flood-1", 0);
    let big = Arc::new(voice::text(1, 256 * 1024));
    let per_thread = 150;
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (tracer, cx, big) = (tracer.clone(), cx.clone(), big.clone());
            s.spawn(move || {
                for _ in 0..per_thread {
                    end_prompt_span(&*tracer, &cx, big.to_string());
                }
            });
        }
    });
    cx.span().end();
    provider.force_flush().unwrap();
    let n = 2 * per_thread as u64 + 1;
    let s = stats.snapshot();
    assert_eq!(s.spans_seen, n);
    assert!(
        s.spans_dropped_queue_full > 0,
        "queue of 1 never filled: {s:?}"
    );
    assert_eq!(s.detail_spans_sent + s.spans_dropped_queue_full, n, "{s:?}");
    let core = rx.core_of("flood-1").unwrap();
    assert_eq!(
        core["telemetry_summary"]["total_spans"], n,
        "the summary counts every span"
    );
    provider.shutdown().unwrap();
}

#[test]
fn the_call_id_set_on_the_root_after_start_still_groups_its_children() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b);
    let tracer = provider.tracer("late-id");
    let root = tracer.start("agent_session");
    let trace_id = root.span_context().trace_id();
    let cx = Context::new().with_span(root);
    // children end before the root knows its call id
    for name in ["stt", "llm_request", "tts_request"] {
        tracer.start_with_context(name, &cx).end();
    }
    cx.span()
        .set_attribute(KeyValue::new("call_id", "joined-1"));
    cx.span().end();
    provider.force_flush().unwrap();
    let core = rx
        .core_of("joined-1")
        .expect("the call is named by its late id");
    assert_eq!(core["telemetry_summary"]["total_spans"], 4);
    assert!(
        core["trace_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &format!("{trace_id:032x}"))
    );
    assert_eq!(detail_span_ids(&rx.details(), "joined-1").len(), 4);
    assert_eq!(stats.snapshot().calls_joined, 1);
    provider.shutdown().unwrap();
}

/// The call id can also arrive in baggage, after some of the trace's spans already ended
/// without one: the span that starts with it joins them (no span carries it as an attribute).
#[test]
fn a_call_id_first_seen_in_baggage_joins_the_spans_that_ended_before_it() {
    use opentelemetry::baggage::BaggageExt;
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b);
    let tracer = provider.tracer("baggage-id");
    let root = tracer.start("agent_session");
    let cx = Context::new().with_span(root);
    for name in ["stt", "llm_request"] {
        tracer.start_with_context(name, &cx).end();
    }
    let with_id = cx.with_baggage(vec![KeyValue::new("call_id", "joined-2")]);
    tracer.start_with_context("tts_request", &with_id).end();
    cx.span().end();
    provider.force_flush().unwrap();
    let core = rx
        .core_of("joined-2")
        .expect("the call is named by the id its baggage carried");
    assert_eq!(core["telemetry_summary"]["total_spans"], 4);
    assert_eq!(detail_span_ids(&rx.details(), "joined-2").len(), 4);
    let s = stats.snapshot();
    assert_eq!(s.calls_joined, 1);
    assert_eq!(s.calls_started, 1);
    assert_eq!(s.late_spans, 0);
    provider.shutdown().unwrap();
}

/// Spans are packed into their call's chunk on the app thread and handed over when the chunk
/// fills up; a quiet call's few spans must still stream out (the worker takes chunks older than
/// a tick, then its batch timeout sends them) while the call stays open.
#[test]
fn a_quiet_open_call_streams_its_spans_without_ending() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.batch_timeout(Duration::from_millis(50)));
    let tracer = provider.tracer("quiet");
    let cx = open_call(&tracer, "quiet-1", 3);
    assert!(
        rx.wait_for(WAIT, |r| detail_span_ids(
            &r.iter().filter(|r| r.ok()).cloned().collect::<Vec<_>>(),
            "quiet-1"
        )
        .len()
            == 3),
        "the open call's 3 spans never arrived: {:?}",
        stats.snapshot()
    );
    assert!(rx.core_of("quiet-1").is_none(), "the call is still open");
    assert_eq!(stats.snapshot().calls_open, 1);
    cx.span().end();
    provider.force_flush().unwrap();
    assert_eq!(detail_span_ids(&rx.details(), "quiet-1").len(), 4);
    provider.shutdown().unwrap();
}

/// `force_flush` delivers the spans of open calls still packed in their chunks.
#[test]
fn force_flush_delivers_spans_of_open_calls() {
    let rx = Receiver::start();
    // The batch timeout is far away: only the flush can send these spans.
    let (provider, stats) = setup(&rx, |b| b.batch_timeout(Duration::from_secs(3600)));
    let tracer = provider.tracer("flush-open");
    let calls: Vec<Context> = (0..5)
        .map(|c| open_call(&tracer, &format!("open-{c}"), 7))
        .collect();
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.detail_spans_sent, 5 * 7, "{s:?}");
    for c in 0..5 {
        assert_eq!(
            detail_span_ids(&rx.details(), &format!("open-{c}")).len(),
            7
        );
    }
    assert_eq!(s.calls_open, 5);
    drop(calls);
    provider.shutdown().unwrap();
}

/// `CALLSCOPE_DETAIL=critical` sends tool calls, errors and slow spans as detail and counts
/// every other span as filtered, from two threads at once (the count is kept per thread);
/// the summary still counts every span.
#[test]
fn critical_detail_sends_tools_errors_and_slow_spans_and_counts_the_rest() {
    use opentelemetry::trace::Status;
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| {
        b.detail(DetailMode::Critical)
            .critical_threshold(Duration::from_millis(1000))
    });
    let tracer = provider.tracer("critical");
    let cx = support::open_root(&tracer, "critical-call");
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for th in 0..2u64 {
            let (tracer, cx, barrier) = (&tracer, &cx, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..50u64 {
                    let start = t0(th) + Duration::from_secs(i);
                    let (name, ms) = match i % 10 {
                        0 => ("function_tool", 5),
                        1 => ("llm_request", 2500),
                        _ => ("tts_request", 40),
                    };
                    let mut span = tracer
                        .span_builder(name)
                        .with_start_time(start)
                        .start_with_context(tracer, cx);
                    if i % 10 == 2 {
                        span.set_status(Status::error("tts failed"));
                    }
                    span.end_with_timestamp(start + Duration::from_millis(ms));
                }
            });
        }
    });
    cx.span().end();
    provider.force_flush().unwrap();
    let st = stats.snapshot();
    // Per thread: 5 tool calls, 5 slow llm spans, 5 errors are critical; 35 are not.
    assert_eq!(st.detail_spans_sent, 30);
    assert_eq!(
        st.detail_spans_filtered,
        70 + 1,
        "the 70 plain spans and the root"
    );
    assert_eq!(st.spans_dropped(), 0);
    let core = rx.core_of("critical-call").unwrap();
    assert_eq!(core["telemetry_summary"]["total_spans"], 101);
    assert_eq!(core["telemetry_summary"]["error_count"], 10);
    provider.shutdown().unwrap();
}

/// A span named in `CALLSCOPE_ROOT_SPAN_NAMES` ends its call even when it has a parent (an
/// agent whose call span sits under a process-wide span); a span of another name does not.
#[test]
fn a_configured_root_name_ends_its_call_under_a_parent() {
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.root_span_names(["phone_call"]));
    let tracer = provider.tracer("roots");
    let process = tracer.start_with_context("worker_process", &Context::new());
    let process_cx = Context::new().with_span(process);
    for (call, name) in [("by-name", "phone_call"), ("not-a-root", "agent_session")] {
        let call_span = tracer
            .span_builder(name)
            .with_attributes([KeyValue::new("call_id", call)])
            .start_with_context(&tracer, &process_cx);
        let cx = process_cx.with_span(call_span);
        tracer.start_with_context("llm_request", &cx).end();
        cx.span().end();
    }
    provider.force_flush().unwrap();
    let core = rx
        .core_of("by-name")
        .expect("the named root ended its call");
    assert_eq!(core["end_reason"], "root_span_ended");
    assert_eq!(core["telemetry_summary"]["total_spans"], 2);
    assert!(
        rx.core_of("not-a-root").is_none(),
        "agent_session is not a root name here"
    );
    assert_eq!(stats.snapshot().calls_open, 1);
    process_cx.span().end();
    provider.shutdown().unwrap();
}

/// No two acknowledged detail batches share an idempotency key (a call's batch number used
/// twice: the receiver would drop the second as a duplicate).
fn assert_no_batch_number_reused(rx: &Receiver) {
    let details = rx.details();
    let mut seen = HashSet::new();
    let repeated: Vec<String> = details
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .filter(|k| !seen.insert(k.clone()))
        .collect();
    let batches: Vec<_> = details
        .iter()
        .map(|r| (&r.idempotency_key, &r.json["late"], &r.json["final"]))
        .collect();
    assert!(repeated.is_empty(), "{repeated:?} reused in {batches:#?}");
}

/// A late batch goes out while the call's final is still held (its core not yet answered);
/// the final's acknowledgement must not move the call's batch counter back under the late
/// batch's number, or the next late batch reuses it (the receiver drops it as a duplicate).
#[test]
fn a_late_batch_number_is_not_reused_after_the_final_is_acknowledged() {
    use std::sync::Mutex;
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, go_rx) = (Mutex::new(seen_tx), Mutex::new(go_rx));
    let rx = Receiver::scripted(move |_, body, _| {
        if body.get("update_type").is_none() {
            // The core: say it arrived, then answer only when the test says so.
            let _ = seen_tx.lock().unwrap().send(());
            // (block_in_place: the receiver's other tasks move to its other thread meanwhile)
            tokio::task::block_in_place(|| {
                let _ = go_rx.lock().unwrap().recv_timeout(WAIT);
            });
        }
        Reply::ok()
    });
    let (provider, stats) = setup(&rx, |b| {
        b.batch_timeout(Duration::from_millis(20))
            .timeout(Duration::from_secs(30))
    });
    let tracer = provider.tracer("late-seq");
    let cx = open_call(&tracer, "late-seq-1", 2);
    cx.span().end();
    // The core was dispatched: the call is finished (final held) before any later span is read.
    seen_rx.recv_timeout(WAIT).unwrap();
    tracer.start_with_context("llm_request", &cx).end();
    assert!(
        rx.wait_for(WAIT, |r| r.iter().any(|r| !r.is_core()
            && r.call_id() == "late-seq-1"
            && r.json["late"] == true)),
        "the late batch never arrived"
    );
    go_tx.send(()).unwrap();
    provider.force_flush().unwrap();
    tracer.start_with_context("tts_request", &cx).end();
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.late_spans, 2);
    assert_no_batch_number_reused(&rx);
    provider.shutdown().unwrap();
}

/// A trace without a call id (a provisional call) names, in baggage, a call that already
/// ended: nothing is folded (the provisional call lives on), so the worker must not redirect
/// it (it did: the ended call got a fresh buffer numbered from 0, its final's number, and the
/// provisional call's final reused the number of its first batch).
#[test]
fn a_provisional_call_naming_an_ended_call_reuses_no_batch_number() {
    use opentelemetry::baggage::BaggageExt;
    let rx = Receiver::start();
    let (provider, stats) = setup(&rx, |b| b.batch_timeout(Duration::from_secs(3600)));
    let tracer = provider.tracer("join-ended");
    let cx = open_call(&tracer, "ended-1", 2);
    cx.span().end();
    provider.force_flush().unwrap();
    // Another trace, no call id yet: a provisional call; the flush sends its span.
    let root = tracer.start("agent_session");
    let trace_key = format!("{:032x}", root.span_context().trace_id());
    let pcx = Context::new().with_span(root);
    tracer.start_with_context("stt", &pcx).end();
    provider.force_flush().unwrap();
    // A span starts with the ended call's id in baggage, and ends: a late span of "ended-1".
    let with_id = pcx.with_baggage(vec![KeyValue::new("call_id", "ended-1")]);
    let mut s = tracer.start_with_context("tts_request", &with_id);
    provider.force_flush().unwrap();
    s.end();
    provider.force_flush().unwrap();
    // The provisional call ends by itself (shutdown) with its own spans.
    provider.shutdown().unwrap();
    let st = stats.snapshot();
    assert_eq!(st.late_spans, 1, "{st:?}");
    assert_eq!(st.spans_dropped(), 0);
    assert_no_batch_number_reused(&rx);
    assert_eq!(detail_span_ids(&rx.details(), "ended-1").len(), 4);
    let prov_core = rx
        .core_of(&trace_key)
        .expect("the provisional call's summary");
    assert_eq!(
        detail_span_ids(&rx.details(), &trace_key).len() as u64,
        prov_core["telemetry_summary"]["total_spans"]
            .as_u64()
            .unwrap()
    );
}

/// A call's root span, ended, as the SDK hands it to a processor: trace `trace`, `call_id` set.
fn root_span(trace: u128, call_id: &str) -> opentelemetry_sdk::trace::SpanData {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    let t0 = t0(1);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace),
            SpanId::from(1),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: "agent_session".into(),
        start_time: t0,
        end_time: t0 + Duration::from_secs(1),
        attributes: vec![KeyValue::new("call_id", call_id.to_owned())],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: Default::default(),
    }
}

/// A processor dropped without `shutdown` (never registered with a provider, or leaked out of
/// one) has its worker deliver what it can "briefly": 5 s, then what is undelivered is counted.
/// The closed control channel must not win every turn of the worker's loop (the tick that
/// enforces the deadline is then never taken: it spins, retrying, far past the 5 s).
#[test]
fn a_processor_dropped_without_shutdown_gives_up_after_its_grace_period() {
    use opentelemetry_sdk::trace::SpanProcessor;
    // The receiver never takes anything: the summary is retried until the worker gives up.
    let rx = Receiver::scripted(|_, _, _| Reply::status(503));
    support::init_logs();
    let p = CallSpanProcessor::builder()
        .without_env()
        .endpoint(rx.url())
        .agent_id("test-agent")
        .retry_max_elapsed(Duration::from_secs(300))
        .build()
        .unwrap();
    let stats = p.stats_handle();
    p.on_end(root_span(0xd0, "dropped-1"));
    assert!(
        rx.wait_for(WAIT, |r| !r.is_empty()),
        "the summary was never tried"
    );
    drop(p);
    assert!(
        rx.wait_for(Duration::from_secs(20), |_| stats
            .snapshot()
            .summaries_failed
            == 1),
        "20 s after the drop the undelivered summary is still not given up: {:?}",
        stats.snapshot()
    );
}

/// A summary-only processor sending to `url` (set up further by `tweak`), not registered in a
/// provider, with `calls` calls (one root span each) ended on it.
fn calls_ended(
    url: &str,
    calls: u64,
    tweak: impl FnOnce(CallSpanProcessorBuilder) -> CallSpanProcessorBuilder,
) -> (CallSpanProcessor, StatsHandle) {
    use opentelemetry_sdk::trace::SpanProcessor;
    support::init_logs();
    let p = tweak(
        CallSpanProcessor::builder()
            .without_env()
            .endpoint(url)
            .agent_id("test-agent")
            .detail(DetailMode::None),
    )
    .build()
    .unwrap();
    let stats = p.stats_handle();
    for i in 0..calls {
        p.on_end(root_span(0x1000 + u128::from(i), &format!("call-{i}")));
    }
    (p, stats)
}

/// Call ends against a slow receiver (each answer after 1 s): at most 128 summary uploads
/// are in flight at once (a connection each), the rest wait their turn, and every summary is
/// delivered. Without the cap all 400 went at once.
#[test]
fn summary_uploads_in_flight_are_capped_and_every_summary_is_delivered() {
    use opentelemetry_sdk::trace::SpanProcessor;
    use std::time::Instant;
    const CALLS: u64 = 400;
    let rx = Receiver::scripted(|_, _, _| Reply::ok().delayed(Duration::from_secs(1)));
    let (p, stats) = calls_ended(&rx.url(), CALLS, |b| b);
    assert!(
        rx.wait_for(WAIT, |r| r.len() as u64 >= CALLS),
        "{} of {CALLS} summaries arrived",
        rx.requests().len()
    );
    // The most requests the receiver held at once: arrivals and answers in time order (at the
    // same instant an answer goes first). A request arrives only after the sender sent it, and
    // its answer comes before the sender's slot frees: this is at most what the sender held.
    let mut events: Vec<(Instant, i32)> = rx
        .requests()
        .iter()
        .flat_map(|r| [(r.arrived, 1), (r.answered, -1)])
        .collect();
    events.sort();
    let peak = events
        .iter()
        .scan(0, |held, (_, d)| {
            *held += d;
            Some(*held)
        })
        .max()
        .unwrap_or(0);
    assert!(peak <= 128, "{peak} summary uploads in flight at once");
    assert!(
        peak >= 64,
        "only {peak} at once: the uploads did not overlap"
    );
    p.shutdown().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.summaries_sent, CALLS, "{s:?}");
    assert_eq!(s.summaries_failed, 0);
}

/// Call ends past the worker's backlog: summaries outstanding up to its limit (1,024 at least),
/// as many ends again waiting in the control channel, the rest dropped at the processor.
const FLOOD_CALLS: u64 = 2_200;

/// A processor whose receiver is down (every connection dropped at once: each summary is
/// retried, for up to 300 s), with [`FLOOD_CALLS`] calls ended on it; and that receiver.
/// `max_open_calls` is below the 1,024 the backlog limits start from; only summaries are sent.
fn flooded() -> (CallSpanProcessor, StatsHandle, FaultProxy) {
    let down = FaultProxy::start(None, |_| Fault::Pass);
    down.set_down(true);
    let (p, stats) = calls_ended(&down.url(), FLOOD_CALLS, |b| {
        b.retry_max_elapsed(Duration::from_secs(300))
            .max_open_calls(100)
    });
    (p, stats, down)
}

/// A shutdown during a flood of call ends against a down receiver: its stop request comes
/// behind ends the worker holds back. It must still reach the worker, which then counts every
/// summary it could not deliver before it answers (before, the shutdown timed out waiting and
/// the summaries outstanding or held back were never counted). The calls still open, which the
/// shutdown ends itself, are not dropped at the full bound on queued ends.
#[test]
fn a_shutdown_behind_a_backlog_of_call_ends_counts_every_undelivered_summary() {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::trace::SpanProcessor;
    const OPEN: u64 = 50;
    let (p, stats, _down) = flooded();
    for i in 0..OPEN {
        // A child span naming its call: the call stays open until the shutdown ends it.
        let mut child = root_span(0, "");
        child.span_context = SpanContext::new(
            TraceId::from(0x9000 + u128::from(i)),
            SpanId::from(2),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        child.parent_span_id = SpanId::from(1);
        child.name = "llm_request".into();
        child.attributes = vec![KeyValue::new("call_id", format!("open-{i}"))];
        p.on_end(child);
    }
    assert_eq!(stats.snapshot().calls_open, OPEN);
    let dropped_before = stats.snapshot().summaries_dropped_backlog;
    let result = p.shutdown_with_timeout(Duration::from_secs(3));
    let s = stats.snapshot();
    // Nothing was delivered in time: the shutdown says so.
    assert!(
        matches!(result, Err(OTelSdkError::Timeout(_))),
        "{result:?}"
    );
    assert_eq!(s.summaries_sent, 0);
    assert!(dropped_before > 0, "no backlog was reached: {s:?}");
    assert_eq!(s.summaries_dropped_backlog, dropped_before, "{s:?}");
    assert_eq!(s.summaries_failed, FLOOD_CALLS + OPEN, "{s:?}");
}

/// The same flood with the processor dropped without a shutdown: its closed channel is behind
/// the held-back ends too, and the worker's grace period (5 s) must still end with every
/// undelivered summary counted.
#[test]
fn a_processor_dropped_behind_a_backlog_of_call_ends_counts_every_undelivered_summary() {
    let (p, stats, down) = flooded();
    drop(p);
    // Looked at on each refused connection (the retries), and at least every 200 ms.
    down.wait_for(Duration::from_secs(20), |_, _| {
        stats.snapshot().summaries_failed >= FLOOD_CALLS
    });
    let s = stats.snapshot();
    assert!(
        s.summaries_dropped_backlog > 0,
        "no backlog was reached: {s:?}"
    );
    assert_eq!(s.summaries_failed, FLOOD_CALLS, "{s:?}");
}
