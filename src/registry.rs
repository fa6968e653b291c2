//! The table of open calls: grouping spans into calls, call ends, eviction, idle expiry.
//!
//! Shared by the span hot path (`on_start` / `on_end`) and the worker (idle scan, shutdown).
//! The fast path takes one DashMap shard lock; creating or ending a call also takes the
//! `lifecycle` mutex (lock order: lifecycle, then a shard — never the other way round).

use std::borrow::Cow;
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
use crate::semantics::{self, KeyTable, CallIdValue, Operation};
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

/// What a span ended or joined, for the worker's control queue.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    /// Calls this span ended (its own at a root span, others by eviction).
    pub ended: Vec<Ended>,
    /// A provisional call that this span's call id joined: `(from, to)`.
    pub joined: Option<(Arc<str>, Arc<str>)>,
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
}

#[derive(Debug, Default)]
struct Lifecycle {
    /// Open calls in creation order (may hold ended ones; compacted now and then).
    open_order: VecDeque<Arc<str>>,
    /// Recently ended calls: spans for them are late spans.
    ended: HashSet<Arc<str>>,
    ended_order: VecDeque<(Arc<str>, Vec<TraceId>)>,
}

/// The open calls and the trace → call index.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) config: Arc<Config>,
    pub(crate) stats: Arc<Counters>,
    /// `config.call_id_keys`, ready for the per-attribute test.
    pub(crate) id_keys: KeyTable,
    clock: Instant,
    /// [`now_ns`](Self::now_ns) as the worker last read it (every tick and loop turn): what the
    /// hot path dates a call's activity with, one clock read less per span. It only feeds the
    /// idle timeout, which is far longer than a tick.
    coarse_now: AtomicU64,
    calls: DashMap<Arc<str>, CallState, FastState>,
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

fn lock(m: &Mutex<Lifecycle>) -> MutexGuard<'_, Lifecycle> {
    // A panic while holding the lock leaves consistent-enough state (sets and queues).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub(crate) fn new(config: Arc<Config>, stats: Arc<Counters>) -> Self {
        let open = config.max_open_calls;
        Registry {
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
            id_keys: KeyTable::new(&config.call_id_keys),
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
        }
    }

    /// `on_start`: learn the call id of a trace early, from the parent context's baggage or
    /// (for a root span) from the attributes it starts with.
    pub(crate) fn learn(&self, trace: TraceId, id: CallIdValue<'_>) {
        if self.traces.contains_key(&trace) {
            return;
        }
        let id = self.cut_call_id(id);
        let key = self.intern(&id);
        self.map_trace(trace, &key);
    }

    /// `on_end`: updates the span's call and says what it ended or joined. `now` is the
    /// processor's clock ([`now_ns`](Self::now_ns) or the coarse [`coarse_now_ns`](Self::coarse_now_ns)).
    /// A chunk that fills up is handed to `ship` while the call's shard lock is still held, so
    /// that an end of the call recorded by another thread is counted after it (the worker
    /// finishes a call once everything queued before its end is in: a shipment counted after
    /// the end would arrive as late detail).
    pub(crate) fn record(&self, span: &SpanData, now: u64, ship: &dyn Fn(Shipment)) -> Routed {
        let (op, facts) = semantics::read_span(&span.name, &span.attributes, &self.id_keys);
        let trace_id = span.span_context.trace_id();
        let explicit = facts.call_id.map(|c| self.cut_call_id(c));
        let is_root = span.parent_span_id == SpanId::INVALID
            || self.config.root_span_names.iter().any(|n| *n == span.name);
        let view = SpanView::of(span, op, facts);
        let dur = view.dur;
        let detail = self.wants_detail(span, op, dur);
        if !detail {
            Counters::inc(&self.stats.detail_spans_filtered);
        }
        // Returns how many texts were cut to the call's caps.
        let update = |key: &Arc<str>, c: &mut CallState| {
            let cut = c.record(&view, now);
            if detail && let Some(chunk) = self.pack(&mut c.chunk, span, op, dur, now, false) {
                ship(Shipment {
                    call_id: key.clone(),
                    chunk,
                    late: false,
                    provisional: c.provisional,
                });
            }
            cut
        };

        // Fast path, most spans: the trace's call is known and open, the span names no other
        // call and does not end it. The call is updated while the trace index's shard is
        // read-locked (no code takes a trace lock while holding a call's), so the call id is
        // not cloned (two atomic updates) for every span.
        if !is_root
            && let Some(t) = self.traces.get(&trace_id)
            && explicit.as_deref().is_none_or(|id| **t.value() == *id)
            && let Some(mut c) = self.calls.get_mut(&**t.value())
        {
            let (key, state) = c.pair_mut();
            let cut = update(key, state);
            drop(c);
            drop(t);
            self.count_cut(cut, &trace_id);
            return Routed::default();
        }

        let mut provisional = false;
        let mut late = false;
        let mut ended = Vec::new();
        let mut joined = None;

        // 1. which call
        let known = self.traces.get(&trace_id).map(|e| e.value().clone());
        let key = match (explicit.as_deref(), known) {
            (Some(id), Some(k)) if *k == *id => k,
            (Some(id), Some(k)) if self.is_provisional(&k) => {
                let real = self.join(&k, id, trace_id);
                joined = Some((k, real.clone()));
                real
            }
            (Some(id), _) => {
                let k = self.intern(id);
                self.map_trace(trace_id, &k);
                k
            }
            (None, Some(k)) => k,
            (None, None) => {
                let k: Arc<str> = Arc::from(format!("{trace_id:032x}"));
                self.map_trace(trace_id, &k);
                provisional = true;
                k
            }
        };

        // 2. update it (one shard lock when open) and pack its detail into the call's chunk
        let mut cut = 0;
        if let Some(mut c) = self.calls.get_mut(&*key) {
            let (k, st) = c.pair_mut();
            cut = update(k, st);
        } else {
            let mut lc = lock(&self.lifecycle);
            if let Some(mut c) = self.calls.get_mut(&*key) {
                let (k, st) = c.pair_mut();
                cut = update(k, st);
            } else if lc.ended.contains(&key) {
                late = true;
                Counters::inc(&self.stats.late_spans);
                if detail {
                    // A late span travels on its own.
                    let mut one = None;
                    if let Some(chunk) = self.pack(&mut one, span, op, dur, now, true).or(one) {
                        ship(Shipment {
                            call_id: key.clone(),
                            chunk,
                            late: true,
                            provisional,
                        });
                    }
                }
            } else {
                self.evict_for_new(&mut lc, &mut ended);
                let mut st = CallState::new(key.clone(), provisional, now, self.text_cap);
                // Shipped (if its first span fills a chunk) under the lifecycle lock, which
                // any end of this call takes too.
                cut = update(&key, &mut st);
                self.calls.insert(key.clone(), st);
                self.open.fetch_add(1, Ordering::Relaxed);
                lc.open_order.push_back(key.clone());
                Counters::inc(&self.stats.calls_started);
            }
        }
        self.count_cut(cut, &trace_id);

        // 3. a root span ends its call
        if is_root && !late {
            ended.extend(self.end(&key, EndReason::RootSpanEnded));
        }
        Routed { ended, joined }
    }

    /// Counts texts cut to a call's caps.
    #[inline]
    fn count_cut(&self, cut: u64, trace_id: &TraceId) {
        if cut > 0 {
            Counters::add(&self.stats.text_truncations, cut);
            tracing::debug!(trace_id = %format!("{trace_id:032x}"), cut, "transcript text cut to the call's cap");
        }
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
    pub(crate) fn take_chunks(&self, min_age_ns: u64) -> Vec<(Arc<str>, bool, Chunk)> {
        let now = self.coarse_now_ns();
        let mut out = Vec::new();
        for mut e in self.calls.iter_mut() {
            let due = e
                .chunk
                .as_ref()
                .is_some_and(|c| now.saturating_sub(c.since_ns) >= min_age_ns);
            if due && let Some(c) = e.chunk.take() {
                out.push((e.key().clone(), e.provisional, c));
            }
        }
        out
    }

    fn is_provisional(&self, k: &str) -> bool {
        self.calls.get(k).is_some_and(|c| c.provisional)
    }

    /// The call id `id` showed up on a trace whose spans so far sit in provisional call `prov`:
    /// fold it into the real call and point the trace at it.
    fn join(&self, prov: &Arc<str>, id: &str, trace: TraceId) -> Arc<str> {
        let mut lc = lock(&self.lifecycle);
        let real = self.intern(id);
        self.traces.insert(trace, real.clone());
        if lc.ended.contains(&real) {
            // The real call is over: the provisional one lives on and ends by itself.
            return real;
        }
        let Some((_, p)) = self.calls.remove_if(prov, |_, c| c.provisional) else {
            return real;
        };
        self.open.fetch_sub(1, Ordering::Relaxed);
        let cut = if let Some(mut r) = self.calls.get_mut(&*real) {
            r.merge(p)
        } else {
            let mut st = CallState::new(real.clone(), false, p.first_seen_ns, self.text_cap);
            let cut = st.merge(p);
            self.calls.insert(real.clone(), st);
            self.open.fetch_add(1, Ordering::Relaxed);
            lc.open_order.push_back(real.clone());
            cut
        };
        Counters::add(&self.stats.text_truncations, cut);
        Counters::inc(&self.stats.calls_joined);
        real
    }

    /// Keeps the open calls under `max_open_calls` by ending the oldest.
    fn evict_for_new(&self, lc: &mut Lifecycle, out: &mut Vec<Ended>) {
        while self.open.load(Ordering::Relaxed) >= self.config.max_open_calls {
            let Some(oldest) = lc.open_order.pop_front() else {
                break;
            };
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
            lc.open_order.retain(|k| self.calls.contains_key(k));
        }
    }

    /// Ends a call (if open) and remembers it for late-span detection.
    pub(crate) fn end(&self, key: &str, reason: EndReason) -> Option<Ended> {
        let mut lc = lock(&self.lifecycle);
        self.end_locked(&mut lc, key, reason)
    }

    fn end_locked(&self, lc: &mut Lifecycle, key: &str, reason: EndReason) -> Option<Ended> {
        let (k, state) = self.calls.remove(key)?;
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.remember_ended(lc, k, state.trace_ids.clone());
        self.count_end(reason);
        Some(Ended { state, reason })
    }

    fn remember_ended(&self, lc: &mut Lifecycle, k: Arc<str>, traces: Vec<TraceId>) {
        lc.ended.insert(k.clone());
        lc.ended_order.push_back((k, traces));
        while lc.ended_order.len() > self.ended_cap {
            if let Some((old, traces)) = lc.ended_order.pop_front() {
                lc.ended.remove(&old);
                for t in traces {
                    self.traces.remove_if(&t, |_, v| *v == old);
                }
            }
        }
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
        let idle = |c: &CallState| now.saturating_sub(c.last_seen_ns) >= limit;
        let expired: Vec<Arc<str>> = self
            .calls
            .iter()
            .filter(|e| idle(e.value()))
            .map(|e| e.key().clone())
            .collect();
        let mut out = Vec::new();
        for k in expired {
            let mut lc = lock(&self.lifecycle);
            if let Some((k, state)) = self.calls.remove_if(&k, |_, c| idle(c)) {
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
