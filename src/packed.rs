//! Spans packed into plain bytes on the app thread, unpacked on the worker.
//!
//! Why: handing the worker each `SpanData` itself means every span's memory (name, attribute
//! vector, string values) is freed on the worker's thread. With glibc's allocator those frees
//! land in the app thread's arena and take its lock, and the app thread never gets hot memory
//! back: perf showed 13–17 % of the app thread's time in the arena lock's futex wake-ups, and
//! "aggregate and drop the span here" cost 0.79 × the SDK's batch processor against 2.2 × for
//! "aggregate and hand the span over". Packing copies the span into its call's byte chunk
//! (held under the call's lock the aggregation already takes); the `SpanData` is then dropped
//! where it was allocated, and only whole chunks (many spans each) cross to the worker.
//!
//! The format is private to this process (both ends are this module), little-endian:
//! `op u8, trace 16, span 8, parent 8, kind u8, start u64 ns, end u64 ns, status, name,
//! attributes, events, links`, strings as `u32 length + bytes`, lists as `u32 count + items`,
//! an attribute as `key length u32, tag u8, scalar or value length, key, value bytes`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::call::truncate_str;
use crate::fasthash::FastState;
use crate::semantics::Operation;

/// Largest capacity a call's chunk starts with; it is handed to the worker once three
/// quarters full, so spans of up to a quarter of it never make it grow (a reallocation per
/// doubling cost ~270 instructions per span in callgrind when chunks started empty).
pub(crate) const CHUNK_BYTES: usize = 16 * 1024;
/// Smallest capacity a chunk starts with (when many calls are open, see `Registry::pack`).
pub(crate) const MIN_CHUNK_BYTES: usize = 1024;
/// ... or this many spans (or `CALLSCOPE_QUEUE_SIZE`, if smaller).
pub(crate) const CHUNK_SPANS: usize = 256;

/// A bound shared by the app threads and the worker: what is taken counts against `cap` until
/// it is given back. Bounds the bytes of packed spans not yet serialised by the worker (half of
/// `CALLSCOPE_MAX_BUFFER_BYTES`, on top of the worker's own bound on pending detail: 1.5 × in
/// all) and the spans queued to the worker (`CALLSCOPE_QUEUE_SIZE`).
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    cap: usize,
}

impl Budget {
    pub(crate) fn new(cap: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes `n` if it fits (anything fits while nothing is taken, so one item larger than
    /// the whole bound still goes through an idle pipeline).
    pub(crate) fn try_take(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.cap {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The bound.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Gives back what [`try_take`](Self::try_take) took.
    pub(crate) fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Taken now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Packed spans of one call on their way to the worker. Its memory (the vector's capacity) is
/// taken from a [`Budget`] as it grows and given back when the chunk is dropped, wherever that
/// happens: unpacked by the worker, refused by a full queue, or dropped with its call.
#[derive(Debug)]
pub(crate) struct Chunk {
    bytes: Vec<u8>,
    spans: u32,
    /// Processor clock (coarse, ns) when its first span was packed.
    pub since_ns: u64,
    reserved: usize,
    budget: Arc<Budget>,
}

impl Chunk {
    /// A chunk of `capacity` bytes taken from `budget`; `None` when the budget cannot hold it.
    pub(crate) fn new(budget: &Arc<Budget>, now_ns: u64, capacity: usize) -> Option<Self> {
        if !budget.try_take(capacity) {
            return None;
        }
        Some(Chunk {
            bytes: Vec::with_capacity(capacity),
            reserved: capacity,
            spans: 0,
            since_ns: now_ns,
            budget: budget.clone(),
        })
    }

    /// Whether it is full enough to hand over: three quarters of the capacity it started
    /// with, or `max_spans`.
    pub(crate) fn is_full(&self, max_spans: usize) -> bool {
        self.bytes.len() >= self.reserved / 4 * 3 || self.spans() >= max_spans
    }

    /// Spans packed in it.
    pub(crate) fn spans(&self) -> usize {
        self.spans as usize
    }

    /// Packs `span` (see [`pack`]); false (and nothing packed) when the budget cannot hold it.
    #[inline]
    pub(crate) fn push(
        &mut self,
        span: &SpanData,
        op: Operation,
        dur: Duration,
        value_cap: usize,
    ) -> bool {
        let before = self.bytes.len();
        pack(&mut self.bytes, span, op, dur, value_cap);
        let cap = self.bytes.capacity();
        if cap > self.reserved {
            if !self.budget.try_take(cap - self.reserved) {
                self.bytes.truncate(before);
                self.bytes.shrink_to(self.reserved);
                return false;
            }
            self.reserved = cap;
        }
        self.spans += 1;
        true
    }

    /// Appends `other`'s spans (a provisional call joining its real one). The budget is
    /// charged what the merged vector holds even past its bound, by at most one chunk: the
    /// spans were already accepted once.
    pub(crate) fn append(&mut self, mut other: Chunk) {
        self.bytes.extend_from_slice(&other.bytes);
        self.spans += other.spans;
        self.reserved += std::mem::take(&mut other.reserved);
        let cap = self.bytes.capacity();
        if cap > self.reserved {
            self.budget
                .used
                .fetch_add(cap - self.reserved, Ordering::AcqRel);
            self.reserved = cap;
        }
    }

    /// Its spans, for the worker.
    pub(crate) fn unpack(&self) -> Unpacker<'_> {
        Unpacker::new(&self.bytes)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.budget.give(self.reserved);
    }
}

const V_BOOL: u8 = 0;
const V_I64: u8 = 1;
const V_F64: u8 = 2;
const V_STR: u8 = 3;
const V_BOOLS: u8 = 4;
const V_I64S: u8 = 5;
const V_F64S: u8 = 6;
const V_STRS: u8 = 7;

const S_UNSET: u8 = 0;
const S_OK: u8 = 1;
const S_ERROR: u8 = 2;

/// Nanoseconds since the Unix epoch (0 before it, `u64::MAX` past the year 2554).
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A length as written: longer than `u32::MAX` is cut to it (the text with it).
#[inline]
fn len32(n: usize) -> u32 {
    n.min(u32::MAX as usize) as u32
}

#[inline]
fn put_len(out: &mut Vec<u8>, n: usize) -> usize {
    let n = len32(n);
    out.extend_from_slice(&n.to_le_bytes());
    n as usize
}

#[inline]
fn put_str(out: &mut Vec<u8>, s: &str) {
    let n = put_len(out, s.len());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_list<T>(out: &mut Vec<u8>, items: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
    put_len(out, items.len());
    for x in items.iter().take(u32::MAX as usize) {
        each(out, x);
    }
}

/// One attribute: a head of the key's length, the value's tag and its scalar or length, in one
/// write; then the key; then a string value's bytes (or an array's items). Three writes for a
/// string attribute, two for a number: each write is a capacity check and, for text, a call to
/// `memcpy`, and a voice-agent span has eight or more attributes.
#[inline]
fn put_attr(out: &mut Vec<u8>, key: &str, v: &Value, cap: usize) {
    let k = len32(key.len());
    let kb = &key.as_bytes()[..k as usize];
    let [k0, k1, k2, k3] = k.to_le_bytes();
    let scalar = |out: &mut Vec<u8>, tag: u8, x: u64| {
        let [b0, b1, b2, b3, b4, b5, b6, b7] = x.to_le_bytes();
        out.extend_from_slice(&[k0, k1, k2, k3, tag, b0, b1, b2, b3, b4, b5, b6, b7]);
        out.extend_from_slice(kb);
    };
    let text = |out: &mut Vec<u8>, s: &str| {
        let n = len32(s.len());
        let [n0, n1, n2, n3] = n.to_le_bytes();
        out.extend_from_slice(&[k0, k1, k2, k3, V_STR, n0, n1, n2, n3]);
        out.extend_from_slice(kb);
        out.extend_from_slice(&s.as_bytes()[..n as usize]);
    };
    let array = |out: &mut Vec<u8>, tag: u8| {
        out.extend_from_slice(&[k0, k1, k2, k3, tag]);
        out.extend_from_slice(kb);
    };
    match v {
        Value::Bool(b) => {
            out.extend_from_slice(&[k0, k1, k2, k3, V_BOOL, u8::from(*b)]);
            out.extend_from_slice(kb);
        }
        Value::I64(i) => scalar(out, V_I64, *i as u64),
        Value::F64(f) => scalar(out, V_F64, f.to_bits()),
        Value::String(s) => text(out, truncate_str(s.as_str(), cap)),
        Value::Array(Array::Bool(a)) => {
            array(out, V_BOOLS);
            put_list(out, a, |o, b| o.push(u8::from(*b)));
        }
        Value::Array(Array::I64(a)) => {
            array(out, V_I64S);
            put_list(out, a, |o, i| o.extend_from_slice(&i.to_le_bytes()));
        }
        Value::Array(Array::F64(a)) => {
            array(out, V_F64S);
            put_list(out, a, |o, f| {
                o.extend_from_slice(&f.to_bits().to_le_bytes())
            });
        }
        Value::Array(Array::String(a)) => {
            array(out, V_STRS);
            put_list(out, a, |o, s| put_str(o, truncate_str(s.as_str(), cap)));
        }
        // Kinds added to the API later travel as their text.
        other => text(out, truncate_str(&other.to_string(), cap)),
    }
}

fn put_attrs(out: &mut Vec<u8>, attrs: &[KeyValue], cap: usize) {
    put_list(out, attrs, |o, kv| {
        put_attr(o, kv.key.as_str(), &kv.value, cap)
    });
}

fn put_kind(k: &SpanKind) -> u8 {
    match k {
        SpanKind::Client => 0,
        SpanKind::Server => 1,
        SpanKind::Producer => 2,
        SpanKind::Consumer => 3,
        SpanKind::Internal => 4,
    }
}

/// Appends `span` (and its operation) to `out`; returns the bytes appended. `dur` is the
/// span's duration as the aggregates read it ([`crate::call::span_duration`]): the end is packed as start +
/// duration (one clock subtraction less per span; an end before the start reads back as the
/// start, which is how its duration already counts). String values longer than `value_cap`
/// bytes are cut to it: no request could carry more of them, and the worker still shortens
/// (and counts) such a value to fit `CALLSCOPE_MAX_REQUEST_BYTES`.
pub(crate) fn pack(
    out: &mut Vec<u8>,
    span: &SpanData,
    op: Operation,
    dur: Duration,
    value_cap: usize,
) -> usize {
    let cap = value_cap;
    let start = out.len();
    let ctx = &span.span_context;
    // The fixed-size head in one write.
    let mut head = [0u8; 51];
    head[0] = op.index() as u8;
    head[1..17].copy_from_slice(&ctx.trace_id().to_bytes());
    head[17..25].copy_from_slice(&ctx.span_id().to_bytes());
    head[25..33].copy_from_slice(&span.parent_span_id.to_bytes());
    head[33] = put_kind(&span.span_kind);
    let start_ns = nanos(span.start_time);
    let dur_ns = u64::try_from(dur.as_nanos()).unwrap_or(u64::MAX);
    head[34..42].copy_from_slice(&start_ns.to_le_bytes());
    head[42..50].copy_from_slice(&start_ns.saturating_add(dur_ns).to_le_bytes());
    head[50] = match &span.status {
        Status::Unset => S_UNSET,
        Status::Ok => S_OK,
        Status::Error { .. } => S_ERROR,
    };
    out.extend_from_slice(&head);
    if let Status::Error { description } = &span.status {
        put_str(out, description);
    }
    put_str(out, &span.name);
    put_attrs(out, &span.attributes, cap);
    put_list(out, &span.events, |o, e| {
        put_str(o, &e.name);
        o.extend_from_slice(&nanos(e.timestamp).to_le_bytes());
        put_attrs(o, &e.attributes, cap);
    });
    put_list(out, &span.links, |o, l| {
        o.extend_from_slice(&l.span_context.trace_id().to_bytes());
        o.extend_from_slice(&l.span_context.span_id().to_bytes());
        put_attrs(o, &l.attributes, cap);
    });
    out.len() - start
}

fn span_events(events: Vec<Event>) -> SpanEvents {
    let mut e = SpanEvents::default();
    e.events = events;
    e
}

fn span_links(links: Vec<Link>) -> SpanLinks {
    let mut l = SpanLinks::default();
    l.links = links;
    l
}

/// Reads spans back from a chunk [`pack`] wrote.
pub(crate) struct Unpacker<'a> {
    rest: &'a [u8],
    /// Attribute keys read so far, by their bytes: a call's spans repeat the same few keys,
    /// and sharing one `Key` (a reference count) saves building a `String` for each use.
    keys: HashMap<&'a [u8], Key, FastState>,
}

/// Distinct keys an [`Unpacker`] shares (more are read as new strings each time).
const SHARED_KEYS: usize = 256;

impl<'a> Unpacker<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Unpacker {
            rest: bytes,
            keys: HashMap::default(),
        }
    }

    /// An attribute's key of `n` bytes.
    fn key(&mut self, n: usize) -> Option<Key> {
        let b = self.take(n)?;
        if let Some(k) = self.keys.get(b) {
            return Some(k.clone());
        }
        let k = Key::from(Arc::<str>::from(std::str::from_utf8(b).ok()?));
        if self.keys.len() < SHARED_KEYS {
            self.keys.insert(b, k.clone());
        }
        Some(k)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Some(a)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.array()?) as usize)
    }

    fn time(&mut self) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_nanos(self.u64()?))
    }

    fn list<T>(&mut self, mut each: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.len()?;
        // A corrupt count must not reserve much: start small, grow with what is read.
        let mut v = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            v.push(each(self)?);
        }
        Some(v)
    }

    fn text(&mut self, n: usize) -> Option<String> {
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn string(&mut self) -> Option<String> {
        let n = self.len()?;
        self.text(n)
    }

    /// One attribute as [`put_attr`] wrote it.
    fn attr(&mut self) -> Option<KeyValue> {
        let klen = self.len()?;
        let tag = self.u8()?;
        let value = match tag {
            V_BOOL => {
                let b = self.u8()? != 0;
                let key = self.key(klen)?;
                return Some(KeyValue::new(key, Value::Bool(b)));
            }
            V_I64 | V_F64 => {
                let x = u64::from_le_bytes(self.array()?);
                let key = self.key(klen)?;
                let v = if tag == V_I64 {
                    Value::I64(x as i64)
                } else {
                    Value::F64(f64::from_bits(x))
                };
                return Some(KeyValue::new(key, v));
            }
            V_STR => {
                let n = self.len()?;
                let key = self.key(klen)?;
                return Some(KeyValue::new(key, Value::String(self.text(n)?.into())));
            }
            V_BOOLS => {
                let key = self.key(klen)?;
                (
                    key,
                    Value::Array(Array::Bool(self.list(|u| Some(u.u8()? != 0))?)),
                )
            }
            V_I64S => {
                let key = self.key(klen)?;
                let a = self.list(|u| Some(i64::from_le_bytes(u.array()?)))?;
                (key, Value::Array(Array::I64(a)))
            }
            V_F64S => {
                let key = self.key(klen)?;
                let a = self.list(|u| Some(f64::from_bits(u64::from_le_bytes(u.array()?))))?;
                (key, Value::Array(Array::F64(a)))
            }
            V_STRS => {
                let key = self.key(klen)?;
                let a = self.list(|u| Some(StringValue::from(u.string()?)))?;
                (key, Value::Array(Array::String(a)))
            }
            _ => return None,
        };
        Some(KeyValue::new(value.0, value.1))
    }

    fn attrs(&mut self) -> Option<Vec<KeyValue>> {
        self.list(Self::attr)
    }

    fn context(&mut self) -> Option<SpanContext> {
        let trace = TraceId::from_bytes(self.array()?);
        let span = SpanId::from_bytes(self.array()?);
        Some(SpanContext::new(
            trace,
            span,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ))
    }

    fn span(&mut self) -> Option<(SpanData, Operation)> {
        let op = Operation::from_u8(self.u8()?)?;
        let span_context = self.context()?;
        let parent_span_id = SpanId::from_bytes(self.array()?);
        let span_kind = match self.u8()? {
            0 => SpanKind::Client,
            1 => SpanKind::Server,
            2 => SpanKind::Producer,
            3 => SpanKind::Consumer,
            _ => SpanKind::Internal,
        };
        let start_time = self.time()?;
        let end_time = self.time()?;
        let status = match self.u8()? {
            S_OK => Status::Ok,
            S_ERROR => Status::Error {
                description: Cow::Owned(self.string()?),
            },
            _ => Status::Unset,
        };
        let name = Cow::Owned(self.string()?);
        let attributes = self.attrs()?;
        let events = self.list(|u| {
            let name = u.string()?;
            let t = u.time()?;
            Some(Event::new(name, t, u.attrs()?, 0))
        })?;
        let links = self.list(|u| {
            let cx = u.context()?;
            Some(Link::new(cx, u.attrs()?, 0))
        })?;
        Some((
            SpanData {
                span_context,
                parent_span_id,
                parent_span_is_remote: false,
                span_kind,
                name,
                start_time,
                end_time,
                attributes,
                dropped_attributes_count: 0,
                events: span_events(events),
                links: span_links(links),
                status,
                instrumentation_scope: InstrumentationScope::default(),
            },
            op,
        ))
    }
}

impl Iterator for Unpacker<'_> {
    /// A span and its operation, or `Err` once for bytes that do not read as a span (the rest
    /// of the chunk is then skipped).
    type Item = Result<(SpanData, Operation), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match self.span() {
            Some(s) => Some(Ok(s)),
            None => {
                self.rest = &[];
                Some(Err(()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::call::span_duration;
    use crate::payload;

    fn span(i: u8) -> SpanData {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([i; 16]),
                SpanId::from_bytes([i.wrapping_add(1); 8]),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::from_bytes([7; 8]),
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "llm_request".into(),
            start_time: t0,
            end_time: t0 + Duration::from_millis(u64::from(i) + 3),
            attributes: vec![
                KeyValue::new("gen_ai.request.model", "gpt-4o-mini"),
                KeyValue::new("gen_ai.usage.input_tokens", 300),
                KeyValue::new("lk.response.ttft", 0.12),
                KeyValue::new("flag", true),
                KeyValue::new("quote \"\u{e9}\"", "line\nbreak"),
                KeyValue::new("bools", Value::Array(vec![true, false].into())),
                KeyValue::new("ints", Value::Array(vec![1i64, -2].into())),
                KeyValue::new("floats", Value::Array(vec![1.5f64, f64::NAN].into())),
                KeyValue::new(
                    "strs",
                    Value::Array(vec![StringValue::from("a"), StringValue::from("")].into()),
                ),
            ],
            dropped_attributes_count: 0,
            events: span_events(vec![Event::new(
                "exception",
                t0,
                vec![KeyValue::new("exception.message", "boom")],
                0,
            )]),
            links: span_links(vec![Link::new(
                SpanContext::new(
                    TraceId::from_bytes([9; 16]),
                    SpanId::from_bytes([8; 8]),
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::NONE,
                ),
                vec![KeyValue::new("link.kind", "follows")],
                0,
            )]),
            status: Status::error("timed out"),
            instrumentation_scope: InstrumentationScope::default(),
        }
    }

    fn dur(s: &SpanData) -> Duration {
        span_duration(s.start_time, s.end_time)
    }

    fn json(s: &SpanData, op: Operation) -> Vec<u8> {
        let mut out = Vec::new();
        payload::write_span(&mut out, s, op, usize::MAX);
        out
    }

    #[test]
    fn a_budget_bounds_what_is_taken_and_lets_one_oversized_item_through_when_empty() {
        let q = Budget::new(10_000);
        assert!(q.try_take(6_000));
        assert!(q.try_take(4_000));
        assert!(!q.try_take(1), "past the bound");
        assert_eq!(q.used(), 10_000, "a refusal takes nothing");
        q.give(6_000);
        assert!(q.try_take(5_000));
        q.give(5_000);
        q.give(4_000);
        assert_eq!(q.used(), 0);
        assert!(
            q.try_take(50_000),
            "a span larger than the bound passes an empty queue"
        );
        assert!(!q.try_take(1_024));
        q.give(50_000);
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn unpacked_spans_serialize_exactly_as_the_originals() {
        let mut chunk = Vec::new();
        let spans: Vec<_> = (0..3).map(span).collect();
        let ops = [Operation::Llm, Operation::Tool, Operation::Other];
        let mut sizes = 0;
        for (s, op) in spans.iter().zip(ops) {
            sizes += pack(&mut chunk, s, op, dur(s), usize::MAX);
        }
        assert_eq!(sizes, chunk.len());
        let back: Vec<_> = Unpacker::new(&chunk).map(|r| r.unwrap()).collect();
        assert_eq!(back.len(), 3);
        for ((orig, op), (got, got_op)) in spans.iter().zip(ops).zip(&back) {
            assert_eq!(*got_op, op);
            assert_eq!(json(orig, op), json(got, *got_op));
        }
    }

    #[test]
    fn a_cut_chunk_reads_as_one_error_not_a_panic() {
        let mut chunk = Vec::new();
        pack(
            &mut chunk,
            &span(1),
            Operation::Llm,
            dur(&span(1)),
            usize::MAX,
        );
        let whole = chunk.len();
        pack(
            &mut chunk,
            &span(2),
            Operation::Llm,
            dur(&span(2)),
            usize::MAX,
        );
        for cut in [whole + 1, whole + 40, chunk.len() - 1] {
            let got: Vec<_> = Unpacker::new(&chunk[..cut]).collect();
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert!(got[0].is_ok());
            assert!(got[1].is_err());
        }
        // A nonsense count does not reserve memory for it.
        let mut bad = vec![Operation::Llm.index() as u8];
        bad.extend_from_slice(&[0; 16 + 8 + 8 + 1 + 16]);
        bad.push(S_UNSET);
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        let got: Vec<_> = Unpacker::new(&bad).collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
    }

    #[test]
    fn keys_shared_between_spans_and_past_the_shared_limit_read_back_the_same() {
        let mut chunk = Vec::new();
        let spans: Vec<_> = (0..SHARED_KEYS + 40)
            .map(|i| {
                let mut s = span((i % 200) as u8);
                s.attributes = vec![
                    KeyValue::new("gen_ai.request.model", "gpt-4o-mini"),
                    KeyValue::new(format!("k{i}"), i as i64),
                    KeyValue::new("", "empty key"),
                ];
                s
            })
            .collect();
        for s in &spans {
            pack(&mut chunk, s, Operation::Other, dur(s), usize::MAX);
        }
        let back: Vec<_> = Unpacker::new(&chunk).map(|r| r.unwrap()).collect();
        assert_eq!(back.len(), spans.len());
        for (orig, (got, op)) in spans.iter().zip(&back) {
            assert_eq!(json(orig, Operation::Other), json(got, *op));
        }
    }
}
