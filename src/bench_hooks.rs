//! **Unstable, not part of the API.** Thin wrappers over the pipeline's pure stages, so the
//! criterion benches in `benches/` can time each stage alone on the same code the processor runs.
//! Anything here may change or disappear in any release; applications must not use it.

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SpanData;

use crate::batch::CallBuffer;
use crate::call::{CallState, SpanView};
use crate::config::Config;
use crate::payload;
use crate::registry::Registry;
use crate::semantics;
use crate::stats::Counters;
use crate::transport::{Sink, Transport};
use crate::{CallSpanProcessor, ConfigError};

/// The key table with no call-id key, built once (building it per span would time the build).
fn default_keys() -> &'static semantics::KeyTable {
    static KEYS: std::sync::OnceLock<semantics::KeyTable> = std::sync::OnceLock::new();
    KEYS.get_or_init(semantics::KeyTable::default)
}

/// The call-id keys, prepared once as the processor prepares them.
#[derive(Debug, Clone)]
pub struct Keys(semantics::KeyTable);

impl Keys {
    /// Prepares `keys` (first wins).
    pub fn new(keys: &[String]) -> Self {
        Keys(semantics::KeyTable::new(keys))
    }
}

/// Span classification and fact reading (`on_end`'s single attribute pass); returns the
/// operation name and whether a call id was found under `keys`.
pub fn classify(span: &SpanData, keys: &Keys) -> (&'static str, bool) {
    let (op, facts) = semantics::read_span(&span.name, &span.attributes, &keys.0);
    (op.as_str(), facts.call_id.is_some())
}

/// Call-id resolution from attributes (what `on_start` does for a root span): whether an id
/// was found under `keys`.
pub fn find_call_id(attrs: &[KeyValue], keys: &Keys) -> bool {
    semantics::find_call_id(attrs, &keys.0).is_some()
}

/// The call table alone (`on_end` without the hand-off to the worker): call-id resolution
/// through the per-thread cache or the trace index, aggregate update under the call's lock, call ends.
#[derive(Debug)]
pub struct CallTable {
    reg: Registry,
}

impl CallTable {
    /// An empty table with `config`'s limits.
    pub fn new(config: Config) -> Self {
        CallTable {
            reg: Registry::new(Arc::new(config), Arc::new(Counters::default())),
        }
    }

    /// Records one ended span; returns how many calls it ended.
    pub fn record(&self, span: &SpanData) -> usize {
        self.reg
            .record(span, self.reg.now_ns(), &crate::registry::Discard)
            .ended
            .len()
    }

    /// Calls open now.
    pub fn open_calls(&self) -> usize {
        self.reg.open_calls()
    }
}

/// One call's running state (aggregates, top-5, transcript, turn records), fed span by span.
#[derive(Debug)]
pub struct Aggregate {
    state: CallState,
    keys: semantics::KeyTable,
}

impl Aggregate {
    /// An empty call; `keys` are the call-id keys read from each span.
    pub fn new(keys: Vec<String>) -> Self {
        Aggregate {
            state: CallState::new(Arc::from("bench-call"), false, 0, 500_000),
            keys: semantics::KeyTable::new(&keys),
        }
    }

    /// Reads and adds one span (classification plus aggregate update).
    pub fn record(&mut self, span: &SpanData) {
        self.state.record(&SpanView::read(span, &self.keys), 0);
    }

    /// Spans recorded.
    pub fn total_spans(&self) -> u64 {
        self.state.agg.total_spans
    }

    /// The core summary body (phase 1), at most `max_bytes`; `None` if it cannot fit.
    pub fn core_json(&self, max_bytes: usize) -> Option<Vec<u8>> {
        payload::core_body(&self.state, "bench-agent", "root_span_ended", max_bytes)
            .ok()
            .map(|c| c.json)
    }

    /// The `transcript_with_metrics` array of the final detail batch.
    pub fn transcript_with_metrics(&self, budget: usize) -> Vec<u8> {
        payload::transcript_with_metrics(&self.state.turns.in_time_order(), budget).0
    }
}

/// Appends every span of `packed` (see [`pack`]) as `session_traces` JSON elements, as the
/// worker serialises a chunk; returns how many values were shortened to fit `budget`.
pub fn write_spans(out: &mut Vec<u8>, packed: &[u8], budget: usize) -> u64 {
    let mut spans = crate::packed::Unpacker::new(packed);
    let mut cut = 0;
    while let Some(Ok(s)) = spans.next_span() {
        cut += payload::write_span(out, &s, budget);
    }
    cut
}

/// Packs one span as the app thread does into its call's chunk (see `packed`); returns the
/// bytes appended.
pub fn pack(out: &mut Vec<u8>, span: &SpanData) -> usize {
    let (op, _) = semantics::read_span(&span.name, &span.attributes, default_keys());
    let dur = crate::call::span_duration(span.start_time, span.end_time);
    crate::packed::pack(out, span, op, dur, usize::MAX)
}

/// Reads packed spans back as the worker does before serialising them (no copy: each is a
/// view of the bytes); returns how many.
pub fn unpack(bytes: &[u8]) -> usize {
    crate::packed::Unpacker::new(bytes).count()
}

/// The per-call byte-capped batcher: push serialized spans, get full batches back.
#[derive(Debug, Default)]
pub struct Batcher {
    buf: CallBuffer,
}

impl Batcher {
    /// Adds a serialized span; returns the byte size of the batch it completed, if any.
    pub fn push(&mut self, span: &[u8], budget: usize) -> Option<usize> {
        self.buf
            .push(span, budget, Instant::now())
            .map(|l| l.bytes.len())
    }

    /// Takes what is held (the last batch); returns its byte size.
    pub fn take(&mut self) -> usize {
        self.buf.take().bytes.len()
    }
}

/// The transport's body encoder (gzip at the level the worker uses when `config` asks for it).
#[derive(Debug)]
pub struct Encoder {
    transport: Transport,
}

impl Encoder {
    /// An encoder for `config` (builds, but never uses, the HTTP client).
    pub fn new(config: &Config) -> Option<Self> {
        Transport::new(config, Arc::new(Counters::default()))
            .ok()
            .map(|transport| Encoder { transport })
    }

    /// The body as it would go on the wire.
    pub fn encode(&self, json: &[u8]) -> bytes::Bytes {
        self.transport.encode(json).bytes
    }
}

/// A [`CallSpanProcessor`] whose I/O stage consumes into a no-op sink: the worker receives the
/// detail queue and the call ends as usual, builds each core, and acknowledges every payload at
/// once without serializing, compressing or sending it (counted as sent in `stats()`). The
/// counterpart of the SDK's `BatchSpanProcessor` with a no-op exporter.
pub fn null_sink_processor(config: Config) -> Result<CallSpanProcessor, ConfigError> {
    CallSpanProcessor::with_sink(config, Sink::Null)
}

/// `json` gzip-compressed at `level` (0-9), as the transport compresses bodies.
pub fn gzip(json: &[u8], level: u32) -> Vec<u8> {
    crate::transport::gzip(json, level)
}

/// `json` gzip-compressed at `level` by flate2, the transport's compressor without the
/// `libdeflate` feature (for the comparison in the same run).
pub fn gzip_flate2(json: &[u8], level: u32) -> Vec<u8> {
    crate::transport::gzip_flate2(json, level)
}

/// The gzip level the transport uses for request bodies.
pub const GZIP_LEVEL: u32 = crate::transport::GZIP_LEVEL;
