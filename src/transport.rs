//! HTTP delivery: one POST with headers, compression and the idempotency key, retried by the
//! pure policy in `retry.rs`. Runs on the worker's runtime only.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
};
use reqwest::{Client, Url};

use crate::config::{Compression, Config};
use crate::retry::{self, Backoff, Decision, GiveUpReason, Outcome};
use crate::stats::Counters;

/// Default gzip level of request bodies (`CALLSCOPE_GZIP_LEVEL`; see BENCHMARKS.md for the
/// ratio / speed trade).
pub(crate) const GZIP_LEVEL: u32 = crate::config::DEFAULT_GZIP_LEVEL;

/// Compressing detail at `CALLSCOPE_GZIP_LEVEL_MAX` may take one part in `RAISED_SHARE` of
/// wall time: a tenth of one core. At the default levels (5 against 1, zlib-rs) that is ~10 MB/s
/// of span JSON at the raised level, for ~0.6 of level 1's bytes.
const RAISED_SHARE: u128 = 10;

/// Credit for the raised level saved while compression idles: 100 ms of compressing, so a
/// burst after a quiet spell gets at most that much before the share holds.
const RAISED_CREDIT_MAX_NS: i64 = 100_000_000;

/// How much compressing at the raised level may still spend: credit earned at one part in
/// [`RAISED_SHARE`] of the time that passes, spent by each raised body's compression time.
#[derive(Debug)]
struct RaiseBudget {
    credit_ns: i64,
    at: Instant,
}

impl RaiseBudget {
    /// Full credit at `now`.
    fn new(now: Instant) -> Self {
        Self {
            credit_ns: RAISED_CREDIT_MAX_NS,
            at: now,
        }
    }

    /// Whether a body starting at `now` may be compressed at the raised level: credit is left
    /// once the time since the last look has earned its share.
    fn allows(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_nanos() / RAISED_SHARE;
        self.at = self.at.max(now);
        let earned = i64::try_from(earned).unwrap_or(RAISED_CREDIT_MAX_NS);
        self.credit_ns = self
            .credit_ns
            .saturating_add(earned)
            .min(RAISED_CREDIT_MAX_NS);
        self.credit_ns > 0
    }

    /// Charges a raised body's compression time.
    fn spend(&mut self, took: Duration) {
        let ns = i64::try_from(took.as_nanos()).unwrap_or(i64::MAX);
        self.credit_ns = self.credit_ns.saturating_sub(ns);
    }
}

/// How much of a rejecting response body is logged.
const LOGGED_BODY_BYTES: usize = 512;

/// Which endpoint a payload goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Phase 1: `CALLSCOPE_ENDPOINT`.
    Core,
    /// Phase 2: `CALLSCOPE_DETAILED_ENDPOINT`.
    Detail,
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// 2xx.
    Acked,
    /// 413: the receiver wants smaller bodies.
    TooLarge,
    /// Given up: rejected (4xx) or the retry budget ran out.
    Failed,
}

/// Why building the HTTP client failed.
#[derive(Debug, thiserror::Error)]
#[error("could not build the HTTP client for CALLSCOPE_ENDPOINT: {0}")]
pub(crate) struct TransportError(#[from] reqwest::Error);

/// The header that names a payload for the receiver's deduplication (wire contract v1).
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A request body as it goes on the wire.
#[derive(Debug, Clone, Default)]
pub(crate) struct Body {
    pub bytes: Bytes,
    /// Compressed: sent with `Content-Encoding: gzip`.
    pub gzip: bool,
}

/// The HTTP side of the worker.
#[derive(Debug)]
pub(crate) struct Transport {
    /// Detail uploads.
    client: Client,
    /// Summaries: a pool of their own, so they never queue behind a large detail upload.
    core_client: Client,
    /// Summaries currently waiting to be retried, plus one while summaries wait for an upload
    /// slot (`summaries_queued`): detail holds back while it is not zero.
    cores_retrying: tokio::sync::watch::Sender<usize>,
    /// Summaries wait for an upload slot (the worker's cap on those in flight).
    summaries_queued: std::sync::atomic::AtomicBool,
    core_url: Url,
    detail_url: Url,
    headers: HeaderMap,
    compression: Compression,
    gzip_level: u32,
    /// `CALLSCOPE_GZIP_LEVEL_MAX`, with the budget that decides when a detail body gets it
    /// (`None` when it is `gzip_level`: nothing to raise).
    raised: Option<(u32, Mutex<RaiseBudget>)>,
    backoff: Backoff,
    stats: Arc<Counters>,
    /// Where payloads go: the HTTP endpoints, or nowhere (benches only).
    sink: Sink,
}

/// Where the worker's payloads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sink {
    /// POSTed to the configured endpoints.
    Http,
    /// Acknowledged at once without being serialized, compressed or sent (the benches'
    /// counterpart of the SDK's no-op exporter; reachable only through `callscope::__bench`).
    Null,
}

impl Transport {
    pub(crate) fn new(cfg: &Config, stats: Arc<Counters>) -> Result<Self, TransportError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in &cfg.headers {
            // Validated by the config; skip (never panic) if one slipped through.
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                // Set per request (see `deliver`): a second value would make the receiver
                // decode the body wrongly or lose its deduplication.
                if k == CONTENT_ENCODING || k == IDEMPOTENCY_KEY {
                    tracing::warn!(
                        header = %k,
                        "CALLSCOPE_HEADERS sets a header callscope sets per request (Content-Encoding from CALLSCOPE_COMPRESSION, Idempotency-Key from the payload); the configured value is ignored"
                    );
                    continue;
                }
                headers.insert(k, v);
            }
        }
        if let Some(key) = &cfg.api_key
            && let Ok(mut v) = HeaderValue::try_from(format!("Bearer {key}"))
        {
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let build = || {
            Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
        };
        Ok(Transport {
            client: build()?,
            core_client: build()?,
            cores_retrying: tokio::sync::watch::Sender::new(0),
            summaries_queued: std::sync::atomic::AtomicBool::new(false),
            core_url: cfg.endpoint.clone(),
            detail_url: cfg.detailed_endpoint.clone(),
            headers,
            compression: cfg.compression,
            gzip_level: cfg.gzip_level,
            raised: (cfg.gzip_level_max > cfg.gzip_level).then(|| {
                (
                    cfg.gzip_level_max,
                    Mutex::new(RaiseBudget::new(Instant::now())),
                )
            }),
            backoff: Backoff::new(cfg.retry_max_elapsed),
            stats,
            sink: Sink::Http,
        })
    }

    /// The same transport, delivering into `sink`.
    pub(crate) fn with_sink(mut self, sink: Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Whether bodies are gzip-compressed before they go out (not for the null sink).
    pub(crate) fn compresses(&self) -> bool {
        self.compression != Compression::None && self.sink == Sink::Http
    }

    /// Whether a detail body may go uncompressed when compression costs more than it saves
    /// (`CALLSCOPE_COMPRESSION=auto`).
    pub(crate) fn adaptive(&self) -> bool {
        self.compression == Compression::Auto && self.compresses()
    }

    /// Whether payloads go nowhere (the worker then skips serializing detail).
    pub(crate) fn is_null(&self) -> bool {
        self.sink == Sink::Null
    }

    /// The body as it goes on the wire (gzip at `CALLSCOPE_GZIP_LEVEL` unless compression is
    /// off). Nothing for the null sink.
    pub(crate) fn encode(&self, json: &[u8]) -> Body {
        self.encode_at(json, self.compresses().then_some(self.gzip_level))
    }

    /// A detail body as it goes on the wire, compressed on a deflate thread: at
    /// `CALLSCOPE_GZIP_LEVEL_MAX` while compression has CPU to spare — the worker is not
    /// behind (`spare`, see `Worker::spare`) and raised bodies have taken at most a tenth of
    /// the time, with up to 100 ms saved ahead ([`RaiseBudget`]) — and at
    /// `CALLSCOPE_GZIP_LEVEL` otherwise. A worker that is behind does not raise.
    /// Says whether the body was raised.
    pub(crate) fn encode_detail(&self, json: &[u8], spare: bool) -> (Body, bool) {
        let Some((level, budget)) = self.raised.as_ref().filter(|_| spare && self.compresses())
        else {
            return (self.encode(json), false);
        };
        let lock = || budget.lock().unwrap_or_else(PoisonError::into_inner);
        if !lock().allows(Instant::now()) {
            return (self.encode(json), false);
        }
        let started = Instant::now();
        let body = self.encode_at(json, Some(*level));
        lock().spend(started.elapsed());
        Counters::inc(&self.stats.detail_bodies_level_raised);
        (body, true)
    }

    /// The body as plain JSON (shared, not copied), whatever `CALLSCOPE_COMPRESSION` says
    /// (see [`Compression::Auto`]). Nothing for the null sink.
    pub(crate) fn plain(&self, json: Bytes) -> Body {
        Counters::add(&self.stats.bytes_uncompressed, json.len() as u64);
        if self.sink == Sink::Null {
            return Body::default();
        }
        Body {
            bytes: json,
            gzip: false,
        }
    }

    /// `json` gzipped at `level`, or plain for `None`.
    fn encode_at(&self, json: &[u8], level: Option<u32>) -> Body {
        let Some(level) = level else {
            return self.plain(Bytes::copy_from_slice(json));
        };
        Counters::add(&self.stats.bytes_uncompressed, json.len() as u64);
        Body {
            bytes: Bytes::from(gzip(json, level)),
            gzip: true,
        }
    }

    /// Says whether summaries wait for an upload slot; while they do, detail holds back as it
    /// does while a summary waits for a retry (cheap when nothing changes: one atomic swap).
    pub(crate) fn summaries_queued(&self, queued: bool) {
        use std::sync::atomic::Ordering;
        if self.summaries_queued.swap(queued, Ordering::Relaxed) != queued {
            self.cores_retrying.send_modify(|n| {
                *n = if queued { *n + 1 } else { n.saturating_sub(1) };
            });
        }
    }

    /// POSTs `body` (already encoded, with `Content-Encoding: gzip` if it is compressed) until
    /// acknowledged, rejected, or the retry budget is spent.
    ///
    /// Summaries have their own client (own connection pool) and priority: while any summary is
    /// waiting to be retried, or waiting for an upload slot ([`Transport::summaries_queued`]),
    /// detail uploads hold back before each attempt, so on recovery the summaries reach the
    /// receiver first.
    pub(crate) async fn deliver(&self, lane: Lane, body: Body, idempotency_key: &str) -> Delivery {
        self.deliver_timed(lane, body, idempotency_key).await.0
    }

    /// [`deliver`](Self::deliver), and how long its last attempt took (from the request's
    /// start, after any wait behind retried summaries, to the decision; zero for the null sink).
    pub(crate) async fn deliver_timed(
        &self,
        lane: Lane,
        body: Body,
        idempotency_key: &str,
    ) -> (Delivery, Duration) {
        let Body { bytes: body, gzip } = body;
        if self.sink == Sink::Null {
            return (Delivery::Acked, Duration::ZERO);
        }
        // When the last attempt started, in nanoseconds after `base` (an atomic: the future
        // must stay `Send`).
        let base = tokio::time::Instant::now();
        let last_try = std::sync::atomic::AtomicU64::new(0);
        let last_try = &last_try;
        let (client, url) = match lane {
            Lane::Core => (&self.core_client, &self.core_url),
            Lane::Detail => (&self.client, &self.detail_url),
        };
        let mut trouble: Option<CoreTrouble<'_>> = None;
        let send = |_attempt: u32| {
            let body = body.clone();
            async move {
                if lane == Lane::Detail {
                    let mut rx = self.cores_retrying.subscribe();
                    // The sender lives as long as `self`: this cannot fail while we run.
                    let _ = rx.wait_for(|n| *n == 0).await;
                }
                let since = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                last_try.store(since, std::sync::atomic::Ordering::Relaxed);
                let mut req = client
                    .post(url.clone())
                    .headers(self.headers.clone())
                    .header(IDEMPOTENCY_KEY, idempotency_key);
                if gzip {
                    req = req.header(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                let sent = req.body(body).send().await;
                match sent {
                    Ok(resp) => {
                        let ra = resp
                            .headers()
                            .get(reqwest::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        (Attempt::Status(resp.status().as_u16(), ra), Some(resp))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %url, "request failed");
                        let kind = if e.is_timeout() {
                            Attempt::Timeout
                        } else if e.is_connect() {
                            Attempt::ConnectError
                        } else {
                            Attempt::OtherTransportError
                        };
                        (kind, None)
                    }
                }
            }
        };
        let on_retry = |attempt: u32, wait: Duration| {
            Counters::inc(&self.stats.requests_retried);
            tracing::debug!(?wait, attempt, key = idempotency_key, "retrying");
            if lane == Lane::Core && trouble.is_none() {
                trouble = Some(CoreTrouble::new(&self.cores_retrying));
            }
        };
        let (decision, response, attempts) =
            retry_loop(&self.backoff, send, fastrand::f64, on_retry).await;
        drop(trouble);
        let took = base.elapsed().saturating_sub(Duration::from_nanos(
            last_try.load(std::sync::atomic::Ordering::Relaxed),
        ));
        Counters::add(
            &self.stats.bytes_sent,
            body.len() as u64 * u64::from(attempts),
        );
        let delivery = match decision {
            Decision::Done => Delivery::Acked,
            Decision::Split => Delivery::TooLarge,
            Decision::RetryAfter(_) => Delivery::Failed,
            Decision::GiveUp(reason) => {
                let snippet = match response {
                    Some(r) => body_snippet(r).await,
                    None => String::new(),
                };
                match reason {
                    GiveUpReason::Rejected(code) => {
                        Counters::inc(&self.stats.requests_rejected);
                        tracing::error!(
                            status = code,
                            key = idempotency_key,
                            response = %snippet,
                            "receiver rejected the payload; not retrying"
                        )
                    }
                    GiveUpReason::RetryBudgetExhausted => {
                        Counters::inc(&self.stats.retry_budget_exhausted);
                        tracing::error!(
                            key = idempotency_key,
                            attempts,
                            "giving up after retries (CALLSCOPE_RETRY_MAX_ELAPSED_MS)"
                        )
                    }
                }
                Delivery::Failed
            }
        };
        (delivery, took)
    }
}

/// What [`gzip`] compressed (a spooled body a 413 split must cut). Errors on anything that is
/// not one whole gzip member.
pub(crate) fn gunzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4));
    flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
    Ok(out)
}

/// A thread's compressor states by level, the last used first: a deflate thread alternates
/// between `CALLSCOPE_GZIP_LEVEL` and `CALLSCOPE_GZIP_LEVEL_MAX`, and a new state is costly.
type States<C> = [Option<(u32, C)>; 2];

/// The state for `level` in `slots`, moved to the front: kept and passed to `reuse`, or new from
/// `make` in place of the one used less lately.
fn state_for<C>(
    slots: &mut States<C>,
    level: u32,
    make: impl FnOnce() -> C,
    reuse: impl FnOnce(&mut C),
) -> &mut C {
    match slots
        .iter()
        .position(|s| matches!(s, Some((l, _)) if *l == level))
    {
        Some(i) => {
            slots.swap(0, i);
            if let Some((_, c)) = &mut slots[0] {
                reuse(c);
            }
        }
        None => {
            slots.swap(0, 1);
            slots[0] = None;
        }
    }
    &mut slots[0].get_or_insert_with(|| (level, make())).1
}

/// `json` gzip-compressed at `level` (0-9): one whole gzip member, as request bodies are sent.
///
/// With the opt-in `libdeflate` feature libdeflate compresses. At level 1 it sends ~30 % fewer
/// bytes of callscope's span JSON than zlib-rs's level 1 (which codes with fixed Huffman tables
/// only) for ~1.45x its CPU (BENCHMARKS.md, "libdeflate"). Its compressor is kept per thread
/// like flate2's state in [`gzip_flate2`], which serves without the feature.
#[cfg(feature = "libdeflate")]
pub(crate) fn gzip(json: &[u8], level: u32) -> Vec<u8> {
    use libdeflater::{CompressionLvl, Compressor};
    thread_local! {
        static DEFLATE: std::cell::RefCell<States<Compressor>> =
            const { std::cell::RefCell::new([None, None]) };
    }
    DEFLATE.with(|cell| {
        let mut slots = cell.borrow_mut();
        let c = state_for(
            &mut slots,
            level,
            // The config holds levels to 0-9; libdeflate takes 0-12.
            || Compressor::new(CompressionLvl::new(level.min(9) as i32).unwrap_or_default()),
            |_| {},
        );
        // The bound is what incompressible input takes. Pages past what is written are not
        // touched when the allocation is fresh from the OS; the shrink gives them back.
        let mut out = vec![0u8; c.gzip_compress_bound(json.len())];
        match c.gzip_compress(json, &mut out) {
            Ok(n) => {
                out.truncate(n);
                out.shrink_to_fit();
                out
            }
            // Cannot happen with the bound's room; nothing half-written is sent.
            Err(_) => Vec::new(),
        }
    })
}

/// Without the `libdeflate` feature flate2 compresses (see [`gzip_flate2`]).
#[cfg(not(feature = "libdeflate"))]
pub(crate) use self::gzip_flate2 as gzip;

/// `json` gzip-compressed at `level` (0-9) by flate2 (zlib-rs, or miniz_oxide without default
/// features): what [`gzip`] is without the `libdeflate` feature.
///
/// The deflate state is kept per thread and reset between bodies: a new one is ~300 KB zeroed on
/// creation (callgrind: ~390,000 instructions, more than compressing a 15 KB summary), and the
/// worker compresses every payload on its one thread.
pub(crate) fn gzip_flate2(json: &[u8], level: u32) -> Vec<u8> {
    use flate2::{Compress, Crc, FlushCompress, Status};
    thread_local! {
        static DEFLATE: std::cell::RefCell<States<Compress>> =
            const { std::cell::RefCell::new([None, None]) };
    }
    // Gzip header: deflate, no flags, no mtime, no extra flags, OS unknown (as flate2 writes it).
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    DEFLATE.with(|cell| {
        let mut slots = cell.borrow_mut();
        let c = state_for(
            &mut slots,
            level,
            || Compress::new(flate2::Compression::new(level), false),
            Compress::reset,
        );
        let mut out = Vec::with_capacity(json.len() / 4 + 64);
        out.extend_from_slice(&HEADER);
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve((json.len() / 8).max(1024));
            }
            let fed = usize::try_from(c.total_in())
                .unwrap_or(json.len())
                .min(json.len());
            match c.compress_vec(&json[fed..], &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                // Deflating into a Vec with room left cannot fail; nothing half-written is sent.
                Err(_) => return Vec::new(),
            }
        }
        let mut crc = Crc::new();
        crc.update(json);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        // ISIZE: the input length modulo 2^32.
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out
    })
}

/// Marks one summary as waiting for a retry while it lives (detail holds back meanwhile).
struct CoreTrouble<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> CoreTrouble<'a> {
    fn new(w: &'a tokio::sync::watch::Sender<usize>) -> Self {
        w.send_modify(|n| *n += 1);
        CoreTrouble(w)
    }
}

impl Drop for CoreTrouble<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What one attempt ended with (owned form of [`Outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The receiver answered with this status and `Retry-After` value.
    Status(u16, Option<String>),
    /// No connection could be made.
    ConnectError,
    /// The request timed out.
    Timeout,
    /// Another transport failure (reset mid-body, ...).
    OtherTransportError,
}

impl Attempt {
    fn outcome(&self) -> Outcome<'_> {
        match self {
            Attempt::Status(code, ra) => Outcome::Status {
                code: *code,
                retry_after: ra.as_deref(),
            },
            Attempt::ConnectError => Outcome::ConnectError,
            Attempt::Timeout => Outcome::Timeout,
            Attempt::OtherTransportError => Outcome::OtherTransportError,
        }
    }
}

/// The retry loop, apart from HTTP: `send(attempt)` makes one attempt, the pure policy decides,
/// waits use tokio's clock (so tests run it on paused time). Returns the final decision (never
/// `RetryAfter`), the last response and the number of attempts.
pub(crate) async fn retry_loop<R, Fut>(
    backoff: &Backoff,
    mut send: impl FnMut(u32) -> Fut,
    mut rand01: impl FnMut() -> f64,
    mut on_retry: impl FnMut(u32, Duration),
) -> (Decision, Option<R>, u32)
where
    Fut: std::future::Future<Output = (Attempt, Option<R>)>,
{
    let started = tokio::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        let (outcome, response) = send(attempt).await;
        let decision = retry::decide(
            &outcome.outcome(),
            attempt,
            started.elapsed(),
            backoff,
            SystemTime::now(),
            rand01(),
        );
        match decision {
            Decision::RetryAfter(wait) => {
                on_retry(attempt, wait);
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
            d => return (d, response, attempt.saturating_add(1)),
        }
    }
}

/// The start of a response body, for the log.
async fn body_snippet(r: reqwest::Response) -> String {
    match r.bytes().await {
        Ok(b) => {
            let end = b.len().min(LOGGED_BODY_BYTES);
            String::from_utf8_lossy(&b[..end]).into_owned()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn gzip_level_comes_from_the_config() {
        let json = span_text(2000);
        let size = |level: u32| {
            let (t, _) = transport_with(Config::builder().gzip_level(level));
            let body = t.encode(&json);
            assert_eq!(gunzipped(&body), json);
            body.bytes.len()
        };
        assert!(size(0) > size(1));
        assert!(size(1) > size(9));
    }

    /// With the feature, bodies are libdeflate's: on span-like text at level 1 they are smaller
    /// than flate2's (zlib-rs's level 1 codes with fixed Huffman tables), and still one gzip
    /// member any decoder reads.
    #[cfg(feature = "libdeflate")]
    #[test]
    fn libdeflate_level_1_sends_fewer_bytes_than_flate2() {
        const WORDS: [&str; 12] = [
            "booking", "table", "allergy", "evening", "deposit", "window", "caller", "menu",
            "confirm", "parking", "four", "the",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!(
                "{{\"span\":{i},\"name\":\"llm_request\",\"text\":\""
            ));
            for _ in 0..1_000 {
                text.push_str(WORDS[rng.usize(..WORDS.len())]);
                text.push(if rng.u8(..8) == 0 { '.' } else { ' ' });
            }
            text.push_str("\"},");
        }
        let ours = gzip(text.as_bytes(), 1);
        let flate2 = gzip_flate2(text.as_bytes(), 1);
        assert!(
            ours.len() * 10 < flate2.len() * 9,
            "libdeflate {} bytes against flate2's {}",
            ours.len(),
            flate2.len()
        );
        assert_eq!(gunzip(&ours).expect("one gzip member"), text.as_bytes());
    }

    /// Two levels in turn keep their two states; a third replaces the one used less lately.
    #[test]
    fn compressor_states_are_kept_for_two_levels() {
        let mut slots: States<u32> = [None, None];
        let mut made = Vec::new();
        let mut reused = 0;
        for level in [1, 5, 1, 5, 5, 1, 9, 1, 5] {
            let state = state_for(
                &mut slots,
                level,
                || {
                    made.push(level);
                    level * 100
                },
                |_| reused += 1,
            );
            assert_eq!(*state, level * 100, "the state of level {level}");
        }
        // 9 evicted 5 (1 was used after it); 5 then evicted 9.
        assert_eq!(made, [1, 5, 9, 5]);
        assert_eq!(reused, 5);
    }

    /// The raised level's credit: full at first, spent by compression time, earned back at a
    /// tenth of the time passed, never saved past 100 ms.
    #[test]
    fn raise_budget_holds_the_raised_level_to_a_tenth_of_the_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = RaiseBudget::new(t0);
        assert!(b.allows(t0));
        b.spend(ms(150));
        assert!(!b.allows(t0), "50 ms over");
        assert!(!b.allows(t0 + ms(500)), "500 ms earn 50 ms: none left");
        assert!(b.allows(t0 + ms(510)), "510 ms earn 51 ms");
        // An hour of idling saves 100 ms, not 360 s.
        assert!(b.allows(t0 + Duration::from_secs(3600)));
        b.spend(ms(100));
        assert!(!b.allows(t0 + Duration::from_secs(3600)));
        // A clock read out of order earns nothing and loses nothing.
        assert!(!b.allows(t0));
        assert!(b.allows(t0 + Duration::from_secs(3600) + ms(1)));
    }

    fn span_text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"span\":{i},\"name\":\"llm_request\",\"text\":\"the caller asked about table {} at {} pm\"}},",
                    i % 37,
                    i % 11
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    fn transport_with(b: crate::config::ConfigBuilder) -> (Transport, Arc<Counters>) {
        let cfg = b
            .without_env()
            .endpoint("http://127.0.0.1:9/v1/calls")
            .build()
            .expect("valid config");
        let stats = Arc::new(Counters::default());
        (Transport::new(&cfg, stats.clone()).expect("client"), stats)
    }

    fn gunzipped(body: &Body) -> Vec<u8> {
        assert!(body.gzip);
        gunzip(&body.bytes).expect("valid gzip")
    }

    /// With the default levels a detail body is compressed at 5 while the worker is not
    /// behind and the budget has credit; at 1 when the worker is behind, and once sustained
    /// compressing has spent the credit; never raised when a level is set alone.
    #[test]
    fn detail_bodies_are_raised_only_while_compression_has_cpu_to_spare() {
        use std::sync::atomic::Ordering::Relaxed;
        let json = span_text(4_000);
        let level_1 = gzip(&json, 1).len();
        let level_5 = gzip(&json, 5).len();
        // Sizes tell the levels apart (with either compressor).
        assert!(level_5 < level_1, "{level_5} against {level_1}");

        let (t, stats) = transport_with(Config::builder());
        let (body, raised) = t.encode_detail(&json, true);
        assert!(raised);
        assert_eq!(gunzipped(&body), json);
        assert_eq!(body.bytes.len(), level_5);
        assert_eq!(stats.detail_bodies_level_raised.load(Relaxed), 1);

        // The worker is behind: level 1.
        let (body, raised) = t.encode_detail(&json, false);
        assert!(!raised);
        assert_eq!(body.bytes.len(), level_1);
        assert_eq!(gunzipped(&body), json);
        assert_eq!(stats.detail_bodies_level_raised.load(Relaxed), 1);

        // Compressing back to back spends the credit faster than time earns it.
        let mut raised = 0;
        let fell_back = (0..2_000).any(|_| {
            let (body, was) = t.encode_detail(&json, true);
            let small = body.bytes.len() == level_5;
            assert_eq!(was, small);
            raised += usize::from(small);
            !small
        });
        assert!(fell_back, "still raised after {raised} bodies back to back");
        assert_eq!(
            stats.detail_bodies_level_raised.load(Relaxed),
            1 + raised as u64
        );

        // A level set alone is fixed; `none` sends plain JSON.
        let (t, stats) = transport_with(Config::builder().gzip_level(1));
        assert_eq!(t.encode_detail(&json, true).0.bytes.len(), level_1);
        assert_eq!(stats.detail_bodies_level_raised.load(Relaxed), 0);
        let (t, stats) = transport_with(Config::builder().compression(Compression::None));
        let (body, raised) = t.encode_detail(&json, true);
        assert!(!body.gzip && !raised);
        assert_eq!(body.bytes, json);
        assert_eq!(stats.detail_bodies_level_raised.load(Relaxed), 0);
    }

    /// The reused deflate state yields valid gzip for any size, level and order of calls.
    #[test]
    fn gzip_with_a_reused_state_round_trips() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"span\":{i},\"name\":\"llm_request\"}}").into_bytes())
            .collect();
        type Gzip = fn(&[u8], u32) -> Vec<u8>;
        let compressors: [(&str, Gzip); 2] = [("gzip", gzip), ("gzip_flate2", gzip_flate2)];
        for (name, compress) in compressors {
            for (level, len) in [
                (1, 0),
                (1, 10),
                (6, 5_000),
                (1, text.len()),
                (3, 77),
                (0, 9_999),
                (9, 1_234),
                // Two levels in turn, as a deflate thread raising bodies goes.
                (5, 50_000),
                (9, 3_000),
                (5, 70),
                (9, 12_345),
            ] {
                let body = compress(&text[..len], level);
                let mut back = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut back)
                    .expect("valid gzip");
                assert_eq!(back, &text[..len], "{name}, level {level}, {len} bytes");
                if len > 1_000 && level > 0 {
                    assert!(body.len() < len / 4, "{name} level {level} compresses");
                }
            }
        }
    }

    fn scripted(
        answers: Vec<Attempt>,
    ) -> impl FnMut(u32) -> std::future::Ready<(Attempt, Option<()>)> {
        let answers = RefCell::new(answers.into_iter());
        move |_| {
            let a = answers
                .borrow_mut()
                .next()
                .unwrap_or(Attempt::Status(200, None));
            std::future::ready((a, None))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_and_retry_after_on_paused_time() {
        let t0 = tokio::time::Instant::now();
        let mut waits = Vec::new();
        let (d, _, attempts) = retry_loop(
            &Backoff::new(Duration::from_secs(300)),
            scripted(vec![
                Attempt::Status(503, None),
                Attempt::Status(429, Some("7".into())),
                Attempt::ConnectError,
                Attempt::Timeout,
                Attempt::Status(200, None),
            ]),
            || 1.0,
            |_, w| waits.push(w),
        )
        .await;
        assert_eq!(d, Decision::Done);
        assert_eq!(attempts, 5);
        // Full jitter at its top: 0.5 s, then Retry-After 7 s and its random part at the top
        // (half of it, 3.5 s), then 2 s, 4 s.
        let want = [500, 10_500, 2000, 4000].map(Duration::from_millis);
        assert_eq!(waits, want);
        assert_eq!(t0.elapsed(), want.iter().sum::<Duration>());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_ends_the_loop() {
        let t0 = tokio::time::Instant::now();
        let (d, _, attempts) = retry_loop(
            &Backoff::new(Duration::from_secs(5)),
            scripted(vec![Attempt::Status(500, None); 100]),
            || 1.0,
            |_, _| {},
        )
        .await;
        assert_eq!(d, Decision::GiveUp(GiveUpReason::RetryBudgetExhausted));
        // 0.5 + 1 + 2 = 3.5 s waited; the next 4 s would pass the 5 s budget.
        assert_eq!(attempts, 4);
        assert_eq!(t0.elapsed(), Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_and_413_end_at_once() {
        for (code, want) in [
            (400, Decision::GiveUp(GiveUpReason::Rejected(400))),
            (401, Decision::GiveUp(GiveUpReason::Rejected(401))),
            (404, Decision::GiveUp(GiveUpReason::Rejected(404))),
            (413, Decision::Split),
        ] {
            let t0 = tokio::time::Instant::now();
            let (d, _, attempts) = retry_loop(
                &Backoff::new(Duration::from_secs(300)),
                scripted(vec![Attempt::Status(code, None)]),
                || 0.5,
                |_, _| {},
            )
            .await;
            assert_eq!((d, attempts), (want, 1));
            assert_eq!(t0.elapsed(), Duration::ZERO);
        }
    }

    /// A transport sending to `app`, served on 127.0.0.1 for the rest of the test.
    async fn transport_to(app: axum::Router) -> Transport {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let cfg = Config::builder()
            .without_env()
            .endpoint(&url)
            .build()
            .unwrap();
        Transport::new(&cfg, Arc::new(Counters::default())).unwrap()
    }

    /// While summaries wait for an upload slot, a detail upload makes no attempt; once they
    /// are gone it goes.
    #[tokio::test]
    async fn detail_waits_while_summaries_wait_for_a_slot() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            h.fetch_add(1, Ordering::SeqCst);
            async { axum::http::StatusCode::OK }
        });
        let t = Arc::new(transport_to(app).await);
        t.summaries_queued(true);
        t.summaries_queued(true); // said twice, held once
        let t2 = t.clone();
        let mut detail = tokio::spawn(async move {
            t2.deliver(Lane::Detail, t2.encode(b"{}"), "c:detail:0")
                .await
        });
        // Bounded look for what must not happen: an attempt while summaries wait.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut detail)
                .await
                .is_err()
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        t.summaries_queued(false);
        assert_eq!(detail.await.unwrap(), Delivery::Acked);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(*t.cores_retrying.borrow(), 0);
    }

    /// `deliver_timed` reports the acknowledged attempt's time, not the failed attempt's and
    /// the backoff before it. A receiver answers the first attempt 503 after 300 ms and the
    /// second at once.
    #[tokio::test]
    async fn deliver_timed_reports_the_last_attempt_only() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let h = h.clone();
            async move {
                if h.fetch_add(1, Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        });
        let t = transport_to(app).await;
        let started = std::time::Instant::now();
        let (d, took) = t
            .deliver_timed(Lane::Detail, t.encode(b"{}"), "c:detail:0")
            .await;
        let total = started.elapsed();
        assert_eq!(d, Delivery::Acked);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert!(total >= Duration::from_millis(300), "{total:?}");
        assert!(took < Duration::from_millis(300), "{took:?} of {total:?}");
    }
}
