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

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::trace::SpanData;

use crate::call::truncate_str;
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

/// A packed attribute value, borrowed from its chunk (text already checked to be UTF-8).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ValueRef<'a> {
    Bool(bool),
    I64(i64),
    F64(f64),
    Str(&'a str),
    /// One byte per item.
    Bools(&'a [u8]),
    /// Eight little-endian bytes per item.
    I64s(&'a [u8]),
    /// Eight little-endian bytes (the bits) per item.
    F64s(&'a [u8]),
    Strs(StrItems<'a>),
}

/// The items of a packed string array, as [`put_list`] / [`put_str`] wrote them; read once
/// (and checked) when the span was read, so reading them again cannot fail.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StrItems<'a> {
    left: u32,
    rest: &'a [u8],
}

impl<'a> Iterator for StrItems<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (n, rest) = self.rest.split_first_chunk::<4>()?;
        let n = (u32::from_le_bytes(*n) as usize).min(rest.len());
        let (s, rest) = rest.split_at(n);
        self.rest = rest;
        // Checked when the span was read.
        Some(std::str::from_utf8(s).unwrap_or_default())
    }
}

/// One packed attribute.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttrRef<'a> {
    pub key: &'a str,
    pub value: ValueRef<'a>,
}

/// A packed span's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusRef<'a> {
    Unset,
    Ok,
    Error(&'a str),
}

/// A packed event; its attributes are [`SpanRef::attrs_of`] its `attrs`.
#[derive(Debug, Clone)]
pub(crate) struct EventRef<'a> {
    pub name: &'a str,
    pub time: SystemTime,
    pub attrs: Range<usize>,
}

/// A packed link; its attributes are [`SpanRef::attrs_of`] its `attrs`.
#[derive(Debug, Clone)]
pub(crate) struct LinkRef {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub attrs: Range<usize>,
}

/// The fixed part of a packed span.
#[derive(Debug)]
struct Head<'a> {
    op: Operation,
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: SpanId,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
    status: StatusRef<'a>,
    name: &'a str,
    span_attrs: usize,
}

/// One span read back from a chunk, borrowing its text from the chunk and its lists from the
/// [`Unpacker`]: the worker serialises it without building a `SpanData` (which cost a `String`
/// per name and value, a vector per list, and their frees: a fifth of the worker's
/// instructions per span).
#[derive(Debug)]
pub(crate) struct SpanRef<'u, 'a> {
    pub op: Operation,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: SpanId,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub status: StatusRef<'a>,
    pub name: &'a str,
    pub events: &'u [EventRef<'a>],
    pub links: &'u [LinkRef],
    /// The span's attributes, then its events', then its links'.
    all_attrs: &'u [AttrRef<'a>],
    span_attrs: usize,
}

impl<'a> SpanRef<'_, 'a> {
    /// The span's own attributes.
    pub(crate) fn attrs(&self) -> &[AttrRef<'a>] {
        &self.all_attrs[..self.span_attrs]
    }

    /// An event's or a link's attributes.
    pub(crate) fn attrs_of(&self, r: &Range<usize>) -> &[AttrRef<'a>] {
        self.all_attrs.get(r.clone()).unwrap_or_default()
    }

    /// Every attribute of the span, its events and its links.
    pub(crate) fn all_attrs(&self) -> &[AttrRef<'a>] {
        self.all_attrs
    }
}

/// Reads spans back from a chunk [`pack`] wrote, one at a time ([`next_span`](Self::next_span)):
/// each borrows the lists this reader keeps, which are reused from span to span.
pub(crate) struct Unpacker<'a> {
    rest: &'a [u8],
    attrs: Vec<AttrRef<'a>>,
    events: Vec<EventRef<'a>>,
    links: Vec<LinkRef>,
}

impl<'a> Unpacker<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Unpacker {
            rest: bytes,
            attrs: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
        }
    }

    /// The next span, or `Err` once for bytes that do not read as a span (the rest of the
    /// chunk is then skipped); `None` at the end.
    pub(crate) fn next_span(&mut self) -> Option<Result<SpanRef<'_, 'a>, ()>> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(h) = self.span() else {
            self.rest = &[];
            return Some(Err(()));
        };
        Some(Ok(SpanRef {
            op: h.op,
            trace_id: h.trace_id,
            span_id: h.span_id,
            parent_span_id: h.parent_span_id,
            kind: h.kind,
            start: h.start,
            end: h.end,
            status: h.status,
            name: h.name,
            events: &self.events,
            links: &self.links,
            all_attrs: &self.attrs,
            span_attrs: h.span_attrs,
        }))
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
        let (a, b) = self.rest.split_first_chunk::<N>()?;
        self.rest = b;
        Some(*a)
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

    fn text(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn string(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        self.text(n)
    }

    /// One attribute as [`put_attr`] wrote it.
    fn attr(&mut self) -> Option<AttrRef<'a>> {
        let klen = self.len()?;
        let tag = self.u8()?;
        let (key, value) = match tag {
            V_BOOL => {
                let b = self.u8()? != 0;
                (self.text(klen)?, ValueRef::Bool(b))
            }
            V_I64 | V_F64 => {
                let x = self.u64()?;
                let key = self.text(klen)?;
                let v = if tag == V_I64 {
                    ValueRef::I64(x as i64)
                } else {
                    ValueRef::F64(f64::from_bits(x))
                };
                (key, v)
            }
            V_STR => {
                // Key and value are written back to back: one UTF-8 check for both (a check
                // is a call of ~120 instructions on these short texts, and most attributes
                // are strings). The key ends where a whole text ended, at a char boundary.
                let n = self.len()?;
                let both = self.text(klen.checked_add(n)?)?;
                let (key, value) = both.split_at_checked(klen)?;
                (key, ValueRef::Str(value))
            }
            V_BOOLS | V_I64S | V_F64S => {
                let key = self.text(klen)?;
                let n = self.len()?;
                let width = if tag == V_BOOLS { 1 } else { 8 };
                let items = self.take(n.checked_mul(width)?)?;
                let v = match tag {
                    V_BOOLS => ValueRef::Bools(items),
                    V_I64S => ValueRef::I64s(items),
                    _ => ValueRef::F64s(items),
                };
                (key, v)
            }
            V_STRS => {
                let key = self.text(klen)?;
                let n = self.len()?;
                let from = self.rest;
                for _ in 0..n {
                    self.string()?;
                }
                let rest = &from[..from.len() - self.rest.len()];
                (
                    key,
                    ValueRef::Strs(StrItems {
                        left: n as u32,
                        rest,
                    }),
                )
            }
            _ => return None,
        };
        Some(AttrRef { key, value })
    }

    /// A list of attributes, appended to the span's; their range in it.
    fn attrs(&mut self) -> Option<Range<usize>> {
        let n = self.len()?;
        let from = self.attrs.len();
        for _ in 0..n {
            let a = self.attr()?;
            self.attrs.push(a);
        }
        Some(from..self.attrs.len())
    }

    fn ids(&mut self) -> Option<(TraceId, SpanId)> {
        let trace = TraceId::from_bytes(self.array()?);
        Some((trace, SpanId::from_bytes(self.array()?)))
    }

    fn span(&mut self) -> Option<Head<'a>> {
        self.attrs.clear();
        self.events.clear();
        self.links.clear();
        let op = Operation::from_u8(self.u8()?)?;
        let (trace_id, span_id) = self.ids()?;
        let parent_span_id = SpanId::from_bytes(self.array()?);
        let kind = match self.u8()? {
            0 => SpanKind::Client,
            1 => SpanKind::Server,
            2 => SpanKind::Producer,
            3 => SpanKind::Consumer,
            _ => SpanKind::Internal,
        };
        let start = self.time()?;
        let end = self.time()?;
        let status = match self.u8()? {
            S_OK => StatusRef::Ok,
            S_ERROR => StatusRef::Error(self.string()?),
            _ => StatusRef::Unset,
        };
        let name = self.string()?;
        let span_attrs = self.attrs()?.end;
        for _ in 0..self.len()? {
            let name = self.string()?;
            let time = self.time()?;
            let attrs = self.attrs()?;
            self.events.push(EventRef { name, time, attrs });
        }
        for _ in 0..self.len()? {
            let (trace_id, span_id) = self.ids()?;
            let attrs = self.attrs()?;
            self.links.push(LinkRef {
                trace_id,
                span_id,
                attrs,
            });
        }
        Some(Head {
            op,
            trace_id,
            span_id,
            parent_span_id,
            kind,
            start,
            end,
            status,
            name,
            span_attrs,
        })
    }

    /// Spans read until the end or the first that does not read (for the stage benches).
    pub(crate) fn count(mut self) -> usize {
        let mut n = 0;
        while let Some(Ok(_)) = self.next_span() {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::call::span_duration;
    use crate::payload;
    use opentelemetry::trace::{Event, Link, SpanContext, TraceFlags, TraceState};
    use opentelemetry::{InstrumentationScope, StringValue};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use serde_json::{Value as Json, json};

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

    /// Every span of a chunk as the worker writes it, parsed.
    fn json_of(chunk: &[u8]) -> Vec<Json> {
        let mut spans = Unpacker::new(chunk);
        let mut out = Vec::new();
        while let Some(s) = spans.next_span() {
            let mut one = Vec::new();
            payload::write_span(&mut one, &s.unwrap(), usize::MAX);
            out.push(serde_json::from_slice(&one).unwrap());
        }
        out
    }

    /// What the wire contract says a span's `session_traces` element holds, from the span
    /// itself (independent of `payload`'s writer).
    fn expected(s: &SpanData, op: Operation) -> Json {
        fn value(v: &Value) -> Json {
            match v {
                Value::Bool(b) => json!(b),
                Value::I64(i) => json!(i),
                Value::F64(f) if f.is_finite() => json!(f),
                Value::F64(_) => Json::Null,
                Value::String(s) => json!(s.as_str()),
                Value::Array(Array::Bool(a)) => json!(a),
                Value::Array(Array::I64(a)) => json!(a),
                Value::Array(Array::F64(a)) => {
                    Json::Array(a.iter().map(|f| value(&Value::F64(*f))).collect())
                }
                Value::Array(Array::String(a)) => {
                    Json::Array(a.iter().map(|s| json!(s.as_str())).collect())
                }
                other => json!(other.to_string()),
            }
        }
        let attrs = |kvs: &[KeyValue]| -> Json {
            Json::Object(
                kvs.iter()
                    .map(|kv| (kv.key.as_str().to_owned(), value(&kv.value)))
                    .collect(),
            )
        };
        let status = match &s.status {
            Status::Unset => json!({"code": "unset"}),
            Status::Ok => json!({"code": "ok"}),
            Status::Error { description } => json!({"code": "error", "message": description}),
        };
        let dur = span_duration(s.start_time, s.end_time);
        json!({
            "trace_id": format!("{:032x}", s.span_context.trace_id()),
            "span_id": format!("{:016x}", s.span_context.span_id()),
            "parent_span_id": format!("{:016x}", s.parent_span_id),
            "name": s.name,
            "operation": op.as_str(),
            "kind": "client",
            "start_time": payload::rfc3339(s.start_time),
            "end_time": payload::rfc3339(s.start_time + dur),
            "duration_ms": dur.as_secs_f64() * 1000.0,
            "status": status,
            "attributes": attrs(&s.attributes),
            "events": s.events.iter().map(|e| json!({
                "name": e.name,
                "time": payload::rfc3339(e.timestamp),
                "attributes": attrs(&e.attributes),
            })).collect::<Vec<_>>(),
            "links": s.links.iter().map(|l| json!({
                "trace_id": format!("{:032x}", l.span_context.trace_id()),
                "span_id": format!("{:016x}", l.span_context.span_id()),
                "attributes": attrs(&l.attributes),
            })).collect::<Vec<_>>(),
        })
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
    fn packed_spans_serialize_as_the_wire_contract_says() {
        let mut chunk = Vec::new();
        let spans: Vec<_> = (0..3).map(span).collect();
        let ops = [Operation::Llm, Operation::Tool, Operation::Other];
        let mut sizes = 0;
        for (s, op) in spans.iter().zip(ops) {
            sizes += pack(&mut chunk, s, op, dur(s), usize::MAX);
        }
        assert_eq!(sizes, chunk.len());
        let back = json_of(&chunk);
        assert_eq!(back.len(), 3);
        for ((orig, op), got) in spans.iter().zip(ops).zip(&back) {
            assert_eq!(*got, expected(orig, op));
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
        // Whether each span read back (`None` once the reader reached the end).
        let read = |bytes: &[u8]| {
            let mut spans = Unpacker::new(bytes);
            let mut got = Vec::new();
            while let Some(s) = spans.next_span() {
                got.push(s.is_ok());
            }
            got
        };
        // Every cut inside the second span: the head, a key, a value, between key and value.
        for cut in whole + 1..chunk.len() {
            assert_eq!(read(&chunk[..cut]), [true, false], "cut at {cut}");
        }
        // Text that is not UTF-8 is an error too (the span's name starts after the head).
        let mut broken = chunk.clone();
        broken[51 + 4 + "timed out".len() + 4] = 0xff;
        assert_eq!(read(&broken), [false]);
        // A key and value checked as one text must also split at a char boundary: "k" and
        // "x" made into 0xC3 and 0xA9 are "é" together, but neither is text on its own.
        let mut one = span(1);
        one.attributes = vec![KeyValue::new("k", "x")];
        let mut split = Vec::new();
        pack(&mut split, &one, Operation::Llm, dur(&one), usize::MAX);
        assert_eq!(read(&split), [true]);
        let attr = [1, 0, 0, 0, V_STR, 1, 0, 0, 0, b'k', b'x'];
        let at = split
            .windows(attr.len())
            .position(|w| w == attr)
            .expect("the attribute as put_attr writes it");
        split[at + 9] = 0xC3;
        split[at + 10] = 0xA9;
        assert_eq!(read(&split), [false]);
        // A nonsense count does not reserve memory for it.
        let mut bad = vec![Operation::Llm.index() as u8];
        bad.extend_from_slice(&[0; 16 + 8 + 8 + 1 + 16]);
        bad.push(S_UNSET);
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(read(&bad), [false]);
    }

    #[test]
    fn many_distinct_keys_and_an_empty_key_read_back_the_same() {
        let mut chunk = Vec::new();
        let spans: Vec<_> = (0..300)
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
        let back = json_of(&chunk);
        assert_eq!(back.len(), spans.len());
        for (orig, got) in spans.iter().zip(&back) {
            assert_eq!(*got, expected(orig, Operation::Other));
        }
    }
}
