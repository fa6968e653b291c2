//! Wire contract v1: the core summary (phase 1) and detail batches (phase 2), as JSON bytes.
//!
//! Spans are written straight into a byte buffer (no intermediate `serde_json::Value`); the
//! core is a serde struct, shortened until it fits `CALLSCOPE_MAX_SUMMARY_BYTES`.

use std::time::SystemTime;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use serde::Serialize;

use crate::call::{CallState, TurnRecord, ms, truncate_str};
use crate::packed::{AttrRef, SpanRef, StatusRef, ValueRef};
use crate::semantics::Operation;

/// Schema version carried by every body.
pub(crate) const SCHEMA_VERSION: u32 = 1;
/// Marker appended to an attribute value shortened to fit the request cap.
const TRUNCATION_MARK: &str = "…[truncated by callscope]";
/// Text kept per transcript line once a summary must shrink.
const SHORT_LINE_BYTES: usize = 1000;

/// RFC 3339 UTC with nanoseconds and a `Z` (see [`crate::rfc3339`]).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    crate::rfc3339::string(t)
}

/// Whether JSON needs to escape any byte of `b` (`"`, `\\` or a control character below
/// 0x20), eight bytes at a time: a byte-by-byte scan of 1 KB attribute values was a tenth of
/// the worker's time in the throughput scenario (perf), as much as half of deflate's.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero iff its high bit is set here (exact for "any byte", which is all
    // that is asked: a borrow only reaches bytes above one that is really zero).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    // Below 0x20: the top three bits are zero. Then the two characters by equality.
    let special = |x: u64| {
        zero(x & (0xE0 * ONES))
            | zero(x ^ (u64::from(b'"') * ONES))
            | zero(x ^ (u64::from(b'\\') * ONES))
            != 0
    };
    let word = |w: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        u64::from_le_bytes(a)
    };
    if b.len() < 8 {
        // Most keys and names: one word, padded with spaces (which need no escaping).
        let mut a = [b' '; 8];
        a[..b.len()].copy_from_slice(b);
        return special(u64::from_le_bytes(a));
    }
    let mut words = b.chunks_exact(8);
    if words.by_ref().any(|w| special(word(w))) {
        return true;
    }
    // The last bytes, as the word that ends the string (it overlaps the one before).
    !words.remainder().is_empty() && special(word(&b[b.len() - 8..]))
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Most values need no escaping (JSON escapes only `"`, `\\` and control characters):
    // copy those in one go instead of byte by byte.
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `"<hex>"`: the low `digits` hex digits of `v`, lowercase, without allocating.
fn push_hex(out: &mut Vec<u8>, v: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'"'; 34];
    let n = digits as usize;
    for (i, b) in buf[1..=n].iter_mut().enumerate() {
        *b = HEX[((v >> ((n - 1 - i) * 4)) & 0xf) as usize];
    }
    out.extend_from_slice(&buf[..n + 2]);
}

fn push_trace_id(out: &mut Vec<u8>, t: TraceId) {
    push_hex(out, u128::from_be_bytes(t.to_bytes()), 32);
}

fn push_span_id(out: &mut Vec<u8>, s: SpanId) {
    push_hex(out, u128::from(u64::from_be_bytes(s.to_bytes())), 16);
}

fn push_key(out: &mut Vec<u8>, first: &mut bool, key: &str) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    push_str(out, key);
    out.push(b':');
}

fn push_f64(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &f);
    } else {
        out.extend_from_slice(b"null");
    }
}

fn push_time(out: &mut Vec<u8>, t: SystemTime) {
    crate::rfc3339::push_quoted(out, t);
}

fn push_capped_str(out: &mut Vec<u8>, s: &str, cap: usize, cut: &mut u64) {
    if s.len() <= cap {
        push_str(out, s);
    } else {
        *cut += 1;
        let kept = truncate_str(s, cap);
        let mut v = String::with_capacity(kept.len() + TRUNCATION_MARK.len());
        v.push_str(kept);
        v.push_str(TRUNCATION_MARK);
        push_str(out, &v);
    }
}

/// Items of eight little-endian bytes.
fn words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8).map(|w| {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        u64::from_le_bytes(a)
    })
}

/// A JSON array of `items`, each written by `each`.
fn seq<I: IntoIterator>(out: &mut Vec<u8>, items: I, mut each: impl FnMut(&mut Vec<u8>, I::Item)) {
    out.push(b'[');
    for (i, x) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, x);
    }
    out.push(b']');
}

fn push_i64(out: &mut Vec<u8>, i: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
}

fn push_bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

fn push_value(out: &mut Vec<u8>, v: &ValueRef<'_>, cap: usize, cut: &mut u64) {
    match *v {
        ValueRef::Bool(b) => push_bool(out, b),
        ValueRef::I64(i) => push_i64(out, i),
        ValueRef::F64(f) => push_f64(out, f),
        ValueRef::Str(s) => push_capped_str(out, s, cap, cut),
        ValueRef::Bools(a) => seq(out, a.iter(), |o, b| push_bool(o, *b != 0)),
        ValueRef::I64s(a) => seq(out, words(a), |o, w| push_i64(o, w as i64)),
        ValueRef::F64s(a) => seq(out, words(a), |o, w| push_f64(o, f64::from_bits(w))),
        ValueRef::Strs(a) => seq(out, a, |o, s| push_capped_str(o, s, cap, cut)),
    }
}

fn push_attrs(
    out: &mut Vec<u8>,
    attrs: &[AttrRef<'_>],
    cap: usize,
    cut: &mut u64,
    extra: Option<(&str, u64)>,
) {
    out.push(b'{');
    let mut first = true;
    for a in attrs {
        push_key(out, &mut first, a.key);
        push_value(out, &a.value, cap, cut);
    }
    if let Some((k, n)) = extra {
        push_key(out, &mut first, k);
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    out.push(b'}');
}

fn kind_str(k: &SpanKind) -> &'static str {
    match k {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

fn hex_trace(t: TraceId) -> String {
    format!("{t:032x}")
}

fn hex_span(s: SpanId) -> String {
    format!("{s:016x}")
}

/// Lengths of every string value in a span (attributes, events, links), for sizing.
fn string_lengths(span: &SpanRef<'_, '_>) -> Vec<usize> {
    let mut v = Vec::new();
    for a in span.all_attrs() {
        match a.value {
            ValueRef::Str(s) => v.push(s.len()),
            ValueRef::Strs(items) => v.extend(items.map(str::len)),
            _ => {}
        }
    }
    v
}

/// The largest per-value cap under which the string values of a span add up to `budget` bytes.
fn value_cap(mut lens: Vec<usize>, budget: usize) -> usize {
    lens.sort_unstable_by(|a, b| b.cmp(a));
    let total: usize = lens.iter().sum();
    if total <= budget {
        return usize::MAX;
    }
    // Water-filling: the values longer than `cap` are cut to `cap`.
    let (mut lo, mut hi) = (0usize, lens.first().copied().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let used: usize = lens
            .iter()
            .map(|l| (*l).min(mid) + TRUNCATION_MARK.len())
            .sum();
        if used <= budget {
            lo = mid
        } else {
            hi = mid - 1
        }
    }
    lo
}

/// Writes one span as a `session_traces` element, shortening the largest string values
/// when the span would not fit `budget` bytes. Returns how many values were shortened.
pub(crate) fn write_span(out: &mut Vec<u8>, span: &SpanRef<'_, '_>, budget: usize) -> u64 {
    let start = out.len();
    let mut cut = 0;
    write_span_capped(out, span, usize::MAX, &mut cut);
    if out.len() - start <= budget {
        return 0;
    }
    // Too big: everything that is not a string value stays; cut the strings to fit.
    let strings: usize = string_lengths(span).iter().sum();
    let fixed = (out.len() - start).saturating_sub(strings);
    let cap = value_cap(string_lengths(span), budget.saturating_sub(fixed + 64));
    out.truncate(start);
    cut = 0;
    write_span_capped(out, span, cap, &mut cut);
    cut
}

fn write_span_capped(out: &mut Vec<u8>, span: &SpanRef<'_, '_>, cap: usize, cut: &mut u64) {
    let name = truncate_str(span.name, cap.max(crate::call::MAX_NAME_BYTES));
    out.push(b'{');
    let mut f = true;
    push_key(out, &mut f, "trace_id");
    push_trace_id(out, span.trace_id);
    push_key(out, &mut f, "span_id");
    push_span_id(out, span.span_id);
    push_key(out, &mut f, "parent_span_id");
    if span.parent_span_id == SpanId::INVALID {
        out.extend_from_slice(b"null");
    } else {
        push_span_id(out, span.parent_span_id);
    }
    push_key(out, &mut f, "name");
    push_str(out, name);
    push_key(out, &mut f, "operation");
    push_str(out, span.op.as_str());
    push_key(out, &mut f, "kind");
    push_str(out, kind_str(&span.kind));
    push_key(out, &mut f, "start_time");
    push_time(out, span.start);
    push_key(out, &mut f, "end_time");
    push_time(out, span.end);
    push_key(out, &mut f, "duration_ms");
    push_f64(
        out,
        ms(span.end.duration_since(span.start).unwrap_or_default()),
    );
    push_key(out, &mut f, "status");
    match span.status {
        StatusRef::Unset => out.extend_from_slice(br#"{"code":"unset"}"#),
        StatusRef::Ok => out.extend_from_slice(br#"{"code":"ok"}"#),
        StatusRef::Error(description) => {
            out.extend_from_slice(br#"{"code":"error","message":"#);
            push_capped_str(out, description, cap, cut);
            out.push(b'}');
        }
    }
    push_key(out, &mut f, "attributes");
    // When cutting, the span says how many of its attribute values were shortened.
    let marker = (cap != usize::MAX)
        .then(|| ("callscope.truncated_values", again_count(span.attrs(), cap)))
        .filter(|(_, n)| *n > 0);
    push_attrs(out, span.attrs(), cap, cut, marker);
    push_key(out, &mut f, "events");
    seq(out, span.events, |out, e| {
        out.extend_from_slice(br#"{"name":"#);
        push_str(
            out,
            truncate_str(e.name, cap.max(crate::call::MAX_NAME_BYTES)),
        );
        out.extend_from_slice(br#","time":"#);
        push_time(out, e.time);
        out.extend_from_slice(br#","attributes":"#);
        push_attrs(out, span.attrs_of(&e.attrs), cap, cut, None);
        out.push(b'}');
    });
    push_key(out, &mut f, "links");
    seq(out, span.links, |out, l| {
        out.extend_from_slice(br#"{"trace_id":"#);
        push_trace_id(out, l.trace_id);
        out.extend_from_slice(br#","span_id":"#);
        push_span_id(out, l.span_id);
        out.extend_from_slice(br#","attributes":"#);
        push_attrs(out, span.attrs_of(&l.attrs), cap, cut, None);
        out.push(b'}');
    });
    out.push(b'}');
}

/// How many attribute values exceed `cap` (the span-level truncation marker).
fn again_count(attrs: &[AttrRef<'_>], cap: usize) -> u64 {
    let mut n = 0u64;
    for a in attrs {
        match a.value {
            ValueRef::Str(s) if s.len() > cap => n += 1,
            ValueRef::Strs(items) => n += items.filter(|s| s.len() > cap).count() as u64,
            _ => {}
        }
    }
    n
}

/// What identifies a call's detail batches.
#[derive(Debug, Clone)]
pub(crate) struct DetailMeta<'a> {
    pub call_id: &'a str,
    pub agent_id: &'a str,
}

impl DetailMeta<'_> {
    /// Bytes of a non-final body around its spans (with room for a large `batch_seq`).
    pub(crate) fn overhead(&self) -> usize {
        let mut probe = Vec::new();
        self.write_head(&mut probe, u32::MAX);
        probe.extend_from_slice(br#"]},"final":false,"late":false}"#);
        probe.len()
    }

    fn write_head(&self, out: &mut Vec<u8>, seq: u32) {
        out.extend_from_slice(br#"{"schema_version":1,"call_id":"#);
        push_str(out, self.call_id);
        out.extend_from_slice(br#","agent_id":"#);
        push_str(out, self.agent_id);
        out.extend_from_slice(br#","update_type":"detailed_telemetry","batch_seq":"#);
        out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        out.extend_from_slice(br#","telemetry_data":{"session_traces":["#);
    }

    /// A detail body: `spans` is the comma-joined span objects; `last` is the final part
    /// (`total_batches` and the `transcript_with_metrics` JSON array) for the final batch.
    pub(crate) fn body(
        &self,
        seq: u32,
        spans: &[u8],
        late: bool,
        last: Option<(u32, &[u8])>,
    ) -> Vec<u8> {
        let extra = last.map_or(0, |(_, t)| t.len() + 64);
        let mut out = Vec::with_capacity(self.overhead() + spans.len() + extra);
        self.write_head(&mut out, seq);
        out.extend_from_slice(spans);
        out.extend_from_slice(b"]}");
        match last {
            Some((total, twm)) => {
                out.extend_from_slice(br#","final":true,"total_batches":"#);
                out.extend_from_slice(itoa::Buffer::new().format(total).as_bytes());
                out.extend_from_slice(br#","transcript_with_metrics":"#);
                out.extend_from_slice(twm);
            }
            None => out.extend_from_slice(br#","final":false"#),
        }
        if late {
            out.extend_from_slice(br#","late":true"#);
        }
        out.push(b'}');
        out
    }
}

/// One `transcript_with_metrics` record.
fn write_turn(out: &mut Vec<u8>, r: &TurnRecord) {
    let opt = |out: &mut Vec<u8>, key: &[u8], v: Option<f64>| {
        out.extend_from_slice(key);
        match v {
            Some(f) => push_f64(out, f),
            None => out.extend_from_slice(b"null"),
        }
    };
    out.extend_from_slice(br#"{"turn":"#);
    out.extend_from_slice(itoa::Buffer::new().format(r.turn).as_bytes());
    out.extend_from_slice(br#","role":"#);
    push_str(out, r.role.as_str());
    out.extend_from_slice(br#","content":"#);
    push_str(out, &r.content);
    out.extend_from_slice(br#","started_at":"#);
    push_time(out, r.started_at);
    opt(out, br#","llm_latency":"#, r.llm_latency);
    opt(out, br#","tts_latency":"#, r.tts_latency);
    opt(out, br#","stt_latency":"#, r.stt_latency);
    opt(out, br#","ttft":"#, r.ttft);
    out.extend_from_slice(br#","tokens":"#);
    out.extend_from_slice(itoa::Buffer::new().format(r.tokens).as_bytes());
    out.push(b'}');
}

/// The `transcript_with_metrics` array, at most `budget` bytes: later turns are left out
/// first. Returns the JSON and how many records were left out.
pub(crate) fn transcript_with_metrics(records: &[&TurnRecord], budget: usize) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(256 * records.len().min(1024));
    out.push(b'[');
    let mut left_out = 0;
    for r in records {
        let mark = out.len();
        if mark > 1 {
            out.push(b',');
        }
        let item = out.len();
        write_turn(&mut out, r);
        // Room for the item, a comma and the closing bracket.
        if mark + (out.len() - item) + 2 > budget {
            out.truncate(mark);
            left_out += 1;
        }
    }
    out.push(b']');
    (out, left_out)
}

#[derive(Serialize)]
struct TranscriptLine<'a> {
    role: &'static str,
    content: &'a str,
    at: String,
}

#[derive(Serialize)]
struct SummaryMetrics {
    avg_latency: Option<f64>,
    total_turns: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct OpLatency {
    count: u64,
    avg: f64,
    min: f64,
    max: f64,
    /// Percentiles from a log-bucket histogram (within ~12.5 %), clamped to `[min, max]`.
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
}

#[derive(Serialize)]
struct Slow<'a> {
    name: &'a str,
    operation: &'static str,
    duration_ms: f64,
    trace_id: String,
    span_id: String,
    started_at: String,
}

#[derive(Serialize)]
struct TelemetrySummary<'a> {
    total_spans: u64,
    error_count: u64,
    avg_llm_latency: Option<f64>,
    avg_tts_latency: Option<f64>,
    avg_stt_latency: Option<f64>,
    operation_counts: serde_json::Map<String, serde_json::Value>,
    latency_by_operation: std::collections::BTreeMap<&'static str, OpLatency>,
    slowest_operations: Vec<Slow<'a>>,
}

#[derive(Serialize)]
struct Core<'a> {
    schema_version: u32,
    call_id: &'a str,
    agent_id: &'a str,
    call_started_at: String,
    call_ended_at: String,
    duration_seconds: f64,
    end_reason: &'static str,
    transcript_json: &'a [TranscriptLine<'a>],
    summary_metrics: SummaryMetrics,
    telemetry_summary: TelemetrySummary<'a>,
    /// Traces this call covers: detail sent under a trace id (before the call id was known) joins by these.
    trace_ids: Vec<String>,
    truncated: bool,
}

/// A built core body.
#[derive(Debug)]
pub(crate) struct CoreBody {
    pub json: Vec<u8>,
    pub truncated: bool,
}

/// Why a core could not be built within its cap.
#[derive(Debug, thiserror::Error)]
#[error(
    "the core summary of call {call_id} needs {needed} bytes even without its transcript; raise CALLSCOPE_MAX_SUMMARY_BYTES above {needed}"
)]
pub(crate) struct CoreTooLarge {
    pub call_id: String,
    pub needed: usize,
}

/// Builds the core summary of an ended call, never larger than `max_bytes`: the transcript is
/// shortened first (lines cut, then later lines left out), then the trace id list.
pub(crate) fn core_body(
    call: &CallState,
    agent_id: &str,
    end_reason: &'static str,
    max_bytes: usize,
) -> Result<CoreBody, CoreTooLarge> {
    let now = SystemTime::now();
    let started = call.started_at.unwrap_or(now);
    let ended = call.ended_at.unwrap_or(started).max(started);
    let agg = &call.agg;
    let mean = |op: Operation| agg.ops[op.index()].mean();
    let mut operation_counts = serde_json::Map::new();
    let mut latency_by_operation = std::collections::BTreeMap::new();
    for op in Operation::ALL {
        let s = agg.ops[op.index()];
        let h = &agg.hists[op.index()];
        if s.count > 0 {
            operation_counts.insert(op.as_str().to_owned(), s.count.into());
            latency_by_operation.insert(
                op.as_str(),
                OpLatency {
                    count: s.count,
                    avg: s.sum_ms / s.count as f64,
                    min: s.min_ms,
                    max: s.max_ms,
                    p50: h.quantile_ms(0.50, s.min_ms, s.max_ms),
                    p90: h.quantile_ms(0.90, s.min_ms, s.max_ms),
                    p99: h.quantile_ms(0.99, s.min_ms, s.max_ms),
                },
            );
        }
    }
    let slowest = agg.slowest.sorted();
    let entries = call.transcript.in_time_order();
    let lines = |cap: usize| -> Vec<TranscriptLine<'_>> {
        entries
            .iter()
            .map(|e| TranscriptLine {
                role: e.role.as_str(),
                content: truncate_str(&e.content, cap),
                at: rfc3339(e.at),
            })
            .collect()
    };
    let full = lines(usize::MAX);
    let short = lines(SHORT_LINE_BYTES);
    let mut core = Core {
        schema_version: SCHEMA_VERSION,
        call_id: &call.call_id,
        agent_id,
        call_started_at: rfc3339(started),
        call_ended_at: rfc3339(ended),
        duration_seconds: ended
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64(),
        end_reason,
        transcript_json: &full,
        summary_metrics: SummaryMetrics {
            avg_latency: agg.avg_latency(),
            total_turns: agg.turns,
            total_tokens: agg.tokens,
        },
        telemetry_summary: TelemetrySummary {
            total_spans: agg.total_spans,
            error_count: agg.error_count,
            avg_llm_latency: mean(Operation::Llm),
            avg_tts_latency: mean(Operation::Tts),
            avg_stt_latency: mean(Operation::Stt),
            operation_counts,
            latency_by_operation,
            slowest_operations: slowest
                .iter()
                .map(|s| Slow {
                    name: &s.name,
                    operation: s.op.as_str(),
                    duration_ms: ms(s.duration),
                    trace_id: hex_trace(s.trace_id),
                    span_id: hex_span(s.span_id),
                    started_at: rfc3339(s.started_at),
                })
                .collect(),
        },
        trace_ids: call.trace_ids.iter().map(|t| hex_trace(*t)).collect(),
        truncated: call.transcript.truncated,
    };
    let encode = |c: &Core<'_>| serde_json::to_vec(c).unwrap_or_default();
    let json = encode(&core);
    if json.len() <= max_bytes {
        return Ok(CoreBody {
            truncated: core.truncated,
            json,
        });
    }
    core.truncated = true;
    // 1. cut every line to a short length
    core.transcript_json = &short;
    let json = encode(&core);
    if json.len() <= max_bytes {
        return Ok(CoreBody {
            truncated: true,
            json,
        });
    }
    // 2. keep the longest prefix of lines that fits (size grows with the count: binary search)
    let (mut lo, mut hi) = (0usize, short.len());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        core.transcript_json = &short[..mid];
        if encode(&core).len() <= max_bytes {
            lo = mid
        } else {
            hi = mid - 1
        }
    }
    core.transcript_json = &short[..lo];
    let json = encode(&core);
    if json.len() <= max_bytes {
        return Ok(CoreBody {
            truncated: true,
            json,
        });
    }
    // 3. the trace id list
    core.trace_ids.truncate(1);
    let json = encode(&core);
    if json.len() <= max_bytes {
        return Ok(CoreBody {
            truncated: true,
            json,
        });
    }
    Err(CoreTooLarge {
        call_id: call.call_id.to_string(),
        needed: json.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_exactly_like_serde_json() {
        for s in [
            "plain text",
            "",
            "quote \" here",
            "back\\slash",
            "tab\tnew\nline",
            "\u{1}ctl",
            "héllo ☎",
            "\u{7f}del",
        ] {
            let mut out = Vec::new();
            push_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    proptest::proptest! {
        /// The word-at-a-time check says what a byte-by-byte one says, for any bytes at any
        /// offset (all 256 values and every position within a word).
        #[test]
        fn needs_escape_equals_the_byte_by_byte_check(
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            let slow = b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
            proptest::prop_assert_eq!(needs_escape(&b), slow);
        }
    }

    #[test]
    fn needs_escape_finds_each_special_byte_in_each_lane() {
        for len in 1..=24 {
            for at in 0..len {
                for special in (0u8..0x20).chain([b'"', b'\\']) {
                    let mut b = vec![b'a'; len];
                    b[at] = special;
                    assert!(needs_escape(&b), "{special:#x} at {at} of {len}");
                }
                for plain in [0x20u8, b'!', b'#', b'[', b']', 0x7f, 0x80, 0xe0, 0xff] {
                    let mut b = vec![b'a'; len];
                    b[at] = plain;
                    assert!(!needs_escape(&b), "{plain:#x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn ids_are_lowercase_hex_like_format() {
        for t in [
            0u128,
            1,
            0xdead_beef,
            u128::MAX,
            0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        ] {
            let mut out = Vec::new();
            push_trace_id(&mut out, TraceId::from(t));
            assert_eq!(
                out,
                format!("\"{}\"", hex_trace(TraceId::from(t))).into_bytes()
            );
        }
        for v in [0u64, 1, 0xabc, u64::MAX] {
            let mut out = Vec::new();
            push_span_id(&mut out, SpanId::from(v));
            assert_eq!(
                out,
                format!("\"{}\"", hex_span(SpanId::from(v))).into_bytes()
            );
        }
    }

    /// The serde form `transcript_with_metrics` had before it was written by hand.
    #[derive(Serialize)]
    struct TurnJson<'a> {
        turn: u64,
        role: &'static str,
        content: &'a str,
        started_at: String,
        llm_latency: Option<f64>,
        tts_latency: Option<f64>,
        stt_latency: Option<f64>,
        ttft: Option<f64>,
        tokens: u64,
    }

    fn by_serde(records: &[&TurnRecord], budget: usize) -> (Vec<u8>, u64) {
        let mut out = vec![b'['];
        let mut left_out = 0;
        for r in records {
            let item = serde_json::to_vec(&TurnJson {
                turn: r.turn,
                role: r.role.as_str(),
                content: &r.content,
                started_at: rfc3339(r.started_at),
                llm_latency: r.llm_latency,
                tts_latency: r.tts_latency,
                stt_latency: r.stt_latency,
                ttft: r.ttft,
                tokens: r.tokens,
            })
            .unwrap();
            if out.len() + item.len() + 2 > budget {
                left_out += 1;
                continue;
            }
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(&item);
        }
        out.push(b']');
        (out, left_out)
    }

    proptest::proptest! {
        /// Byte for byte what serde_json writes for the same records, and the same records
        /// left out under any budget.
        #[test]
        fn turn_records_equal_serde_json(
            recs in proptest::collection::vec(
                (0u64..1000, proptest::bool::ANY, ".{0,40}", 0u64..4_000_000_000,
                 proptest::option::of(-1.0e6f64..1.0e6), proptest::option::of(0.0f64..5000.0),
                 proptest::option::of(proptest::num::f64::ANY), 0u64..100_000),
                0..12),
            budget in 0usize..4000,
        ) {
            let records: Vec<TurnRecord> = recs
                .into_iter()
                .map(|(turn, user, content, secs, a, b, c, tokens)| TurnRecord {
                    turn,
                    role: if user { crate::call::Role::User } else { crate::call::Role::Assistant },
                    content,
                    started_at: std::time::UNIX_EPOCH + std::time::Duration::from_millis(secs),
                    llm_latency: a,
                    tts_latency: b,
                    stt_latency: c,
                    ttft: b.map(|x| x / 3.0),
                    tokens,
                })
                .collect();
            let refs: Vec<&TurnRecord> = records.iter().collect();
            for budget in [budget, usize::MAX] {
                let (ours, ours_left) = transcript_with_metrics(&refs, budget);
                let (theirs, theirs_left) = by_serde(&refs, budget);
                proptest::prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
                proptest::prop_assert_eq!(ours_left, theirs_left);
            }
        }
    }
}
