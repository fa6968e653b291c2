//! The worker: one thread with its own current-thread tokio runtime that owns all I/O.
//!
//! It receives detail spans (lossy bounded queue) and control messages (call ends, joins,
//! flush, shutdown; never dropped), serializes and batches detail per call, builds the core at
//! call end, sends it on its own lane, and sends a call's `final` batch only once the core was
//! acknowledged and every span queued before the call ended has been batched.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_sdk::trace::SpanData;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{Id, JoinSet};

use crate::batch::{CallBuffer, SpanList};
use crate::call::CallState;
use crate::config::{Config, DetailMode};
use crate::payload::{self, DetailMeta};
use crate::registry::{Ended, Registry};
use crate::semantics::Operation;
use crate::stats::Counters;
use crate::transport::{Delivery, Lane, Transport};

/// Sequence numbers for late batches of calls the worker no longer remembers start here, far
/// above any real batch count, so they never collide with a stored batch.
const LATE_SEQ_BASE: u32 = 1 << 30;
/// Ended calls whose next batch number is remembered for late spans.
const ENDED_SEQS_KEPT: usize = 16_384;
/// Room kept in every body for the final part's fixed fields.
const FINAL_FIELDS_BYTES: usize = 96;

/// One span's detail on its way to the worker.
#[derive(Debug)]
pub(crate) struct DetailMsg {
    pub call_id: Arc<str>,
    pub span: SpanData,
    pub op: Operation,
    pub late: bool,
    pub provisional: bool,
}

/// Messages that are never dropped.
#[derive(Debug)]
pub(crate) enum Control {
    /// A call ended; `mark` = detail messages enqueued before it ended.
    End(Box<Ended>, u64),
    /// A provisional call (trace id) joined its real call id.
    Join { from: Arc<str>, to: Arc<str> },
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
    pub data: mpsc::Sender<DetailMsg>,
    pub control: mpsc::UnboundedSender<Control>,
    /// Detail messages successfully enqueued (the worker compares it with what it received).
    pub enqueued: Arc<AtomicU64>,
    pub thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Starts the worker thread.
pub(crate) fn spawn(registry: Arc<Registry>, transport: Transport) -> std::io::Result<Handle> {
    let cfg = registry.config.clone();
    let (data_tx, data_rx) = mpsc::channel(cfg.queue_size);
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    let enqueued = Arc::new(AtomicU64::new(0));
    let worker = Worker {
        stats: registry.stats.clone(),
        detail_sem: Arc::new(Semaphore::new(cfg.max_concurrent_detail)),
        transport: Arc::new(transport),
        cfg,
        reg: registry,
        data_rx,
        ctrl_rx,
        received: 0,
        enqueued: enqueued.clone(),
        buffers: HashMap::new(),
        redirects: HashMap::new(),
        pending: HashMap::new(),
        ended_seqs: HashMap::new(),
        ended_order: VecDeque::new(),
        late_seq: LATE_SEQ_BASE,
        tasks: JoinSet::new(),
        inflight: HashMap::new(),
        epoch: 0,
        finished_epoch: 0,
        waiters: Vec::new(),
        stop_at: None,
        exit: false,
        buffered_bytes: 0,
        inflight_bytes: 0,
        scratch: Vec::with_capacity(16 * 1024),
    };
    let thread = std::thread::Builder::new()
        .name("callscope-worker".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(worker.run()),
                Err(e) => tracing::error!(error = %e, "callscope worker could not start its runtime; nothing will be delivered"),
            }
        })?;
    Ok(Handle {
        data: data_tx,
        control: ctrl_tx,
        enqueued,
        thread: std::sync::Mutex::new(Some(thread)),
    })
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
    state: CallState,
    mark: u64,
    core: CoreState,
}

#[derive(Debug)]
enum Work {
    Core { call_id: Arc<str> },
    Detail { spans: u64 },
}

#[derive(Debug)]
struct Inflight {
    epoch: u64,
    bytes: usize,
    work: Work,
}

#[derive(Debug)]
struct Waiter {
    mark: u64,
    /// Set once every span up to `mark` was batched: tasks started before it must finish.
    epoch: Option<u64>,
    ack: SyncSender<()>,
    stop: bool,
}

struct Worker {
    reg: Arc<Registry>,
    cfg: Arc<Config>,
    stats: Arc<Counters>,
    transport: Arc<Transport>,
    detail_sem: Arc<Semaphore>,
    data_rx: mpsc::Receiver<DetailMsg>,
    ctrl_rx: mpsc::UnboundedReceiver<Control>,
    received: u64,
    enqueued: Arc<AtomicU64>,
    buffers: HashMap<Arc<str>, Buf>,
    redirects: HashMap<Arc<str>, Arc<str>>,
    pending: HashMap<Arc<str>, PendingEnd>,
    ended_seqs: HashMap<Arc<str>, u32>,
    ended_order: VecDeque<Arc<str>>,
    late_seq: u32,
    tasks: JoinSet<Delivery>,
    inflight: HashMap<Id, Inflight>,
    epoch: u64,
    /// `epoch` right after the latest ended call was finished (its final batch dispatched).
    finished_epoch: u64,
    waiters: Vec<Waiter>,
    stop_at: Option<Instant>,
    exit: bool,
    buffered_bytes: usize,
    inflight_bytes: usize,
    scratch: Vec<u8>,
}

impl Worker {
    async fn run(mut self) {
        let idle = self.cfg.call_idle_timeout / 4;
        let period = idle.clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut data_open = true;
        while !self.exit {
            tokio::select! {
                biased;
                c = self.ctrl_rx.recv() => match c {
                    Some(c) => self.on_control(c),
                    // The processor was dropped without shutdown: deliver what we can, briefly.
                    None => self.begin_stop(0, Instant::now() + Duration::from_secs(5), None),
                },
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    match done {
                        Ok((id, result)) => self.on_done(id, result),
                        Err(e) => self.on_done(e.id(), Delivery::Failed),
                    }
                }
                d = self.data_rx.recv(), if data_open => match d {
                    Some(d) => self.on_detail(d),
                    None => data_open = false,
                },
                _ = tick.tick() => self.on_tick(),
            }
            self.progress();
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::End(e, mark) => self.on_end(*e, mark),
            Control::Join { from, to } => self.on_join(from, to),
            Control::Flush { mark, ack } => self.waiters.push(Waiter {
                mark,
                epoch: None,
                ack,
                stop: false,
            }),
            Control::Shutdown {
                mark,
                deadline,
                ack,
            } => self.begin_stop(mark, deadline, Some(ack)),
        }
    }

    fn begin_stop(&mut self, mark: u64, deadline: Instant, ack: Option<SyncSender<()>>) {
        self.stop_at = Some(self.stop_at.map_or(deadline, |d| d.min(deadline)));
        let ack = ack.unwrap_or_else(|| std::sync::mpsc::sync_channel(1).0);
        self.waiters.push(Waiter {
            mark,
            epoch: None,
            ack,
            stop: true,
        });
    }

    fn on_tick(&mut self) {
        let mark = self.enqueued.load(Ordering::Acquire);
        for e in self.reg.expire_idle() {
            tracing::debug!(call_id = %e.state.call_id, "call ended: idle timeout");
            self.on_end(e, mark);
        }
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
        if self.stop_at.is_some_and(|d| now >= d) {
            self.abandon();
        }
    }

    // ---- detail ------------------------------------------------------------------------

    fn on_detail(&mut self, msg: DetailMsg) {
        self.received += 1;
        let key = self
            .redirects
            .get(&msg.call_id)
            .cloned()
            .unwrap_or_else(|| msg.call_id.clone());
        if !self.buffers.contains_key(&key) {
            let late = msg.late && !self.pending.contains_key(&key);
            let next_seq = if late {
                self.ended_seqs.get(&key).copied().unwrap_or_else(|| {
                    self.late_seq = self.late_seq.saturating_add(1);
                    self.late_seq
                })
            } else {
                0
            };
            let b = self.new_buf(&key, msg.provisional, late, next_seq);
            self.buffers.insert(key.clone(), b);
        }
        let Some(b) = self.buffers.get(&key) else {
            return;
        };
        let budget = self.cfg.max_request_bytes.saturating_sub(b.overhead);
        self.scratch.clear();
        let cut = payload::write_span(&mut self.scratch, &msg.span, msg.op, budget);
        if cut > 0 {
            Counters::add(&self.stats.attributes_truncated, cut);
            tracing::warn!(call_id = %key, span = %msg.span.name, values = cut,
                "span larger than CALLSCOPE_MAX_REQUEST_BYTES: its largest attribute values were shortened");
        }
        drop(msg);
        self.buffered_bytes += self.scratch.len() + 1;
        let now = Instant::now();
        let full = match self.buffers.get_mut(&key) {
            Some(b) => b.buf.push(&self.scratch, budget, now),
            None => None,
        };
        if let Some(list) = full {
            self.send_batch(&key, list, None);
        }
        // Over the memory budget: stream this call's batch out early.
        if self.buffered_bytes + self.inflight_bytes > self.cfg.max_buffer_bytes {
            self.flush_buffer(&key);
        }
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
        if late {
            if let Some(b) = self.buffers.remove(key) {
                self.remember_seq(key.clone(), b.buf.next_seq);
            }
        }
    }

    /// Frames and sends one batch of `key`'s spans; `last` makes it the final batch.
    fn send_batch(&mut self, key: &Arc<str>, list: SpanList, last: Option<&[u8]>) {
        let Some(b) = self.buffers.get_mut(key) else {
            return;
        };
        self.buffered_bytes = self
            .buffered_bytes
            .saturating_sub(list.bytes.len() + list.len());
        let seq = b.buf.seq();
        let late = b.late;
        let agent = self.reg.agent_id();
        let meta = DetailMeta {
            call_id: key,
            agent_id: &agent,
        };
        let json = meta.body(seq, &list.bytes, late, last.map(|t| (seq + 1, t)));
        let spans = list.len() as u64;
        drop(list);
        if self.inflight_bytes + json.len() > self.cfg.max_buffer_bytes {
            Counters::add(&self.stats.spans_dropped_buffer_full, spans);
            Counters::inc(&self.stats.detail_batches_failed);
            tracing::warn!(call_id = %key, spans, "detail batch dropped: CALLSCOPE_MAX_BUFFER_BYTES reached (receiver too slow or down)");
            return;
        }
        let body = Bytes::from(self.transport.encode(&json));
        let idem = format!("{key}:detail:{seq}");
        let t = self.transport.clone();
        let sem = self.detail_sem.clone();
        self.spawn(Work::Detail { spans }, body.len(), async move {
            let Ok(_permit) = sem.acquire_owned().await else {
                return Delivery::Failed;
            };
            t.deliver(Lane::Detail, body, &idem).await
        });
    }

    fn spawn(
        &mut self,
        work: Work,
        bytes: usize,
        fut: impl std::future::Future<Output = Delivery> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(fut);
        self.inflight.insert(
            handle.id(),
            Inflight {
                epoch: self.epoch,
                bytes,
                work,
            },
        );
        self.epoch += 1;
        self.inflight_bytes += bytes;
    }

    fn on_done(&mut self, id: Id, result: Delivery) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(f.bytes);
        let ok = result == Delivery::Acked;
        match f.work {
            Work::Core { call_id } => {
                if ok {
                    Counters::inc(&self.stats.summaries_sent);
                } else {
                    Counters::inc(&self.stats.summaries_failed);
                    tracing::error!(%call_id, ?result, "call summary not delivered");
                }
                if let Some(p) = self.pending.get_mut(&call_id) {
                    p.core = if ok {
                        CoreState::Acked
                    } else {
                        CoreState::Failed
                    };
                }
            }
            Work::Detail { spans } => {
                if ok {
                    Counters::inc(&self.stats.detail_batches_sent);
                    Counters::add(&self.stats.detail_spans_sent, spans);
                } else {
                    Counters::inc(&self.stats.detail_batches_failed);
                    Counters::add(&self.stats.spans_dropped_send_failed, spans);
                    tracing::error!(spans, ?result, "detail batch not delivered");
                }
            }
        }
    }

    // ---- call ends -----------------------------------------------------------------------

    fn on_join(&mut self, from: Arc<str>, to: Arc<str>) {
        self.redirects.insert(from.clone(), to.clone());
        let Some(old) = self.buffers.remove(&from) else {
            return;
        };
        if !self.buffers.contains_key(&to) {
            let b = self.new_buf(&to, false, false, 0);
            self.buffers.insert(to.clone(), b);
        }
        let Some(b) = self.buffers.get(&to) else {
            return;
        };
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
        let Ended { state, reason } = e;
        let call_id = state.call_id.clone();
        if let Some(old) = self.pending.remove(&call_id) {
            // The same id ended twice before its first end was finished: finish that one now.
            self.finish(
                call_id.clone(),
                PendingEnd {
                    core: CoreState::Failed,
                    ..old
                },
            );
        }
        let agent = self.reg.agent_id();
        let core =
            match payload::core_body(&state, &agent, reason.as_str(), self.cfg.max_summary_bytes) {
                Ok(core) => core,
                Err(err) => {
                    Counters::inc(&self.stats.summaries_failed);
                    tracing::error!(%call_id, error = %err, "call summary not built");
                    self.pending.insert(
                        call_id,
                        PendingEnd {
                            state,
                            mark,
                            core: CoreState::Failed,
                        },
                    );
                    return;
                }
            };
        if core.truncated {
            Counters::inc(&self.stats.summaries_truncated);
            tracing::warn!(%call_id, "call summary transcript shortened to fit CALLSCOPE_MAX_SUMMARY_BYTES");
        }
        let body = Bytes::from(self.transport.encode(&core.json));
        let t = self.transport.clone();
        let idem = format!("{call_id}:core");
        self.spawn(
            Work::Core {
                call_id: call_id.clone(),
            },
            body.len(),
            async move { t.deliver(Lane::Core, body, &idem).await },
        );
        self.pending.insert(
            call_id,
            PendingEnd {
                state,
                mark,
                core: CoreState::InFlight,
            },
        );
    }

    /// Finishes ended calls whose core is settled and whose spans have all been batched.
    fn progress(&mut self) {
        if !self.pending.is_empty() {
            let ready: Vec<Arc<str>> = self
                .pending
                .iter()
                .filter(|(_, p)| p.core != CoreState::InFlight && self.received >= p.mark)
                .map(|(k, _)| k.clone())
                .collect();
            for k in ready {
                if let Some(p) = self.pending.remove(&k) {
                    self.finish(k, p);
                }
            }
        }
        if !self.waiters.is_empty() {
            self.check_waiters();
        }
    }

    fn finish(&mut self, key: Arc<str>, p: PendingEnd) {
        if self.cfg.detail == DetailMode::None {
            self.buffers.remove(&key);
            return;
        }
        if !self.buffers.contains_key(&key) {
            let next = self.ended_seqs.get(&key).copied().unwrap_or(0);
            let b = self.new_buf(&key, false, false, next);
            self.buffers.insert(key.clone(), b);
        }
        if p.core == CoreState::Acked {
            let Some(b) = self.buffers.get_mut(&key) else {
                return;
            };
            let budget = self.cfg.max_request_bytes.saturating_sub(b.overhead);
            let records = p.state.turns.in_time_order();
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
        } else {
            // No acknowledged core: no final batch; the spans still go out (the receiver keeps
            // detail that arrives before its core).
            self.flush_buffer(&key);
        }
        if let Some(b) = self.buffers.remove(&key) {
            self.remember_seq(key, b.buf.next_seq);
        }
        self.finished_epoch = self.epoch;
    }

    fn remember_seq(&mut self, key: Arc<str>, next: u32) {
        self.redirects.retain(|_, to| *to != key);
        if self.ended_seqs.insert(key.clone(), next).is_none() {
            self.ended_order.push_back(key);
        }
        while self.ended_order.len() > ENDED_SEQS_KEPT {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended_seqs.remove(&old);
            }
        }
    }

    // ---- flush and shutdown --------------------------------------------------------------

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
        let min_inflight = self.inflight.values().map(|f| f.epoch).min();
        let epoch = self.epoch;
        let finished_epoch = self.finished_epoch;
        let received = self.received;
        let pending_marks: Vec<u64> = self.pending.values().map(|p| p.mark).collect();
        let mut stop = false;
        self.waiters.retain_mut(|w| {
            if received < w.mark {
                return true;
            }
            // Calls that ended before the flush must be finished (their finals sent) first.
            if w.epoch.is_none() || pending_marks.iter().any(|m| *m <= w.mark) {
                w.epoch = Some(epoch);
                return true;
            }
            // Finals dispatched while the flush waited count too.
            w.epoch = w.epoch.max(Some(finished_epoch));
            if min_inflight.is_some_and(|m| Some(m) < w.epoch) {
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

    /// The shutdown deadline passed: count what is still undelivered and stop.
    fn abandon(&mut self) {
        for (_, f) in self.inflight.drain() {
            match f.work {
                Work::Core { call_id } => {
                    Counters::inc(&self.stats.summaries_failed);
                    tracing::error!(%call_id, "call summary not delivered before the shutdown timeout");
                }
                Work::Detail { spans } => {
                    Counters::inc(&self.stats.detail_batches_failed);
                    Counters::add(&self.stats.spans_dropped_send_failed, spans);
                }
            }
        }
        self.tasks.abort_all();
        let mut lost = 0u64;
        for (_, b) in self.buffers.drain() {
            lost += b.buf.list.len() as u64;
        }
        // Spans still queued were never batched.
        lost += self
            .enqueued
            .load(Ordering::Acquire)
            .saturating_sub(self.received);
        if lost > 0 {
            Counters::add(&self.stats.spans_dropped_send_failed, lost);
            tracing::error!(
                spans = lost,
                "detail not delivered before the shutdown timeout"
            );
        }
        self.pending.clear();
        for w in self.waiters.drain(..) {
            drop(w.ack);
        }
        self.exit = true;
    }
}
