//! The worker: one thread with its own current-thread tokio runtime that owns all I/O.
//!
//! It receives detail as chunks of one call's packed spans (lossy bounded queue; see
//! [`crate::packed`]) and control messages (call ends, joins, flush, shutdown; never dropped),
//! takes the chunks of quiet open calls each tick, serializes and batches detail per call,
//! builds the core at call end, and delivers:
//!
//! - every payload becomes a [`Job`]; with a spool it is written there first, and deleted when
//!   acknowledged. A detail batch is sent once an fsync covers its record (one fsync at a time
//!   on the `callscope-fsync` thread, each covering every record written before it began); a
//!   summary goes at once, as far as the cap on summaries in flight allows (see
//!   [`Worker::pump`]). A detail body is
//!   gzip-compressed on a deflate thread before it is written unless too many bodies wait for
//!   one already ([`Worker::seal`]): the disk then takes, and the spool's cap counts, the bytes
//!   that go on the wire;
//! - summaries are dispatched at once on their own lane, at most [`MAX_CONCURRENT_SUMMARIES`]
//!   in flight (detail holds back while more wait); detail jobs wait in a FIFO and run at
//!   most `CALLSCOPE_MAX_CONCURRENT_DETAIL` at a time;
//! - a call's `final` batch is held until its core was acknowledged and none of its other
//!   batches is still pending, so `total_batches` (set when it is dispatched) counts every batch,
//!   including halves made by a 413 split;
//! - pending detail is bounded by `CALLSCOPE_MAX_BUFFER_BYTES`: past it, bodies are let go from
//!   memory (kept in the spool) or, without a spool, the oldest detail batch is dropped.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{Id, JoinSet};

use crate::batch::{CallBuffer, DetailDoc, SpanList};
use crate::call::Turns;
use crate::config::{Config, DetailMode};
use crate::fasthash::FastState;
use crate::packed::{Budget, Chunk, SpanRef};
use crate::payload::{self, DetailMeta};
use crate::registry::{Ended, Registry};
use crate::spool::{Meta, RecId, Spool, SyncJob};
use crate::stats::Counters;
use crate::transport::{Body, Delivery, Lane, Transport};

/// Sequence numbers for late batches of calls the worker no longer remembers start here, far
/// above any real batch count, so they never collide with a stored batch.
const LATE_SEQ_BASE: u32 = 1 << 30;
/// Ended calls whose next batch number is remembered for late spans, at least (see
/// [`Worker::ended_seqs_kept`]).
const ENDED_SEQS_KEPT: usize = 16_384;
/// Outstanding jobs up to which flush waiters are checked on every event (above: per tick).
const WAITER_SCAN_LIMIT: usize = 1024;
/// Smallest share of the memory bound an open batch gets, however many calls are open.
const MIN_OPEN_BATCH_BYTES: usize = 64 * 1024;
/// Room kept in every body for the final part's fixed fields.
const FINAL_FIELDS_BYTES: usize = 96;
/// A lone span the receiver still refuses at this size is given up.
const MIN_SHORTENED_BYTES: usize = 1024;
/// Spans taken from the queue per loop turn, in whole chunks (then control and uploads get a
/// look).
const DRAIN_MAX: usize = 1024;
/// After the first chunk wakes an idle worker, it waits this long for more before draining, so
/// producers pay the wake-up (a syscall) at most about once per nap, not once per chunk.
const WAKE_NAP: Duration = Duration::from_millis(1);
/// Most chunks queued during a nap before a producer cuts it short (at most a quarter of
/// `CALLSCOPE_QUEUE_SIZE`).
const MAX_WAKE_EVERY: usize = 4096;
/// While draining, control messages (call ends) are looked at every this many spans (at chunk
/// boundaries).
const CONTROL_EVERY: usize = 32;

const RUNNING: u8 = 0;
const SLEEPING: u8 = 1;
const NAPPING: u8 = 2;

/// Payloads outstanding (and call ends queued to the worker) at which a flood of call ends is
/// held back, whatever `CALLSCOPE_MAX_OPEN_CALLS` says below it.
const MIN_BACKLOG: usize = 1024;

/// Summary uploads in flight at most. A flood of call ends against a slow receiver would
/// otherwise hold a connection per summary (as many as [`MIN_BACKLOG`] and more); the rest
/// wait their turn in order. Above the 100 calls ending at once of the load tool's latency run.
const MAX_CONCURRENT_SUMMARIES: usize = 128;

/// A map keyed by call id, with the registry's hasher: the call's batch is looked up for
/// every span, and std's SipHash of the id cost more than the lookup.
type ByCall<V> = HashMap<Arc<str>, V, FastState>;

/// The processor's shutdown has begun: set once, and the worker woken to see it.
#[derive(Debug, Default)]
pub(crate) struct Stopping {
    set: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stopping {
    /// Says so, and wakes the worker (a stored permit if it is not waiting yet).
    pub(crate) fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

/// How the processor wakes the worker for detail: only when the worker said it is asleep (once
/// per sleep), or every `wake_every`-th chunk while it naps. The worker checks the queue after
/// saying so (`enqueued` against what it received), so a chunk is never left behind: either the
/// worker sees it, or the producer sees the worker asleep and wakes it.
#[derive(Debug)]
pub(crate) struct Wake {
    state: AtomicU8,
    notify: tokio::sync::Notify,
    /// A power of two minus one.
    wake_mask: u64,
}

impl Wake {
    fn new(queue_size: usize) -> Self {
        let every = (queue_size / 4).clamp(1, MAX_WAKE_EVERY);
        // The largest power of two not above `every`.
        let every = 1u64 << (usize::BITS - 1 - every.leading_zeros());
        Wake {
            state: AtomicU8::new(RUNNING),
            notify: tokio::sync::Notify::new(),
            wake_mask: every - 1,
        }
    }

    /// Called by the processor after it queued a chunk and counted it (`n`: the count after).
    #[inline]
    pub(crate) fn after_send(&self, n: u64) {
        let want = match self.state.load(Ordering::SeqCst) {
            RUNNING => return,
            SLEEPING => SLEEPING,
            _ if n & self.wake_mask == 0 => NAPPING,
            _ => return,
        };
        if self
            .state
            .compare_exchange(want, RUNNING, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }
}

/// Whether a detail body goes plain under `CALLSCOPE_COMPRESSION=auto`: deflating a body
/// lately took longer (its wait for a deflate thread included) than sending the bytes deflate
/// saved would have (`times`: moving averages in nanoseconds, see [`UploadTimes`]), and pending
/// detail (`pending` bytes) is past 7/8 of its bound `max` (drops are near). A worker that cannot
/// compress as fast as detail comes then sends more bytes instead of dropping spans; a slow
/// receiver or network, where the saved bytes are worth more than the CPU, never gets plain
/// bodies. Past half of the bound instead of 7/8, plain uploads took CPU from deflate and most
/// bodies went plain (BENCHMARKS.md).
fn plain_when_behind(pending: usize, max: usize, times: (u64, u64)) -> bool {
    let (deflate_ns, saved_bytes_ns) = times;
    deflate_ns > saved_bytes_ns && pending > max - max / 8
}

/// Under `CALLSCOPE_COMPRESSION=auto`, while detail goes plain, every `PROBE_EVERY`th body is
/// compressed anyway to keep [`UploadTimes`] current.
const PROBE_EVERY: u32 = 8;

/// What compression lately cost and bought detail uploads: moving averages in nanoseconds,
/// updated by each compressed upload the receiver acknowledged. `deflate_ns`: from the moment
/// a body was handed to the deflate threads to the end of its compression. `saved_bytes_ns`:
/// how much longer its acknowledged HTTP attempt would have taken with the bytes deflate
/// removed, scaling the attempt's time by the bytes (an over-estimate: part of an attempt is
/// latency, not bytes; it errs towards compressing).
#[derive(Debug, Default)]
struct UploadTimes {
    deflate_ns: AtomicU64,
    saved_bytes_ns: AtomicU64,
}

impl UploadTimes {
    /// Records one compressed upload: `deflate` and `http` as measured, `raw` and `wire` the
    /// body's bytes before and after compression.
    fn record(&self, deflate: Duration, http: Duration, raw: usize, wire: usize) {
        let ewma = |avg: &AtomicU64, x: u128| {
            let x = u64::try_from(x).unwrap_or(u64::MAX);
            let old = avg.load(Ordering::Relaxed);
            avg.store(old - old / 4 + x / 4, Ordering::Relaxed);
        };
        let saved = raw.saturating_sub(wire) as u128;
        ewma(&self.deflate_ns, deflate.as_nanos());
        ewma(
            &self.saved_bytes_ns,
            http.as_nanos().saturating_mul(saved) / wire.max(1) as u128,
        );
    }

    fn get(&self) -> (u64, u64) {
        (
            self.deflate_ns.load(Ordering::Relaxed),
            self.saved_bytes_ns.load(Ordering::Relaxed),
        )
    }
}

/// Packed spans of one call on their way to the worker.
#[derive(Debug)]
pub(crate) struct DetailMsg {
    pub call_id: Arc<str>,
    pub chunk: Chunk,
    pub late: bool,
    pub provisional: bool,
    /// The registry's number for the call ([`crate::call::CallState::incarnation`]).
    pub incarnation: u64,
}

/// An id whose call the worker finished (or whose batch numbers it otherwise remembers).
#[derive(Debug, Clone, Copy)]
struct EndedId {
    /// Its next batch number.
    next: u32,
    /// The registry's number of the last call finished under it (`None`: the id is known
    /// from a late batch or an earlier run's spool only).
    call: Option<u64>,
    /// When its batch numbers were last remembered (see `Worker::ended_order`).
    generation: u64,
}

/// Where a provisional call's spans go once it was folded into a call.
#[derive(Debug)]
struct Redirect {
    to: Arc<str>,
    /// The call's registry number.
    call: u64,
    /// Detail messages enqueued when the tick first found the call neither open in the registry
    /// nor pending here: the redirect goes once that many were received (every chunk of the
    /// provisional call was shipped before its fold, so before that count was read).
    gone_at: Option<u64>,
}

/// What the app thread said of a chunk's spans.
#[derive(Debug, Clone, Copy)]
struct Origin {
    /// The registry found the call ended.
    late: bool,
    /// The call is keyed by its trace id.
    provisional: bool,
    /// The call's registry number ([`crate::call::CallState::incarnation`]).
    incarnation: u64,
}

impl Origin {
    /// Spans of the open call `incarnation`, neither late nor provisional.
    fn of(incarnation: u64) -> Self {
        Origin {
            late: false,
            provisional: false,
            incarnation,
        }
    }
}

/// Messages that are never dropped.
#[derive(Debug)]
pub(crate) enum Control {
    /// A call ended; `mark` = detail messages enqueued before it ended.
    End(Box<Ended>, u64),
    /// A provisional call (trace id) joined its real call id, whose registry number is `call`.
    Join {
        from: Arc<str>,
        to: Arc<str>,
        call: u64,
    },
    /// Deliver everything pending; ack when done.
    Flush { mark: u64, ack: SyncSender<()> },
    /// Deliver everything pending before `deadline`, then stop.
    Shutdown {
        mark: u64,
        deadline: Instant,
        ack: SyncSender<()>,
    },
}

/// The processor's side of the worker.
#[derive(Debug)]
pub(crate) struct Handle {
    /// Detail queue (bounded, never blocks the caller: `try_send`). Sending does not wake the
    /// worker by itself: the sender calls `wake.after_send` once it counted the span.
    pub data: SyncSender<DetailMsg>,
    pub wake: Arc<Wake>,
    pub control: mpsc::UnboundedSender<Control>,
    /// Detail messages successfully enqueued (the worker compares it with what it received).
    pub enqueued: Arc<AtomicU64>,
    /// Call ends sent and not yet taken by the worker (bounds the control channel's backlog).
    pub ends_queued: Arc<AtomicUsize>,
    /// Call ends queued to the worker at most (past it a summary is dropped and counted):
    /// `CALLSCOPE_MAX_OPEN_CALLS`, at least [`MIN_BACKLOG`]; the worker's backlog limit too.
    pub ends_limit: usize,
    /// Set by `shutdown` before it asks the worker to stop: the worker then takes control
    /// messages past its backlog limit, so the request is not stuck behind call ends.
    pub stopping: Arc<Stopping>,
    /// Spans queued (`CALLSCOPE_QUEUE_SIZE`); the bytes of packed spans are bounded by the
    /// registry's budget (`Registry::pack`).
    pub queue_spans: Arc<Budget>,
    pub thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Starts the worker thread (opening the spool first, if one is configured: a spool that cannot
/// be opened is a startup error naming the directory).
pub(crate) fn spawn(registry: Arc<Registry>, transport: Transport) -> std::io::Result<Handle> {
    let cfg = registry.config.clone();
    let (spool, replay) = match &cfg.spool_dir {
        Some(dir) => {
            let (s, o) = Spool::open(dir, cfg.spool_max_bytes).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("CALLSCOPE_SPOOL_DIR {}: {e}", dir.display()),
                )
            })?;
            (Some(s), o)
        }
        None => (None, crate::spool::Opened::default()),
    };
    let (mut worker, mut handle) = Worker::new(registry, transport, spool);
    worker.replay(replay);
    // Detail compression runs on the runtime's blocking threads: one per core left besides
    // the worker's, at most one per concurrent upload.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deflaters = (cores - 1).clamp(1, worker.cfg.max_concurrent_detail.max(1));
    // Bodies waiting for a deflate thread cannot be let go to the spool: an eighth of the
    // memory bound may wait so, enough to keep the threads busy through a burst.
    worker.seal_bytes_max = worker.cfg.max_buffer_bytes / 8;
    if worker.spool.is_some() {
        match Syncer::spawn() {
            Ok(s) => worker.syncer = Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the spool's fsync thread: the worker thread fsyncs itself (slower under load)");
            }
        }
    }
    let thread = std::thread::Builder::new()
        .name("callscope-worker".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(deflaters)
                .thread_name("callscope-deflate")
                .build()
            {
                Ok(rt) => rt.block_on(worker.run()),
                Err(e) => tracing::error!(error = %e, "callscope worker could not start its runtime; nothing will be delivered"),
            }
        })?;
    handle.thread = std::sync::Mutex::new(Some(thread));
    Ok(handle)
}

/// One call's open batch and how its bodies are framed.
#[derive(Debug)]
struct Buf {
    buf: CallBuffer,
    /// Bytes a body needs around its spans.
    overhead: usize,
    /// Held until the call id is known (only sent when full or at flush/end).
    provisional: bool,
    /// Spans of a call that already ended: flushed on the batch timeout, then forgotten.
    late: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoreState {
    InFlight,
    Acked,
    Failed,
}

#[derive(Debug)]
struct PendingEnd {
    /// Only the per-turn records are kept for the final batch; the rest of the call's state
    /// (transcript, aggregates) went into the core and is dropped at once.
    turns: Turns,
    mark: u64,
    /// The call's last packed spans (its chunk when it ended), batched at its mark, after the
    /// spans queued before its end: many ends drained at once must not fill open batches.
    chunk: Option<Chunk>,
    /// The registry's number for the call ([`crate::call::CallState::incarnation`]).
    incarnation: u64,
}

/// A payload on its way: a core or a detail batch.
#[derive(Debug)]
struct Job {
    /// Creation order; flush waits for the jobs created before it (split halves inherit it).
    id: u64,
    call: Arc<str>,
    meta: Meta,
    /// The body: JSON, or gzip when `meta.gzip` (compressed before it was spooled); `None`
    /// when let go from memory (it is in the spool). Shared, not copied, with the compression
    /// of an upload in progress.
    body: Option<Bytes>,
    /// Spool record and its size on disk.
    rec: Option<(RecId, u64)>,
    /// For a body compressed before it was spooled: how long that took (its wait for a
    /// deflate thread included) and its JSON's length, for [`UploadTimes`] once it is
    /// acknowledged.
    deflated: Option<(Duration, usize)>,
}

impl Job {
    fn mem(&self) -> usize {
        self.body.as_ref().map_or(0, Bytes::len)
    }
}

/// A detail job whose body is compressed on a deflate thread before it is spooled (see
/// [`Worker::seal`]).
#[derive(Debug)]
struct Sealing {
    /// Its body is still the JSON, shared with the task.
    job: Job,
    /// The gzip body and how long it took from the spawn (`None` when it was raised, see
    /// [`deflate_off_thread`]).
    task: tokio::task::JoinHandle<(Body, Option<Duration>)>,
}

/// A final batch waiting for its core and its call's other batches.
#[derive(Debug)]
struct Held {
    job: Job,
}

#[derive(Debug)]
struct Running {
    job: Job,
    /// Bytes its body is counted as while it runs, beside its job's JSON: the encoded body's,
    /// its JSON's again while a detail body is compressed off this thread, or 0 for a plain
    /// detail body (it shares the job's JSON).
    wire: usize,
}

#[derive(Debug)]
struct Waiter {
    mark: u64,
    /// Set once every span up to `mark` was batched: jobs created before it must settle.
    epoch: Option<u64>,
    ack: SyncSender<()>,
    stop: bool,
}

struct Worker {
    reg: Arc<Registry>,
    cfg: Arc<Config>,
    stats: Arc<Counters>,
    transport: Arc<Transport>,
    data_rx: Receiver<DetailMsg>,
    data_open: bool,
    wake: Arc<Wake>,
    /// Detail goes nowhere: spans are counted and dropped unserialized.
    null_sink: bool,
    /// Spans taken by the null sink, not yet added to `detail_spans_sent`.
    null_spans: u64,
    /// The tick's period in ns (chunks older than this are taken from quiet calls).
    tick_ns: u64,
    ctrl_rx: mpsc::UnboundedReceiver<Control>,
    /// False once the control channel closed (the processor was dropped without shutdown).
    ctrl_open: bool,
    received: u64,
    enqueued: Arc<AtomicU64>,
    ends_queued: Arc<AtomicUsize>,
    queue_spans: Arc<Budget>,
    /// Outstanding payloads above which control messages wait (see [`Worker::takes_control`]).
    backlog_limit: usize,
    /// The processor is shutting down (see [`Handle::stopping`]).
    stopping: Arc<Stopping>,
    buffers: ByCall<Buf>,
    /// Provisional calls folded into a call: its id and registry number.
    redirects: ByCall<Redirect>,
    pending: ByCall<PendingEnd>,
    /// `pending` by mark, smallest first (entries of calls finished otherwise are skipped).
    by_mark: BTreeSet<(u64, Arc<str>)>,
    ended: ByCall<EndedId>,
    /// Ids of `ended` by their last end, oldest first, with the `EndedId::generation` of that
    /// end (entries of an id that ended again since are stale and skipped).
    ended_order: VecDeque<(Arc<str>, u64)>,
    /// The number of the last `remember_seq`.
    ended_gen: u64,
    /// How many ended calls' numbers are kept: more than the registry remembers ended calls,
    /// so an id the registry lets start again (once it forgot it) is still numbered on from
    /// its first call, never from 0 again.
    ended_seqs_kept: usize,
    late_seq: u32,
    tasks: JoinSet<Delivery>,
    running: HashMap<Id, Running>,
    running_detail: usize,
    /// Summaries not yet dispatched: they go at the next `pump` while fewer than
    /// [`MAX_CONCURRENT_SUMMARIES`] are in flight (and stay once the shutdown deadline has
    /// passed).
    cores: VecDeque<Job>,
    /// Detail batches waiting for an upload slot, oldest first.
    queue: VecDeque<Job>,
    /// Detail batches being compressed before they are spooled, oldest first (taken in this
    /// order). Counted in `mem_bytes` and, unless final, in `open`.
    sealing: VecDeque<Sealing>,
    /// Bytes of the JSON bodies in `sealing`.
    sealing_bytes: usize,
    /// A body is sealed only while `sealing_bytes` is below this (0: none is, bodies are
    /// spooled as JSON).
    seal_bytes_max: usize,
    /// Final batches waiting for their core and their call's other batches.
    held: ByCall<Held>,
    /// Non-final detail jobs alive per call (queued or running).
    open: ByCall<usize>,
    /// Outcome of each call's core, while its final may still need it.
    core_outcome: ByCall<CoreState>,
    /// The tick asks for a waiter check whatever the number of outstanding jobs.
    waiter_scan_due: bool,
    next_job: u64,
    waiters: Vec<Waiter>,
    stop_at: Option<Instant>,
    exit: bool,
    /// Bytes of spans in open per-call buffers.
    buffered_bytes: usize,
    /// Bytes of detail bodies held in memory (queued, held, running; running counts its wire body too).
    mem_bytes: usize,
    spool: Option<Spool>,
    /// The spool's fsync thread (set by `spawn`; without it the worker fsyncs itself).
    syncer: Option<Syncer>,
    /// The fsync running there, if any (one at a time).
    syncing: Option<oneshot::Receiver<Synced>>,
    scratch: Vec<u8>,
    upload_times: Arc<UploadTimes>,
    /// Since when detail has been going plain, and how many detail bodies found compression
    /// behind so far, probes included (`None` while bodies are compressed; see
    /// [`Worker::compressor_behind`]).
    plain_since: Option<(Instant, u64)>,
    /// When going plain was last logged at `info` (at most once a minute; `debug` between).
    plain_logged: Option<Instant>,
}

impl Worker {
    /// A worker for `registry`'s calls, sending through `transport`, and the processor's
    /// handle on it (its thread is set once the worker runs on it).
    fn new(registry: Arc<Registry>, transport: Transport, spool: Option<Spool>) -> (Self, Handle) {
        let cfg = registry.config.clone();
        let (data_tx, data_rx) = std::sync::mpsc::sync_channel(cfg.queue_size);
        let wake = Arc::new(Wake::new(cfg.queue_size));
        let null_sink = transport.is_null();
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let enqueued = Arc::new(AtomicU64::new(0));
        let ends_queued = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(Stopping::default());
        let queue_spans = Arc::new(Budget::new(cfg.queue_size));
        let backlog_limit = cfg.max_open_calls.max(MIN_BACKLOG);
        let ended_seqs_kept = registry.ended_cap().saturating_mul(2).max(ENDED_SEQS_KEPT);
        let worker = Worker {
            stats: registry.stats.clone(),
            transport: Arc::new(transport),
            cfg,
            reg: registry,
            data_rx,
            data_open: true,
            wake: wake.clone(),
            null_sink,
            null_spans: 0,
            tick_ns: 0,
            ctrl_rx,
            ctrl_open: true,
            received: 0,
            enqueued: enqueued.clone(),
            ends_queued: ends_queued.clone(),
            queue_spans: queue_spans.clone(),
            backlog_limit,
            stopping: stopping.clone(),
            buffers: ByCall::default(),
            redirects: ByCall::default(),
            pending: ByCall::default(),
            by_mark: BTreeSet::new(),
            ended: ByCall::default(),
            ended_order: VecDeque::new(),
            ended_gen: 0,
            ended_seqs_kept,
            late_seq: LATE_SEQ_BASE,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            running_detail: 0,
            cores: VecDeque::new(),
            queue: VecDeque::new(),
            sealing: VecDeque::new(),
            // Set by `spawn`: sealing needs the worker's runtime.
            sealing_bytes: 0,
            seal_bytes_max: 0,
            held: ByCall::default(),
            open: ByCall::default(),
            core_outcome: ByCall::default(),
            waiter_scan_due: false,
            next_job: 0,
            waiters: Vec::new(),
            stop_at: None,
            exit: false,
            buffered_bytes: 0,
            mem_bytes: 0,
            spool,
            syncer: None,
            syncing: None,
            scratch: Vec::with_capacity(16 * 1024),
            upload_times: Arc::default(),
            plain_since: None,
            plain_logged: None,
        };
        let handle = Handle {
            data: data_tx,
            wake,
            control: ctrl_tx,
            enqueued,
            ends_queued,
            ends_limit: backlog_limit,
            stopping,
            queue_spans,
            thread: std::sync::Mutex::new(None),
        };
        (worker, handle)
    }

    async fn run(mut self) {
        let idle = self.cfg.call_idle_timeout / 4;
        let period = idle.clamp(Duration::from_millis(10), Duration::from_millis(250));
        self.tick_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nap: Option<tokio::time::Instant> = None;
        self.pump();
        while !self.exit {
            // The hot path dates call activity with this (see Registry::coarse_now_ns); every
            // tick is a loop turn, so a quiet worker refreshes it at least once a tick.
            self.reg.refresh_clock();
            let mut more = false;
            if nap.is_none() {
                let n = self.drain_data();
                more = n >= DRAIN_MAX;
                if n > 0 {
                    self.progress();
                }
            }
            // Say we sleep, then look again: a span counted before this is seen here, one
            // counted after it finds us asleep and wakes us.
            let mut asleep = false;
            if nap.is_none() && !more && self.data_open {
                self.wake.state.store(SLEEPING, Ordering::SeqCst);
                if self.enqueued.load(Ordering::SeqCst) > self.received {
                    self.wake.state.store(RUNNING, Ordering::SeqCst);
                    more = true;
                } else {
                    asleep = true;
                }
            }
            let nap_end = nap.unwrap_or_else(tokio::time::Instant::now);
            let stop_at = self.stop_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                // A stop's deadline is kept to the moment: what is not delivered by then is
                // counted before the caller's own deadline (a tick later could be after it).
                // The timer is made only when polled, not on every loop turn without a stop.
                () = async {
                    if let Some(d) = stop_at {
                        tokio::time::sleep_until(d).await;
                    }
                }, if stop_at.is_some() => {
                    self.abandon();
                }
                c = self.ctrl_rx.recv(), if self.ctrl_open && self.takes_control() => {
                    // Ends and flushes refer to spans queued before them: no napping now.
                    nap = None;
                    match c {
                        Some(c) => self.on_control(c),
                        // The processor was dropped without shutdown: deliver what we can, briefly.
                        // Once: a closed channel is ready on every turn and would starve the
                        // tick (which enforces the deadline) and the uploads.
                        None => {
                            self.ctrl_open = false;
                            self.begin_stop(0, Instant::now() + Duration::from_secs(5), None);
                        }
                    }
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    match done {
                        Ok((id, result)) => self.on_done(id, result),
                        Err(e) => self.on_done(e.id(), Delivery::Failed),
                    }
                }
                Some(done) = next_synced(&mut self.syncing), if self.syncing.is_some() => {
                    self.syncing = None;
                    self.on_synced(done.ok());
                }
                Some(done) = next_sealed(&mut self.sealing), if !self.sealing.is_empty() => {
                    if let Some(s) = self.sealing.pop_front() {
                        self.on_sealed(s.job, done.ok());
                    }
                    // And every body done behind it (one per loop turn held the deflate
                    // thread's output back while the bodies waiting filled their bound).
                    while self.sealing.front().is_some_and(|s| s.task.is_finished()) {
                        if let Some(s) = self.sealing.pop_front() {
                            let done = s.task.await;
                            self.on_sealed(s.job, done.ok());
                        }
                    }
                }
                () = self.wake.notify.notified(), if asleep || nap.is_some() => {
                    if nap.is_some() {
                        // Enough spans queued during the nap: drain now.
                        nap = None;
                    } else {
                        // The first span after idle: let a batch gather before draining.
                        self.wake.state.store(NAPPING, Ordering::SeqCst);
                        nap = Some(tokio::time::Instant::now() + WAKE_NAP);
                    }
                }
                () = tokio::time::sleep_until(nap_end), if nap.is_some() => nap = None,
                _ = tick.tick() => self.on_tick(),
                () = std::future::ready(()), if more => {}
                // Shutdown begun: an idle worker looks again now, when control messages are
                // taken past the backlog limit (see `takes_control`; a busy one reads the flag
                // there on every turn, so this branch comes last).
                () = self.stopping.notify.notified(), if !self.stopping.is_set() => {}
            }
            // Written only when it changes: callers read this line on every span.
            if nap.is_none() && self.wake.state.load(Ordering::Relaxed) != RUNNING {
                self.wake.state.store(RUNNING, Ordering::SeqCst);
            }
            self.progress();
        }
    }

    /// Takes queued chunks up to about [`DRAIN_MAX`] spans; returns how many spans. Control messages
    /// are looked at every [`CONTROL_EVERY`] spans and ended calls are finished as soon as their
    /// last span is in, as when spans came one per loop turn: a drained burst of many calls must
    /// not hold all of them in open batches (that would push pending detail over its bound).
    fn drain_data(&mut self) -> usize {
        let mut n = 0;
        let mut next_control = 0;
        while n < DRAIN_MAX {
            if n >= next_control {
                next_control = n + CONTROL_EVERY;
                while self.takes_control()
                    && let Ok(c) = self.ctrl_rx.try_recv()
                {
                    self.on_control(c);
                }
            }
            match self.data_rx.try_recv() {
                Ok(d) => {
                    n += d.chunk.spans().max(1);
                    self.on_detail(d);
                    if self
                        .by_mark
                        .first()
                        .is_some_and(|(m, _)| *m <= self.received)
                    {
                        self.finish_ready();
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.data_open = false;
                    break;
                }
            }
        }
        self.settle_null_spans();
        n
    }

    /// Adds what the null sink took to `detail_spans_sent`.
    fn settle_null_spans(&mut self) {
        if self.null_spans > 0 {
            Counters::add(&self.stats.detail_spans_sent, self.null_spans);
            self.null_spans = 0;
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::End(e, mark) => {
                self.ends_queued.fetch_sub(1, Ordering::AcqRel);
                self.on_end(*e, mark)
            }
            Control::Join { from, to, call } => self.on_join(from, to, call),
            Control::Flush { mark, ack } => {
                // Spans still packed in open calls' chunks are part of what a flush delivers.
                self.take_chunks(0);
                self.waiters.push(Waiter {
                    mark,
                    epoch: None,
                    ack,
                    stop: false,
                })
            }
            Control::Shutdown {
                mark,
                deadline,
                ack,
            } => self.begin_stop(mark, deadline, Some(ack)),
        }
    }

    fn begin_stop(&mut self, mark: u64, deadline: Instant, ack: Option<SyncSender<()>>) {
        // Spans still packed in open calls' chunks (the processor dropped without shutdown, or
        // a span that raced the shutdown's end of every call) are delivered with the rest.
        self.take_chunks(0);
        self.stop_at = Some(self.stop_at.map_or(deadline, |d| d.min(deadline)));
        let ack = ack.unwrap_or_else(|| std::sync::mpsc::sync_channel(1).0);
        self.waiters.push(Waiter {
            mark,
            epoch: None,
            ack,
            stop: true,
        });
    }

    /// Serialises the chunks of open calls packed at least `min_age_ns` ago.
    fn take_chunks(&mut self, min_age_ns: u64) {
        for s in self.reg.take_chunks(min_age_ns) {
            let origin = Origin {
                provisional: s.provisional,
                ..Origin::of(s.incarnation)
            };
            self.on_chunk(&s.call_id, origin, &s.chunk);
        }
        self.settle_null_spans();
    }

    fn on_tick(&mut self) {
        self.waiter_scan_due = true;
        // A quiet call's packed spans wait at most about a tick before they are batched.
        self.take_chunks(self.tick_ns);
        // The mark is read after the calls were taken out: a chunk shipped under a call's lock
        // just before its idle end is then counted in it (as `send_end` does for other ends),
        // instead of arriving after the call finished, as late detail.
        let expired = self.reg.expire_idle();
        let mark = self.enqueued.load(Ordering::Acquire);
        for e in expired {
            tracing::debug!(call_id = %e.state.call_id, "call ended: idle timeout");
            self.on_end(e, mark);
        }
        self.reg.sweep_traces_if_due();
        self.sweep_redirects();
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .buffers
            .iter()
            .filter(|(_, b)| !b.provisional)
            .filter(|(_, b)| {
                b.buf
                    .since
                    .is_some_and(|s| now.duration_since(s) >= self.cfg.batch_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.flush_buffer(&k);
        }
        // Batched fsync: whatever was written since the last one (acks included).
        self.start_sync();
    }

    // ---- detail ------------------------------------------------------------------------

    fn on_detail(&mut self, msg: DetailMsg) {
        self.received += 1;
        self.queue_spans.give(msg.chunk.spans());
        let origin = Origin {
            late: msg.late,
            provisional: msg.provisional,
            incarnation: msg.incarnation,
        };
        self.on_chunk(&msg.call_id, origin, &msg.chunk);
    }

    /// Serialises and batches a chunk of one call's packed spans; the chunk (and the bytes it
    /// holds against the queue's bound) is let go by the caller.
    fn on_chunk(&mut self, call_id: &Arc<str>, origin: Origin, chunk: &Chunk) {
        if self.null_sink {
            // Counted once per drain (the counters share cache lines with the callers').
            self.null_spans += chunk.spans() as u64;
            return;
        }
        let mut read = 0;
        let mut spans = chunk.unpack();
        while let Some(s) = spans.next_span() {
            match s {
                Ok(span) => {
                    read += 1;
                    self.on_span(call_id, origin, &span);
                }
                Err(()) => {
                    // Only a bug in `packed` gets here; the chunk's other spans are lost.
                    Counters::add(
                        &self.stats.spans_dropped_send_failed,
                        chunk.spans().saturating_sub(read) as u64,
                    );
                    tracing::error!(%call_id, "callscope could not read back a packed span (a bug: please report it); span detail dropped");
                }
            }
        }
    }

    fn on_span(&mut self, call_id: &Arc<str>, origin: Origin, span: &SpanRef<'_, '_>) {
        // Most spans: no fold, and their call's batch is open (two lookups of one fast hash
        // each; the borrow checker will not let one `get_mut` fall back to opening it).
        let redirect = if self.redirects.is_empty() {
            None
        } else {
            self.redirects.get(call_id).map(|r| (r.to.clone(), r.call))
        };
        let key = match redirect {
            // A provisional call's span redirected to the call it joined is that call's.
            Some((to, call)) => {
                self.open_buf(&to, origin.late, false, call);
                to
            }
            None => {
                if !self.buffers.contains_key(call_id) {
                    let provisional = origin.provisional;
                    self.open_buf(call_id, origin.late, provisional, origin.incarnation);
                }
                call_id.clone()
            }
        };
        let open_batches = self.buffers.len().max(1);
        let Some(b) = self.buffers.get_mut(&key) else {
            return;
        };
        // Every span found late here, not only the one that opened the late batch (the
        // registry counted those it found late itself).
        if b.late && !origin.late {
            Counters::inc(&self.stats.late_spans);
        }
        // A span must fit a request; the open batch is also kept to its share of a quarter of
        // CALLSCOPE_MAX_BUFFER_BYTES, so many concurrent calls stream smaller batches instead of
        // filling the memory bound with half-built ones (and forcing drops of queued ones).
        let budget = self.cfg.max_request_bytes.saturating_sub(b.overhead);
        let share = (self.cfg.max_buffer_bytes / 4 / open_batches).max(MIN_OPEN_BATCH_BYTES);
        let open_cap = budget.min(share);
        self.scratch.clear();
        let cut = payload::write_span(&mut self.scratch, span, budget);
        if cut > 0 {
            Counters::add(&self.stats.attributes_truncated, cut);
            tracing::warn!(call_id = %key, span = %span.name, values = cut,
                "span larger than CALLSCOPE_MAX_REQUEST_BYTES: its largest attribute values were shortened");
        }
        self.buffered_bytes += self.scratch.len() + 1;
        let full = b.buf.push(&self.scratch, open_cap, Instant::now());
        if let Some(list) = full {
            self.send_batch(&key, list, None);
        }
        // Over the memory budget: spill or drop queued batches; if still over it, stream this
        // call's batch out early: at once when the open batches alone are over it, else once
        // it holds half its cap. What keeps memory over may then be bodies nothing can let go
        // yet (uploads in flight, bodies waiting for a deflate thread): flushing on every span
        // sent batches of a few spans each, every one a request of its own, which held more
        // bodies in flight (the faults suite's gzip acceptance test fell into this on a busy
        // machine: 820 batches for 3,100 spans).
        let max = self.cfg.max_buffer_bytes;
        if self.pending() > max {
            self.enforce_budget();
            let half_full = |w: &Self| {
                w.buffers
                    .get(&key)
                    .is_some_and(|b| b.buf.list.bytes.len() >= open_cap / 2)
            };
            if self.pending() > max && (self.buffered_bytes > max || half_full(self)) {
                self.flush_buffer(&key);
            }
        }
    }

    /// Opens `key`'s batch unless it is open. Spans of a call whose final batch already went
    /// out raced its call's end (queued before the end by another thread, counted after it, or
    /// joined to it after it ended): they travel as late detail with a fresh batch number, never
    /// reusing one the receiver already stored. Spans of a *new* call under an id that ended
    /// before (registry number `incarnation` is not the ended call's, or the id is known only
    /// from a late batch or an earlier run's spool) are not late, but are numbered on from the
    /// ended call too: the receiver keys batches by call id and number.
    fn open_buf(&mut self, key: &Arc<str>, msg_late: bool, provisional: bool, incarnation: u64) {
        if self.buffers.contains_key(key) {
            return;
        }
        // The id ended, as this very call.
        let same_call = self.ended.get(key).and_then(|e| e.call) == Some(incarnation);
        let late = (msg_late || same_call) && !self.pending.contains_key(key);
        let known = self.known_next(key);
        let next_seq = if late {
            known.unwrap_or_else(|| {
                self.late_seq = self.late_seq.saturating_add(1);
                self.late_seq
            })
        } else {
            // A pending end of an id that ended before numbers on from there, as `finish` does.
            known.unwrap_or(0)
        };
        let b = self.new_buf(key, provisional, late, next_seq);
        self.buffers.insert(key.clone(), b);
    }

    fn new_buf(&self, call_id: &str, provisional: bool, late: bool, next_seq: u32) -> Buf {
        let agent = self.reg.agent_id();
        let overhead = DetailMeta {
            call_id,
            agent_id: &agent,
        }
        .overhead()
            + FINAL_FIELDS_BYTES;
        Buf {
            buf: CallBuffer {
                next_seq,
                ..CallBuffer::default()
            },
            overhead,
            provisional,
            late,
        }
    }

    /// Sends whatever a call's buffer holds as a non-final batch. Late buffers are then forgotten.
    fn flush_buffer(&mut self, key: &Arc<str>) {
        let Some(b) = self.buffers.get_mut(key) else {
            return;
        };
        let late = b.late;
        if !b.buf.list.is_empty() {
            let list = b.buf.take();
            self.send_batch(key, list, None);
        }
        if late && let Some(b) = self.buffers.remove(key) {
            self.remember_seq(key.clone(), b.buf.next_seq);
        }
    }

    /// Frames one batch of `key`'s spans as a job; `last` (the transcript) makes it the final
    /// batch, which is held until it may go.
    fn send_batch(&mut self, key: &Arc<str>, list: SpanList, last: Option<&[u8]>) {
        let Some(b) = self.buffers.get_mut(key) else {
            return;
        };
        self.buffered_bytes = self
            .buffered_bytes
            .saturating_sub(list.bytes.len() + usize::from(!list.is_empty()));
        let seq = b.buf.seq();
        let late = b.late;
        let agent = self.reg.agent_id();
        let meta = DetailMeta {
            call_id: key,
            agent_id: &agent,
        };
        let json = meta.body(seq, &list.bytes, late, last.map(|t| (seq + 1, t)));
        let meta = Meta {
            core: false,
            is_final: last.is_some(),
            late,
            seq,
            spans: list.len() as u32,
            call_id: key.to_string(),
            gzip: false,
        };
        drop(list);
        let id = self.new_id();
        if self.may_seal() {
            return self.seal(Job {
                id,
                call: key.clone(),
                meta,
                body: Some(Bytes::from(json)),
                rec: None,
                deflated: None,
            });
        }
        let is_final = meta.is_final;
        let Some(job) = self.make_job(id, key.clone(), meta, json) else {
            if is_final {
                self.forget_core(key, id);
            }
            return;
        };
        self.place(job);
    }

    /// Holds a final batch, queues any other.
    fn place(&mut self, job: Job) {
        if job.meta.is_final {
            self.hold(job);
        } else {
            self.enqueue(job, false);
        }
    }

    /// Whether a new detail body is compressed before it is spooled: there is a spool, bodies
    /// are compressed, the bodies waiting for a deflate thread are fewer bytes than
    /// `seal_bytes_max`, and `CALLSCOPE_COMPRESSION=auto` does not find
    /// compression behind. Otherwise it is spooled as JSON at once (and compressed, or not,
    /// when it is sent).
    fn may_seal(&self) -> bool {
        self.spool.is_some()
            && self.sealing_bytes < self.seal_bytes_max
            && self.transport.compresses()
            && !self.behind()
    }

    /// Whether compression has CPU to spare for a raised gzip level
    /// (`CALLSCOPE_GZIP_LEVEL_MAX`, see [`Transport::encode_detail`]): no body is being
    /// compressed for the spool, no more detail waits to be sent than `free` upload slots can
    /// start at once, and pending detail is under half of `CALLSCOPE_MAX_BUFFER_BYTES`.
    /// Otherwise the worker is falling behind (on CPU or on the receiver) and keeps the base
    /// level. (Not [`Worker::behind`], `auto`'s rule for plain bodies.)
    fn spare(&self, free: usize) -> bool {
        self.sealing.is_empty()
            && self.queue.len() <= free
            && self.pending() < self.cfg.max_buffer_bytes / 2
    }

    /// Pending detail: open batches and what the worker holds in memory.
    fn pending(&self) -> usize {
        self.buffered_bytes + self.mem_bytes
    }

    /// Under `CALLSCOPE_COMPRESSION=auto`: whether compression is behind (see
    /// [`plain_when_behind`]).
    fn behind(&self) -> bool {
        self.transport.adaptive()
            && plain_when_behind(
                self.pending(),
                self.cfg.max_buffer_bytes,
                self.upload_times.get(),
            )
    }

    /// Compresses a new detail job's body on a deflate thread; [`Worker::on_sealed`] spools
    /// the gzip body and queues the job. The spool then holds ~4× less than the JSON, and
    /// the body is not compressed again when sent. Until then the job is counted in memory
    /// (its JSON cannot be let go to the spool yet: `seal_bytes_max` bounds these) and, unless it
    /// is its call's final, among the call's open batches (its final waits for it).
    fn seal(&mut self, job: Job) {
        let json = job.body.clone().unwrap_or_default();
        let task = deflate_off_thread(self.transport.clone(), json, self.spare(0));
        self.mem_bytes += job.mem();
        self.sealing_bytes += job.mem();
        if !job.meta.is_final {
            *self.open.entry(job.call.clone()).or_insert(0) += 1;
        }
        self.sealing.push_back(Sealing { job, task });
    }

    /// A body [`Worker::seal`] compressed (`None`: its task failed, only when the runtime
    /// shuts down; then it is spooled as JSON): written to the spool, then held or queued.
    fn on_sealed(&mut self, mut job: Job, sealed: Option<(Body, Option<Duration>)>) {
        self.mem_bytes = self.mem_bytes.saturating_sub(job.mem());
        self.sealing_bytes = self.sealing_bytes.saturating_sub(job.mem());
        if let Some((body, took)) = sealed {
            job.deflated = took.map(|took| (took, job.mem()));
            job.body = Some(body.bytes);
            job.meta.gzip = body.gzip;
        }
        if self.spool_job(&mut job).is_none() {
            // Dropped (spool full; counted): nothing waits for it any more.
            if job.meta.is_final {
                self.forget_core(&job.call, job.id);
            } else {
                self.close_open(&job);
            }
            return;
        }
        if job.meta.gzip && job.rec.is_some() {
            Counters::inc(&self.stats.spool_records_compressed);
        }
        if !job.meta.is_final {
            // `enqueue` counts it open again.
            self.uncount_open(&job.call);
        }
        self.place(job);
    }

    /// The call's final batch while it is being sealed (its newest, should the id have ended
    /// twice), taken out of `sealing` (its body is its JSON still; the task's result will
    /// find nothing to take).
    fn unseal_final(&mut self, key: &Arc<str>) -> Option<Job> {
        let at = self
            .sealing
            .iter()
            .rposition(|s| s.job.meta.is_final && s.job.call == *key)?;
        let s = self.sealing.remove(at)?;
        s.task.abort();
        self.sealing_bytes = self.sealing_bytes.saturating_sub(s.job.mem());
        Some(s.job)
    }

    fn new_id(&mut self) -> u64 {
        self.next_job += 1;
        self.next_job
    }

    /// A job whose body is `json`, written to the spool first when there is one. `None` if it
    /// had to be dropped (spool full).
    fn make_job(&mut self, id: u64, call: Arc<str>, meta: Meta, json: Vec<u8>) -> Option<Job> {
        let mut job = Job {
            id,
            call,
            meta: Meta {
                gzip: false,
                ..meta
            },
            body: Some(Bytes::from(json)),
            rec: None,
            deflated: None,
        };
        if self.spool.is_some() {
            self.spool_job(&mut job)?;
        }
        Some(job)
    }

    /// Writes a job to the spool; makes room (dropping the oldest detail) when it is full.
    fn spool_job(&mut self, job: &mut Job) -> Option<()> {
        let len = job.mem();
        if !job.meta.core {
            while !self.spool.as_ref().is_some_and(|s| s.fits(len)) {
                let Some(old) = self.queue.pop_front() else {
                    break;
                };
                self.drop_detail(old, DropWhy::SpoolFull);
            }
            if !self.spool.as_ref().is_some_and(|s| s.fits(len)) {
                self.count_spool_full(&job.call, job.meta.spans, "detail batch dropped");
                Counters::inc(&self.stats.detail_batches_failed);
                return None;
            }
        }
        let spool = self.spool.as_mut()?;
        let json = job.body.as_deref().unwrap_or_default();
        match spool.append(&job.meta, json) {
            Ok(rec) => {
                job.rec = Some(rec);
                Counters::inc(&self.stats.spool_records_written);
            }
            Err(e) => {
                Counters::inc(&self.stats.spool_errors);
                tracing::error!(error = %e, "could not write to the spool; the payload is kept in memory only");
            }
        }
        Some(())
    }

    /// Queues a detail job for upload (`front`: it goes next).
    fn enqueue(&mut self, job: Job, front: bool) {
        self.mem_bytes += job.mem();
        if !job.meta.is_final {
            *self.open.entry(job.call.clone()).or_insert(0) += 1;
        }
        if front {
            self.queue.push_front(job);
        } else {
            self.queue.push_back(job);
        }
        self.enforce_budget();
    }

    /// Holds a final batch until its core is acknowledged and its call has nothing else pending.
    fn hold(&mut self, job: Job) {
        let key = job.call.clone();
        if self.ended_again_since(&key, job.id) {
            // An earlier end's final, done compressing after the call id ended again: it goes
            // as is (the hold and the core state are the newer end's; waiting on them, it
            // could be made plain by the newer end's failed summary).
            return self.enqueue(job, false);
        }
        self.mem_bytes += job.mem();
        if let Some(old) = self.held.insert(key.clone(), Held { job }) {
            // The same call id ended again before its first final went: send that one as is.
            self.mem_bytes = self.mem_bytes.saturating_sub(old.job.mem());
            self.enqueue(old.job, false);
        }
        self.try_release(&key);
        self.enforce_budget();
    }

    /// Whether `key` ended again after the end whose final batch is job `id`: the newer end
    /// is pending, or its final is held or being compressed. The call's core state and hold
    /// are then the newer end's.
    fn ended_again_since(&self, key: &Arc<str>, id: u64) -> bool {
        self.pending.contains_key(key)
            || self.held.get(key).is_some_and(|h| h.job.id > id)
            || self
                .sealing
                .iter()
                .any(|s| s.job.meta.is_final && s.job.id > id && s.job.call == *key)
    }

    /// The final batch `id` of `key` was lost (counted): nothing waits for the call's core
    /// any more, unless the call ended again since.
    fn forget_core(&mut self, key: &Arc<str>, id: u64) {
        if !self.ended_again_since(key, id) {
            self.core_outcome.remove(key);
        }
    }

    /// Moves a held final to the front of the queue once it may go; turns it into a plain
    /// batch when its core failed.
    fn try_release(&mut self, key: &Arc<str>) {
        if self.open.get(key).copied().unwrap_or(0) > 0 {
            return;
        }
        let core = self
            .core_outcome
            .get(key)
            .copied()
            .unwrap_or(CoreState::Acked);
        if core == CoreState::InFlight || !self.held.contains_key(key) {
            return;
        }
        let Some(Held { mut job }) = self.held.remove(key) else {
            return;
        };
        self.core_outcome.remove(key);
        self.mem_bytes = self.mem_bytes.saturating_sub(job.mem());
        if core == CoreState::Failed {
            // No acknowledged core: no final batch; its spans still go (the receiver keeps
            // detail that arrives before its core).
            if job.meta.spans == 0 {
                self.settle(&job);
                return;
            }
            job.meta.is_final = false;
            self.rework(job, |d| d.make_plain(), true);
        } else {
            self.enqueue(job, true);
        }
    }

    /// Rewrites a job's body (rare paths: a failed core, 413), replacing its spool record, and
    /// queues it.
    fn rework(&mut self, job: Job, f: impl FnOnce(&mut DetailDoc), front: bool) {
        let Some(new) = self.rewrite(job, f) else {
            return;
        };
        if new.meta.is_final {
            self.hold(new);
        } else {
            self.enqueue(new, front);
        }
    }

    /// `job` with its body rewritten by `f`: the new spool record is written before the old
    /// one is let go, so a process restart in between finds one of the two (a power loss keeps
    /// what the last fsync covered). `None` if the body could not be read back or the spool had
    /// no room (both counted).
    fn rewrite(&mut self, job: Job, f: impl FnOnce(&mut DetailDoc)) -> Option<Job> {
        let Some(mut doc) = self.json_of(&job).and_then(|j| DetailDoc::parse(&j)) else {
            self.fail_detail(job, "its body could not be read back");
            return None;
        };
        f(&mut doc);
        let body = doc.to_vec();
        // A spool without room for both records lets the old one go first rather than drop
        // other detail (or this batch) to make room.
        let both = self.spool.as_ref().is_none_or(|s| s.fits(body.len()));
        if !both {
            self.settle(&job);
        }
        let new = self.make_job(job.id, job.call.clone(), job.meta.clone(), body);
        if both {
            self.settle(&job);
        }
        new
    }

    /// The job's body as JSON (a gzip body is inflated).
    fn json_of(&self, job: &Job) -> Option<Bytes> {
        let body = self.body_of(job)?;
        if !job.meta.gzip {
            return Some(body);
        }
        match crate::transport::gunzip(&body) {
            Ok(json) => Some(Bytes::from(json)),
            Err(e) => {
                Counters::inc(&self.stats.spool_errors);
                tracing::error!(error = %e, "could not inflate a compressed spool body");
                None
            }
        }
    }

    /// The job's body as it is kept: in memory, or read back from the spool.
    fn body_of(&self, job: &Job) -> Option<Bytes> {
        if let Some(j) = &job.body {
            return Some(j.clone());
        }
        let (rec, _) = job.rec?;
        match self.spool.as_ref()?.read(rec) {
            Ok(j) => Some(Bytes::from(j)),
            Err(e) => {
                Counters::inc(&self.stats.spool_errors);
                tracing::error!(error = %e, "could not read a payload back from the spool");
                None
            }
        }
    }

    /// Bounds pending detail by `CALLSCOPE_MAX_BUFFER_BYTES`: with a spool, bodies are let go
    /// from memory (newest first: the oldest go next); without one, the oldest detail batch is
    /// dropped. Summaries are never dropped.
    fn enforce_budget(&mut self) {
        let max = self.cfg.max_buffer_bytes;
        if let Some(spool) = &self.spool {
            if spool.in_group() {
                return;
            }
            for job in self.queue.iter_mut().rev() {
                if self.buffered_bytes + self.mem_bytes <= max {
                    return;
                }
                if job.rec.is_some()
                    && let Some(j) = job.body.take()
                {
                    self.mem_bytes = self.mem_bytes.saturating_sub(j.len());
                    Counters::inc(&self.stats.spool_spills);
                }
            }
            for h in self.held.values_mut() {
                if self.buffered_bytes + self.mem_bytes <= max {
                    return;
                }
                if h.job.rec.is_some()
                    && let Some(j) = h.job.body.take()
                {
                    self.mem_bytes = self.mem_bytes.saturating_sub(j.len());
                    Counters::inc(&self.stats.spool_spills);
                }
            }
            return;
        }
        // Uploads in progress are never cut off (the receiver may already have stored them,
        // and a loss must be certain to be counted): they are the bound's slack, at most
        // `CALLSCOPE_MAX_CONCURRENT_DETAIL` bodies.
        while self.pending() > max {
            let Some(old) = self.queue.pop_front() else {
                return;
            };
            self.drop_detail(old, DropWhy::BufferFull);
        }
    }

    /// Drops a queued detail job (counted), keeping the call's bookkeeping.
    fn drop_detail(&mut self, job: Job, why: DropWhy) {
        self.mem_bytes = self.mem_bytes.saturating_sub(job.mem());
        let spans = u64::from(job.meta.spans);
        // Counted each; logged when a count passes a power of two, so an overload cannot
        // flood the log too.
        match why {
            DropWhy::BufferFull => {
                Counters::add(&self.stats.spans_dropped_buffer_full, spans);
                if let Some(batches) =
                    Counters::inc_at_powers_of_two(&self.stats.detail_batches_dropped_buffer_full)
                {
                    let total = self.stats.spans_dropped_buffer_full.load(Ordering::Relaxed);
                    tracing::warn!(call_id = %job.call, spans, batches, total_spans = total,
                        "oldest detail batch dropped: CALLSCOPE_MAX_BUFFER_BYTES reached (the receiver is too slow or down, or the worker is short of CPU: CALLSCOPE_COMPRESSION=auto trades bytes for CPU)");
                }
            }
            DropWhy::SpoolFull => {
                self.count_spool_full(&job.call, job.meta.spans, "oldest detail batch dropped")
            }
        }
        Counters::inc(&self.stats.detail_batches_failed);
        self.settle(&job);
        self.close_open(&job);
    }

    /// Counts a detail batch of `spans` spans dropped because the spool is full; logs when the
    /// spans dropped so pass a power of two.
    fn count_spool_full(&self, call: &str, spans: u32, what: &str) {
        let spans = u64::from(spans);
        if let Some(total) =
            Counters::add_at_powers_of_two(&self.stats.spans_dropped_spool_full, spans)
        {
            tracing::warn!(call_id = %call, spans, total_spans = total,
                "{what}: the spool is full (CALLSCOPE_SPOOL_MAX_BYTES)");
        }
    }

    /// One fsync for everything written to the spool since the last one (if anything was),
    /// and the removal of the segments found deletable.
    fn sync_spool(&mut self) {
        if let Some(spool) = self.spool.as_mut()
            && let Err(e) = spool.sync()
        {
            Counters::inc(&self.stats.spool_errors);
            tracing::error!(error = %e, "spool fsync failed");
        }
    }

    /// Starts making what was spooled durable (records before they are sent, acks before
    /// their segments go): on the fsync thread when there is one (unless an fsync runs there
    /// now: the next one starts when it ends), covering everything written so far; else here,
    /// at once.
    fn start_sync(&mut self) {
        if self.syncing.is_some() {
            return;
        }
        let (Some(syncer), Some(spool)) = (&self.syncer, self.spool.as_mut()) else {
            return self.sync_spool();
        };
        let Some(job) = spool.begin_sync() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        match syncer.tx.send((job, tx)) {
            Ok(()) => self.syncing = Some(rx),
            Err(std::sync::mpsc::SendError((job, _))) => {
                // Run here what the thread cannot: its fsyncs and its removals.
                let result = job.run();
                self.on_synced(Some((job, result)));
                self.syncer_gone();
            }
        }
    }

    /// An fsync of the fsync thread is done (`None`: the thread is gone).
    fn on_synced(&mut self, done: Option<Synced>) {
        let Some((job, result)) = done else {
            return self.syncer_gone();
        };
        if let Some(spool) = self.spool.as_mut()
            && let Err(e) = spool.end_sync(job, result)
        {
            Counters::inc(&self.stats.spool_errors);
            tracing::error!(error = %e, "spool fsync failed");
        }
    }

    /// The fsync thread stopped (it panicked): the worker fsyncs itself from now on.
    #[cold]
    fn syncer_gone(&mut self) {
        tracing::error!("the spool's fsync thread stopped: the worker thread fsyncs itself");
        self.syncer = None;
        self.syncing = None;
        self.sync_spool();
    }

    /// The job is done with: its spool record goes.
    fn settle(&mut self, job: &Job) {
        if let (Some((rec, bytes)), Some(spool)) = (job.rec, self.spool.as_mut())
            && let Err(e) = spool.ack(rec, bytes)
        {
            Counters::inc(&self.stats.spool_errors);
            tracing::warn!(error = %e, "could not mark a spool record acknowledged (it may be sent again after a restart)");
        }
    }

    /// A non-final detail job of its call is no longer pending: maybe its final may go.
    fn close_open(&mut self, job: &Job) {
        if job.meta.core || job.meta.is_final {
            return;
        }
        if self.uncount_open(&job.call) {
            self.try_release(&job.call.clone());
        }
    }

    /// One open batch of `call` fewer; whether it was its last.
    fn uncount_open(&mut self, call: &Arc<str>) -> bool {
        let Some(n) = self.open.get_mut(call) else {
            return false;
        };
        *n = n.saturating_sub(1);
        let last = *n == 0;
        if last {
            self.open.remove(call);
        }
        last
    }

    fn fail_detail(&mut self, job: Job, why: &str) {
        let spans = u64::from(job.meta.spans);
        Counters::inc(&self.stats.detail_batches_failed);
        Counters::add(&self.stats.spans_dropped_send_failed, spans);
        tracing::error!(call_id = %job.call, seq = job.meta.seq, spans, "detail batch not delivered: {why}");
        self.settle(&job);
        self.close_open(&job);
    }

    /// Starts what may start ([`Worker::pump_jobs`]), then tells the transport whether
    /// summaries still wait for an upload slot: detail holds back while they do, so that every
    /// summary still goes before any detail when more than [`MAX_CONCURRENT_SUMMARIES`] wait.
    fn pump(&mut self) {
        self.pump_jobs();
        self.transport.summaries_queued(!self.cores.is_empty());
    }

    /// Starts the fsync of spooled records, summaries up to [`MAX_CONCURRENT_SUMMARIES`] in
    /// flight, and as many detail uploads (fsynced) as `CALLSCOPE_MAX_CONCURRENT_DETAIL` allows.
    fn pump_jobs(&mut self) {
        if self.stop_at.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let waiting = (!self.cores.is_empty()
            && self.summaries_running() < MAX_CONCURRENT_SUMMARIES)
            || (!self.queue.is_empty() && self.running_detail < self.cfg.max_concurrent_detail);
        if !waiting {
            return;
        }
        self.start_sync();
        // A summary goes before an fsync covers its record. That loses nothing a power loss
        // would not: a record not yet fsynced is lost with the power whether it was sent or
        // not, and one the receiver acknowledged is needed no more. And it carries no batch
        // number that a restart could give out again. Detail waits: its record carries its
        // call's batch number, which must be on disk before the receiver can have it.
        while self.summaries_running() < MAX_CONCURRENT_SUMMARIES
            && let Some(job) = self.cores.pop_front()
        {
            self.start(job, Lane::Core);
        }
        while self.running_detail < self.cfg.max_concurrent_detail {
            let Some(mut job) = self.queue.pop_front_if(|j| synced(self.spool.as_ref(), j)) else {
                break;
            };
            if job.body.is_none() {
                match self.body_of(&job) {
                    Some(j) => {
                        self.mem_bytes += j.len();
                        job.body = Some(j);
                    }
                    None => {
                        self.fail_detail(job, "its body could not be read back from the spool");
                        continue;
                    }
                }
            }
            self.start(job, Lane::Detail);
        }
    }

    /// Summary uploads in flight (every running job that is not detail).
    fn summaries_running(&self) -> usize {
        self.running.len().saturating_sub(self.running_detail)
    }

    fn start(&mut self, job: Job, lane: Lane) {
        if lane == Lane::Detail {
            self.running_detail += 1;
        }
        let idem = if job.meta.core {
            format!("{}:core", job.call)
        } else {
            format!("{}:detail:{}", job.call, job.meta.seq)
        };
        let t = self.transport.clone();
        let json = job.body.clone().unwrap_or_default();
        let detail = lane == Lane::Detail;
        let (handle, wire) = if job.meta.gzip {
            // Compressed before it was spooled: it goes as it is, sharing the job's body.
            let body = Body {
                bytes: json,
                gzip: true,
            };
            let times = self.upload_times.clone();
            let deflated = job.deflated;
            let handle = self.tasks.spawn(async move {
                deliver_compressed(&t, lane, body, &idem, &times, deflated).await
            });
            (handle, 0)
        } else if detail && self.transport.compresses() && !self.compressor_behind() {
            // A detail body is compressed on the runtime's blocking thread while this thread
            // goes on building batches (deflate was two thirds of this thread's time). Until
            // the upload is done it counts as big as its JSON: the compressed size is not
            // known yet, and memory must never be under-counted.
            let charged = json.len();
            let times = self.upload_times.clone();
            // Bodies ready together start together: only detail left waiting for a slot
            // says the worker is behind.
            let free = self
                .cfg
                .max_concurrent_detail
                .saturating_sub(self.running_detail);
            let encoded = deflate_off_thread(t.clone(), json, self.spare(free));
            let handle = self.tasks.spawn(async move {
                match encoded.await {
                    Ok((body, deflate)) => {
                        let deflated = deflate.map(|d| (d, charged));
                        deliver_compressed(&t, lane, body, &idem, &times, deflated).await
                    }
                    // Only a runtime shutting down gets here (deflating into a Vec cannot
                    // fail): the batch is counted as failed like any undelivered one.
                    Err(_) => Delivery::Failed,
                }
            });
            (handle, charged)
        } else {
            // Summaries are compressed here, at once: they are small and their latency is
            // what the call log waits for. A detail body here goes as it is: compression is
            // off, or behind (`CALLSCOPE_COMPRESSION=auto`); it shares the job's JSON, which
            // is counted already.
            let (body, wire) = if detail {
                if self.transport.compresses() {
                    Counters::inc(&self.stats.detail_bodies_uncompressed);
                }
                (self.transport.plain(json), 0)
            } else {
                let body = self.transport.encode(&json);
                let wire = body.bytes.len();
                (body, wire)
            };
            let handle = self
                .tasks
                .spawn(async move { t.deliver(lane, body, &idem).await });
            (handle, wire)
        };
        if !job.meta.core {
            self.mem_bytes += wire;
        }
        self.running.insert(handle.id(), Running { job, wire });
    }

    /// Under `CALLSCOPE_COMPRESSION=auto`: whether the next detail body goes plain because
    /// compression is behind (see [`plain_when_behind`]). One body in [`PROBE_EVERY`] of a
    /// run of plain ones is compressed all the same, so the times that decide keep being
    /// measured: without it they froze when bodies went plain, and a receiver that became
    /// slow meanwhile got plain bodies for as long as memory stayed tight.
    fn compressor_behind(&mut self) -> bool {
        let behind = self.behind();
        if !behind {
            if let Some((since, found)) = self.plain_since.take() {
                tracing::debug!(
                    bodies = found - found / u64::from(PROBE_EVERY),
                    seconds = since.elapsed().as_secs_f64(),
                    "detail bodies are compressed again (CALLSCOPE_COMPRESSION=auto)"
                );
            }
            return false;
        }
        let n = match &mut self.plain_since {
            Some((_, found)) => {
                *found += 1;
                *found
            }
            None => {
                self.plain_since = Some((Instant::now(), 1));
                self.log_going_plain();
                1
            }
        };
        n % u64::from(PROBE_EVERY) != 0
    }

    /// Says why detail starts going plain: at `info` once a minute at most (memory near its
    /// bound can make it start and stop often), at `debug` otherwise.
    #[cold]
    fn log_going_plain(&mut self) {
        let (deflate_ns, saved_ns) = self.upload_times.get();
        let pending = self.pending();
        let bound = self.cfg.max_buffer_bytes;
        let (deflate_ms, saved_ms) = (deflate_ns as f64 / 1e6, saved_ns as f64 / 1e6);
        let now = Instant::now();
        if self
            .plain_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.plain_logged = Some(now);
            tracing::info!(
                deflate_ms,
                saved_ms,
                pending,
                bound,
                "compression is behind: detail bodies go uncompressed while pending detail is past 7/8 of CALLSCOPE_MAX_BUFFER_BYTES (CALLSCOPE_COMPRESSION=auto; counted in detail_bodies_uncompressed)"
            );
        } else {
            tracing::debug!(
                deflate_ms,
                saved_ms,
                pending,
                bound,
                "detail bodies go uncompressed again"
            );
        }
    }

    fn on_done(&mut self, id: Id, result: Delivery) {
        let Some(Running { job, wire, .. }) = self.running.remove(&id) else {
            return;
        };
        if job.meta.core {
            return self.core_done(job, result);
        }
        self.running_detail = self.running_detail.saturating_sub(1);
        self.mem_bytes = self.mem_bytes.saturating_sub(wire + job.mem());
        match result {
            Delivery::Acked => {
                Counters::inc(&self.stats.detail_batches_sent);
                Counters::add(&self.stats.detail_spans_sent, u64::from(job.meta.spans));
                self.settle(&job);
                // Never lower: late batches may already have taken numbers above the final's.
                let next = job.meta.seq + 1;
                if job.meta.is_final && self.ended_next(&job.call).is_none_or(|s| s < next) {
                    self.remember_seq(job.call.clone(), next);
                }
                self.close_open(&job);
            }
            Delivery::TooLarge => self.split(job),
            Delivery::Failed => self.fail_detail(job, "rejected or out of retries"),
        }
    }

    fn core_done(&mut self, job: Job, result: Delivery) {
        let call_id = job.call.clone();
        let ok = result == Delivery::Acked;
        if ok {
            Counters::inc(&self.stats.summaries_sent);
        } else {
            Counters::inc(&self.stats.summaries_failed);
            if result == Delivery::TooLarge {
                tracing::error!(%call_id, "call summary refused as too large (413): lower CALLSCOPE_MAX_SUMMARY_BYTES under the receiver's limit");
            } else {
                tracing::error!(%call_id, ?result, "call summary not delivered");
            }
        }
        self.settle(&job);
        let state = if ok {
            CoreState::Acked
        } else {
            CoreState::Failed
        };
        if self.core_outcome.contains_key(&call_id) {
            self.core_outcome.insert(call_id.clone(), state);
            self.try_release(&call_id);
        }
    }

    /// 413: split the batch in halves (first half keeps its number, the second takes a new
    /// one, or the held final's); a lone span is shortened instead. What the split writes to
    /// the spool and the acks of what it replaces go as one unit: a crash finds the batch
    /// before the split or after it, never a mix (a number taken twice, or one never used).
    fn split(&mut self, job: Job) {
        if let Some(s) = self.spool.as_mut() {
            s.begin_group();
        }
        self.split_records(job);
        if let Some(s) = self.spool.as_mut()
            && let Err(failed) = s.end_group()
        {
            Counters::inc(&self.stats.spool_errors);
            tracing::error!(error = %failed.error, "could not write a split batch to the spool: its batches are kept in memory only, and the batch it split may be sent again after a restart");
            // Their records do not exist: their bodies must stay in memory.
            let lost: HashSet<RecId> = failed.places.into_iter().collect();
            for job in self
                .queue
                .iter_mut()
                .chain(self.held.values_mut().map(|h| &mut h.job))
            {
                if job.rec.is_some_and(|(r, _)| lost.contains(&r)) {
                    job.rec = None;
                }
            }
        }
        // Bodies are let go from memory only once their records are written.
        self.enforce_budget();
    }

    fn split_records(&mut self, job: Job) {
        let Some(doc) = self.json_of(&job).and_then(|j| DetailDoc::parse(&j)) else {
            return self.fail_detail(job, "413 and its body could not be read back");
        };
        if doc.span_count() < 2 {
            let size = doc.to_vec().len();
            let budget = size / 2;
            let mut doc = doc;
            let cut = if budget >= MIN_SHORTENED_BYTES {
                doc.shorten(budget)
            } else {
                0
            };
            let new_len = doc.to_vec().len();
            if new_len >= size {
                return self.fail_detail(
                    job,
                    "the receiver refuses even a single span (413) and nothing is left to shorten",
                );
            }
            Counters::add(&self.stats.attributes_truncated, cut);
            tracing::warn!(call_id = %job.call, values = cut, bytes = new_len,
                "receiver answered 413 to a single span: its largest attribute values were shortened");
            let (call, meta, id) = (job.call.clone(), job.meta.clone(), job.id);
            let new = self.make_job(id, call, meta, doc.to_vec());
            self.settle(&job);
            match new {
                Some(new) if new.meta.is_final => self.hold(new),
                Some(new) => {
                    self.enqueue(new, true);
                    self.close_open(&job);
                }
                None => self.close_open(&job),
            }
            return;
        }
        let Some((mut a, mut b)) = doc.split() else {
            return self.fail_detail(job, "413 and the batch cannot be split");
        };
        Counters::inc(&self.stats.batches_split);
        let key = job.call.clone();
        let seq_a = job.meta.seq;
        // The held final gives up its number to the second half and takes the next one. It is
        // rewritten (and respooled) now, before the halves are written: a restart must never
        // find the final and a half under one number (the receiver would keep only one).
        let mut final_moved = None;
        let seq_b = if !job.meta.is_final
            && let Some(mut fin) = self
                .held
                .remove(&key)
                .map(|h| h.job)
                .or_else(|| self.unseal_final(&key))
        {
            self.mem_bytes = self.mem_bytes.saturating_sub(fin.mem());
            let s = fin.meta.seq;
            let next = self.next_seq(&key);
            fin.meta.seq = next;
            let fin_id = fin.id;
            final_moved = self.rewrite(fin, |d| d.renumber(next));
            if final_moved.is_none() {
                self.forget_core(&key, fin_id);
            }
            s
        } else {
            self.next_seq(&key)
        };
        tracing::info!(call_id = %key, seq = seq_a, new_seq = seq_b, spans = job.meta.spans,
            "receiver answered 413: batch split in halves");
        a.renumber(seq_a);
        b.renumber(seq_b);
        let meta_a = Meta {
            is_final: false,
            seq: seq_a,
            spans: a.span_count() as u32,
            ..job.meta.clone()
        };
        let meta_b = Meta {
            seq: seq_b,
            spans: b.span_count() as u32,
            ..job.meta.clone()
        };
        let id = job.id;
        // Both halves are on disk before the whole is let go.
        let ja = self.make_job(id, key.clone(), meta_a, a.to_vec());
        let jb = self.make_job(id, key.clone(), meta_b, b.to_vec());
        self.settle(&job);
        // Queue the halves first so the call's final stays held, then close the whole.
        let mut keep_open = Vec::new();
        for j in [jb, ja].into_iter().flatten() {
            if j.meta.is_final {
                keep_open.push(j);
            } else {
                self.enqueue(j, true);
            }
        }
        self.close_open(&job);
        for j in keep_open.into_iter().chain(final_moved) {
            self.hold(j);
        }
    }

    /// The next batch number of a call, wherever its counter lives now.
    fn next_seq(&mut self, key: &Arc<str>) -> u32 {
        if let Some(b) = self.buffers.get_mut(key) {
            return b.buf.seq();
        }
        let s = match self.known_next(key) {
            Some(s) => s,
            None => {
                self.late_seq = self.late_seq.saturating_add(1);
                self.late_seq
            }
        };
        self.remember_seq(key.clone(), s + 1);
        s
    }

    // ---- call ends -----------------------------------------------------------------------

    /// Drops the redirects of calls neither open in the registry nor waiting here to finish (a
    /// join read after its call finished, or a call whose end was dropped under backlog) once
    /// every detail message enqueued when that was first seen was received: their provisional
    /// calls' chunks are then all in, even if the call's end is still on its way.
    fn sweep_redirects(&mut self) {
        if self.redirects.is_empty() {
            return;
        }
        let (reg, pending) = (&self.reg, &self.pending);
        let (enqueued, received) = (self.enqueued.load(Ordering::Acquire), self.received);
        self.redirects.retain(|_, r| {
            let live = reg.is_open(&r.to, r.call)
                || pending.get(&r.to).is_some_and(|p| p.incarnation == r.call);
            if live {
                r.gone_at = None;
                return true;
            }
            let mark = *r.gone_at.get_or_insert(enqueued);
            received < mark
        });
    }

    fn on_join(&mut self, from: Arc<str>, to: Arc<str>, call: u64) {
        if self.cfg.detail == DetailMode::None {
            return;
        }
        // Once call `call` finished, every chunk of `from` is in (its end's mark counted
        // them): a redirect would only linger.
        let finished = !self.buffers.contains_key(&to)
            && !self.pending.contains_key(&to)
            && self.ended.get(&to).is_some_and(|e| e.call == Some(call));
        if !finished {
            let r = Redirect {
                to: to.clone(),
                call,
                gone_at: None,
            };
            self.redirects.insert(from.clone(), r);
        }
        let Some(old) = self.buffers.remove(&from) else {
            return;
        };
        // The join may reach the worker after the real call's end (an idle end, or another
        // thread's end sent first): the provisional call's spans are then its late detail.
        self.open_buf(&to, false, false, call);
        let Some(b) = self.buffers.get(&to) else {
            return;
        };
        if b.late {
            Counters::add(&self.stats.late_spans, old.buf.list.len() as u64);
        }
        let budget = self.cfg.max_request_bytes.saturating_sub(b.overhead);
        let now = Instant::now();
        let bytes = &old.buf.list.bytes;
        let mut start = 0;
        for &end in &old.buf.list.ends {
            let span = &bytes[start..end];
            start = end + 1;
            let full = self
                .buffers
                .get_mut(&to)
                .and_then(|b| b.buf.push(span, budget, now));
            if let Some(list) = full {
                self.send_batch(&to, list, None);
            }
        }
    }

    fn on_end(&mut self, e: Ended, mark: u64) {
        let Ended { mut state, reason } = e;
        let chunk = state.chunk.take();
        let call_id = state.call_id.clone();
        let folded = std::mem::take(&mut state.folded);
        let incarnation = state.incarnation;
        if let Some(old) = self.pending.remove(&call_id) {
            // The same id ended twice before its first end was finished: finish that one now.
            self.finish(call_id.clone(), old);
        }
        let agent = self.reg.agent_id();
        let core_state = match payload::core_body(
            &state,
            &agent,
            reason.as_str(),
            self.cfg.max_summary_bytes,
        ) {
            Ok(core) => {
                if core.truncated {
                    Counters::inc(&self.stats.summaries_truncated);
                    tracing::warn!(%call_id, "call summary transcript shortened to fit CALLSCOPE_MAX_SUMMARY_BYTES");
                }
                self.queue_core(&call_id, core.json);
                CoreState::InFlight
            }
            Err(err) => {
                Counters::inc(&self.stats.summaries_failed);
                tracing::error!(%call_id, error = %err, "call summary not built");
                CoreState::Failed
            }
        };
        self.core_outcome.insert(call_id.clone(), core_state);
        self.by_mark.insert((mark, call_id.clone()));
        self.pending.insert(
            call_id.clone(),
            PendingEnd {
                turns: state.turns,
                mark,
                chunk,
                incarnation,
            },
        );
        // Its folds, whose joins may still wait in the control queue (an idle end is taken by
        // the tick): their detail is this call's, in its final batch, not late detail after it.
        for from in folded {
            self.on_join(from, call_id.clone(), incarnation);
        }
    }

    /// Spools a call's summary (`json`) and queues it to go at the next `pump`.
    fn queue_core(&mut self, call_id: &Arc<str>, json: Vec<u8>) {
        let meta = Meta {
            core: true,
            is_final: false,
            late: false,
            seq: 0,
            spans: 0,
            call_id: call_id.to_string(),
            gzip: false,
        };
        let id = self.new_id();
        if let Some(job) = self.make_job(id, call_id.clone(), meta, json) {
            self.cores.push_back(job);
        }
    }

    /// Finishes ended calls whose spans have all been batched; dispatches what may go.
    fn progress(&mut self) {
        self.finish_ready();
        // Checking waiters scans every outstanding job: with many outstanding (a flood of call
        // ends) it runs once per tick instead of once per event, which kept it quadratic.
        if !self.waiters.is_empty()
            && (self.waiter_scan_due || self.outstanding() <= WAITER_SCAN_LIMIT)
        {
            self.waiter_scan_due = false;
            self.check_waiters();
        }
        self.pump();
    }

    /// Finishes the ended calls whose mark `received` has passed, smallest marks first.
    fn finish_ready(&mut self) {
        while let Some((mark, _)) = self.by_mark.first()
            && *mark <= self.received
        {
            let Some((mark, k)) = self.by_mark.pop_first() else {
                break;
            };
            // An entry of a call that ended again (a newer end has its own entry) or was
            // finished otherwise is skipped.
            if self.pending.get(&k).is_some_and(|p| p.mark == mark)
                && let Some(p) = self.pending.remove(&k)
            {
                self.finish(k, p);
            }
        }
    }

    /// Every span of an ended call is batched: its remaining spans and its transcript become
    /// the final batch, held until the core is acknowledged.
    fn finish(&mut self, key: Arc<str>, mut p: PendingEnd) {
        // Every chunk of the calls folded into this one is in (the end's mark counted them).
        self.redirects
            .retain(|_, r| !(r.to == key && r.call == p.incarnation));
        if self.cfg.detail == DetailMode::None {
            self.buffers.remove(&key);
            self.core_outcome.remove(&key);
            return;
        }
        if !self.buffers.contains_key(&key) {
            let next = self.known_next(&key).unwrap_or(0);
            let b = self.new_buf(&key, false, false, next);
            self.buffers.insert(key.clone(), b);
        }
        // The spans packed since the call's last full chunk (its buffer exists: never late).
        if let Some(chunk) = p.chunk.take() {
            self.on_chunk(&key, Origin::of(p.incarnation), &chunk);
            self.settle_null_spans();
        }
        if self.core_outcome.get(&key) == Some(&CoreState::Failed) {
            self.core_outcome.remove(&key);
            self.flush_buffer(&key);
        } else {
            let Some(b) = self.buffers.get_mut(&key) else {
                return;
            };
            let budget = self.cfg.max_request_bytes.saturating_sub(b.overhead);
            let records = p.turns.in_time_order();
            let (twm, left_out) = payload::transcript_with_metrics(&records, budget);
            if left_out > 0 {
                Counters::add(&self.stats.text_truncations, left_out);
                tracing::warn!(call_id = %key, left_out, "transcript_with_metrics shortened to fit CALLSCOPE_MAX_REQUEST_BYTES");
            }
            if !b.buf.list.is_empty() && b.buf.list.len_with(twm.len()) > budget {
                let list = b.buf.take();
                self.send_batch(&key, list, None);
            }
            let list = self
                .buffers
                .get_mut(&key)
                .map(|b| b.buf.take())
                .unwrap_or_default();
            self.send_batch(&key, list, Some(&twm));
        }
        if let Some(b) = self.buffers.remove(&key) {
            self.remember_seq(key.clone(), b.buf.next_seq);
            if let Some(e) = self.ended.get_mut(&key) {
                e.call = Some(p.incarnation);
            }
        }
    }

    /// `key`'s next batch number, if its numbers are remembered.
    fn ended_next(&self, key: &str) -> Option<u32> {
        self.ended.get(key).map(|e| e.next)
    }

    /// `key`'s next batch number: the higher of this worker's memory and the spool's, which
    /// knows the numbers a call used before a restart (acknowledged batches included) for as
    /// many calls as it holds records of.
    fn known_next(&self, key: &str) -> Option<u32> {
        let spool = self.spool.as_ref().and_then(|s| s.next_seq(key));
        self.ended_next(key).max(spool)
    }

    /// Remembers `key`'s next batch number; the ids whose last end is oldest are forgotten
    /// past `ended_seqs_kept`.
    fn remember_seq(&mut self, key: Arc<str>, next: u32) {
        self.ended_gen += 1;
        let generation = self.ended_gen;
        self.ended
            .entry(key.clone())
            .and_modify(|e| (e.next, e.generation) = (next, generation))
            .or_insert(EndedId {
                next,
                call: None,
                generation,
            });
        self.ended_order.push_back((key, generation));
        let current = |calls: &ByCall<EndedId>, k: &Arc<str>, g: u64| {
            calls.get(k).is_some_and(|e| e.generation == g)
        };
        while self.ended.len() > self.ended_seqs_kept {
            let Some((old, g)) = self.ended_order.pop_front() else {
                break;
            };
            if current(&self.ended, &old, g) {
                self.ended.remove(&old);
            }
        }
        // An id remembered again leaves a stale entry behind: keep the queue within twice the
        // ids it orders.
        if self.ended_order.len() > self.ended_seqs_kept.saturating_mul(2) + 64 {
            let ended = &self.ended;
            self.ended_order.retain(|(k, g)| current(ended, k, *g));
        }
    }

    // ---- start, flush and shutdown -------------------------------------------------------

    /// Queues what an earlier run left in the spool: summaries first, finals after their core.
    fn replay(&mut self, opened: crate::spool::Opened) {
        if opened.corrupt_tails > 0 {
            Counters::add(&self.stats.spool_corrupt_tails, opened.corrupt_tails);
        }
        let n = opened.records.len();
        if n == 0 {
            return;
        }
        Counters::add(&self.stats.spool_records_replayed, n as u64);
        tracing::info!(
            records = n,
            "replaying payloads left in the spool by an earlier run"
        );
        // Finals after every other record: a final is held while its call's other batches are
        // pending, and they must be counted first (halves of a split come after the final).
        let (finals, others): (Vec<_>, Vec<_>) = opened
            .records
            .into_iter()
            .partition(|r| !r.meta.core && r.meta.is_final);
        // A final under the number of another batch of its call is one a 413 split renumbered
        // (the half took its number; its rewrite is here too, or was delivered) whose ack was
        // lost with its segment: sending it could beat the half to that number.
        let taken: HashSet<(String, u32)> = others
            .iter()
            .filter(|r| !r.meta.core)
            .map(|r| (r.meta.call_id.clone(), r.meta.seq))
            .collect();
        for r in others.into_iter().chain(finals) {
            let call: Arc<str> = Arc::from(r.meta.call_id.as_str());
            let id = self.new_id();
            let stale = r.meta.is_final && taken.contains(&(r.meta.call_id.clone(), r.meta.seq));
            let job = Job {
                id,
                call: call.clone(),
                meta: r.meta,
                body: None,
                rec: Some((r.id, r.bytes)),
                deflated: None,
            };
            if stale {
                tracing::info!(%call, seq = job.meta.seq,
                    "spooled final batch superseded by a split (its number is a half's): not sent again");
                self.settle(&job);
                continue;
            }
            if job.meta.core {
                self.core_outcome.insert(call, CoreState::InFlight);
                self.cores.push_back(job);
            } else {
                let next = job.meta.seq.saturating_add(1);
                if self.ended_next(&call).is_none_or(|s| s < next) {
                    self.remember_seq(call, next);
                }
                if job.meta.is_final {
                    self.hold(job);
                } else {
                    self.enqueue(job, false);
                }
            }
        }
        // Bodies are read back when their turn comes; only summaries are loaded now.
        let cores: Vec<Job> = self.cores.drain(..).collect();
        for mut job in cores {
            job.body = self.body_of(&job);
            if job.body.is_some() {
                self.cores.push_back(job);
            } else {
                Counters::inc(&self.stats.summaries_failed);
                self.settle(&job);
                self.core_outcome
                    .insert(job.call.clone(), CoreState::Failed);
                self.try_release(&job.call);
            }
        }
    }

    /// Jobs not yet settled (queued, held or running).
    fn outstanding(&self) -> usize {
        self.queue.len()
            + self.cores.len()
            + self.held.len()
            + self.running.len()
            + self.sealing.len()
    }

    /// Whether control messages are taken now. With too many payloads outstanding (a flood of
    /// call ends against a slow or down receiver) call ends wait in the channel, where the
    /// processor bounds them (counted drops). Not once the processor is shutting down or gone:
    /// its stop request (or the closed channel) is behind those ends, and only once it is taken
    /// does the worker keep its deadline and count what it could not deliver. Taking the ends
    /// then holds at most the processor's bound of them as summaries.
    fn takes_control(&self) -> bool {
        self.outstanding() < self.backlog_limit
            || self.stopping.is_set()
            || self.ctrl_rx.is_closed()
    }

    /// The oldest job not yet settled.
    fn oldest_job(&self) -> Option<u64> {
        let q = self.queue.iter().chain(&self.cores).map(|j| j.id);
        let h = self.held.values().map(|h| h.job.id);
        let r = self.running.values().map(|r| r.job.id);
        let s = self.sealing.iter().map(|s| s.job.id);
        q.chain(h).chain(r).chain(s).min()
    }

    fn check_waiters(&mut self) {
        let mut flush_now = false;
        for w in &mut self.waiters {
            if self.received >= w.mark && w.epoch.is_none() {
                flush_now = true;
            }
        }
        if flush_now {
            let keys: Vec<Arc<str>> = self.buffers.keys().cloned().collect();
            for k in keys {
                self.flush_buffer(&k);
            }
        }
        let oldest = self.oldest_job();
        let next = self.next_job + 1;
        let received = self.received;
        let smallest_pending = self.by_mark.first().map(|(m, _)| *m);
        let mut stop = false;
        self.waiters.retain_mut(|w| {
            if received < w.mark {
                return true;
            }
            // Calls that ended before the flush must be finished (their finals made) first.
            if w.epoch.is_none() || smallest_pending.is_some_and(|m| m <= w.mark) {
                w.epoch = Some(next);
                return true;
            }
            if oldest.is_some_and(|o| Some(o) < w.epoch) {
                return true;
            }
            let _ = w.ack.try_send(());
            stop |= w.stop;
            false
        });
        if stop {
            self.exit = true;
        }
    }

    /// The shutdown deadline passed: with a spool, everything not yet acknowledged is left
    /// there for the next start (counted as left in the spool); without one, it is counted lost.
    fn abandon(&mut self) {
        self.tasks.abort_all();
        // No new body waits for a deflate thread now; those compressing are spooled as JSON.
        self.seal_bytes_max = 0;
        while let Some(s) = self.sealing.pop_front() {
            s.task.abort();
            self.on_sealed(s.job, None);
        }
        if self.spool.is_some() {
            // Batch what is still queued in memory so it reaches the disk too.
            while let Ok(d) = self.data_rx.try_recv() {
                self.on_detail(d);
            }
            let pending: Vec<Arc<str>> = self.pending.keys().cloned().collect();
            for k in pending {
                if let Some(p) = self.pending.remove(&k) {
                    self.finish(k, p);
                }
            }
            let keys: Vec<Arc<str>> = self.buffers.keys().cloned().collect();
            for k in keys {
                self.flush_buffer(&k);
            }
        }
        let spooled = self.spool.is_some();
        let mut jobs: Vec<Job> = self.running.drain().map(|(_, r)| r.job).collect();
        jobs.extend(self.cores.drain(..));
        jobs.extend(self.queue.drain(..));
        jobs.extend(self.held.drain().map(|(_, h)| h.job));
        let (mut cores, mut spans, mut unspooled) = (0u64, 0u64, 0u64);
        for j in &jobs {
            if spooled && j.rec.is_none() {
                // Could not be written to the spool: lost after all.
                unspooled += u64::from(j.meta.spans);
                if j.meta.core {
                    Counters::inc(&self.stats.summaries_failed);
                }
                continue;
            }
            if j.meta.core {
                cores += 1;
            } else {
                spans += u64::from(j.meta.spans);
            }
        }
        if spooled {
            self.sync_spool();
            Counters::add(&self.stats.summaries_left_in_spool, cores);
            Counters::add(&self.stats.spans_left_in_spool, spans);
            if unspooled > 0 {
                Counters::add(&self.stats.spans_dropped_send_failed, unspooled);
            }
            if cores + spans > 0 {
                tracing::warn!(
                    summaries = cores,
                    spans,
                    "not delivered before the shutdown timeout: left in the spool for the next start"
                );
            }
        } else {
            let mut lost = spans;
            for (_, b) in self.buffers.drain() {
                lost += b.buf.list.len() as u64;
            }
            // Spans still queued, or packed in ended calls' last chunks, were never batched.
            lost += self.queue_spans.used() as u64;
            lost += self
                .pending
                .values()
                .filter_map(|p| p.chunk.as_ref())
                .map(|c| c.spans() as u64)
                .sum::<u64>();
            Counters::add(&self.stats.summaries_failed, cores);
            if cores > 0 {
                tracing::error!(
                    summaries = cores,
                    "call summaries not delivered before the shutdown timeout"
                );
            }
            if lost > 0 {
                Counters::add(&self.stats.spans_dropped_send_failed, lost);
                Counters::add(
                    &self.stats.detail_batches_failed,
                    jobs.iter().filter(|j| !j.meta.core).count() as u64,
                );
                tracing::error!(
                    spans = lost,
                    "detail not delivered before the shutdown timeout"
                );
            }
        }
        self.pending.clear();
        self.by_mark.clear();
        for w in self.waiters.drain(..) {
            drop(w.ack);
        }
        self.exit = true;
    }
}

/// Detail `json` compressed on a deflate thread (the runtime's blocking pool), and how long
/// that took from now, its wait for the thread included. `spare` (see [`Worker::spare`]): the
/// body may get the raised level ([`Transport::encode_detail`]). The time is `None` for a
/// raised body: [`UploadTimes`] weighs what compressing at `CALLSCOPE_GZIP_LEVEL` costs, and
/// a raised body's ~4.7x would make `CALLSCOPE_COMPRESSION=auto` go plain too early.
fn deflate_off_thread(
    t: Arc<Transport>,
    json: Bytes,
    spare: bool,
) -> tokio::task::JoinHandle<(Body, Option<Duration>)> {
    let queued = Instant::now();
    tokio::task::spawn_blocking(move || {
        let (body, raised) = t.encode_detail(&json, spare);
        (body, (!raised).then(|| queued.elapsed()))
    })
}

/// Delivers a compressed body; once it is acknowledged, [`UploadTimes`] learns what
/// compressing it cost and saved (`deflated`: how long it took and the JSON's length; `None`
/// for a body replayed from the spool, whose compression is not known).
async fn deliver_compressed(
    t: &Transport,
    lane: Lane,
    body: Body,
    idem: &str,
    times: &UploadTimes,
    deflated: Option<(Duration, usize)>,
) -> Delivery {
    let wire = body.bytes.len();
    let (r, http) = t.deliver_timed(lane, body, idem).await;
    // An acknowledged attempt's time only: retries' backoff and fast rejections say nothing
    // about what the bytes cost.
    if r == Delivery::Acked
        && let Some((deflate, raw)) = deflated
    {
        times.record(deflate, http, raw, wire);
    }
    r
}

/// Whether a job may be sent: its spool record (if it has one) was covered by an fsync.
fn synced(spool: Option<&Spool>, job: &Job) -> bool {
    match (spool, job.rec) {
        (Some(spool), Some((rec, _))) => spool.synced(rec),
        _ => true,
    }
}

/// A spool fsync that ran on the [`Syncer`] thread, and how it went.
type Synced = (SyncJob, std::io::Result<()>);

/// A thread of its own for the spool's fsyncs. They take the disk's time (hundreds of them a
/// second under load, each waiting on the device), during which the worker goes on batching,
/// writing and sending what is already durable. One runs at a time and covers every record
/// written before it began, so under load each covers more (group commit).
#[derive(Debug)]
struct Syncer {
    tx: std::sync::mpsc::Sender<(SyncJob, oneshot::Sender<Synced>)>,
}

impl Syncer {
    /// Starts the thread; it ends when the worker drops its `Syncer`.
    fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(SyncJob, oneshot::Sender<Synced>)>();
        std::thread::Builder::new()
            .name("callscope-fsync".into())
            .spawn(move || {
                for (job, back) in rx {
                    let r = job.run();
                    let _ = back.send((job, r));
                }
            })?;
        Ok(Syncer { tx })
    }
}

/// The running fsync's outcome, once it is done.
async fn next_synced(
    syncing: &mut Option<oneshot::Receiver<Synced>>,
) -> Option<Result<Synced, oneshot::error::RecvError>> {
    Some(syncing.as_mut()?.await)
}

/// The oldest sealing body's result, once its task is done (taken in order: a final must not
/// pass its call's other batches).
async fn next_sealed(
    sealing: &mut VecDeque<Sealing>,
) -> Option<Result<(Body, Option<Duration>), tokio::task::JoinError>> {
    Some((&mut sealing.front_mut()?.task).await)
}

#[derive(Debug, Clone, Copy)]
enum DropWhy {
    BufferFull,
    SpoolFull,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::call::CallState;
    use crate::semantics::Operation;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::SpanData;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::time::UNIX_EPOCH;

    fn worker() -> (Worker, Handle) {
        let (w, h, _) = worker_with(
            Config::builder()
                .without_env()
                .endpoint("http://127.0.0.1:9/"),
        );
        (w, h)
    }

    /// A worker for the config `b` builds, its handle and its counters.
    fn worker_with(b: crate::config::ConfigBuilder) -> (Worker, Handle, Arc<Counters>) {
        let cfg = Arc::new(b.build().unwrap());
        let stats = Arc::new(Counters::default());
        let transport = Transport::new(&cfg, stats.clone()).unwrap();
        let (w, h) = Worker::new(Arc::new(Registry::new(cfg, stats.clone())), transport, None);
        (w, h, stats)
    }

    fn span(id: u64) -> SpanData {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(7u128),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::from(1),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "llm_request".into(),
            start_time: t0,
            end_time: t0 + Duration::from_millis(id),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// The registry's number of the call `feed` hands spans of.
    const FED_CALL: u64 = 1;

    /// `k`'s call finished, numbered up to `next`; `call` is its registry number, if known.
    fn ended(w: &mut Worker, k: &Arc<str>, next: u32, call: Option<u64>) {
        w.remember_seq(k.clone(), next);
        w.ended.get_mut(k).unwrap().call = call;
    }

    /// Sends `k`'s open batch; the queue's batches as `(batch_seq, late, spans)`.
    fn flush_and_list(w: &mut Worker, k: &Arc<str>) -> Vec<(u32, bool, u32)> {
        w.flush_buffer(k);
        w.queue
            .iter()
            .map(|j| (j.meta.seq, j.meta.late, j.meta.spans))
            .collect()
    }

    /// Hands the worker `span(id)` as it arrives: packed by an app thread, read back.
    fn feed(w: &mut Worker, call: &Arc<str>, late: bool, provisional: bool, id: u64) {
        let s = span(id);
        let mut bytes = Vec::new();
        let dur = crate::call::span_duration(s.start_time, s.end_time);
        crate::packed::pack(&mut bytes, &s, Operation::Llm, dur, usize::MAX);
        let mut spans = crate::packed::Unpacker::new(&bytes);
        let one = spans.next_span().unwrap().unwrap();
        let origin = Origin {
            late,
            provisional,
            incarnation: FED_CALL,
        };
        w.on_span(call, origin, &one);
    }

    #[test]
    fn plain_bodies_only_when_deflate_costs_more_than_the_bytes_it_saves_and_drops_are_near() {
        // (pending, max, (deflate time, time of the bytes deflate saved))
        let cpu_bound = (15_000_000, 3_000_000);
        assert!(plain_when_behind(876, 1000, cpu_bound));
        assert!(plain_when_behind(1000, 1000, cpu_bound));
        // Memory is not tight: compressing late costs nothing.
        assert!(!plain_when_behind(875, 1000, cpu_bound));
        assert!(!plain_when_behind(0, 1000, cpu_bound));
        // The saved bytes are worth more than the CPU (a slow receiver or network): plain
        // bodies would only make uploads longer.
        assert!(!plain_when_behind(1000, 1000, (3_000_000, 15_000_000)));
        // Nothing measured yet.
        assert!(!plain_when_behind(1000, 1000, (0, 0)));
    }

    #[test]
    fn upload_times_scale_the_exchange_by_the_bytes_deflate_saved() {
        let times = UploadTimes::default();
        // 1,000 bytes deflated to 250 in 10 ms, sent in 4 ms: the 750 saved bytes would have
        // taken 3 times the exchange, 12 ms.
        for _ in 0..64 {
            times.record(
                Duration::from_millis(10),
                Duration::from_millis(4),
                1000,
                250,
            );
        }
        let (deflate, saved) = times.get();
        assert!((9_900_000..=10_000_000).contains(&deflate), "{deflate}");
        assert!((11_900_000..=12_000_000).contains(&saved), "{saved}");
        // Incompressible bodies save nothing; an empty wire body never divides by zero.
        let times = UploadTimes::default();
        for (raw, wire) in [(100, 120), (0, 0)] {
            times.record(Duration::from_millis(1), Duration::from_secs(1), raw, wire);
        }
        assert_eq!(times.get().1, 0);
    }

    /// What a receiver saw: (Idempotency-Key, Content-Encoding values, body as JSON text).
    type Seen = Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

    /// A receiver on 127.0.0.1:0 that acknowledges everything after `delay` and records what
    /// came.
    async fn recording_receiver(delay: Duration) -> (String, Seen) {
        use axum::http::HeaderMap;
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |h: HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                let encodings: Vec<&str> = h
                    .get_all("content-encoding")
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                let text = if encodings == ["gzip"] {
                    String::from_utf8(crate::transport::gunzip(&body).unwrap()).unwrap()
                } else {
                    String::from_utf8_lossy(&body).into_owned()
                };
                let key = h
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                log.lock().unwrap().push((key, encodings.join(","), text));
                tokio::time::sleep(delay).await;
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    /// A worker sending to `url` with `compression`, and its counters. The app's headers name
    /// a Content-Encoding and an Idempotency-Key of their own, which the transport must not
    /// send.
    fn worker_to(url: &str, compression: crate::config::Compression) -> (Worker, Arc<Counters>) {
        let (w, _h, stats) = worker_with(
            Config::builder()
                .without_env()
                .endpoint(url)
                .header("Content-Encoding", "br")
                .header("Idempotency-Key", "from-the-app")
                .compression(compression),
        );
        (w, stats)
    }

    /// A detail job of call "c" numbered `seq`, whose body is `json`.
    fn detail_job(seq: u32, json: String) -> Job {
        Job {
            id: u64::from(seq),
            call: Arc::from("c"),
            meta: Meta::detail("c", seq),
            body: Some(Bytes::from(json)),
            rec: None,
            deflated: None,
        }
    }

    /// Starts `job` as the pump does (its JSON charged first, as `enqueue` does), waits for its
    /// upload and hands the result to `on_done`; returns what memory counted while it ran.
    async fn upload_one(w: &mut Worker, job: Job) -> usize {
        let before = w.mem_bytes;
        w.mem_bytes += job.mem();
        w.start(job, Lane::Detail);
        let running = w.mem_bytes - before;
        let (id, r) = w.tasks.join_next_with_id().await.unwrap().unwrap();
        assert_eq!(r, Delivery::Acked);
        w.on_done(id, r);
        assert_eq!(
            w.mem_bytes, before,
            "what an upload was charged is given back"
        );
        running
    }

    /// Stale times that say deflate costs uploads 15 ms and the bytes it saves 3 ms.
    fn deflate_behind(w: &Worker) {
        for _ in 0..64 {
            w.upload_times
                .record(Duration::from_millis(15), Duration::from_millis(1), 4, 1);
        }
    }

    /// Under `CALLSCOPE_COMPRESSION=auto` a detail body goes plain (and is counted, and
    /// charged to memory once) only while deflate costs uploads more than the bytes it saves
    /// and pending detail is past 7/8 of its bound; under `gzip` it is always compressed. The
    /// receiver gets each body whole either way, with one Content-Encoding or none.
    #[tokio::test]
    async fn auto_compression_sends_plain_detail_while_deflate_is_what_uploads_wait_for() {
        let (url, seen) = recording_receiver(Duration::ZERO).await;
        for compression in [
            crate::config::Compression::Auto,
            crate::config::Compression::Gzip,
        ] {
            seen.lock().unwrap().clear();
            let (mut w, stats) = worker_to(&url, compression);
            deflate_behind(&w);
            w.mem_bytes = w.cfg.max_buffer_bytes - w.cfg.max_buffer_bytes / 8 + 1;
            let body0 = "{\"batch_seq\":0}".to_owned();
            let charged = upload_one(&mut w, detail_job(0, body0.clone())).await;
            let auto = compression == crate::config::Compression::Auto;
            // A compressed body counts its JSON twice until its size is known.
            let copies = if auto { 1 } else { 2 };
            assert_eq!(charged, copies * body0.len(), "{compression}");
            // Memory is not tight: compressed.
            w.mem_bytes = 0;
            upload_one(&mut w, detail_job(1, "{\"batch_seq\":1}".into())).await;
            let enc = |gz: bool| if gz { "gzip" } else { "" }.to_owned();
            assert_eq!(
                *seen.lock().unwrap(),
                [
                    ("c:detail:0".to_owned(), enc(!auto), body0.clone()),
                    (
                        "c:detail:1".to_owned(),
                        enc(true),
                        "{\"batch_seq\":1}".to_owned()
                    ),
                ],
                "{compression}"
            );
            assert_eq!(
                stats.detail_bodies_uncompressed.load(Ordering::Relaxed),
                u64::from(auto)
            );
        }
    }

    /// With the default levels (1, raised to 5) a detail body goes out at 5 unless more detail
    /// waits in the worker than the free upload slots can start (the worker is behind), and
    /// then at 1; every body arrives whole.
    #[tokio::test]
    async fn detail_is_raised_only_while_the_free_slots_can_start_what_waits() {
        let (url, seen) = recording_receiver(Duration::ZERO).await;
        let (mut w, stats) = worker_to(&url, crate::config::Compression::Gzip);
        assert_eq!((w.cfg.gzip_level, w.cfg.gzip_level_max), (1, 5));
        assert_eq!(w.cfg.max_concurrent_detail, 2);
        let json = |seq: u32| {
            let spans: Vec<String> = (0..300)
                .map(|i| {
                    format!(
                        "{{\"name\":\"llm_request\",\"i\":{i},\"text\":\"table for {} at {} pm\"}}",
                        i % 7,
                        i % 11
                    )
                })
                .collect();
            format!("{{\"batch_seq\":{seq},\"spans\":[{}]}}", spans.join(","))
        };
        let gz = |seq: u32, level: u32| crate::transport::gzip(json(seq).as_bytes(), level).len();
        assert!(gz(0, 5) < gz(0, 1));
        let raised = || stats.detail_bodies_level_raised.load(Ordering::Relaxed);
        let sent = || stats.bytes_sent.load(Ordering::Relaxed) as usize;

        upload_one(&mut w, detail_job(0, json(0))).await;
        assert_eq!((raised(), sent()), (1, gz(0, 5)));
        // A raised body's deflate time is not what `auto` weighs: not recorded.
        assert_eq!(w.upload_times.get(), (0, 0));
        // One more body waits, and the other upload slot is free to start it: raised.
        w.queue.push_back(detail_job(8, json(8)));
        upload_one(&mut w, detail_job(1, json(1))).await;
        assert_eq!((raised(), sent()), (2, gz(0, 5) + gz(1, 5)));
        // Two wait, one slot is left: the worker is behind, level 1.
        w.queue.push_back(detail_job(9, json(9)));
        upload_one(&mut w, detail_job(2, json(2))).await;
        assert_eq!(
            raised(),
            2,
            "more detail waited than could start: not raised"
        );
        assert_eq!(sent(), gz(0, 5) + gz(1, 5) + gz(2, 1));
        assert!(
            w.upload_times.get().0 > 0,
            "a level-1 body's time is recorded"
        );
        // Nothing waits, but pending detail is at half its bound: level 1.
        w.queue.clear();
        w.mem_bytes = w.cfg.max_buffer_bytes / 2;
        upload_one(&mut w, detail_job(3, json(3))).await;
        assert_eq!(raised(), 2, "memory half full: not raised");
        assert_eq!(sent(), gz(0, 5) + gz(1, 5) + gz(2, 1) + gz(3, 1));
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 4);
        for ((key, enc, text), seq) in got.into_iter().zip([0, 1, 2, 3]) {
            assert_eq!((key, enc), (format!("c:detail:{seq}"), "gzip".to_owned()));
            assert_eq!(text, json(seq));
        }
    }

    /// The times that decide come from real uploads, and keep coming while bodies go plain.
    /// With stale times that say deflate is what uploads wait for and memory past 7/8 of its
    /// bound, bodies go plain but one in `PROBE_EVERY` is compressed; its upload, to a
    /// receiver that takes 50 ms per body, shows that the bytes deflate saves are worth more
    /// than its CPU, and every body after it is compressed.
    #[tokio::test]
    async fn auto_compression_probes_while_plain_and_keeps_compressing_for_a_slow_receiver() {
        let (url, seen) = recording_receiver(Duration::from_millis(50)).await;
        let (mut w, stats) = worker_to(&url, crate::config::Compression::Auto);
        deflate_behind(&w);
        let tight = w.cfg.max_buffer_bytes - w.cfg.max_buffer_bytes / 8 + 1;
        let spans = format!(
            "[{}]",
            vec!["{\"name\":\"llm_request\",\"attributes\":{\"lk.turn\":1}}"; 400].join(",")
        );
        let n = PROBE_EVERY + 4;
        for seq in 0..n {
            w.mem_bytes = tight;
            upload_one(&mut w, detail_job(seq, spans.clone())).await;
        }
        let compressed: Vec<bool> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, enc, body)| {
                assert_eq!(*body, spans);
                enc == "gzip"
            })
            .collect();
        let expected: Vec<bool> = (1..=n).map(|i| i >= PROBE_EVERY).collect();
        assert_eq!(compressed, expected);
        assert_eq!(
            stats.detail_bodies_uncompressed.load(Ordering::Relaxed),
            u64::from(PROBE_EVERY - 1)
        );
        // The saved time is each acknowledged attempt (at least 50 ms) scaled by the bytes
        // deflate removed, not the attempt alone: after the 5 compressed uploads it is at
        // least 1 - (3/4)^5 of that.
        let (raw, wire) = (
            spans.len() as f64,
            crate::transport::gzip(spans.as_bytes(), w.cfg.gzip_level).len() as f64,
        );
        let floor = 50e6 * (raw - wire) / wire * (1.0 - 0.75f64.powi(5));
        let (deflate, saved) = w.upload_times.get();
        assert!(
            saved as f64 >= floor && saved > deflate,
            "saved {saved} ns, floor {floor}, deflate {deflate} ns"
        );
    }

    /// A rejected upload (or one that ran out of retries) feeds nothing into the times: a fast
    /// 400 says nothing about what the bytes cost, and would make deflate look dear.
    #[tokio::test]
    async fn only_acknowledged_uploads_feed_the_times() {
        let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::BAD_REQUEST });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let (mut w, stats) = worker_to(&url, crate::config::Compression::Auto);
        w.start(detail_job(0, "{\"batch_seq\":0}".into()), Lane::Detail);
        let done = w.tasks.join_next().await.unwrap().unwrap();
        assert_eq!(done, Delivery::Failed);
        assert_eq!(stats.requests_rejected.load(Ordering::Relaxed), 1);
        assert_eq!(w.upload_times.get(), (0, 0));
    }

    /// A provisional call's chunk that arrives after its join opens a batch of the real call,
    /// which streams on the batch timeout like any named call's (a provisional batch waits
    /// until it is full or its call ends).
    #[test]
    fn a_provisional_chunk_after_its_join_opens_a_named_batch() {
        let (mut w, _handle) = worker();
        let (p, real): (Arc<str>, Arc<str>) =
            ("0000000000000000000000000000000a".into(), "real".into());
        w.on_join(p.clone(), real.clone(), FED_CALL);
        feed(&mut w, &p, false, true, 2);
        assert!(!w.buffers.contains_key(&p));
        assert!(w.buffers.get(&real).is_some_and(|b| !b.provisional));
    }

    /// A join that reaches the worker after its real call's final batch went out (another
    /// thread sent the call's end first, or the tick ended it idle): the provisional call's
    /// spans are the real call's late detail, numbered after its final, never from 0 again.
    #[test]
    fn a_join_after_its_call_ended_sends_the_spans_as_late_detail_after_the_final() {
        let (mut w, _handle) = worker();
        let (p, real): (Arc<str>, Arc<str>) =
            ("0000000000000000000000000000000b".into(), "real".into());
        feed(&mut w, &p, false, true, 2);
        feed(&mut w, &p, false, true, 3);
        // `real` finished: its batches 0, 1 and 2 (the final) went out.
        ended(&mut w, &real, 3, Some(FED_CALL));
        w.on_join(p.clone(), real.clone(), FED_CALL);
        assert!(!w.buffers.contains_key(&p));
        assert!(w.buffers.get(&real).is_some_and(|b| b.late));
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 2);
        let sent = flush_and_list(&mut w, &real);
        assert_eq!(sent, [(3, true, 2)]);
        // The late batch went: a later end or late span of `real` is numbered after it.
        assert_eq!(w.ended_next(&real), Some(4));
    }

    /// The queued and held jobs, and their `(batch_seq, final)` in order.
    fn queued_and_held(w: &Worker) -> (Vec<&Job>, Vec<(u32, bool)>) {
        let jobs: Vec<&Job> = w
            .queue
            .iter()
            .chain(w.held.values().map(|h| &h.job))
            .collect();
        let mut seqs: Vec<(u32, bool)> =
            jobs.iter().map(|j| (j.meta.seq, j.meta.is_final)).collect();
        seqs.sort_unstable();
        (jobs, seqs)
    }

    /// What a restart on the spool in `dir` replays: `(batch_seq, final, spans)` in order.
    fn spooled(dir: &std::path::Path) -> Vec<(u32, bool, u32)> {
        let (_s, o) = crate::spool::Spool::open(dir, 1 << 30).unwrap();
        let mut v: Vec<(u32, bool, u32)> = o
            .records
            .iter()
            .map(|r| (r.meta.seq, r.meta.is_final, r.meta.spans))
            .collect();
        v.sort_unstable();
        v
    }

    /// `c`'s batch 0 (spans 2 and 3) queued and its final (1, span 4) held.
    fn batch_and_final(w: &mut Worker, c: &Arc<str>) {
        feed(w, c, false, false, 2);
        feed(w, c, false, false, 3);
        w.flush_buffer(c);
        feed(w, c, false, false, 4);
        let list = w.buffers.get_mut(c).unwrap().buf.take();
        w.send_batch(c, list, Some(b"[]"));
    }

    /// A 413 split gives the number of its call's held final to one half, and the final the
    /// next number. A restart before the final went must not find the final and the half
    /// under one number (the receiver keeps one of the two and drops the other as a
    /// duplicate): the final is rewritten in the spool at the split, before the halves.
    #[test]
    fn a_final_renumbered_by_a_split_is_respooled_under_its_new_number() {
        let dir = tempfile::tempdir().unwrap();
        let c: Arc<str> = "split-call".into();
        let open = |w: &Worker| crate::spool::Spool::open(dir.path(), w.cfg.spool_max_bytes);
        {
            let (mut w, _handle) = worker();
            w.spool = Some(open(&w).unwrap().0);
            batch_and_final(&mut w, &c);
            assert!(w.held.get(&c).is_some_and(|h| h.job.meta.seq == 1));
            // Batch 0 is answered 413 and split: its halves are 0 and 1, the final becomes 2.
            let whole = w.queue.pop_front().unwrap();
            w.split(whole);
            assert!(w.held.get(&c).is_some_and(|h| h.job.meta.seq == 2));
            w.sync_spool();
            // The process stops here, before the final went.
        }
        let (mut w, _handle) = worker();
        let (spool, opened) = open(&w).unwrap();
        let mut spooled: Vec<(u32, bool)> = opened
            .records
            .iter()
            .map(|r| (r.meta.seq, r.meta.is_final))
            .collect();
        spooled.sort_unstable();
        assert_eq!(spooled, [(0, false), (1, false), (2, true)]);
        w.spool = Some(spool);
        w.replay(opened);
        // Replayed, the final waits for the halves again (they were spooled after it).
        let fin = &w.held.get(&c).expect("the final is held").job;
        let body: serde_json::Value = serde_json::from_slice(&w.body_of(fin).unwrap()).unwrap();
        assert_eq!(body["batch_seq"], 2);
        assert_eq!(body["total_batches"], 3);
        assert_eq!(w.queue.len(), 2);
    }

    /// After a restart, a final whose ack was lost while the split half that took its number
    /// and its rewrite under the next number are still spooled: it is dropped, not sent to
    /// race the half for that number.
    #[test]
    fn a_superseded_final_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let meta = |seq, is_final| Meta {
            is_final,
            ..Meta::detail("c", seq)
        };
        {
            let (mut s, _) = crate::spool::Spool::open(dir.path(), 1 << 20).unwrap();
            s.append(&meta(1, true), b"{}").unwrap();
            s.append(&meta(1, false), b"{}").unwrap();
            s.append(&meta(2, true), b"{}").unwrap();
        }
        let (mut w, _handle) = worker();
        let (spool, opened) = crate::spool::Spool::open(dir.path(), 1 << 20).unwrap();
        w.spool = Some(spool);
        w.replay(opened);
        let (jobs, seqs) = queued_and_held(&w);
        assert_eq!(seqs, [(1, false), (2, true)]);
        // The stale final's record is acknowledged: only the two jobs' records are pending.
        let pending: u64 = jobs.iter().filter_map(|j| j.rec).map(|(_, b)| b).sum();
        assert_eq!(w.spool.as_ref().unwrap().live_bytes(), pending);
    }

    /// After a restart a call's batch numbers stay taken even when the records that carried
    /// them were acknowledged and their segment deleted: a 413 split of a replayed batch moves
    /// the held final after the late batch the receiver already stored, not onto its number
    /// (the receiver would answer "already stored" and the final and its spans would be lost).
    #[test]
    fn a_split_after_a_restart_numbers_after_batches_acknowledged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let c: Arc<str> = "restarted-call".into();
        let open = |w: &Worker| crate::spool::Spool::open(dir.path(), w.cfg.spool_max_bytes);
        let filler = |w: &mut Worker, call: &str| {
            let meta = Meta::detail(call, 0);
            let spool = w.spool.as_mut().unwrap();
            let (rec, bytes) = spool.append(&meta, &vec![b' '; 4 << 20]).unwrap();
            spool.ack(rec, bytes).unwrap();
        };
        {
            let (mut w, _handle) = worker();
            w.spool = Some(open(&w).unwrap().0);
            batch_and_final(&mut w, &c);
            w.buffers.remove(&c);
            ended(&mut w, &c, 2, Some(FED_CALL));
            // A late span goes as batch 2, in a segment of its own, and is acknowledged.
            filler(&mut w, "other-call");
            feed(&mut w, &c, false, false, 5);
            assert_eq!(flush_and_list(&mut w, &c), [(0, false, 2), (2, true, 1)]);
            let late = w.queue.pop_back().unwrap();
            w.settle(&late);
            w.close_open(&late);
            // Its segment fills with acknowledged records and is deleted.
            filler(&mut w, "another-call");
            w.sync_spool();
            assert!(!dir.path().join(format!("{:020}.seg", 1)).exists());
            // The process stops before batch 0 and the final went.
        }
        let (mut w, _handle) = worker();
        let (spool, opened) = open(&w).unwrap();
        w.spool = Some(spool);
        w.replay(opened);
        let whole = w.queue.pop_front().unwrap();
        assert_eq!((whole.meta.seq, whole.meta.spans), (0, 2));
        // Batch 0 is answered 413: its halves are 0 and 1, the final takes 3, not 2.
        w.split(whole);
        let fin = &w.held.get(&c).expect("the final is held").job;
        assert_eq!(fin.meta.seq, 3);
        let body: serde_json::Value = serde_json::from_slice(&w.body_of(fin).unwrap()).unwrap();
        assert_eq!(body["batch_seq"], 3);
        assert_eq!(body["total_batches"], 4);
    }

    /// A 413 split writes its records (the renumbered final, the two halves, the acks of what
    /// they replace) to the spool as one unit: a crash at any point of the split leaves the
    /// spool as it was before the split or as it is after it, never a mix under which a batch
    /// number would be taken twice or never used.
    #[test]
    fn a_split_reaches_the_spool_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let c: Arc<str> = "split-call".into();
        let name = format!("{:020}.seg", 0);
        let seg0 = dir.path().join(&name);
        let (before, after) = {
            let (mut w, _handle) = worker();
            w.spool = Some(crate::spool::Spool::open(dir.path(), 1 << 30).unwrap().0);
            batch_and_final(&mut w, &c);
            w.sync_spool();
            let before = std::fs::metadata(&seg0).unwrap().len() as usize;
            let whole = w.queue.pop_front().unwrap();
            w.split(whole);
            w.sync_spool();
            (before, std::fs::metadata(&seg0).unwrap().len() as usize)
        };
        let bytes = std::fs::read(&seg0).unwrap();
        // What a restart finds when the segment was written up to `cut`.
        let state = |cut: usize| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(&name), &bytes[..cut]).unwrap();
            spooled(d.path())
        };
        let (old, new) = (state(before), state(after));
        assert_eq!(old, [(0, false, 2), (1, true, 1)]);
        assert_eq!(new, [(0, false, 1), (1, false, 1), (2, true, 1)]);
        // A cut every 5 bytes falls in every record's frame, were each written on its own (an
        // ack's is 25 bytes): each prefix of them is tried, as is the inside of the one frame
        // they are written as.
        for cut in (before + 1..after).step_by(5) {
            let s = state(cut);
            assert!(
                s == old || s == new,
                "cut at {cut} of {before}..{after}: {s:?}"
            );
        }
    }

    /// A split whose records cannot be written to the spool keeps its batches in memory (their
    /// places do not exist), and the batch and final it replaced stay pending on disk: a
    /// restart finds the call as it was before the split.
    #[test]
    fn a_split_the_spool_could_not_write_keeps_its_batches_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let c: Arc<str> = "split-call".into();
        let (mut w, _handle) = worker();
        w.spool = Some(crate::spool::Spool::open(dir.path(), 1 << 30).unwrap().0);
        batch_and_final(&mut w, &c);
        // Segment 0 (the batch and the final) fills: the split goes to segment 1.
        let spool = w.spool.as_mut().unwrap();
        let summary = Meta {
            core: true,
            ..Meta::detail("other-call", 0)
        };
        let (rec, bytes) = spool.append(&summary, &vec![b' '; 4 << 20]).unwrap();
        spool.ack(rec, bytes).unwrap();
        w.sync_spool();
        let whole = w.queue.pop_front().unwrap();
        crate::spool::FAIL_WRITE.with(|f| f.set(true));
        w.split(whole);
        crate::spool::FAIL_WRITE.with(|f| f.set(false));
        assert_eq!(w.stats.spool_errors.load(Ordering::Relaxed), 1);
        let (jobs, seqs) = queued_and_held(&w);
        assert_eq!(seqs, [(0, false), (1, false), (2, true)]);
        assert!(jobs.iter().all(|j| j.rec.is_none() && j.body.is_some()));
        w.spool.as_mut().unwrap().sync().unwrap();
        let seg0 = dir.path().join(format!("{:020}.seg", 0));
        assert!(seg0.exists(), "deleted on the word of acks never written");
        let copy = crate::spool::copy_of(dir.path());
        assert_eq!(spooled(copy.path()), [(0, false, 2), (1, true, 1)]);
    }

    /// An idle end is taken by the worker's tick, which may run before the worker reads a join
    /// sent just before: the ended call's own list of folds brings the provisional call's
    /// detail into its final batch, and the join read afterwards changes nothing.
    #[test]
    fn an_idle_end_ahead_of_its_join_still_batches_the_folded_spans_in_the_final() {
        let (mut w, _handle) = worker();
        let (p, real): (Arc<str>, Arc<str>) = (
            "0000000000000000000000000000000c".into(),
            "idle-real".into(),
        );
        feed(&mut w, &p, false, true, 2);
        feed(&mut w, &p, false, true, 3);
        let mut state = CallState::new(real.clone(), false, 0, 1 << 16);
        state.merge(CallState::new(p.clone(), true, 0, 1 << 16));
        assert_eq!(state.folded, std::slice::from_ref(&p));
        w.on_end(
            Ended {
                state,
                reason: crate::registry::EndReason::IdleTimeout,
            },
            0,
        );
        w.finish_ready();
        w.on_join(p.clone(), real.clone(), 0);
        let fin = &w
            .held
            .get(&real)
            .expect("the final is held for its core")
            .job;
        assert_eq!((fin.meta.seq, fin.meta.spans, fin.meta.late), (0, 2, false));
        assert!(w.buffers.is_empty());
        assert!(
            w.redirects.is_empty(),
            "a join after the end leaves no redirect"
        );
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 0);
    }

    /// A call id that ends a second time (its first call was evicted or idle, then the id came
    /// back) numbers the batches it opens while its end is pending after the first call's,
    /// as its final does: batch 0 again would be a duplicate at the receiver.
    #[test]
    fn a_call_id_ended_again_numbers_its_batches_after_its_first_call() {
        let (mut w, _handle) = worker();
        let k: Arc<str> = "again".into();
        ended(&mut w, &k, 3, None);
        let state = CallState::new(k.clone(), false, 0, 1 << 16);
        let reason = crate::registry::EndReason::RootSpanEnded;
        // Its end waits for one more chunk, which arrives.
        w.on_end(Ended { state, reason }, 1);
        feed(&mut w, &k, false, false, 2);
        w.flush_buffer(&k);
        let sent: Vec<(u32, bool)> = w.queue.iter().map(|j| (j.meta.seq, j.meta.late)).collect();
        assert_eq!(sent, [(3, false)]);
    }

    /// An id the registry forgot (after `ended_cap` other ends) may open a call again; the
    /// worker must still know the id's next batch number then, whatever the configuration.
    #[test]
    fn the_worker_remembers_batch_numbers_longer_than_the_registry_remembers_ends() {
        for open in [16, 10_000, 100_000] {
            let cfg = Config::builder()
                .without_env()
                .endpoint("http://127.0.0.1:9/")
                .max_open_calls(open)
                .build()
                .unwrap();
            let stats = Arc::new(Counters::default());
            let transport = Transport::new(&cfg, stats.clone()).unwrap();
            let reg = Arc::new(Registry::new(Arc::new(cfg), stats));
            let cap = reg.ended_cap();
            let (w, _handle) = Worker::new(reg, transport, None);
            assert!(w.ended_seqs_kept > cap, "{open} open calls");
        }
    }

    /// With `CALLSCOPE_DETAIL=none` a call's end leaves no redirect of its folds behind.
    #[test]
    fn no_redirect_outlives_its_call_without_detail() {
        let cfg = Config::builder()
            .without_env()
            .endpoint("http://127.0.0.1:9/")
            .detail(DetailMode::None)
            .build()
            .unwrap();
        let stats = Arc::new(Counters::default());
        let transport = Transport::new(&cfg, stats.clone()).unwrap();
        let (mut w, _handle) = Worker::new(
            Arc::new(Registry::new(Arc::new(cfg), stats)),
            transport,
            None,
        );
        let (p, real): (Arc<str>, Arc<str>) = (
            "0000000000000000000000000000000d".into(),
            "no-detail".into(),
        );
        w.on_join(p.clone(), real.clone(), 0);
        let mut state = CallState::new(real.clone(), false, 0, 1 << 16);
        state.merge(CallState::new(p, true, 0, 1 << 16));
        let reason = crate::registry::EndReason::RootSpanEnded;
        w.on_end(Ended { state, reason }, 0);
        w.finish_ready();
        assert!(w.redirects.is_empty());
    }

    /// An id the registry forgot and opened again is a new call (another registry number, or
    /// any call after a restart): its spans before its end are not late, and its batches are
    /// numbered on from the ended call's, which the receiver may have stored.
    #[test]
    fn a_new_call_under_an_ended_id_is_not_late_and_numbers_on() {
        let (mut w, _handle) = worker();
        let (reused, replayed): (Arc<str>, Arc<str>) = ("reused".into(), "replayed".into());
        ended(&mut w, &reused, 4, Some(FED_CALL + 1));
        // Known only from the spool of an earlier run.
        ended(&mut w, &replayed, 2, None);
        for k in [&reused, &replayed] {
            feed(&mut w, k, false, false, 2);
            assert!(w.buffers.get(k).is_some_and(|b| !b.late), "{k}");
            w.flush_buffer(k);
        }
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 0);
        let sent: Vec<(&str, u32, bool)> = w
            .queue
            .iter()
            .map(|j| (&*j.call, j.meta.seq, j.meta.late))
            .collect();
        assert_eq!(sent, [("reused", 4, false), ("replayed", 2, false)]);
    }

    /// Past `ended_seqs_kept` ids, the one whose *last* end is oldest is forgotten: an id that
    /// ended again is kept (it may come back a third time, numbered on).
    #[test]
    fn the_id_forgotten_is_the_one_whose_last_end_is_oldest() {
        let (mut w, _handle) = worker();
        w.ended_seqs_kept = 2;
        let [a, b, c]: [Arc<str>; 3] = ["a".into(), "b".into(), "c".into()];
        ended(&mut w, &a, 1, Some(1));
        ended(&mut w, &b, 1, Some(2));
        ended(&mut w, &a, 2, Some(3));
        ended(&mut w, &c, 1, Some(4));
        let mut kept: Vec<&str> = w.ended.keys().map(|k| &**k).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["a", "c"]);
        assert_eq!(w.ended_next(&a), Some(2));
        assert_eq!(w.ended.len(), 2);
        // Stale entries do not pile up.
        for i in 0..1000 {
            ended(&mut w, &a, 3 + i, Some(5));
        }
        assert!(w.ended_order.len() <= 2 * w.ended_seqs_kept + 64 + 1);
    }

    /// Finishing a call remembers its registry number: a chunk of that call arriving after
    /// its final (counted after its end's mark) is late; one of a later call of the id is not.
    #[test]
    fn finish_remembers_which_call_ended() {
        let (mut w, _handle) = worker();
        let k: Arc<str> = "finished".into();
        let mut state = CallState::new(k.clone(), false, 0, 1 << 16);
        state.incarnation = FED_CALL;
        let reason = crate::registry::EndReason::RootSpanEnded;
        w.on_end(Ended { state, reason }, 0);
        w.finish_ready();
        assert_eq!(w.ended.get(&k).and_then(|e| e.call), Some(FED_CALL));
        feed(&mut w, &k, false, false, 2);
        assert!(w.buffers.get(&k).is_some_and(|b| b.late));
    }

    /// A provisional call joins a *new* call under an id that ended before: its spans are the
    /// new call's (not late), numbered on from the ended call's batches.
    #[test]
    fn a_join_into_a_new_call_under_an_ended_id_is_not_late() {
        let (mut w, _handle) = worker();
        let (p, real): (Arc<str>, Arc<str>) =
            ("0000000000000000000000000000000e".into(), "room-7".into());
        ended(&mut w, &real, 4, Some(FED_CALL));
        feed(&mut w, &p, false, true, 2);
        w.on_join(p.clone(), real.clone(), FED_CALL + 1);
        // A later chunk of the provisional call follows the join.
        feed(&mut w, &p, false, true, 3);
        assert!(
            w.buffers
                .get(&real)
                .is_some_and(|b| !b.late && !b.provisional)
        );
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 0);
        let sent = flush_and_list(&mut w, &real);
        assert_eq!(sent, [(4, false, 2)]);
    }

    /// A late batch of an id's old call goes out while a newer call under the id has a
    /// provisional call folded into it: the newer call's redirect stays (only its own end
    /// removes it), so the provisional call's later chunks still follow it.
    #[test]
    fn an_old_calls_late_batch_leaves_a_newer_calls_redirect() {
        let (mut w, _handle) = worker();
        let (p, k): (Arc<str>, Arc<str>) =
            ("0000000000000000000000000000000f".into(), "room-9".into());
        ended(&mut w, &k, 3, Some(FED_CALL));
        w.on_join(p.clone(), k.clone(), FED_CALL + 1);
        // A late span of the old call, its batch sent on the batch timeout.
        feed(&mut w, &k, true, false, 2);
        w.flush_buffer(&k);
        feed(&mut w, &p, false, true, 3);
        assert!(
            !w.buffers.contains_key(&p),
            "the provisional chunk lost its way"
        );
        assert!(w.buffers.get(&k).is_some_and(|b| !b.late));
    }

    /// A join read after its call finished (or whose call's end was dropped) leaves a redirect
    /// nothing would remove: the tick drops those whose call is neither open nor pending.
    #[test]
    fn the_tick_drops_redirects_of_calls_no_longer_open() {
        let (mut w, _handle) = worker();
        let mut s = span(2);
        s.attributes = vec![opentelemetry::KeyValue::new("call.id", "live")];
        w.reg.record(&s, w.reg.now_ns(), &crate::registry::Discard);
        // The registry's first call is number 1.
        assert!(w.reg.is_open("live", 1));
        let (p1, p2): (Arc<str>, Arc<str>) = ("p1".into(), "p2".into());
        w.on_join(p1.clone(), "live".into(), 1);
        w.on_join(p2.clone(), "gone".into(), 7);
        // A detail message is still on its way (it may be a chunk of p2): p2's redirect waits
        // for it.
        w.enqueued.store(1, Ordering::Release);
        w.sweep_redirects();
        let left = |w: &Worker| {
            let mut k: Vec<String> = w.redirects.keys().map(|k| k.to_string()).collect();
            k.sort_unstable();
            k
        };
        assert_eq!(left(&w), ["p1", "p2"]);
        w.received = 1;
        w.sweep_redirects();
        assert_eq!(left(&w), ["p1"]);
    }

    /// Spans of a call whose final batch already went out (they raced its end) are late,
    /// each of them.
    #[test]
    fn every_span_found_late_by_the_worker_is_counted() {
        let (mut w, _handle) = worker();
        let k: Arc<str> = "over".into();
        ended(&mut w, &k, 1, Some(FED_CALL));
        for i in 0..3 {
            feed(&mut w, &k, false, false, 2 + i);
        }
        assert!(w.buffers.get(&k).is_some_and(|b| b.late));
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 3);
        // Spans the registry already found late (and counted) are not counted again.
        feed(&mut w, &k, true, false, 9);
        assert_eq!(w.stats.late_spans.load(Ordering::Relaxed), 3);
    }

    /// `buffered_bytes` counts the spans of open per-call batches (each span's bytes plus one
    /// for its separator); sending one call's batch must take off exactly what it added.
    #[test]
    fn buffered_bytes_stay_equal_to_the_open_batches() {
        let (mut w, _handle) = worker();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        feed(&mut w, &a, false, false, 2);
        for i in 0..10 {
            feed(&mut w, &b, false, false, 3 + i);
        }
        w.flush_buffer(&b);
        let open: usize = w
            .buffers
            .values()
            .filter(|b| !b.buf.list.is_empty())
            .map(|b| b.buf.list.bytes.len() + 1)
            .sum();
        assert!(open > 0);
        assert_eq!(
            w.buffered_bytes, open,
            "call a's open batch is under-counted"
        );
    }

    /// While memory nothing can let go yet (uploads in flight, bodies waiting for a deflate
    /// thread) keeps pending detail over its bound, a call's batch still goes out at half its
    /// cap at least: flushing it on every span sent (and here dropped) one-span batches.
    #[test]
    fn memory_held_in_flight_does_not_cut_batches_to_single_spans() {
        use crate::config::{MIN_MAX_BUFFER_BYTES, MIN_MAX_REQUEST_BYTES};
        let (mut w, _handle, stats) = worker_with(
            Config::builder()
                .without_env()
                .endpoint("http://127.0.0.1:9/")
                .max_request_bytes(MIN_MAX_REQUEST_BYTES)
                .max_buffer_bytes(MIN_MAX_BUFFER_BYTES),
        );
        // Held by uploads in flight: no queued batch to spill or drop makes room.
        w.mem_bytes = w.cfg.max_buffer_bytes + 1;
        let c: Arc<str> = "c".into();
        for i in 0..400 {
            feed(&mut w, &c, false, false, 2 + i);
        }
        let dropped = stats
            .detail_batches_dropped_buffer_full
            .load(Ordering::Relaxed);
        let spans = stats.spans_dropped_buffer_full.load(Ordering::Relaxed)
            + w.queue.iter().map(|j| u64::from(j.meta.spans)).sum::<u64>();
        let batches = dropped + w.queue.len() as u64;
        assert!(
            spans >= 200 && batches > 0,
            "{spans} spans in {batches} batches"
        );
        assert!(
            spans / batches >= 10,
            "{spans} spans in {batches} batches: cut to a few spans each"
        );
    }

    /// Open batches alone over the memory bound (many calls, each under its half cap) are
    /// still sent as spans come: what they hold stays within the bound and one span.
    #[test]
    fn open_batches_of_many_calls_stay_within_the_bound() {
        use crate::config::MIN_MAX_BUFFER_BYTES;
        let (mut w, _handle, _) = worker_with(
            Config::builder()
                .without_env()
                .endpoint("http://127.0.0.1:9/")
                .max_buffer_bytes(MIN_MAX_BUFFER_BYTES),
        );
        let calls: Vec<Arc<str>> = (0..200).map(|c| Arc::from(format!("c{c}"))).collect();
        let mut most = 0;
        for i in 0..10 {
            for c in &calls {
                feed(&mut w, c, false, false, 2 + i);
                most = most.max(w.buffered_bytes);
            }
        }
        assert!(
            most <= w.cfg.max_buffer_bytes + 1024,
            "open batches held {most} bytes over a bound of {}",
            w.cfg.max_buffer_bytes
        );
    }

    // ---- detail compressed before it is spooled -------------------------------------------

    /// A worker sending to `url` (gzip) with a spool in `dir` that compresses bodies before
    /// they are spooled while those compressing are fewer than `seal_bytes_max` bytes.
    fn sealing_worker(
        url: &str,
        dir: &std::path::Path,
        seal_bytes_max: usize,
    ) -> (Worker, Arc<Counters>) {
        let (mut w, stats) = worker_to(url, crate::config::Compression::Gzip);
        w.spool = Some(crate::spool::Spool::open(dir, 1 << 30).unwrap().0);
        w.seal_bytes_max = seal_bytes_max;
        (w, stats)
    }

    /// Takes the oldest sealing body's result as the run loop does.
    async fn seal_one(w: &mut Worker) {
        let done = next_sealed(&mut w.sealing)
            .await
            .expect("a body is sealing");
        let s = w.sealing.pop_front().unwrap();
        w.on_sealed(s.job, done.ok());
    }

    /// With a spool, a detail body is gzip-compressed before it is written: the spool holds
    /// the bytes that go on the wire, and they are sent as they are, not compressed again.
    /// While it is compressed its JSON is counted in memory; once sent, nothing is.
    #[tokio::test]
    async fn a_spooled_detail_body_is_compressed_before_it_is_written_and_sent_as_written() {
        let (url, seen) = recording_receiver(Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut w, stats) = sealing_worker(&url, dir.path(), 1 << 20);
        let c: Arc<str> = "c".into();
        feed(&mut w, &c, false, false, 2);
        feed(&mut w, &c, false, false, 3);
        w.flush_buffer(&c);
        assert_eq!(w.sealing.len(), 1, "the batch is compressed first");
        assert!(w.queue.is_empty());
        let json_len = w.sealing[0].job.mem();
        assert_eq!(w.mem_bytes, json_len);
        seal_one(&mut w).await;
        assert_eq!(stats.spool_records_compressed.load(Ordering::Relaxed), 1);
        let job = w.queue.front().unwrap();
        assert!(job.meta.gzip);
        assert_eq!(w.mem_bytes, job.mem());
        assert!(job.mem() < json_len);
        let (rec, _) = job.rec.unwrap();
        let on_disk = w.spool.as_ref().unwrap().read(rec).unwrap();
        assert_eq!(on_disk[..2], [0x1f, 0x8b], "the spool holds the gzip body");
        let spooled_json = String::from_utf8(crate::transport::gunzip(&on_disk).unwrap()).unwrap();
        w.pump();
        let (id, r) = w.tasks.join_next_with_id().await.unwrap().unwrap();
        assert_eq!(r, Delivery::Acked);
        w.on_done(id, r);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, "gzip");
        assert_eq!(seen[0].2, spooled_json, "sent as spooled, compressed once");
        let body: serde_json::Value = serde_json::from_str(&seen[0].2).unwrap();
        assert_eq!(
            body["telemetry_data"]["session_traces"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            stats.bytes_uncompressed.load(Ordering::Relaxed),
            json_len as u64
        );
        assert_eq!(w.mem_bytes, 0);
        assert!(w.sealing.is_empty() && w.queue.is_empty() && w.running.is_empty());
    }

    /// With a spool, a body compressed before it is written gets the raised level only while
    /// nothing else is being compressed for the spool: a second batch sealed meanwhile gets
    /// level 1. Only the level-1 body's time is kept for `CALLSCOPE_COMPRESSION=auto`.
    #[tokio::test]
    async fn a_body_sealed_while_another_seals_keeps_the_base_level() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let mut jsons = Vec::new();
        for call in ["a", "b"] {
            let c: Arc<str> = call.into();
            for id in 2..102 {
                feed(&mut w, &c, false, false, id);
            }
            w.flush_buffer(&c);
            jsons.push(w.sealing.back().unwrap().job.body.clone().unwrap());
        }
        assert_eq!(w.sealing.len(), 2);
        for json in &jsons {
            let size = |level| crate::transport::gzip(json, level).len();
            assert_ne!(size(5), size(1), "the levels tell apart");
        }
        seal_one(&mut w).await;
        seal_one(&mut w).await;
        assert_eq!(stats.detail_bodies_level_raised.load(Ordering::Relaxed), 1);
        let jobs: Vec<&Job> = w.queue.iter().collect();
        assert_eq!(jobs.len(), 2);
        for ((job, json), level) in jobs.into_iter().zip(&jsons).zip([5, 1]) {
            assert!(job.meta.gzip);
            let body = job.body.as_ref().unwrap();
            assert_eq!(crate::transport::gunzip(body).unwrap(), json[..]);
            assert_eq!(
                body.len(),
                crate::transport::gzip(json, level).len(),
                "level {level}"
            );
            assert_eq!(job.deflated.is_some(), level == 1);
        }
    }

    /// A 413 split of a batch spooled compressed (its body let go from memory) cuts its JSON:
    /// the halves and the renumbered final are whole JSON documents again.
    #[tokio::test]
    async fn a_split_of_a_compressed_spooled_batch_cuts_its_json() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "split-call".into();
        batch_and_final(&mut w, &c);
        seal_one(&mut w).await;
        seal_one(&mut w).await;
        assert!(w.held[&c].job.meta.gzip);
        let mut whole = w.queue.pop_front().unwrap();
        assert!(whole.meta.gzip);
        w.mem_bytes -= whole.mem();
        whole.body = None;
        w.split(whole);
        w.sync_spool();
        assert_eq!(
            spooled(dir.path()),
            [(0, false, 1), (1, false, 1), (2, true, 1)]
        );
        let fin = &w.held[&c].job;
        let body: serde_json::Value = serde_json::from_slice(&w.json_of(fin).unwrap()).unwrap();
        assert_eq!(
            (body["batch_seq"].as_u64(), body["total_batches"].as_u64()),
            (Some(2), Some(3))
        );
        for (half, seq) in w.queue.iter().zip([0, 1]) {
            let body: serde_json::Value =
                serde_json::from_slice(&w.json_of(half).unwrap()).unwrap();
            assert_eq!(body["batch_seq"], seq);
            assert_eq!(
                body["telemetry_data"]["session_traces"]
                    .as_array()
                    .unwrap()
                    .len(),
                1
            );
        }
    }

    /// A split while its call's final is still being compressed takes the final out: the
    /// half takes its number and the final the next one, as for a held final.
    #[tokio::test]
    async fn a_split_renumbers_a_final_still_being_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "split-call".into();
        batch_and_final(&mut w, &c);
        seal_one(&mut w).await;
        assert!(
            w.sealing[0].job.meta.is_final,
            "the final is still compressing"
        );
        let whole = w.queue.pop_front().unwrap();
        w.split(whole);
        assert!(w.sealing.is_empty());
        assert_eq!(w.held[&c].job.meta.seq, 2);
        w.sync_spool();
        assert_eq!(
            spooled(dir.path()),
            [(0, false, 1), (1, false, 1), (2, true, 1)]
        );
    }

    /// A batch being compressed is one of its call's open batches: the final, spooled at
    /// once (the bodies compressing already take the bytes allowed), waits for it as for any pending batch.
    #[tokio::test]
    async fn a_final_waits_for_its_calls_batch_still_being_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1);
        let c: Arc<str> = "c".into();
        batch_and_final(&mut w, &c);
        assert_eq!(w.sealing.len(), 1);
        assert!(
            !w.held[&c].job.meta.gzip,
            "no room to wait for deflate: spooled as JSON"
        );
        w.try_release(&c);
        assert!(w.held.contains_key(&c) && w.queue.is_empty());
        seal_one(&mut w).await;
        assert!(w.held.contains_key(&c), "the batch is queued, not settled");
        let batch = w.queue.pop_front().unwrap();
        w.mem_bytes -= batch.mem();
        w.settle(&batch);
        w.close_open(&batch);
        assert!(!w.held.contains_key(&c), "released once its batch settled");
        assert_eq!(w.queue.front().map(|j| j.meta.is_final), Some(true));
    }

    /// Ends `c` once more: one span and a transcript as its final batch (compressed first
    /// while `seal_bytes_max` allows), after a summary still in flight. The final's job id.
    fn end_again(w: &mut Worker, c: &Arc<str>, span: u64) -> u64 {
        w.core_outcome.insert(c.clone(), CoreState::InFlight);
        feed(w, c, false, false, span);
        let list = w.buffers.get_mut(c).unwrap().buf.take();
        w.send_batch(c, list, Some(b"[]"));
        w.next_job
    }

    /// A call id that ends again while its first final is still being compressed: that final,
    /// once compressed, goes as is, and the second stays held for its own summary.
    #[tokio::test]
    async fn a_final_compressed_after_its_call_id_ended_again_leaves_the_newer_one_held() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "again".into();
        let first = end_again(&mut w, &c, 2);
        assert_eq!(w.sealing[0].job.id, first, "the first final is compressing");
        w.seal_bytes_max = 0;
        let second = end_again(&mut w, &c, 3);
        assert_eq!(w.held[&c].job.id, second);
        seal_one(&mut w).await;
        assert_eq!(w.held[&c].job.id, second, "the newer final stays held");
        let queued: Vec<u64> = w.queue.iter().map(|j| j.id).collect();
        assert_eq!(queued, [first], "the first final goes as is");
        assert_eq!(w.mem_bytes, w.held[&c].job.mem() + w.queue[0].mem());
    }

    /// The same while the call id's second end still waits for its spans: the first final
    /// goes as is. Held, it would wait on the second end's summary, and be made a plain
    /// batch should that summary fail.
    #[tokio::test]
    async fn a_final_compressed_while_its_call_ids_next_end_is_pending_goes_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "again".into();
        let first = end_again(&mut w, &c, 2);
        let state = CallState::new(c.clone(), false, 0, 1 << 16);
        let reason = crate::registry::EndReason::RootSpanEnded;
        w.on_end(Ended { state, reason }, w.received + 1);
        assert!(
            w.pending.contains_key(&c),
            "the second end waits for a chunk"
        );
        seal_one(&mut w).await;
        assert!(w.held.is_empty(), "held under the second end's summary");
        let queued: Vec<(u64, bool)> = w.queue.iter().map(|j| (j.id, j.meta.is_final)).collect();
        assert_eq!(queued, [(first, true)]);
    }

    /// The same, when the spool is full by the time the first final is compressed: it is
    /// dropped (counted), and the second end's summary state stays, so its final still waits.
    #[tokio::test]
    async fn a_final_dropped_after_its_call_id_ended_again_keeps_the_newer_end_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "again".into();
        end_again(&mut w, &c, 2);
        w.seal_bytes_max = 0;
        let second = end_again(&mut w, &c, 3);
        w.spool.as_mut().unwrap().fill_up();
        seal_one(&mut w).await;
        assert_eq!(stats.spans_dropped_spool_full.load(Ordering::Relaxed), 1);
        assert_eq!(w.core_outcome.get(&c), Some(&CoreState::InFlight));
        w.try_release(&c);
        assert_eq!(w.held[&c].job.id, second, "still held for its summary");
        assert!(w.queue.is_empty());
    }

    /// At the shutdown deadline, bodies still being compressed are spooled as JSON and
    /// counted as left in the spool, not lost.
    #[tokio::test]
    async fn bodies_still_compressing_at_the_deadline_are_left_in_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 1 << 20);
        let c: Arc<str> = "c".into();
        feed(&mut w, &c, false, false, 2);
        feed(&mut w, &c, false, false, 3);
        w.flush_buffer(&c);
        assert_eq!(w.sealing.len(), 1);
        w.abandon();
        assert_eq!(stats.spans_left_in_spool.load(Ordering::Relaxed), 2);
        assert_eq!(stats.spans_dropped_send_failed.load(Ordering::Relaxed), 0);
        assert_eq!(spooled(dir.path()), [(0, false, 2)]);
    }

    /// With the fsync thread, a detail batch goes only once an fsync covering its spool
    /// record ended; the worker goes on meanwhile instead of waiting for the disk. A summary
    /// goes at once (phase 1 does not wait for the disk).
    #[tokio::test]
    async fn a_detail_batch_waits_for_the_fsync_of_its_record_a_summary_does_not() {
        let (url, seen) = recording_receiver(Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker(&url, dir.path(), 0);
        w.syncer = Some(Syncer::spawn().unwrap());
        let c: Arc<str> = "c".into();
        feed(&mut w, &c, false, false, 2);
        w.flush_buffer(&c);
        assert_eq!(w.queue.len(), 1);
        let detail = w.queue[0].rec.expect("written to the spool").0;
        w.queue_core(&c, br#"{"core":1}"#.to_vec());
        let rec = w.cores[0].rec.expect("written to the spool").0;
        w.pump();
        assert!(w.syncing.is_some(), "the fsync runs on its thread");
        assert!(!w.spool.as_ref().unwrap().synced(rec));
        assert_eq!(w.running.len(), 1, "the summary alone is sent");
        assert_eq!(w.queue.len(), 1, "sent before its record was durable");
        let (id, r) = w.tasks.join_next_with_id().await.unwrap().unwrap();
        assert_eq!(r, Delivery::Acked);
        w.on_done(id, r);
        let done = next_synced(&mut w.syncing).await.unwrap();
        w.syncing = None;
        w.on_synced(done.ok());
        assert!(w.spool.as_ref().unwrap().synced(detail));
        w.pump();
        assert_eq!(w.running.len(), 1);
        let (id, r) = w.tasks.join_next_with_id().await.unwrap().unwrap();
        assert_eq!(r, Delivery::Acked);
        w.on_done(id, r);
        let keys: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(keys, ["c:core", "c:detail:0"]);
    }

    /// A sync the fsync thread can no longer take (it is gone) runs on the worker: its
    /// fsyncs, and its removal of the segments an earlier sync found deletable, are not lost.
    #[tokio::test]
    async fn a_sync_the_fsync_thread_cannot_take_runs_on_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _stats) = sealing_worker("http://127.0.0.1:9/", dir.path(), 0);
        // Segment 0 filled, rotated away and acknowledged; a background sync found it
        // deletable, so the next sync removes its file.
        let spool = w.spool.as_mut().unwrap();
        let big = vec![b'x'; 4 << 20];
        let (r0, b0) = spool
            .append(&crate::spool::Meta::detail("old", 0), &big)
            .unwrap();
        let (r1, _) = spool
            .append(&crate::spool::Meta::detail("old", 1), b"{}")
            .unwrap();
        assert_eq!((r0.seg, r1.seg), (0, 1));
        spool.ack(r0, b0).unwrap();
        let job = spool.begin_sync().unwrap();
        let result = job.run();
        spool.end_sync(job, result).unwrap();
        let seg0 = dir.path().join(format!("{:020}.seg", 0));
        assert!(seg0.exists());
        let (tx, rx) = std::sync::mpsc::channel();
        drop(rx);
        w.syncer = Some(Syncer { tx });
        let c: Arc<str> = "c".into();
        feed(&mut w, &c, false, false, 2);
        w.flush_buffer(&c);
        let rec = w.queue[0].rec.unwrap().0;
        w.start_sync();
        assert!(w.syncer.is_none() && w.syncing.is_none());
        assert!(w.spool.as_ref().unwrap().synced(rec));
        assert!(
            !seg0.exists(),
            "the removal went with the sync the thread could not take"
        );
    }
}
