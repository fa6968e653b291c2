//! # callscope
//!
//! An OpenTelemetry span processor for voice-AI agents (LiveKit Agents, Pipecat, or a Rust
//! agent). It groups spans by call, keeps running aggregates per call, and delivers in two
//! phases:
//!
//! 1. **core** — when a call ends, a small summary (< `CALLSCOPE_MAX_SUMMARY_BYTES`, default
//!    500 KB): ids, times, text transcript, latencies per operation, top-5 slowest spans, tokens;
//! 2. **detail** — every span, streamed in byte-capped batches (`CALLSCOPE_MAX_REQUEST_BYTES`)
//!    to the detailed endpoint; the last batch goes only after the core was acknowledged.
//!
//! ## Quick start
//!
//! Register the processor in the tracer provider; nothing else in the app changes. Settings
//! come from `CALLSCOPE_*` environment variables (`CALLSCOPE_ENDPOINT` is required).
//!
//! ```no_run
//! use callscope::CallSpanProcessor;
//! use opentelemetry_sdk::trace::SdkTracerProvider;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let provider = SdkTracerProvider::builder()
//!     .with_span_processor(CallSpanProcessor::from_env()?)
//!     .build();
//! opentelemetry::global::set_tracer_provider(provider.clone());
//!
//! // ... the agent's own tracing code, unchanged ...
//!
//! provider.shutdown()?; // ends open calls and delivers what is pending
//! # Ok(()) }
//! ```
//!
//! The same in code (code wins over the environment):
//!
//! ```
//! use callscope::{CallSpanProcessor, DetailMode};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), callscope::ConfigError> {
//! let processor = CallSpanProcessor::builder()
//!     .without_env()
//!     .endpoint("http://127.0.0.1:4380/v1/calls")
//!     .api_key("secret")
//!     .detail(DetailMode::Critical)
//!     .call_idle_timeout(Duration::from_secs(30))
//!     .build()?;
//! assert_eq!(processor.stats().spans_seen, 0);
//! # Ok(()) }
//! ```
//!
//! Every drop and truncation is counted in [`CallSpanProcessor::stats`] and logged through
//! `tracing`. The wire contract and the design are described in the repository's DESIGN notes.

mod batch;
mod call;
mod config;
mod fasthash;
mod histogram;
mod packed;
mod payload;
mod processor;
mod registry;
mod retry;
mod rfc3339;
mod semantics;
mod spool;
mod stats;
mod transport;
mod worker;

/// Unstable hooks for the benches in `benches/`; not part of the API (see the module).
#[doc(hidden)]
#[path = "bench_hooks.rs"]
pub mod __bench;

pub use config::{Compression, Config, ConfigBuilder, ConfigError, DetailMode};
pub use processor::{CallSpanProcessor, CallSpanProcessorBuilder, StatsHandle};
pub use stats::Stats;

/// Names of the environment variables and their defaults.
pub mod env {
    pub use crate::config::{
        DEFAULT_BATCH_TIMEOUT, DEFAULT_CALL_ID_KEYS, DEFAULT_CALL_IDLE_TIMEOUT,
        DEFAULT_COMPRESSION, DEFAULT_CRITICAL_THRESHOLD, DEFAULT_DETAIL, DEFAULT_DISABLED,
        DEFAULT_GZIP_LEVEL, DEFAULT_GZIP_LEVEL_MAX, DEFAULT_MAX_BUFFER_BYTES,
        DEFAULT_MAX_CONCURRENT_DETAIL, DEFAULT_MAX_OPEN_CALLS, DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_SUMMARY_BYTES, DEFAULT_QUEUE_SIZE, DEFAULT_RETRY_MAX_ELAPSED,
        DEFAULT_ROOT_SPAN_NAMES, DEFAULT_SPOOL_MAX_BYTES, DEFAULT_TIMEOUT, ENV_AGENT_ID,
        ENV_API_KEY, ENV_BATCH_TIMEOUT_MS, ENV_CALL_ID_KEYS, ENV_CALL_IDLE_TIMEOUT_MS,
        ENV_COMPRESSION, ENV_CRITICAL_MS, ENV_DETAIL, ENV_DETAILED_ENDPOINT, ENV_DISABLED,
        ENV_ENDPOINT, ENV_GZIP_LEVEL, ENV_GZIP_LEVEL_MAX, ENV_HEADERS, ENV_MAX_BUFFER_BYTES,
        ENV_MAX_CONCURRENT_DETAIL, ENV_MAX_OPEN_CALLS, ENV_MAX_REQUEST_BYTES,
        ENV_MAX_SUMMARY_BYTES, ENV_OTEL_SDK_DISABLED, ENV_QUEUE_SIZE, ENV_RETRY_MAX_ELAPSED_MS,
        ENV_ROOT_SPAN_NAMES, ENV_SPOOL_DIR, ENV_SPOOL_MAX_BYTES, ENV_TIMEOUT_MS,
    };
}
