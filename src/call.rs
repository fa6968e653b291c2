//! Per-call state: running aggregates, the top-5 slowest spans, the text transcript and the
//! per-turn records. Updated in `on_end` without I/O; every structure is bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::SpanData;

use crate::fasthash::FastState;
use crate::histogram::Histogram;
use crate::packed::Chunk;
use crate::semantics::{Operation, SpanFacts};

/// How many slowest spans a summary keeps.
pub(crate) const TOP_K: usize = 5;
/// Span names kept in summaries are cut to this many bytes.
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// Trace ids remembered per call (the core names them so detail sent under a trace id joins).
pub(crate) const MAX_TRACE_IDS: usize = 256;
/// Open per-parent turn accumulators per call.
const MAX_TURN_ACCUMULATORS: usize = 1024;

/// What the aggregates need of one span: copied scalars, borrowed text.
#[derive(Debug, Clone)]
pub(crate) struct SpanView<'a> {
    pub name: &'a str,
    pub op: Operation,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: SpanId,
    pub start: SystemTime,
    pub end: SystemTime,
    /// `end - start`, read once ([`span_duration`]): the aggregates, the turns and the
    /// packed detail all need it, and each clock subtraction costs ~55 instructions.
    pub dur: Duration,
    pub is_error: bool,
    pub is_user_turn: bool,
    /// Its name is one of `CALLSCOPE_ROOT_SPAN_NAMES`.
    pub root_name: bool,
    pub facts: SpanFacts<'a>,
}

impl<'a> SpanView<'a> {
    /// The view of an ended SDK span, classified and with its facts read from its attributes
    /// (call-id keys from `keys`).
    #[inline]
    pub(crate) fn read(span: &'a SpanData, keys: &crate::semantics::KeyTable) -> Self {
        let mut v = SpanView {
            name: &span.name,
            op: Operation::Other,
            trace_id: span.span_context.trace_id(),
            span_id: span.span_context.span_id(),
            parent_span_id: span.parent_span_id,
            start: span.start_time,
            end: span.end_time,
            dur: span_duration(span.start_time, span.end_time),
            is_error: matches!(span.status, opentelemetry::trace::Status::Error { .. }),
            is_user_turn: false,
            root_name: false,
            facts: SpanFacts::default(),
        };
        let (op, named) =
            crate::semantics::read_span_into(&span.name, &span.attributes, keys, &mut v.facts);
        (v.op, v.is_user_turn, v.root_name) = (op, named.user_turn, named.root);
        v
    }

    /// The span's duration ([`span_duration`]).
    pub(crate) fn duration(&self) -> Duration {
        self.dur
    }
}

/// Duration from a span's own timestamps; an end before the start counts as zero.
pub(crate) fn span_duration(start: SystemTime, end: SystemTime) -> Duration {
    end.duration_since(start).unwrap_or(Duration::ZERO)
}

/// Milliseconds as a float.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// count / sum / min / max of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LatencyStats {
    pub count: u64,
    pub sum_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    pub(crate) fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min_ms = v;
            self.max_ms = v;
        } else {
            self.min_ms = self.min_ms.min(v);
            self.max_ms = self.max_ms.max(v);
        }
        self.count += 1;
        self.sum_ms += v;
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ms / self.count as f64)
    }

    fn merge(&mut self, o: &LatencyStats) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *o;
            return;
        }
        self.count += o.count;
        self.sum_ms += o.sum_ms;
        self.min_ms = self.min_ms.min(o.min_ms);
        self.max_ms = self.max_ms.max(o.max_ms);
    }
}

/// One of the slowest spans of a call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SlowSpan {
    pub duration: Duration,
    /// Arrival order within the call; among equal durations the earliest stays.
    pub seq: u64,
    pub name: Box<str>,
    pub op: Operation,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub started_at: SystemTime,
}

/// The k slowest spans, kept in a small fixed array (a bounded heap of size 5 is an array).
#[derive(Debug, Clone, Default)]
pub(crate) struct TopK {
    items: Vec<SlowSpan>,
    /// Duration of the fastest kept span once `TOP_K` are kept: most spans stop at this check.
    floor: Duration,
}

impl TopK {
    fn offer(&mut self, view: &SpanView<'_>, seq: u64, duration: Duration) {
        if self.items.len() == TOP_K {
            if duration <= self.floor {
                return;
            }
            // Only a strictly slower span displaces the fastest kept one.
            let Some((idx, min)) = self.min() else { return };
            if duration <= min {
                return;
            }
            self.items.swap_remove(idx);
        }
        self.items.push(SlowSpan {
            duration,
            seq,
            name: truncate_str(view.name, MAX_NAME_BYTES).into(),
            op: view.op,
            trace_id: view.trace_id,
            span_id: view.span_id,
            started_at: view.start,
        });
        self.update_floor();
    }

    fn update_floor(&mut self) {
        if self.items.len() == TOP_K
            && let Some((_, min)) = self.min()
        {
            self.floor = min;
        }
    }

    fn min(&self) -> Option<(usize, Duration)> {
        self.items
            .iter()
            .enumerate()
            // fastest first; among equal durations the latest arrival goes first
            .min_by(|a, b| a.1.duration.cmp(&b.1.duration).then(b.1.seq.cmp(&a.1.seq)))
            .map(|(i, s)| (i, s.duration))
    }

    /// Slowest first; ties by arrival.
    pub(crate) fn sorted(&self) -> Vec<SlowSpan> {
        let mut v = self.items.clone();
        v.sort_by(|a, b| b.duration.cmp(&a.duration).then(a.seq.cmp(&b.seq)));
        v
    }

    fn merge(&mut self, other: &TopK) {
        for s in &other.items {
            if self.items.len() < TOP_K {
                self.items.push(s.clone());
            } else if let Some((idx, min)) = self.min()
                && s.duration > min
            {
                self.items[idx] = s.clone();
            }
        }
        self.update_floor();
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Running aggregates of a call: exact whatever happens to the detail stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct Aggregates {
    pub total_spans: u64,
    pub error_count: u64,
    pub ops: [LatencyStats; 8],
    /// Per-operation latency histograms, for percentiles.
    pub hists: [Histogram; 8],
    pub slowest: TopK,
    pub tokens: u64,
    pub turns: u64,
    /// End of user speech → start of agent speech, where both are seen.
    pub response_latency: LatencyStats,
    last_user_speech_end: Option<SystemTime>,
    awaiting_agent_speech: bool,
}

impl Aggregates {
    /// Adds one ended span.
    pub(crate) fn record(&mut self, v: &SpanView<'_>) {
        let seq = self.total_spans;
        self.total_spans += 1;
        if v.is_error {
            self.error_count += 1;
        }
        let d = v.duration();
        self.ops[v.op.index()].add(ms(d));
        self.hists[v.op.index()].add(d);
        self.slowest.offer(v, seq, d);
        self.tokens = self.tokens.saturating_add(v.facts.tokens());
        if v.op == Operation::Turn && !v.is_user_turn {
            self.turns += 1;
        }
        // Agent response latency: user speech ends (user turn or stt), agent speech starts (tts).
        if v.is_user_turn || v.op == Operation::Stt {
            self.last_user_speech_end =
                Some(self.last_user_speech_end.map_or(v.end, |e| e.max(v.end)));
            self.awaiting_agent_speech = true;
        } else if v.op == Operation::Tts
            && self.awaiting_agent_speech
            && let Some(user_end) = self.last_user_speech_end
            && let Ok(gap) = v.start.duration_since(user_end)
        {
            self.response_latency.add(ms(gap));
            self.awaiting_agent_speech = false;
        }
    }

    /// `avg_latency`: mean agent response latency where known, else the mean turn span duration.
    pub(crate) fn avg_latency(&self) -> Option<f64> {
        self.response_latency
            .mean()
            .or_else(|| self.ops[Operation::Turn.index()].mean())
    }

    /// Folds another call's aggregates into this one (a provisional call joining its real id).
    fn merge(&mut self, o: &Aggregates) {
        self.total_spans += o.total_spans;
        self.error_count += o.error_count;
        for (a, b) in self.ops.iter_mut().zip(o.ops.iter()) {
            a.merge(b);
        }
        for (a, b) in self.hists.iter_mut().zip(o.hists.iter()) {
            a.merge(b);
        }
        self.slowest.merge(&o.slowest);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.turns += o.turns;
        self.response_latency.merge(&o.response_latency);
    }
}

/// Who spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    User,
    Assistant,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One line of the text transcript.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TranscriptEntry {
    pub role: Role,
    pub content: String,
    pub at: SystemTime,
}

/// The text transcript, bounded by bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transcript {
    pub entries: Vec<TranscriptEntry>,
    bytes: usize,
    /// Text was cut or left out because the call's cap was reached.
    pub truncated: bool,
}

impl Transcript {
    /// Adds a line unless it repeats the previous line of the same role (LiveKit puts the
    /// response text on both the llm node and the turn). Returns whether text was cut.
    fn push(&mut self, role: Role, content: &str, at: SystemTime, cap: usize) -> bool {
        if self
            .entries
            .iter()
            .rev()
            .find(|e| e.role == role)
            .is_some_and(|e| e.content == content)
        {
            return false;
        }
        let room = cap.saturating_sub(self.bytes);
        if room == 0 {
            self.truncated = true;
            return true;
        }
        let kept = truncate_str(content, room);
        let cut = kept.len() < content.len();
        self.bytes += kept.len();
        self.entries.push(TranscriptEntry {
            role,
            content: kept.to_owned(),
            at,
        });
        self.truncated |= cut;
        cut
    }

    /// Entries in time order (stable: equal times keep arrival order).
    pub(crate) fn in_time_order(&self) -> Vec<&TranscriptEntry> {
        let mut v: Vec<&TranscriptEntry> = self.entries.iter().collect();
        v.sort_by_key(|e| e.at);
        v
    }

    fn merge(&mut self, o: Transcript, cap: usize) -> bool {
        let mut cut = o.truncated;
        for e in o.entries {
            cut |= self.push(e.role, &e.content, e.at, cap);
        }
        cut
    }
}

/// Metrics gathered under one parent span until its turn span ends.
#[derive(Debug, Clone, Default)]
struct TurnAcc {
    llm_ms: Option<f64>,
    tts_ms: Option<f64>,
    stt_ms: Option<f64>,
    ttft_ms: Option<f64>,
    tokens: u64,
    user_text: Option<String>,
    assistant_text: Option<String>,
}

impl TurnAcc {
    fn is_empty(&self) -> bool {
        self.llm_ms.is_none()
            && self.tts_ms.is_none()
            && self.stt_ms.is_none()
            && self.ttft_ms.is_none()
            && self.tokens == 0
            && self.user_text.is_none()
            && self.assistant_text.is_none()
    }

    /// Takes this span's own values: its own latency wins over a child's of the same type.
    fn absorb_own(&mut self, v: &SpanView<'_>, text_cap: usize) {
        let d = || Some(ms(v.duration()));
        match v.op {
            Operation::Llm => self.llm_ms = d(),
            Operation::Tts => self.tts_ms = d(),
            Operation::Stt => self.stt_ms = d(),
            _ => {}
        }
        // Time to first token is the LLM's (a tts/stt span's ttfb is its own first byte).
        if let (Operation::Llm, Some(t)) = (v.op, v.facts.ttft_ms) {
            self.ttft_ms.get_or_insert(t);
        }
        self.tokens = self.tokens.saturating_add(v.facts.tokens());
        if let Some(t) = v.facts.user_text {
            self.user_text = Some(truncate_str(t, text_cap).to_owned());
        }
        if let Some(t) = v.facts.assistant_text {
            self.assistant_text = Some(truncate_str(t, text_cap).to_owned());
        }
    }

    /// Folds a finished child into its parent: the parent keeps what it already has.
    fn absorb_child(&mut self, c: TurnAcc) {
        self.llm_ms = self.llm_ms.or(c.llm_ms);
        self.tts_ms = self.tts_ms.or(c.tts_ms);
        self.stt_ms = self.stt_ms.or(c.stt_ms);
        self.ttft_ms = self.ttft_ms.or(c.ttft_ms);
        self.tokens = self.tokens.saturating_add(c.tokens);
        self.user_text = self.user_text.take().or(c.user_text);
        self.assistant_text = self.assistant_text.take().or(c.assistant_text);
    }
}

/// A span id's bit in [`Turns::open_bits`] (span ids are random: their low bits spread).
#[inline]
fn id_bit(id: SpanId) -> u64 {
    1 << (id.to_bytes()[7] & 63)
}

/// One entry of `transcript_with_metrics`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TurnRecord {
    pub turn: u64,
    pub role: Role,
    pub content: String,
    pub started_at: SystemTime,
    pub llm_latency: Option<f64>,
    pub tts_latency: Option<f64>,
    pub stt_latency: Option<f64>,
    pub ttft: Option<f64>,
    pub tokens: u64,
}

/// Builds per-turn records from turn spans and the spans under them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Turns {
    open: HashMap<SpanId, TurnAcc, FastState>,
    /// One bit per `open` key (by [`id_bit`]), cleared when `open` empties: a span whose bit
    /// is clear gathered no children, and most spans are leaves.
    open_bits: u64,
    pub records: Vec<TurnRecord>,
    record_bytes: usize,
    agent_turns: u64,
    /// Records or accumulators left out because a bound was reached.
    pub dropped: u64,
}

impl Turns {
    fn record(&mut self, v: &SpanView<'_>, text_cap: usize) {
        let mut acc = if self.open_bits & id_bit(v.span_id) == 0 {
            TurnAcc::default()
        } else {
            let acc = self.open.remove(&v.span_id).unwrap_or_default();
            if self.open.is_empty() {
                self.open_bits = 0;
            }
            acc
        };
        acc.absorb_own(v, text_cap);
        if v.op == Operation::Turn {
            self.finish_turn(v, acc, text_cap);
            return;
        }
        if acc.is_empty() || v.parent_span_id == SpanId::INVALID {
            return;
        }
        if let Some(parent) = self.open.get_mut(&v.parent_span_id) {
            parent.absorb_child(acc);
        } else if self.open.len() < MAX_TURN_ACCUMULATORS {
            self.open.insert(v.parent_span_id, acc);
            self.open_bits |= id_bit(v.parent_span_id);
        } else {
            self.dropped += 1;
        }
    }

    fn finish_turn(&mut self, v: &SpanView<'_>, acc: TurnAcc, text_cap: usize) {
        let number = if v.is_user_turn {
            v.facts.turn_number.unwrap_or(self.agent_turns + 1)
        } else {
            self.agent_turns += 1;
            v.facts.turn_number.unwrap_or(self.agent_turns)
        };
        if let Some(content) = acc.user_text.clone() {
            self.push(
                TurnRecord {
                    turn: number,
                    role: Role::User,
                    content,
                    started_at: v.start,
                    llm_latency: None,
                    tts_latency: None,
                    stt_latency: acc.stt_ms,
                    ttft: None,
                    tokens: 0,
                },
                text_cap,
            );
        }
        if !v.is_user_turn {
            self.push(
                TurnRecord {
                    turn: number,
                    role: Role::Assistant,
                    content: acc.assistant_text.unwrap_or_default(),
                    started_at: v.start,
                    llm_latency: acc.llm_ms,
                    tts_latency: acc.tts_ms,
                    // Pipecat turns hold the stt span too; LiveKit's user_turn carries it.
                    stt_latency: if acc.user_text.is_some() {
                        None
                    } else {
                        acc.stt_ms
                    },
                    ttft: acc.ttft_ms,
                    tokens: acc.tokens,
                },
                text_cap,
            );
        }
    }

    fn push(&mut self, r: TurnRecord, cap: usize) {
        if self.record_bytes + r.content.len() > cap {
            self.dropped += 1;
            return;
        }
        self.record_bytes += r.content.len();
        self.records.push(r);
    }

    /// Records in time order.
    pub(crate) fn in_time_order(&self) -> Vec<&TurnRecord> {
        let mut v: Vec<&TurnRecord> = self.records.iter().collect();
        v.sort_by_key(|r| (r.started_at, r.turn));
        v
    }
}

/// Everything callscope knows about one open call.
#[derive(Debug)]
pub(crate) struct CallState {
    pub call_id: Arc<str>,
    /// Keyed by a trace id because no call id was seen yet; joins a real call when one is.
    pub provisional: bool,
    /// The registry's number for this call (its place in creation order; 0 until it opens):
    /// an id that comes back once the registry forgot it is a new call, with a new number.
    pub incarnation: u64,
    /// Processor clock (ns since the processor started) of the first and last span seen.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub started_at: Option<SystemTime>,
    pub ended_at: Option<SystemTime>,
    pub agg: Aggregates,
    pub transcript: Transcript,
    pub turns: Turns,
    pub trace_ids: Vec<TraceId>,
    /// Provisional calls folded into this one (at most [`MAX_TRACE_IDS`]): the worker moves
    /// their detail into this call at its end even if their joins have not reached it yet
    /// (an idle end is taken by the worker's tick, not sent after the join).
    pub folded: Vec<Arc<str>>,
    /// Spans packed for the worker and not yet handed over (see [`crate::packed`]).
    pub chunk: Option<Chunk>,
    /// Bytes of text one call may hold (transcript and turn records each).
    text_cap: usize,
}

impl CallState {
    pub(crate) fn new(call_id: Arc<str>, provisional: bool, now_ns: u64, text_cap: usize) -> Self {
        CallState {
            call_id,
            provisional,
            incarnation: 0,
            first_seen_ns: now_ns,
            last_seen_ns: now_ns,
            started_at: None,
            ended_at: None,
            agg: Aggregates::default(),
            transcript: Transcript::default(),
            turns: Turns::default(),
            trace_ids: Vec::new(),
            folded: Vec::new(),
            chunk: None,
            text_cap,
        }
    }

    /// Adds one ended span. Returns how many texts were cut to fit the call's bounds.
    pub(crate) fn record(&mut self, v: &SpanView<'_>, now_ns: u64) -> u64 {
        self.last_seen_ns = self.last_seen_ns.max(now_ns);
        self.started_at = Some(self.started_at.map_or(v.start, |s| s.min(v.start)));
        self.ended_at = Some(self.ended_at.map_or(v.end, |e| e.max(v.end)));
        self.note_trace(v.trace_id);
        self.agg.record(v);
        let mut cut = 0;
        if let Some(t) = v.facts.user_text {
            cut += u64::from(self.transcript.push(Role::User, t, v.start, self.text_cap));
        }
        if let Some(t) = v.facts.assistant_text {
            cut += u64::from(
                self.transcript
                    .push(Role::Assistant, t, v.start, self.text_cap),
            );
        }
        let before = self.turns.dropped;
        self.turns.record(v, self.text_cap);
        cut + (self.turns.dropped - before)
    }

    pub(crate) fn note_trace(&mut self, t: TraceId) {
        if !self.trace_ids.contains(&t) && self.trace_ids.len() < MAX_TRACE_IDS {
            self.trace_ids.push(t);
        }
    }

    /// Folds a provisional call (same trace, id not yet known then) into this one.
    pub(crate) fn merge(&mut self, o: CallState) -> u64 {
        self.first_seen_ns = self.first_seen_ns.min(o.first_seen_ns);
        self.last_seen_ns = self.last_seen_ns.max(o.last_seen_ns);
        self.started_at = match (self.started_at, o.started_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.ended_at = match (self.ended_at, o.ended_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for t in &o.trace_ids {
            self.note_trace(*t);
        }
        if o.provisional && self.folded.len() < MAX_TRACE_IDS {
            self.folded.push(o.call_id.clone());
        }
        self.agg.merge(&o.agg);
        let cut = self.transcript.merge(o.transcript, self.text_cap);
        for (k, acc) in o.turns.open {
            self.turns.open_bits |= id_bit(k);
            self.turns.open.entry(k).or_insert(acc);
        }
        for r in o.turns.records {
            self.turns.push(r, self.text_cap);
        }
        self.turns.agent_turns += o.turns.agent_turns;
        if let Some(c) = o.chunk {
            match &mut self.chunk {
                Some(mine) => mine.append(c),
                None => self.chunk = Some(c),
            }
        }
        u64::from(cut)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    fn view(name: &str, op: Operation, start_ms: u64, dur_ms: u64, id: u64) -> SpanView<'_> {
        let start = UNIX_EPOCH + Duration::from_millis(start_ms);
        SpanView {
            name,
            op,
            trace_id: TraceId::from(1u128),
            span_id: SpanId::from(id),
            parent_span_id: SpanId::INVALID,
            start,
            end: start + Duration::from_millis(dur_ms),
            dur: Duration::from_millis(dur_ms),
            is_error: false,
            is_user_turn: name == "user_turn",
            root_name: false,
            facts: SpanFacts::default(),
        }
    }

    #[test]
    fn end_before_start_is_zero_duration() {
        let start = UNIX_EPOCH + Duration::from_millis(1000);
        assert_eq!(span_duration(start, UNIX_EPOCH), Duration::ZERO);
        assert_eq!(
            span_duration(UNIX_EPOCH, start),
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn response_latency_pairs_user_end_with_next_tts_start() {
        let mut a = Aggregates::default();
        a.record(&view("user_turn", Operation::Turn, 0, 1000, 1));
        a.record(&view("tts_node", Operation::Tts, 1800, 500, 2));
        a.record(&view("tts_node", Operation::Tts, 3000, 500, 3)); // no user speech before: unpaired
        assert_eq!(a.response_latency.count, 1);
        assert_eq!(a.avg_latency(), Some(800.0));
    }

    #[test]
    fn avg_latency_falls_back_to_turn_durations() {
        let mut a = Aggregates::default();
        a.record(&view("turn", Operation::Turn, 0, 100, 1));
        a.record(&view("turn", Operation::Turn, 0, 300, 2));
        assert_eq!(a.avg_latency(), Some(200.0));
        assert_eq!(a.turns, 2);
    }

    #[test]
    fn transcript_is_bounded_and_marks_truncation() {
        let mut t = Transcript::default();
        assert!(!t.push(Role::User, "hello", UNIX_EPOCH, 8));
        assert!(t.push(Role::Assistant, "world!!", UNIX_EPOCH, 8));
        assert_eq!(t.entries[1].content, "wor");
        assert!(t.truncated);
        assert!(t.push(Role::User, "more", UNIX_EPOCH, 8));
        assert_eq!(t.entries.len(), 2);
    }

    #[test]
    fn transcript_skips_repeat_of_same_role() {
        let mut t = Transcript::default();
        t.push(Role::Assistant, "sure", UNIX_EPOCH, 100);
        t.push(Role::Assistant, "sure", UNIX_EPOCH, 100);
        assert_eq!(t.entries.len(), 1);
    }

    #[test]
    fn truncate_str_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    #[test]
    fn turn_records_collect_children_metrics() {
        let mut turns = Turns::default();
        let turn_id = SpanId::from(10u64);
        let mut llm = view("llm_node", Operation::Llm, 100, 250, 11);
        llm.parent_span_id = turn_id;
        llm.facts.assistant_text = Some("Sure, booked.");
        llm.facts.ttft_ms = Some(120.0);
        llm.facts.input_tokens = 300;
        llm.facts.output_tokens = 40;
        let mut tts = view("tts_node", Operation::Tts, 360, 180, 12);
        tts.parent_span_id = turn_id;
        let mut turn = view("agent_turn", Operation::Turn, 90, 600, 10);
        turn.parent_span_id = SpanId::from(1u64);
        turns.record(&llm, 1000);
        turns.record(&tts, 1000);
        turns.record(&turn, 1000);
        assert_eq!(turns.records.len(), 1);
        let r = &turns.records[0];
        assert_eq!((r.turn, r.role), (1, Role::Assistant));
        assert_eq!(r.content, "Sure, booked.");
        assert_eq!(r.llm_latency, Some(250.0));
        assert_eq!(r.tts_latency, Some(180.0));
        assert_eq!(r.ttft, Some(120.0));
        assert_eq!(r.tokens, 340);
    }

    /// A span as generated for the property tests.
    #[derive(Debug, Clone)]
    struct Gen {
        op: usize,
        start_ms: u64,
        dur_ms: u64,
        error: bool,
        tokens: u64,
        user_turn: bool,
    }

    fn gen_span() -> impl Strategy<Value = Gen> {
        (
            0usize..8,
            0u64..100_000,
            0u64..5_000,
            any::<bool>(),
            0u64..1000,
            any::<bool>(),
        )
            .prop_map(|(op, start_ms, dur_ms, error, tokens, user_turn)| Gen {
                op,
                start_ms,
                dur_ms,
                error,
                tokens,
                user_turn,
            })
    }

    fn to_view(g: &Gen, id: u64) -> SpanView<'static> {
        let op = Operation::ALL[g.op];
        let name = if op == Operation::Turn && g.user_turn {
            "user_turn"
        } else {
            "span"
        };
        let mut v = view(name, op, g.start_ms, g.dur_ms, id);
        v.is_error = g.error;
        v.facts.input_tokens = g.tokens;
        v
    }

    proptest! {
        /// The running aggregates equal a recomputation from the full span list.
        #[test]
        fn aggregates_equal_recomputation(spans in prop::collection::vec(gen_span(), 0..300)) {
            let mut agg = Aggregates::default();
            let views: Vec<SpanView<'static>> =
                spans.iter().enumerate().map(|(i, g)| to_view(g, i as u64 + 1)).collect();
            for v in &views {
                agg.record(v);
            }
            prop_assert_eq!(agg.total_spans, views.len() as u64);
            prop_assert_eq!(agg.error_count, views.iter().filter(|v| v.is_error).count() as u64);
            prop_assert_eq!(agg.tokens, views.iter().map(|v| v.facts.tokens()).sum::<u64>());
            let turns = views.iter().filter(|v| v.op == Operation::Turn && !v.is_user_turn).count();
            prop_assert_eq!(agg.turns, turns as u64);
            for op in Operation::ALL {
                let durs: Vec<f64> =
                    views.iter().filter(|v| v.op == op).map(|v| ms(v.duration())).collect();
                let s = agg.ops[op.index()];
                prop_assert_eq!(s.count, durs.len() as u64);
                if !durs.is_empty() {
                    let sum: f64 = durs.iter().sum();
                    prop_assert!((s.sum_ms - sum).abs() < 1e-6);
                    prop_assert_eq!(s.min_ms, durs.iter().cloned().fold(f64::MAX, f64::min));
                    prop_assert_eq!(s.max_ms, durs.iter().cloned().fold(f64::MIN, f64::max));
                }
            }
            // top-5: a full stable sort by duration, slowest first, earliest arrival on ties.
            let mut all: Vec<(Duration, SpanId)> =
                views.iter().map(|v| (v.duration(), v.span_id)).collect();
            all.sort_by_key(|b| std::cmp::Reverse(b.0));
            let want: Vec<(Duration, SpanId)> = all.into_iter().take(TOP_K).collect();
            let got: Vec<(Duration, SpanId)> =
                agg.slowest.sorted().iter().map(|s| (s.duration, s.span_id)).collect();
            prop_assert_eq!(got, want);
        }

        /// Merging two halves equals recording everything in one call (order-independent parts).
        #[test]
        fn merge_equals_single_pass(spans in prop::collection::vec(gen_span(), 0..100), split in 0usize..100) {
            let views: Vec<SpanView<'static>> =
                spans.iter().enumerate().map(|(i, g)| to_view(g, i as u64 + 1)).collect();
            let split = split.min(views.len());
            let (mut a, mut b, mut whole) = (Aggregates::default(), Aggregates::default(), Aggregates::default());
            for v in &views[..split] { a.record(v); }
            for v in &views[split..] { b.record(v); }
            for v in &views { whole.record(v); }
            a.merge(&b);
            prop_assert_eq!(a.total_spans, whole.total_spans);
            prop_assert_eq!(a.error_count, whole.error_count);
            prop_assert_eq!(a.tokens, whole.tokens);
            let durs = |t: &TopK| t.sorted().iter().map(|s| s.duration).collect::<Vec<_>>();
            prop_assert_eq!(durs(&a.slowest), durs(&whole.slowest));
            for op in Operation::ALL {
                prop_assert_eq!(a.ops[op.index()].count, whole.ops[op.index()].count);
            }
        }
    }
}
