//! The table of open calls: grouping spans into calls, call ends, eviction, idle expiry.
//!
//! Shared by the span hot path (`on_start` / `on_end`) and the worker (idle scan, shutdown).
//! Each open call is a [`Call`]: its state behind a lock of its own. The fast path finds the
//! span's call in a small per-thread cache (trace id → call) and takes only that call's lock;
//! on a miss it looks the trace up in the trace index and the call in the call table. Creating
//! or ending a call also takes the `lifecycle` mutex. Lock order: lifecycle, then a table
//! shard, then a call's lock — never the other way round (code holding a call's lock takes no
//! other lock).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::SpanData;

use crate::call::{CallState, SpanView, truncate_str};
use crate::config::Config;
use crate::config::DetailMode;
use crate::fasthash::FastState;
use crate::packed::{Budget, CHUNK_BYTES, CHUNK_SPANS, Chunk, MIN_CHUNK_BYTES};
use crate::semantics::{CallIdValue, KeyTable, Operation};
use crate::stats::Counters;

/// Longest call id kept; longer ones are cut (and counted).
pub(crate) const MAX_CALL_ID_BYTES: usize = 256;

/// Why a call ended (`end_reason` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    RootSpanEnded,
    IdleTimeout,
    Shutdown,
    Evicted,
}

impl EndReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EndReason::RootSpanEnded => "root_span_ended",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Shutdown => "shutdown",
            EndReason::Evicted => "evicted",
        }
    }
}

/// One open call in the table: its id and its state under a lock of its own, so a span of a
/// known call takes one uncontended lock and no table lock. The state is taken out (`None`)
/// when the call ends or is folded into another, and only then; a slot found empty means "look
/// again in the table".
#[derive(Debug)]
pub(crate) struct Call {
    id: Arc<str>,
    /// Keyed by a trace id because no call id was seen yet (never changes).
    provisional: bool,
    /// Its place in `Lifecycle::open_order` (an id may come back once it is forgotten).
    seq: u64,
    state: Mutex<Option<CallState>>,
}

impl Call {
    fn new(mut state: CallState, seq: u64) -> Arc<Self> {
        state.incarnation = seq;
        Arc::new(Call {
            id: state.call_id.clone(),
            provisional: state.provisional,
            seq,
            state: Mutex::new(Some(state)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<CallState>> {
        // A panic while recording leaves a consistent-enough state (counters and lists).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the call: takes its state out of the slot.
    fn take(&self) -> Option<CallState> {
        self.lock().take()
    }
}

/// Calls remembered per thread for the traces it records (a power of two).
const CACHED_TRACES: usize = 64;

/// A trace this thread recorded spans of, and its call.
#[derive(Debug)]
struct CachedTrace {
    registry: u64,
    trace: TraceId,
    call: Arc<Call>,
}

thread_local! {
    /// Per thread: trace id → call, direct-mapped by the trace id's low bits. Holds what the
    /// trace index holds, for traces this thread recorded lately: a stale entry is one whose
    /// call has ended (its slot is empty), which sends the span to the table.
    static TRACE_CACHE: RefCell<[Option<CachedTrace>; CACHED_TRACES]> =
        const { RefCell::new([const { None }; CACHED_TRACES]) };
}

/// Forgotten calls between two sweeps of a full trace index.
const SWEEP_EVERY: usize = 256;

/// Numbers registries, so a thread's cache never mixes two processors' calls.
static NEXT_REGISTRY: AtomicU64 = AtomicU64::new(1);

#[inline]
fn cache_slot(trace: TraceId) -> usize {
    let b = trace.to_bytes();
    usize::from(b[15] ^ b[7]) & (CACHED_TRACES - 1)
}

/// Whether `key` is the provisional key of `trace` (its id in 32 hex digits), without
/// formatting one.
fn is_trace_key(key: &str, trace: TraceId) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let k = key.as_bytes();
    k.len() == 32
        && trace
            .to_bytes()
            .iter()
            .zip(k.chunks_exact(2))
            .all(|(b, pair)| {
                pair[0] == HEX[usize::from(b >> 4)] && pair[1] == HEX[usize::from(b & 15)]
            })
}

/// A call that ended, with why.
#[derive(Debug)]
pub(crate) struct Ended {
    pub state: CallState,
    pub reason: EndReason,
}

/// Packed bytes a queued span is given room for: a voice-agent span with eight attributes
/// packs to about 430 bytes.
const QUEUED_SPAN_BYTES: usize = 512;

/// The bound on packed spans not yet serialised by the worker (in open calls' chunks or
/// queued): half of `CALLSCOPE_MAX_BUFFER_BYTES`, or room for `CALLSCOPE_QUEUE_SIZE` spans of
/// [`QUEUED_SPAN_BYTES`], whichever is more (32 MiB with the defaults).
fn packed_bytes_bound(config: &Config) -> usize {
    (config.max_buffer_bytes / 2).max(config.queue_size.saturating_mul(QUEUED_SPAN_BYTES))
}

/// Counts (and logs at powers of two) spans whose detail a full queue refused.
pub(crate) fn count_queue_full(stats: &Counters, spans: u64) {
    if let Some(n) = Counters::add_at_powers_of_two(&stats.spans_dropped_queue_full, spans) {
        tracing::warn!(
            dropped = n,
            "callscope queue full (CALLSCOPE_QUEUE_SIZE spans, or half of CALLSCOPE_MAX_BUFFER_BYTES in packed spans): span detail dropped (summaries stay exact)"
        );
    }
}

/// What a span ended, for the worker's control queue.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    /// Calls this span ended (its own at a root span, others by eviction).
    pub ended: Vec<Ended>,
}

/// Where the registry hands the worker what it must know while the lock that orders it is
/// still held: the worker then learns of it before any end of the call concerned that is sent
/// after it, whichever thread sends that end. (An idle end is taken by the worker's own tick,
/// which may run before it reads a join: the ended call lists its folds for that case.)
pub(crate) trait Outbox {
    /// A call's full chunk of packed spans (or a late span's), under the call's lock.
    fn ship(&self, s: Shipment);
    /// Provisional call `from` was folded into `to`, whose registry number is `call`
    /// ([`CallState::incarnation`]), under the lifecycle lock.
    fn joined(&self, from: Arc<str>, to: Arc<str>, call: u64);
}

/// An [`Outbox`] that lets everything go (benchmarks of the registry alone).
pub(crate) struct Discard;

impl Outbox for Discard {
    fn ship(&self, _: Shipment) {}
    fn joined(&self, _: Arc<str>, _: Arc<str>, _: u64) {}
}

/// A call's packed spans, ready for the worker: its chunk filled up, or the span is late.
#[derive(Debug)]
pub(crate) struct Shipment {
    pub call_id: Arc<str>,
    pub chunk: Chunk,
    /// The call had already ended.
    pub late: bool,
    /// The call is still keyed by its trace id.
    pub provisional: bool,
    /// [`CallState::incarnation`] of the call (0 for a late span: its call is gone).
    pub incarnation: u64,
}

#[derive(Debug, Default)]
struct Lifecycle {
    /// Open calls in creation order, with their [`Call::seq`] (may hold ended ones; compacted
    /// now and then).
    open_order: VecDeque<(Arc<str>, u64)>,
    /// The last [`Call::seq`] given out.
    next_seq: u64,
    /// Forgotten calls to wait for before the full trace index is swept again.
    sweep_wait: usize,
    /// The worker is to sweep the full trace index at its next tick.
    sweep_due: bool,
    /// Recently ended calls: spans for them are late spans.
    ended: HashSet<Arc<str>>,
    ended_order: VecDeque<(Arc<str>, Vec<TraceId>)>,
}

/// The open calls and the trace → call index.
#[derive(Debug)]
pub(crate) struct Registry {
    /// This registry among all of the process's (see [`TRACE_CACHE`]).
    id: u64,
    pub(crate) config: Arc<Config>,
    pub(crate) stats: Arc<Counters>,
    /// `config.call_id_keys`, ready for the per-attribute test.
    pub(crate) id_keys: KeyTable,
    clock: Instant,
    /// [`now_ns`](Self::now_ns) as the worker last read it (every tick and loop turn): what the
    /// hot path dates a call's activity with, one clock read less per span. It only feeds the
    /// idle timeout, which is far longer than a tick.
    coarse_now: AtomicU64,
    calls: DashMap<Arc<str>, Arc<Call>, FastState>,
    /// `calls.len()`, kept under the lifecycle lock: a reader racing the span recorders would
    /// otherwise sum the shards mid-change and may see more calls than ever were open at once.
    open: AtomicUsize,
    traces: DashMap<TraceId, Arc<str>, FastState>,
    lifecycle: Mutex<Lifecycle>,
    resource_agent_id: RwLock<Option<Arc<str>>>,
    /// How many ended calls are remembered for late-span detection.
    ended_cap: usize,
    /// Bound on the trace → call index.
    traces_cap: usize,
    /// Bytes of text kept per call.
    text_cap: usize,
    /// Bound on packed spans not yet serialised by the worker ([`packed_bytes_bound`]).
    queue_bytes: Arc<Budget>,
    /// Spans per chunk before it is handed over.
    chunk_spans: usize,
}

impl Lifecycle {
    /// Puts a new call last in `open_order`; its [`Call::seq`].
    fn push_open(&mut self, key: Arc<str>) -> u64 {
        // From 1: 0 is no call's (a late span's shipment, a state not yet in the table).
        self.next_seq += 1;
        let seq = self.next_seq;
        self.open_order.push_back((key, seq));
        seq
    }

    /// `key` opens in the place of the call that held `seq` (a provisional call folded into
    /// it): a joined call is as old as its first span, not new. Its seq.
    fn take_place(&mut self, seq: u64, key: Arc<str>) -> u64 {
        // Pushed in seq order and only ever filtered: sorted.
        match self.open_order.binary_search_by_key(&seq, |(_, s)| *s) {
            Ok(i) => {
                self.open_order[i].0 = key;
                seq
            }
            Err(_) => self.push_open(key),
        }
    }
}

fn lock(m: &Mutex<Lifecycle>) -> MutexGuard<'_, Lifecycle> {
    // A panic while holding the lock leaves consistent-enough state (sets and queues).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub(crate) fn new(config: Arc<Config>, stats: Arc<Counters>) -> Self {
        let open = config.max_open_calls;
        Registry {
            id: NEXT_REGISTRY.fetch_add(1, Ordering::Relaxed),
            ended_cap: open.saturating_mul(2).max(1024),
            traces_cap: open.saturating_mul(64).max(65_536),
            text_cap: config.max_summary_bytes,
            calls: DashMap::with_capacity_and_hasher(open.min(1024), FastState::default()),
            open: AtomicUsize::new(0),
            traces: DashMap::with_capacity_and_hasher(open.min(1024), FastState::default()),
            lifecycle: Mutex::new(Lifecycle::default()),
            resource_agent_id: RwLock::new(None),
            clock: Instant::now(),
            coarse_now: AtomicU64::new(0),
            id_keys: KeyTable::with_roots(&config.call_id_keys, &config.root_span_names),
            queue_bytes: Arc::new(Budget::new(packed_bytes_bound(&config))),
            chunk_spans: config.queue_size.clamp(1, CHUNK_SPANS),
            config,
            stats,
        }
    }

    /// The processor's monotonic clock, in ns since it started.
    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// [`now_ns`](Self::now_ns) as of the worker's last look (at most a tick old).
    #[inline]
    pub(crate) fn coarse_now_ns(&self) -> u64 {
        self.coarse_now.load(Ordering::Relaxed)
    }

    /// Reads the clock for [`coarse_now_ns`](Self::coarse_now_ns).
    pub(crate) fn refresh_clock(&self) {
        self.coarse_now.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Open calls now.
    pub(crate) fn open_calls(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Records `service.name` of the provider's resource (the default agent id).
    pub(crate) fn set_resource_agent_id(&self, id: Option<&str>) {
        if let Ok(mut g) = self.resource_agent_id.write() {
            *g = id.map(Arc::from);
        }
    }

    /// `agent_id` for payloads: CALLSCOPE_AGENT_ID, else the resource's service.name.
    pub(crate) fn agent_id(&self) -> Arc<str> {
        if let Some(a) = &self.config.agent_id {
            return Arc::from(a.as_str());
        }
        self.resource_agent_id
            .read()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| Arc::from("unknown_service"))
    }

    /// The shared `Arc<str>` for a call id (no new allocation when the call is open).
    fn intern(&self, id: &str) -> Arc<str> {
        match self.calls.get(id) {
            Some(e) => e.key().clone(),
            None => Arc::from(id),
        }
    }

    fn cut_call_id<'a>(&self, id: CallIdValue<'a>) -> Cow<'a, str> {
        let id = match id {
            CallIdValue::Str(s) => Cow::Borrowed(s),
            CallIdValue::Int(i) => Cow::Owned(i.to_string()),
        };
        if id.len() <= MAX_CALL_ID_BYTES {
            return id;
        }
        Counters::inc(&self.stats.call_ids_truncated);
        tracing::warn!(
            len = id.len(),
            "call id longer than {MAX_CALL_ID_BYTES} bytes cut"
        );
        Cow::Owned(truncate_str(&id, MAX_CALL_ID_BYTES).to_owned())
    }

    fn map_trace(&self, trace: TraceId, call: &Arc<str>) {
        if self.traces.len() < self.traces_cap {
            self.traces.entry(trace).or_insert_with(|| call.clone());
        } else if !self.traces.contains_key(&trace)
            && let Some(n) = Counters::add_at_powers_of_two(&self.stats.traces_not_indexed, 1)
        {
            tracing::warn!(
                traces = n,
                cap = self.traces_cap,
                "callscope trace index full: spans of new traces without a call id of their own go to calls keyed by their trace id (raise CALLSCOPE_MAX_OPEN_CALLS if many calls are really open)"
            );
        }
    }

    /// `on_start`: learn the call id of a trace early, from the parent context's baggage or
    /// (for a root span) from the attributes it starts with. A trace whose spans so far went
    /// to a provisional call (no id seen yet) joins the learned call as a span naming it would:
    /// the provisional call is folded into it (told to `out`), or, if it already ended, the
    /// trace's further spans go to the learned call.
    pub(crate) fn learn(&self, trace: TraceId, id: CallIdValue<'_>, out: &dyn Outbox) {
        let known = match self.traces.get(&trace) {
            // Grouped under a real id already: a span naming another call does not move it.
            Some(e) if !is_trace_key(e.value(), trace) => return,
            e => e.map(|e| e.value().clone()),
        };
        let id = self.cut_call_id(id);
        self.named(trace, known, &id, out);
    }

    /// The call of a span (or a span's start) naming call `id`, its trace's call so far being
    /// `known`. A trace grouped so far under a provisional call joins the named call (a fold
    /// is told to `out`), or, if the provisional call already ended, sends its further spans
    /// there; a trace grouped under another real id keeps it.
    fn named(
        &self,
        trace: TraceId,
        known: Option<Arc<str>>,
        id: &str,
        out: &dyn Outbox,
    ) -> Arc<str> {
        match known {
            Some(k) if *k == *id => k,
            Some(k) if self.is_provisional(&k) => self.join(&k, id, trace, out),
            Some(k) if is_trace_key(&k, trace) => {
                // The trace's provisional call ended (evicted, idle) before its id showed up:
                // nothing to fold, but the trace's further spans belong to the named call.
                let real = self.intern(id);
                self.traces.insert(trace, real.clone());
                real
            }
            _ => {
                let k = self.intern(id);
                self.map_trace(trace, &k);
                k
            }
        }
    }

    /// `on_end`: updates the span's call and says what it ended (folds go to `out`). `now` is the
    /// processor's clock ([`now_ns`](Self::now_ns) or the coarse [`coarse_now_ns`](Self::coarse_now_ns)).
    /// A chunk that fills up is handed to `out` while the call's lock is still held, so
    /// that an end of the call recorded by another thread is counted after it (the worker
    /// finishes a call once everything queued before its end is in: a shipment counted after
    /// the end would arrive as late detail).
    pub(crate) fn record(&self, span: &SpanData, now: u64, out: &dyn Outbox) -> Routed {
        let view = SpanView::read(span, &self.id_keys);
        let (op, dur, trace_id) = (view.op, view.dur, view.trace_id);
        let explicit = view.facts.call_id.map(|c| self.cut_call_id(c));
        let is_root = span.parent_span_id == SpanId::INVALID || view.root_name;
        let detail = self.wants_detail(span, op, dur);
        if !detail {
            self.stats.filtered.inc();
        }
        // Returns how many texts were cut to the call's caps.
        let update = |key: &Arc<str>, c: &mut CallState| {
            let cut = c.record(&view, now);
            if detail && let Some(chunk) = self.pack(&mut c.chunk, span, op, dur, now, false) {
                out.ship(Shipment {
                    call_id: key.clone(),
                    chunk,
                    late: false,
                    provisional: c.provisional,
                    incarnation: c.incarnation,
                });
            }
            cut
        };

        // Fast path, most spans: this thread recorded the trace's call lately and it is still
        // open, the span names no other call and does not end it.
        if !is_root && let Some(cut) = self.record_cached(trace_id, explicit.as_deref(), update) {
            self.count_cut(cut, &trace_id);
            return Routed::default();
        }

        let mut provisional = false;
        let mut late = false;
        let mut ended = Vec::new();

        // 1. which call
        let known = self.traces.get(&trace_id).map(|e| e.value().clone());
        let key = match (explicit.as_deref(), known) {
            (Some(id), known) => self.named(trace_id, known, id, out),
            (None, Some(k)) => k,
            (None, None) => {
                let k: Arc<str> = Arc::from(format!("{trace_id:032x}"));
                self.map_trace(trace_id, &k);
                provisional = true;
                k
            }
        };

        // 2. update it (its own lock when open) and pack its detail into the call's chunk
        let mut cut = 0;
        if let Some(call) = self.record_open(&key, &mut cut, update) {
            self.remember_trace(trace_id, call);
        } else {
            let mut lc = lock(&self.lifecycle);
            // Under the lifecycle lock no call starts or ends: what the table says now holds.
            if let Some(call) = self.record_open(&key, &mut cut, update) {
                self.remember_trace(trace_id, call);
            } else if lc.ended.contains(&key) {
                late = true;
                Counters::inc(&self.stats.late_spans);
                if detail {
                    // A late span travels on its own.
                    let mut one = None;
                    if let Some(chunk) = self.pack(&mut one, span, op, dur, now, true).or(one) {
                        out.ship(Shipment {
                            call_id: key.clone(),
                            chunk,
                            late: true,
                            provisional,
                            incarnation: 0,
                        });
                    }
                }
            } else {
                self.evict_for_new(&mut lc, &mut ended);
                let mut st = CallState::new(key.clone(), provisional, now, self.text_cap);
                let seq = lc.push_open(key.clone());
                st.incarnation = seq;
                // Shipped (if its first span fills a chunk) under the lifecycle lock, which
                // any end of this call takes too.
                cut = update(&key, &mut st);
                let call = Call::new(st, seq);
                self.calls.insert(key.clone(), call.clone());
                self.open.fetch_add(1, Ordering::Relaxed);
                Counters::inc(&self.stats.calls_started);
                drop(lc);
                self.remember_trace(trace_id, call);
            }
        }
        self.count_cut(cut, &trace_id);

        // 3. a root span ends its call
        if is_root && !late {
            ended.extend(self.end(&key, EndReason::RootSpanEnded));
        }
        Routed { ended }
    }

    /// Records the span through this thread's cache: `Some(texts cut)` when the trace's call was
    /// cached and still open (and is the call `explicit` names, if the span names one).
    #[inline]
    fn record_cached(
        &self,
        trace: TraceId,
        explicit: Option<&str>,
        update: impl Fn(&Arc<str>, &mut CallState) -> u64,
    ) -> Option<u64> {
        TRACE_CACHE
            .try_with(|cache| {
                // Taken already only if recording re-entered this thread's `on_end`.
                let cache = cache.try_borrow().ok()?;
                let hit = cache[cache_slot(trace)].as_ref()?;
                if hit.registry != self.id
                    || hit.trace != trace
                    || explicit.is_some_and(|id| *hit.call.id != *id)
                {
                    return None;
                }
                let mut g = hit.call.lock();
                let st = g.as_mut()?;
                Some(update(&hit.call.id, st))
            })
            .ok()
            .flatten()
    }

    /// Records into the open call `key` (`update` says how many texts were cut, into `cut`);
    /// the call, or `None` when it is not in the table or its slot was just emptied.
    fn record_open(
        &self,
        key: &str,
        cut: &mut u64,
        update: impl Fn(&Arc<str>, &mut CallState) -> u64,
    ) -> Option<Arc<Call>> {
        let call = self.calls.get(key).map(|e| e.value().clone())?;
        let mut g = call.lock();
        *cut = update(&call.id, g.as_mut()?);
        drop(g);
        Some(call)
    }

    /// Caches `call` as the trace's call for this thread, if the trace index says so (a span
    /// may name a call other than its trace's: that call is not the trace's).
    fn remember_trace(&self, trace: TraceId, call: Arc<Call>) {
        if !self
            .traces
            .get(&trace)
            .is_some_and(|t| Arc::ptr_eq(t.value(), &call.id) || **t.value() == *call.id)
        {
            return;
        }
        let _ = TRACE_CACHE.try_with(|cache| {
            if let Ok(mut cache) = cache.try_borrow_mut() {
                cache[cache_slot(trace)] = Some(CachedTrace {
                    registry: self.id,
                    trace,
                    call,
                });
            }
        });
    }

    /// Counts texts cut to a call's caps.
    #[inline]
    fn count_cut(&self, cut: u64, trace_id: &TraceId) {
        if cut > 0 {
            self.count_cut_slow(cut, trace_id);
        }
    }

    #[cold]
    fn count_cut_slow(&self, cut: u64, trace_id: &TraceId) {
        Counters::add(&self.stats.text_truncations, cut);
        tracing::debug!(trace_id = %format!("{trace_id:032x}"), cut, "transcript text cut to the call's cap");
    }

    /// Whether a span's detail is sent under `CALLSCOPE_DETAIL`.
    fn wants_detail(&self, span: &SpanData, op: Operation, dur: Duration) -> bool {
        match self.config.detail {
            DetailMode::All => true,
            DetailMode::None => false,
            DetailMode::Critical => {
                op == Operation::Tool
                    || matches!(span.status, opentelemetry::trace::Status::Error { .. })
                    || dur > self.config.critical_threshold
            }
        }
    }

    /// Packs a span into `chunk` (a call's, or a fresh one for a late span); returns the chunk
    /// once it is full enough to hand over. A span the byte bound cannot hold is counted and
    /// its detail dropped.
    fn pack(
        &self,
        chunk: &mut Option<Chunk>,
        span: &SpanData,
        op: Operation,
        dur: Duration,
        now: u64,
        late: bool,
    ) -> Option<Chunk> {
        if chunk.is_none() {
            // Room for a quarter of the bound shared by the open calls, within limits; a late
            // span (no call to gather more) gets the smallest.
            let open = self.open.load(Ordering::Relaxed).max(1);
            let capacity = if late {
                MIN_CHUNK_BYTES
            } else {
                (self.queue_bytes.cap() / 4 / open).clamp(MIN_CHUNK_BYTES, CHUNK_BYTES)
            };
            *chunk = Chunk::new(&self.queue_bytes, now, capacity);
        }
        let Some(c) = chunk else {
            count_queue_full(&self.stats, 1);
            return None;
        };
        if !c.push(span, op, dur, self.config.max_request_bytes) {
            count_queue_full(&self.stats, 1);
            if c.spans() == 0 {
                *chunk = None;
            }
            return None;
        }
        if c.is_full(self.chunk_spans) {
            return chunk.take();
        }
        None
    }

    /// Takes the chunks of open calls whose first span was packed at least `min_age_ns` ago
    /// (all of them for 0): a quiet call's detail must not wait for its chunk to fill.
    pub(crate) fn take_chunks(&self, min_age_ns: u64) -> Vec<Shipment> {
        let now = self.coarse_now_ns();
        let mut out = Vec::new();
        for e in self.calls.iter() {
            let call = e.value();
            let mut g = call.lock();
            let Some(st) = g.as_mut() else { continue };
            let due = st
                .chunk
                .as_ref()
                .is_some_and(|c| now.saturating_sub(c.since_ns) >= min_age_ns);
            if due && let Some(chunk) = st.chunk.take() {
                out.push(Shipment {
                    call_id: call.id.clone(),
                    chunk,
                    late: false,
                    provisional: call.provisional,
                    incarnation: st.incarnation,
                });
            }
        }
        out
    }

    fn is_provisional(&self, k: &str) -> bool {
        self.calls.get(k).is_some_and(|c| c.provisional)
    }

    /// The call id `id` showed up on a trace whose spans so far sit in provisional call `prov`:
    /// fold it into the real call and point the trace at it. The real call's key. A fold is
    /// told to `out` under the lifecycle lock, so it reaches the worker before any end of the
    /// real call sent by an app thread (none is taken before the lock is let go); the real
    /// call's state also lists the fold, for an idle end taken by the worker itself. Nothing
    /// is folded when the real call is over, or the provisional one ended meanwhile: it then
    /// keeps its spans under its own key.
    fn join(&self, prov: &Arc<str>, id: &str, trace: TraceId, out: &dyn Outbox) -> Arc<str> {
        let mut lc = lock(&self.lifecycle);
        let real = self.intern(id);
        self.traces.insert(trace, real.clone());
        if lc.ended.contains(&real) {
            // The real call is over: the provisional one lives on and ends by itself, but its
            // trace's spans are now late. Threads may have cached the trace -> provisional call:
            // its state moves to a new slot, so a cached hit finds the old slot empty and asks
            // the trace index (the cache's fast path stays one pointer compare).
            if let Some(old) = self.calls.get(prov).map(|e| e.value().clone())
                && old.provisional
                && let Some(st) = old.take()
            {
                self.calls.insert(prov.clone(), Call::new(st, old.seq));
            }
            return real;
        }
        let Some((_, prov_call)) = self.calls.remove_if(prov, |_, c| c.provisional) else {
            return real;
        };
        let Some(p) = prov_call.take() else {
            return real;
        };
        self.open.fetch_sub(1, Ordering::Relaxed);
        // Under the lifecycle lock a call in the table is open (its state is taken only when it
        // leaves the table, under this lock).
        let open = self.calls.get(&*real).map(|e| e.value().clone());
        let merged = match &open {
            Some(r) => match r.lock().as_mut() {
                Some(st) => Ok((st.merge(p), st.incarnation)),
                None => Err(p),
            },
            None => Err(p),
        };
        let (cut, call) = match merged {
            Ok(merged) => merged,
            Err(p) => {
                let mut st = CallState::new(real.clone(), false, p.first_seen_ns, self.text_cap);
                let cut = st.merge(p);
                let seq = lc.take_place(prov_call.seq, real.clone());
                self.calls.insert(real.clone(), Call::new(st, seq));
                self.open.fetch_add(1, Ordering::Relaxed);
                (cut, seq)
            }
        };
        Counters::add(&self.stats.text_truncations, cut);
        Counters::inc(&self.stats.calls_joined);
        out.joined(prov.clone(), real.clone(), call);
        real
    }

    /// Keeps the open calls under `max_open_calls` by ending the oldest.
    fn evict_for_new(&self, lc: &mut Lifecycle, out: &mut Vec<Ended>) {
        while self.open.load(Ordering::Relaxed) >= self.config.max_open_calls {
            let Some((oldest, seq)) = lc.open_order.pop_front() else {
                break;
            };
            // An entry of an ended call whose id came back as a newer call is not that call.
            if self.calls.get(&oldest).is_none_or(|c| c.seq != seq) {
                continue;
            }
            if let Some(e) = self.end_locked(lc, &oldest, EndReason::Evicted) {
                // Counted in calls_ended_evicted; logged at powers of two so a flood of call
                // ids cannot flood the log too.
                let n = self.stats.calls_ended_evicted.load(Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(call_id = %oldest, evicted = n, "open call evicted: CALLSCOPE_MAX_OPEN_CALLS reached");
                }
                out.push(e);
            }
        }
        if lc.open_order.len() > self.config.max_open_calls.saturating_mul(2) + 64 {
            lc.open_order
                .retain(|(k, seq)| self.calls.get(k).is_some_and(|c| c.seq == *seq));
        }
    }

    /// Whether call number `call` ([`CallState::incarnation`]) is open under `id`.
    pub(crate) fn is_open(&self, id: &str, call: u64) -> bool {
        self.calls.get(id).is_some_and(|c| c.seq == call)
    }

    /// How many ended calls are remembered (their spans are late); an id forgotten can open
    /// a call again.
    pub(crate) fn ended_cap(&self) -> usize {
        self.ended_cap
    }

    /// Ends a call (if open) and remembers it for late-span detection.
    pub(crate) fn end(&self, key: &str, reason: EndReason) -> Option<Ended> {
        let mut lc = lock(&self.lifecycle);
        self.end_locked(&mut lc, key, reason)
    }

    fn end_locked(&self, lc: &mut Lifecycle, key: &str, reason: EndReason) -> Option<Ended> {
        let (k, call) = self.calls.remove(key)?;
        self.open.fetch_sub(1, Ordering::Relaxed);
        // Waits for a span being recorded into it: its shipment is counted before this end.
        let state = call.take()?;
        self.remember_ended(lc, k, state.trace_ids.clone());
        self.count_end(reason);
        Some(Ended { state, reason })
    }

    fn remember_ended(&self, lc: &mut Lifecycle, k: Arc<str>, traces: Vec<TraceId>) {
        lc.ended.insert(k.clone());
        lc.ended_order.push_back((k, traces));
        let mut forgot = false;
        while lc.ended_order.len() > self.ended_cap {
            if let Some((old, traces)) = lc.ended_order.pop_front() {
                forgot = true;
                lc.ended.remove(&old);
                for t in traces {
                    self.traces.remove_if(&t, |_, v| *v == old);
                }
                lc.sweep_wait = lc.sweep_wait.saturating_sub(1);
            }
        }
        // A call's own list names at most MAX_TRACE_IDS of its traces, and traces of late spans
        // or joined to an ended call are on no list: when the index is full, the worker's next
        // tick sweeps it (at most once per SWEEP_EVERY forgotten calls; never on an app thread).
        if forgot && lc.sweep_wait == 0 && self.traces.len() >= self.traces_cap {
            lc.sweep_due = true;
        }
    }

    /// The worker's tick: when the trace index is full and calls were forgotten since it was
    /// last swept, drops the entries that point at calls neither open nor remembered as ended.
    pub(crate) fn sweep_traces_if_due(&self) {
        let mut lc = lock(&self.lifecycle);
        if !std::mem::take(&mut lc.sweep_due) {
            return;
        }
        let ended = &lc.ended;
        self.traces
            .retain(|_, v| ended.contains(v) || self.calls.contains_key(v));
        lc.sweep_wait = SWEEP_EVERY;
    }

    fn count_end(&self, reason: EndReason) {
        let c = match reason {
            EndReason::RootSpanEnded => &self.stats.calls_ended_root,
            EndReason::IdleTimeout => &self.stats.calls_ended_idle,
            EndReason::Shutdown => &self.stats.calls_ended_shutdown,
            EndReason::Evicted => &self.stats.calls_ended_evicted,
        };
        Counters::inc(c);
    }

    /// Ends every call idle for `CALLSCOPE_CALL_IDLE_TIMEOUT_MS` on the processor's clock.
    pub(crate) fn expire_idle(&self) -> Vec<Ended> {
        let now = self.now_ns();
        let limit = u64::try_from(self.config.call_idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let idle = |c: &Call| {
            c.lock()
                .as_ref()
                .is_some_and(|st| now.saturating_sub(st.last_seen_ns) >= limit)
        };
        let expired: Vec<Arc<str>> = self
            .calls
            .iter()
            .filter(|e| idle(e.value()))
            .map(|e| e.key().clone())
            .collect();
        let mut out = Vec::new();
        for k in expired {
            let mut lc = lock(&self.lifecycle);
            if let Some((k, call)) = self.calls.remove_if(&k, |_, c| idle(c))
                && let Some(state) = call.take()
            {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.remember_ended(&mut lc, k, state.trace_ids.clone());
                self.count_end(EndReason::IdleTimeout);
                out.push(Ended {
                    state,
                    reason: EndReason::IdleTimeout,
                });
            }
        }
        out
    }

    /// Ends every open call (at shutdown).
    pub(crate) fn end_all(&self, reason: EndReason) -> Vec<Ended> {
        let keys: Vec<Arc<str>> = self.calls.iter().map(|e| e.key().clone()).collect();
        keys.iter().filter_map(|k| self.end(k, reason)).collect()
    }
}

impl Drop for Registry {
    /// Empties every call's slot: threads' caches may keep a slot alive a while, never a call.
    fn drop(&mut self) {
        for e in self.calls.iter() {
            drop(e.value().take());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags, TraceState};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::sync::Mutex as StdMutex;
    use std::time::{Duration, UNIX_EPOCH};

    fn registry() -> Registry {
        registry_with(|b| b)
    }

    fn registry_with(
        f: impl FnOnce(crate::config::ConfigBuilder) -> crate::config::ConfigBuilder,
    ) -> Registry {
        let config = f(Config::builder()
            .without_env()
            .endpoint("http://127.0.0.1:9/"))
        .build()
        .unwrap();
        Registry::new(Arc::new(config), Arc::new(Counters::default()))
    }

    fn span(trace: u128, id: u64, parent: Option<u64>, call_id: Option<&str>) -> SpanData {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: if parent.is_some() {
                "llm_request"
            } else {
                "agent_session"
            }
            .into(),
            start_time: t0,
            end_time: t0 + Duration::from_millis(id),
            attributes: call_id
                .map(|c| vec![KeyValue::new("call_id", c.to_owned())])
                .unwrap_or_default(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// What the registry handed over: (call id, late) per shipment, and the folds.
    #[derive(Default)]
    struct Seen {
        shipped: StdMutex<Vec<(String, bool)>>,
        joined: StdMutex<Vec<(String, String)>>,
        /// The registry number each fold named.
        join_calls: StdMutex<Vec<u64>>,
    }

    impl Outbox for Seen {
        fn ship(&self, sh: Shipment) {
            self.shipped
                .lock()
                .unwrap()
                .push((sh.call_id.to_string(), sh.late));
        }
        fn joined(&self, from: Arc<str>, to: Arc<str>, call: u64) {
            self.join_calls.lock().unwrap().push(call);
            self.joined
                .lock()
                .unwrap()
                .push((from.to_string(), to.to_string()));
        }
    }

    impl Seen {
        fn record(&self, r: &Registry, s: &SpanData) -> Routed {
            r.record(s, r.now_ns(), self)
        }

        /// The folds told so far, as `(from, to)`.
        fn joins(&self) -> Vec<(String, String)> {
            self.joined.lock().unwrap().clone()
        }
    }

    fn total_spans(e: &Ended) -> u64 {
        e.state.agg.total_spans
    }

    #[test]
    fn a_span_after_its_call_ended_is_late_on_a_thread_that_cached_the_call() {
        let r = registry();
        let seen = Seen::default();
        // This thread records two children: the second one through its cache.
        seen.record(&r, &span(1, 2, Some(1), Some("c")));
        seen.record(&r, &span(1, 3, Some(1), None));
        // The root ends the call on another thread.
        let routed = std::thread::scope(|s| {
            s.spawn(|| seen.record(&r, &span(1, 1, None, Some("c"))))
                .join()
                .unwrap()
        });
        assert_eq!(routed.ended.len(), 1);
        assert_eq!(total_spans(&routed.ended[0]), 3);
        // This thread's cache still names the call: the span must be late, not recorded.
        let after = seen.record(&r, &span(1, 4, Some(1), None));
        assert!(after.ended.is_empty());
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 1);
        assert_eq!(
            seen.shipped.lock().unwrap().last().cloned(),
            Some(("c".to_owned(), true))
        );
        assert_eq!(r.open_calls(), 0);
    }

    #[test]
    fn two_processors_on_one_thread_keep_their_own_calls_for_the_same_trace() {
        let (a, b) = (registry(), registry());
        let seen = Seen::default();
        seen.record(&a, &span(7, 2, Some(1), Some("in-a")));
        seen.record(&b, &span(7, 2, Some(1), Some("in-b")));
        for id in 3..10 {
            seen.record(&a, &span(7, id, Some(1), None));
            seen.record(&b, &span(7, id, Some(1), None));
        }
        let ea = seen.record(&a, &span(7, 1, None, None));
        let eb = seen.record(&b, &span(7, 1, None, None));
        assert_eq!(&*ea.ended[0].state.call_id, "in-a");
        assert_eq!(&*eb.ended[0].state.call_id, "in-b");
        assert_eq!(total_spans(&ea.ended[0]), 9);
        assert_eq!(total_spans(&eb.ended[0]), 9);
    }

    #[test]
    fn spans_cached_under_a_provisional_call_follow_it_into_its_real_call() {
        let r = registry();
        let seen = Seen::default();
        // No call id yet: the trace's spans gather in a provisional call (and in the cache).
        seen.record(&r, &span(5, 2, Some(1), None));
        seen.record(&r, &span(5, 3, Some(1), None));
        // The id shows up on a later span: the provisional call joins the real one.
        seen.record(&r, &span(5, 4, Some(1), Some("real")));
        assert_eq!(
            seen.joins(),
            [(format!("{:032x}", 5u128), "real".to_owned())]
        );
        // A span without the id, on the thread whose cache held the provisional call.
        seen.record(&r, &span(5, 5, Some(1), None));
        let end = seen.record(&r, &span(5, 1, None, None));
        assert_eq!(end.ended.len(), 1);
        assert_eq!(&*end.ended[0].state.call_id, "real");
        assert_eq!(total_spans(&end.ended[0]), 5);
        // The fold named the call it created (no call was open under "real").
        let call = end.ended[0].state.incarnation;
        assert!(call >= 1);
        assert_eq!(*seen.join_calls.lock().unwrap(), [call]);
        assert_eq!(r.open_calls(), 0);
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 0);
    }

    /// A provisional call folded into a call that is not open yet opens it in its own place
    /// in the eviction order: the joined call is the oldest, not the newest.
    #[test]
    fn a_joined_call_keeps_its_provisional_calls_age_for_eviction() {
        let r = registry_with(|b| b.max_open_calls(2));
        let seen = Seen::default();
        seen.record(&r, &span(1, 2, Some(1), None));
        seen.record(&r, &span(2, 2, Some(1), Some("younger")));
        // Trace 1's id shows up: its provisional call becomes "older", still the oldest.
        seen.record(&r, &span(1, 3, Some(1), Some("older")));
        assert_eq!(seen.joins().len(), 1);
        let third = seen.record(&r, &span(3, 2, Some(1), Some("third")));
        let evicted: Vec<&str> = third.ended.iter().map(|e| &*e.state.call_id).collect();
        assert_eq!(evicted, ["older"]);
    }

    /// A fold into a call already open names that call's registry number.
    #[test]
    fn a_fold_into_an_open_call_names_its_number() {
        let r = registry();
        let seen = Seen::default();
        seen.record(&r, &span(6, 2, Some(1), Some("real")));
        seen.record(&r, &span(5, 2, Some(1), None));
        seen.record(&r, &span(5, 3, Some(1), Some("real")));
        let end = seen.record(&r, &span(6, 1, None, None));
        assert_eq!(&*end.ended[0].state.call_id, "real");
        assert_eq!(total_spans(&end.ended[0]), 4);
        assert_eq!(
            *seen.join_calls.lock().unwrap(),
            [end.ended[0].state.incarnation]
        );
    }

    /// A fold is told to the worker before the lifecycle lock is let go: another thread's
    /// end of the real call (taken under that lock, sent after it) cannot reach the worker
    /// before the join, which would finish the real call without the provisional call's
    /// detail and number that detail from 0 again.
    #[test]
    fn a_fold_is_told_while_no_call_can_end() {
        struct LockCheck<'a> {
            r: &'a Registry,
            held: StdMutex<Vec<bool>>,
        }
        impl Outbox for LockCheck<'_> {
            fn ship(&self, _: Shipment) {}
            fn joined(&self, _: Arc<str>, _: Arc<str>, _: u64) {
                let held = self.r.lifecycle.try_lock().is_err();
                self.held.lock().unwrap().push(held);
            }
        }
        let r = registry();
        let check = LockCheck {
            r: &r,
            held: StdMutex::default(),
        };
        // By a span naming the call, and by a call id learned at a span's start.
        r.record(&span(5, 2, Some(1), None), r.now_ns(), &check);
        r.record(&span(5, 3, Some(1), Some("real")), r.now_ns(), &check);
        r.record(&span(6, 2, Some(1), None), r.now_ns(), &check);
        r.learn(TraceId::from(6u128), CallIdValue::Str("real6"), &check);
        assert_eq!(*check.held.lock().unwrap(), [true, true]);
    }

    #[test]
    fn a_trace_joined_to_an_ended_call_is_late_on_every_thread() {
        let r = registry();
        let seen = Seen::default();
        seen.record(&r, &span(1, 2, Some(1), Some("real")));
        assert_eq!(seen.record(&r, &span(1, 1, None, None)).ended.len(), 1);
        // A second trace starts without an id: a provisional call, cached on this thread.
        seen.record(&r, &span(2, 2, Some(1), None));
        seen.record(&r, &span(2, 3, Some(1), None));
        // It then names the call that is over: late, and the trace now belongs to "real".
        seen.record(&r, &span(2, 4, Some(1), Some("real")));
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 1);
        // Further spans of the trace without an id are late too, on this thread (whose cache
        // held the provisional call) as on any other.
        seen.record(&r, &span(2, 5, Some(1), None));
        std::thread::scope(|s| {
            s.spawn(|| seen.record(&r, &span(2, 6, Some(1), None)));
        });
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 3);
        let shipped = seen.shipped.lock().unwrap().clone();
        assert!(
            shipped[shipped.len() - 3..]
                .iter()
                .all(|(id, late)| id == "real" && *late),
            "{shipped:?}"
        );
        // The provisional call keeps what it had and ends by itself.
        assert_eq!(r.open_calls(), 1);
        let prov = r
            .end(&format!("{:032x}", 2u128), EndReason::Shutdown)
            .unwrap();
        assert_eq!(total_spans(&prov), 2);
    }

    #[test]
    fn a_span_naming_another_call_is_not_recorded_into_its_traces_cached_call() {
        let r = registry();
        let seen = Seen::default();
        seen.record(&r, &span(9, 2, Some(1), Some("first")));
        seen.record(&r, &span(9, 3, Some(1), None));
        // Same trace, another call id: its own call, and the trace stays with the first.
        seen.record(&r, &span(9, 4, Some(1), Some("second")));
        seen.record(&r, &span(9, 5, Some(1), None));
        assert_eq!(r.open_calls(), 2);
        let first = r.end("first", EndReason::Shutdown).unwrap();
        let second = r.end("second", EndReason::Shutdown).unwrap();
        assert_eq!(total_spans(&first), 3);
        assert_eq!(total_spans(&second), 1);
    }

    #[test]
    fn a_trace_key_is_its_provisional_call_id_exactly() {
        let t = TraceId::from(0x0123_4567_89ab_cdef_u128 << 3);
        assert!(is_trace_key(&format!("{t:032x}"), t));
        assert!(!is_trace_key(&format!("{t:032x}").to_uppercase(), t));
        assert!(!is_trace_key(&format!("{:032x}", TraceId::from(7u128)), t));
        assert!(!is_trace_key("call-1", t));
        assert!(!is_trace_key(&format!("{t:033x}"), t));
    }

    #[test]
    fn a_call_id_learned_at_span_start_joins_the_traces_provisional_call() {
        let r = registry();
        let seen = Seen::default();
        // A child ends before any span of its trace carried the id: a provisional call.
        seen.record(&r, &span(5, 2, Some(1), None));
        // A later span starts with the id in its parent context's baggage (on_start).
        r.learn(TraceId::from(5u128), CallIdValue::Str("real"), &seen);
        assert_eq!(
            seen.joins(),
            [(format!("{:032x}", 5u128), "real".to_owned())],
            "the provisional call joins the learned id"
        );
        // Its end (the id only in baggage, not in its attributes) and the root's go to "real".
        seen.record(&r, &span(5, 3, Some(1), None));
        let end = seen.record(&r, &span(5, 1, None, None));
        assert_eq!(end.ended.len(), 1);
        assert_eq!(&*end.ended[0].state.call_id, "real");
        assert_eq!(total_spans(&end.ended[0]), 3);
        assert_eq!(r.stats.calls_joined.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 0);
        assert_eq!(r.open_calls(), 0);
        // A trace already grouped under a real id learns nothing more.
        seen.record(&r, &span(6, 2, Some(1), Some("c6")));
        r.learn(TraceId::from(6u128), CallIdValue::Str("other"), &seen);
        assert_eq!(seen.joins().len(), 1);
        let end = seen.record(&r, &span(6, 1, None, None));
        assert_eq!(&*end.ended[0].state.call_id, "c6");
    }

    /// A one-call registry where trace 3's provisional call (no id seen yet) was evicted by
    /// another trace's call "other".
    fn trace_3_with_its_provisional_call_evicted() -> (Registry, Seen) {
        let r = registry_with(|b| b.max_open_calls(1));
        let seen = Seen::default();
        seen.record(&r, &span(3, 2, Some(1), None));
        let other = seen.record(&r, &span(4, 2, Some(1), Some("other")));
        assert_eq!(other.ended.len(), 1);
        assert_eq!(&*other.ended[0].state.call_id, format!("{:032x}", 3u128));
        (r, seen)
    }

    /// Trace 3's root ends `call`, which holds `spans` spans, and no span was late.
    fn trace_3_root_ends(r: &Registry, seen: &Seen, call: &str, spans: u64) {
        let end = seen.record(r, &span(3, 1, None, None));
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 0);
        assert_eq!(end.ended.len(), 1);
        assert_eq!(&*end.ended[0].state.call_id, call);
        assert_eq!(total_spans(&end.ended[0]), spans);
    }

    #[test]
    fn a_call_id_learned_after_the_provisional_call_ended_takes_the_rest_of_the_trace() {
        let (r, seen) = trace_3_with_its_provisional_call_evicted();
        r.learn(TraceId::from(3u128), CallIdValue::Str("real"), &seen);
        assert!(seen.joins().is_empty(), "nothing open to fold");
        seen.record(&r, &span(3, 3, Some(1), None));
        trace_3_root_ends(&r, &seen, "real", 2);
    }

    #[test]
    fn a_trace_whose_provisional_call_ended_follows_the_call_it_names_later() {
        let (r, seen) = trace_3_with_its_provisional_call_evicted();
        // Trace 3 now names its call, which starts (evicting "other").
        seen.record(&r, &span(3, 3, Some(1), Some("real")));
        // The trace's further spans without the id belong to "real", and its root ends it.
        seen.record(&r, &span(3, 4, Some(1), None));
        trace_3_root_ends(&r, &seen, "real", 3);
        assert_eq!(r.open_calls(), 0);
    }

    #[test]
    fn eviction_ends_the_oldest_open_call_even_when_a_forgotten_id_came_back() {
        let max = 512;
        let r = registry_with(|b| b.max_open_calls(max));
        let seen = Seen::default();
        let mut trace = 100u128;
        let mut next = || {
            trace += 1;
            trace
        };
        // "k" starts and ends.
        let k = seen.record(&r, &span(next(), 1, None, Some("k"))).ended;
        assert_eq!(k.len(), 1);
        let first_k = k[0].state.incarnation;
        // "a" starts and stays open: the oldest open call from now on.
        seen.record(&r, &span(next(), 2, Some(1), Some("a")));
        // Enough calls end that "k" is forgotten (no longer late).
        for i in 0..r.ended_cap {
            let id = format!("e{i}");
            assert_eq!(
                seen.record(&r, &span(next(), 1, None, Some(&id)))
                    .ended
                    .len(),
                1
            );
        }
        // "k" comes back as a new call, younger than "a".
        seen.record(&r, &span(next(), 2, Some(1), Some("k")));
        assert_eq!(r.stats.late_spans.load(Ordering::Relaxed), 0);
        for i in 0..max - 2 {
            let id = format!("b{i}");
            assert!(
                seen.record(&r, &span(next(), 2, Some(1), Some(&id)))
                    .ended
                    .is_empty()
            );
        }
        assert_eq!(r.open_calls(), max);
        // One more call: the oldest open call, "a", is evicted.
        let routed = seen.record(&r, &span(next(), 2, Some(1), Some("new")));
        let evicted: Vec<String> = routed
            .ended
            .iter()
            .map(|e| e.state.call_id.to_string())
            .collect();
        assert_eq!(evicted, vec!["a".to_owned()]);
        // The "k" that came back is another call for the worker too (it numbers its batches on
        // from the first one's without taking its spans for late ones).
        let again = r.end("k", EndReason::Shutdown).unwrap();
        assert_ne!(again.state.incarnation, first_k);
    }

    #[test]
    fn late_traces_of_a_forgotten_call_do_not_fill_the_trace_index_for_good() {
        let r = registry();
        let seen = Seen::default();
        assert_eq!(
            seen.record(&r, &span(1, 1, None, Some("gone"))).ended.len(),
            1
        );
        // Late spans, each of a new trace naming the ended call.
        for t in 0..r.traces_cap as u128 {
            seen.record(&r, &span(1_000_000 + t, 2, Some(1), Some("gone")));
        }
        assert_eq!(
            r.stats.late_spans.load(Ordering::Relaxed),
            r.traces_cap as u64
        );
        // Enough calls end that "gone" is forgotten (the last one's trace takes the index entry
        // "gone"'s own trace left).
        for i in 0..=r.ended_cap as u128 {
            let id = format!("e{i}");
            assert_eq!(
                seen.record(&r, &span(10 + i, 1, None, Some(&id)))
                    .ended
                    .len(),
                1
            );
        }
        // A new call whose trace names it once: the trace's spans gather in it.
        let left_out = r.stats.traces_not_indexed.load(Ordering::Relaxed);
        assert!(left_out > 0, "the index was full");
        // The worker's tick.
        r.sweep_traces_if_due();
        seen.record(&r, &span(7, 2, Some(1), Some("x")));
        seen.record(&r, &span(7, 3, Some(1), None));
        let end = seen.record(&r, &span(7, 1, None, None));
        assert_eq!(r.stats.traces_not_indexed.load(Ordering::Relaxed), left_out);
        assert_eq!(end.ended.len(), 1);
        assert_eq!(&*end.ended[0].state.call_id, "x");
        assert_eq!(total_spans(&end.ended[0]), 3);
        assert_eq!(r.open_calls(), 0);
    }
}
