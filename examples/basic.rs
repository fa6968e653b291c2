//! A tiny simulated voice call through `CallSpanProcessor` to `CALLSCOPE_ENDPOINT`.
//!
//! ```sh
//! cargo run -p callscope-ingest -- --no-auth &          # a receiver on 127.0.0.1:4380
//! CALLSCOPE_ENDPOINT=http://127.0.0.1:4380/v1/calls cargo run --example basic
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use callscope::CallSpanProcessor;
use opentelemetry::trace::{Span, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

fn main() -> ExitCode {
    let processor = match CallSpanProcessor::from_env() {
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
                .with_service_name("basic-example-agent")
                .build(),
        )
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("basic");

    // The app's own tracing code: nothing callscope-specific but a call id on the root span.
    let session = tracer
        .span_builder("agent_session")
        .with_attributes(vec![KeyValue::new("call_id", "basic-call-1")])
        .start(&tracer);
    let cx = Context::new().with_span(session);
    for turn in 0..3 {
        let mut user = tracer.start_with_context("user_turn", &cx);
        user.set_attribute(KeyValue::new(
            "lk.user_transcript",
            format!("question number {turn}"),
        ));
        user.end();
        let agent_cx = cx.with_span(tracer.start_with_context("agent_turn", &cx));
        let mut llm = tracer.start_with_context("llm_node", &agent_cx);
        llm.set_attribute(KeyValue::new(
            "lk.response.text",
            format!("answer number {turn}"),
        ));
        llm.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", 120_i64));
        llm.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", 30_i64));
        llm.end();
        tracer.start_with_context("tts_node", &agent_cx).end();
        agent_cx.span().end();
    }
    cx.span().end(); // the root span ends: the call's summary is sent now

    if let Err(e) = provider.shutdown() {
        eprintln!("shutdown: {e}");
    }
    let s = stats.snapshot();
    println!(
        "spans seen {}, summaries sent {} (failed {}), detail spans sent {}, dropped {}",
        s.spans_seen,
        s.summaries_sent,
        s.summaries_failed,
        s.detail_spans_sent,
        s.spans_dropped()
    );
    if s.summaries_sent == 1 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
