//! [`CallSpanProcessor`]: the `SpanProcessor` the app registers. Its hot path only updates
//! the call table and hands spans to the worker with a non-blocking send.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::{Span as _, TraceContextExt};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use std::sync::mpsc::TrySendError;

use crate::config::{Compression, Config, ConfigBuilder, ConfigError, DetailMode};
use crate::registry::{EndReason, Ended, Outbox, Registry, Routed, Shipment, count_queue_full};
use crate::semantics::{self, CallIdValue};
use crate::stats::{Counters, Stats};
use crate::transport::{Sink, Transport};
use crate::worker::{self, Control, DetailMsg};

/// Shortest wait of `force_flush` for the worker (it waits `3 × CALLSCOPE_TIMEOUT_MS` or this).
const MIN_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// An OpenTelemetry [`SpanProcessor`] that groups a voice agent's spans by call, keeps running
/// aggregates per call, sends a small core summary when a call ends (phase 1) and streams the
/// full spans in byte-capped batches (phase 2).
///
/// Register it with the tracer provider; nothing else in the app changes:
///
/// ```no_run
/// # fn main() -> Result<(), callscope::ConfigError> {
/// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
///     .with_span_processor(callscope::CallSpanProcessor::from_env()?)
///     .build();
/// # Ok(()) }
/// ```
///
/// `on_start` / `on_end` never block and never do I/O; a single worker thread with its own
/// current-thread tokio runtime does all delivery. `force_flush` delivers everything pending
/// without ending calls; `shutdown` ends every open call (`end_reason: "shutdown"`) and
/// delivers within the SDK's timeout.
#[derive(Debug)]
pub struct CallSpanProcessor {
    /// `None` when disabled (`CALLSCOPE_DISABLED` / `OTEL_SDK_DISABLED`).
    active: Option<Active>,
}

#[derive(Debug)]
struct Active {
    reg: Arc<Registry>,
    worker: worker::Handle,
    shut: AtomicBool,
}

impl CallSpanProcessor {
    /// Builds the processor from the `CALLSCOPE_*` environment variables (see the README's
    /// table). An invalid value is a [`ConfigError`] naming the variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_config(Config::from_env()?)
    }

    /// A builder: starts from the environment, and what is set in code wins.
    pub fn builder() -> CallSpanProcessorBuilder {
        CallSpanProcessorBuilder {
            config: Config::builder(),
        }
    }

    /// Builds the processor from a validated [`Config`] and starts its worker thread.
    pub fn from_config(config: Config) -> Result<Self, ConfigError> {
        Self::with_sink(config, Sink::Http)
    }

    /// [`from_config`](Self::from_config) with the worker delivering into `sink`.
    pub(crate) fn with_sink(config: Config, sink: Sink) -> Result<Self, ConfigError> {
        if config.disabled {
            tracing::info!(
                "callscope disabled (CALLSCOPE_DISABLED or OTEL_SDK_DISABLED): spans pass through untouched"
            );
            return Ok(CallSpanProcessor { active: None });
        }
        let config = Arc::new(config);
        let stats = Arc::new(Counters::default());
        let transport = Transport::new(&config, stats.clone())
            .map_err(|e| ConfigError::Startup {
                reason: e.to_string(),
            })?
            .with_sink(sink);
        let reg = Arc::new(Registry::new(config, stats));
        let worker = worker::spawn(reg.clone(), transport).map_err(|e| ConfigError::Startup {
            reason: format!("could not start the worker thread: {e}"),
        })?;
        Ok(CallSpanProcessor {
            active: Some(Active {
                reg,
                worker,
                shut: AtomicBool::new(false),
            }),
        })
    }

    /// A snapshot of the counters: spans seen, calls open and ended by reason, summaries and
    /// detail sent or failed, spans dropped by reason, bytes sent, truncations, late spans.
    /// All zero when disabled.
    pub fn stats(&self) -> Stats {
        self.stats_handle().snapshot()
    }

    /// A cheap handle that reads [`stats`](Self::stats) after the processor was moved into the
    /// tracer provider.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            reg: self.active.as_ref().map(|a| a.reg.clone()),
        }
    }

    /// Whether this processor does anything (false when disabled by configuration).
    pub fn is_enabled(&self) -> bool {
        self.active.is_some()
    }
}

/// Reads a [`CallSpanProcessor`]'s counters from anywhere (clone it freely).
#[derive(Debug, Clone)]
pub struct StatsHandle {
    reg: Option<Arc<Registry>>,
}

impl StatsHandle {
    /// A snapshot of the counters; see [`CallSpanProcessor::stats`].
    pub fn snapshot(&self) -> Stats {
        match &self.reg {
            Some(r) => r.stats.snapshot(r.open_calls() as u64),
            None => Stats::default(),
        }
    }
}

impl Outbox for Active {
    /// Hands a full chunk of a call's packed spans to the worker. Called under the call's
    /// lock (see [`Registry::record`]): never blocks.
    fn ship(&self, s: Shipment) {
        let stats = &self.reg.stats;
        let spans = s.chunk.spans();
        if !self.worker.queue_spans.try_take(spans) {
            count_queue_full(stats, spans as u64);
            return;
        }
        let msg = DetailMsg {
            call_id: s.call_id,
            chunk: s.chunk,
            late: s.late,
            provisional: s.provisional,
            incarnation: s.incarnation,
        };
        match self.worker.data.try_send(msg) {
            Ok(()) => {
                // Counted before the worker is woken: it compares this with what it received.
                let n = self.worker.enqueued.fetch_add(1, Ordering::SeqCst) + 1;
                self.worker.wake.after_send(n);
            }
            Err(TrySendError::Full(_)) => {
                self.worker.queue_spans.give(spans);
                count_queue_full(stats, spans as u64);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.worker.queue_spans.give(spans);
                Counters::add(&stats.spans_dropped_send_failed, spans as u64);
            }
        }
    }

    /// Tells the worker of a fold; called under the registry's lifecycle lock (never blocks:
    /// the control channel is unbounded, and a provisional call is folded at most once).
    fn joined(&self, from: Arc<str>, to: Arc<str>, call: u64) {
        self.send_control(Control::Join { from, to, call });
    }
}

impl Active {
    fn send_control(&self, c: Control) -> bool {
        self.worker.control.send(c).is_ok()
    }

    fn send_ends(&self, ends: Routed) {
        for e in ends.ended {
            self.send_end(e, self.worker.ends_limit);
        }
    }

    /// Hands an ended call to the worker. Never blocks: past `limit` ended calls waiting for
    /// the worker (call ends arriving faster than summaries are built; `Handle::ends_limit`),
    /// the summary is dropped and counted, so memory stays bounded whatever the input.
    fn send_end(&self, e: Ended, limit: usize) {
        let stats = &self.reg.stats;
        // The call's last packed spans travel with its end and are lost with it.
        let leftover = e.state.chunk.as_ref().map_or(0, |c| c.spans() as u64);
        if self.worker.ends_queued.fetch_add(1, Ordering::AcqRel) >= limit {
            self.worker.ends_queued.fetch_sub(1, Ordering::AcqRel);
            Counters::inc(&stats.summaries_failed);
            if leftover > 0 {
                count_queue_full(stats, leftover);
            }
            if let Some(n) = Counters::inc_at_powers_of_two(&stats.summaries_dropped_backlog) {
                tracing::warn!(dropped = n, call_id = %e.state.call_id,
                    "call summary dropped: more than CALLSCOPE_MAX_OPEN_CALLS ended calls wait for the callscope worker");
            }
            return;
        }
        let mark = self.worker.enqueued.load(Ordering::Acquire);
        if !self.send_control(Control::End(Box::new(e), mark)) {
            self.worker.ends_queued.fetch_sub(1, Ordering::AcqRel);
            Counters::inc(&stats.summaries_failed);
            Counters::add(&stats.spans_dropped_send_failed, leftover);
        }
    }

    /// Waits for the worker to answer `make(ack)`, at most `wait`.
    fn ask(
        &self,
        wait: Duration,
        make: impl FnOnce(u64, std::sync::mpsc::SyncSender<()>) -> Control,
    ) -> OTelSdkResult {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mark = self.worker.enqueued.load(Ordering::Acquire);
        if !self.send_control(make(mark, tx)) {
            return Err(OTelSdkError::InternalFailure(
                "callscope worker is not running".into(),
            ));
        }
        match rx.recv_timeout(wait) {
            Ok(()) => Ok(()),
            Err(_) => Err(OTelSdkError::Timeout(wait)),
        }
    }
}

impl SpanProcessor for CallSpanProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        let Some(a) = &self.active else { return };
        if a.shut.load(Ordering::Relaxed) {
            return;
        }
        let keys = &a.reg.id_keys;
        let trace = span.span_context().trace_id();
        let baggage = cx.baggage();
        if !baggage.is_empty()
            && let Some(v) = keys.as_slice().iter().find_map(|k| baggage.get(k.as_str()))
        {
            a.reg.learn(trace, CallIdValue::Str(v.as_str()), a);
            return;
        }
        // A root span's start attributes are few: reading them now lets children, which end
        // first, find their call at once.
        let has_parent = cx.has_active_span() && cx.span().span_context().is_valid();
        if !has_parent
            && let Some(data) = span.exported_data()
            && let Some(id) = semantics::find_call_id(&data.attributes, keys)
        {
            a.reg.learn(trace, id, a);
        }
    }

    fn on_end(&self, span: SpanData) {
        let Some(a) = &self.active else { return };
        if a.shut.load(Ordering::Acquire) {
            Counters::inc(&a.reg.stats.spans_dropped_after_shutdown);
            return;
        }
        a.reg.stats.seen.inc();
        let routed = a.reg.record(&span, a.reg.coarse_now_ns(), a);
        // The span's memory is freed here, on the thread that allocated it: its detail is
        // packed in its call's chunk (see `packed`).
        drop(span);
        a.send_ends(routed);
    }

    fn force_flush(&self) -> OTelSdkResult {
        let Some(a) = &self.active else { return Ok(()) };
        if a.shut.load(Ordering::Acquire) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let wait = (a.reg.config.timeout * 3).max(MIN_FLUSH_WAIT);
        a.ask(wait, |mark, ack| Control::Flush { mark, ack })
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(a) = &self.active else { return Ok(()) };
        if a.shut.swap(true, Ordering::AcqRel) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let started = Instant::now();
        // Before the ends below: the stop request must not wait behind call ends the worker
        // holds back while too many payloads are outstanding.
        a.worker.stopping.set();
        // Not held to the bound on queued ends: these are at most the open calls (a bound of
        // their own), and the worker now takes every end queued.
        for e in a.reg.end_all(EndReason::Shutdown) {
            a.send_end(e, usize::MAX);
        }
        // The worker stops a little before the caller's deadline so it can count what is lost.
        let deadline = started + timeout.mul_f64(0.9);
        let result = a.ask(timeout, |mark, ack| Control::Shutdown {
            mark,
            deadline,
            ack,
        });
        if let Ok(mut t) = a.worker.thread.lock()
            && let Some(t) = t.take()
            && result.is_ok()
        {
            let _ = t.join();
        }
        let s = self.stats();
        tracing::info!(
            summaries_sent = s.summaries_sent,
            summaries_failed = s.summaries_failed,
            spans_dropped = s.spans_dropped(),
            "callscope shut down"
        );
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(a) = &self.active {
            let name = resource.get(&opentelemetry::Key::from_static_str("service.name"));
            a.reg
                .set_resource_agent_id(name.as_ref().map(|v| v.as_str()).as_deref());
        }
    }
}

macro_rules! forward {
    ($( $(#[$doc:meta])* $name:ident ( $( $arg:ident : $ty:ty ),* ) ; )*) => {
        $(
            $(#[$doc])*
            pub fn $name(self, $( $arg: $ty ),*) -> Self {
                CallSpanProcessorBuilder { config: self.config.$name($( $arg ),*) }
            }
        )*
    };
}

/// Sets up a [`CallSpanProcessor`] in code. Values set here win over the environment; see
/// [`ConfigBuilder`] for each setting's variable and default.
#[derive(Debug, Clone, Default)]
pub struct CallSpanProcessorBuilder {
    config: ConfigBuilder,
}

impl CallSpanProcessorBuilder {
    forward! {
        /// URL core summaries are POSTed to (`CALLSCOPE_ENDPOINT`).
        endpoint(url: impl AsRef<str>);
        /// URL detail batches are POSTed to (`CALLSCOPE_DETAILED_ENDPOINT`).
        detailed_endpoint(url: impl AsRef<str>);
        /// Sent as `Authorization: Bearer <key>` (`CALLSCOPE_API_KEY`).
        api_key(key: impl Into<String>);
        /// An extra request header (`CALLSCOPE_HEADERS`).
        header(name: impl Into<String>, value: impl Into<String>);
        /// `agent_id` in payloads (`CALLSCOPE_AGENT_ID`).
        agent_id(id: impl Into<String>);
        /// Attribute / baggage keys that carry the call id (`CALLSCOPE_CALL_ID_KEYS`).
        call_id_keys(keys: impl IntoIterator<Item = impl Into<String>>);
        /// Span names whose end ends the call (`CALLSCOPE_ROOT_SPAN_NAMES`).
        root_span_names(names: impl IntoIterator<Item = impl Into<String>>);
        /// A call with no span for this long is ended (`CALLSCOPE_CALL_IDLE_TIMEOUT_MS`).
        call_idle_timeout(timeout: Duration);
        /// Open calls kept before the oldest is evicted (`CALLSCOPE_MAX_OPEN_CALLS`).
        max_open_calls(n: usize);
        /// Hard cap on the core body (`CALLSCOPE_MAX_SUMMARY_BYTES`).
        max_summary_bytes(bytes: usize);
        /// Hard cap on any request body (`CALLSCOPE_MAX_REQUEST_BYTES`).
        max_request_bytes(bytes: usize);
        /// Which spans travel as detail (`CALLSCOPE_DETAIL`).
        detail(mode: DetailMode);
        /// Threshold of `DetailMode::Critical` (`CALLSCOPE_CRITICAL_MS`).
        critical_threshold(threshold: Duration);
        /// Request body compression (`CALLSCOPE_COMPRESSION`).
        compression(compression: Compression);
        /// Per-request timeout (`CALLSCOPE_TIMEOUT_MS`).
        timeout(timeout: Duration);
        /// Spans queued to the worker (`CALLSCOPE_QUEUE_SIZE`).
        queue_size(n: usize);
        /// Turns the processor off (`CALLSCOPE_DISABLED`).
        disabled(disabled: bool);
        /// A detail batch waiting this long is sent (`CALLSCOPE_BATCH_TIMEOUT_MS`).
        batch_timeout(timeout: Duration);
        /// Total time a payload is retried (`CALLSCOPE_RETRY_MAX_ELAPSED_MS`).
        retry_max_elapsed(budget: Duration);
        /// Detail uploads at once (`CALLSCOPE_MAX_CONCURRENT_DETAIL`).
        max_concurrent_detail(n: usize);
        /// Bound on all pending detail (`CALLSCOPE_MAX_BUFFER_BYTES`).
        max_buffer_bytes(bytes: usize);
        /// Directory of the disk spool for undelivered payloads (`CALLSCOPE_SPOOL_DIR`).
        spool_dir(dir: impl Into<std::path::PathBuf>);
        /// Size cap of the disk spool (`CALLSCOPE_SPOOL_MAX_BYTES`).
        spool_max_bytes(bytes: u64);
        /// Gzip level of request bodies, 0 to 9 (`CALLSCOPE_GZIP_LEVEL`); set without
        /// `gzip_level_max`, also the maximum (a fixed level).
        gzip_level(level: u32);
        /// Gzip level of detail bodies while compression has CPU to spare
        /// (`CALLSCOPE_GZIP_LEVEL_MAX`).
        gzip_level_max(level: u32);
        /// Ignore the process environment entirely.
        without_env();
    }

    /// Validates the configuration and starts the processor.
    pub fn build(self) -> Result<CallSpanProcessor, ConfigError> {
        CallSpanProcessor::from_config(self.config.build()?)
    }
}
