//! HTTP delivery: one POST with headers, compression and the idempotency key, retried by the
//! pure policy in `retry.rs`. Runs on the worker's runtime only.

use std::io::Write;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
};
use reqwest::{Client, Url};

use crate::config::{Compression, Config};
use crate::retry::{self, Backoff, Decision, GiveUpReason, Outcome};
use crate::stats::Counters;

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

/// The HTTP side of the worker.
#[derive(Debug)]
pub(crate) struct Transport {
    client: Client,
    core_url: Url,
    detail_url: Url,
    headers: HeaderMap,
    gzip: bool,
    backoff: Backoff,
    stats: Arc<Counters>,
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
                headers.insert(k, v);
            }
        }
        if let Some(key) = &cfg.api_key {
            if let Ok(mut v) = HeaderValue::try_from(format!("Bearer {key}")) {
                v.set_sensitive(true);
                headers.insert(AUTHORIZATION, v);
            }
        }
        let gzip = matches!(cfg.compression, Compression::Gzip);
        if gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let client = Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Transport {
            client,
            core_url: cfg.endpoint.clone(),
            detail_url: cfg.detailed_endpoint.clone(),
            headers,
            gzip,
            backoff: Backoff::new(cfg.retry_max_elapsed),
            stats,
        })
    }

    /// The body as it goes on the wire (gzip at a fast level: JSON compresses well anyway).
    pub(crate) fn encode(&self, json: &[u8]) -> Vec<u8> {
        Counters::add(&self.stats.bytes_uncompressed, json.len() as u64);
        if !self.gzip {
            return json.to_vec();
        }
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(json.len() / 6 + 64),
            flate2::Compression::fast(),
        );
        // Writing into a Vec cannot fail.
        let _ = enc.write_all(json);
        enc.finish().unwrap_or_default()
    }

    /// POSTs `body` (already encoded) until acknowledged, rejected, or the retry budget is spent.
    pub(crate) async fn deliver(&self, lane: Lane, body: Bytes, idempotency_key: &str) -> Delivery {
        let url = match lane {
            Lane::Core => &self.core_url,
            Lane::Detail => &self.detail_url,
        };
        let started = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let sent = self
                .client
                .post(url.clone())
                .headers(self.headers.clone())
                .header("idempotency-key", idempotency_key)
                .body(body.clone())
                .send()
                .await;
            Counters::add(&self.stats.bytes_sent, body.len() as u64);
            let (retry_after, response, transport_error) = match sent {
                Ok(resp) => {
                    let ra = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    (ra, Some(resp), None)
                }
                Err(e) => {
                    tracing::debug!(error = %e, %url, "request failed");
                    let kind = if e.is_timeout() {
                        Outcome::Timeout
                    } else if e.is_connect() {
                        Outcome::ConnectError
                    } else {
                        Outcome::OtherTransportError
                    };
                    (None, None, Some(kind))
                }
            };
            let outcome = match (&response, transport_error) {
                (Some(r), _) => Outcome::Status {
                    code: r.status().as_u16(),
                    retry_after: retry_after.as_deref(),
                },
                (None, Some(kind)) => kind,
                (None, None) => Outcome::OtherTransportError,
            };
            let decision = retry::decide(
                &outcome,
                attempt,
                started.elapsed(),
                &self.backoff,
                SystemTime::now(),
                fastrand::f64(),
            );
            match decision {
                Decision::Done => return Delivery::Acked,
                Decision::Split => return Delivery::TooLarge,
                Decision::RetryAfter(wait) => {
                    Counters::inc(&self.stats.requests_retried);
                    tracing::debug!(?wait, attempt, key = idempotency_key, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt = attempt.saturating_add(1);
                }
                Decision::GiveUp(reason) => {
                    let snippet = match response {
                        Some(r) => body_snippet(r).await,
                        None => String::new(),
                    };
                    match reason {
                        GiveUpReason::Rejected(code) => tracing::error!(
                            status = code,
                            key = idempotency_key,
                            response = %snippet,
                            "receiver rejected the payload; not retrying"
                        ),
                        _ => tracing::error!(
                            key = idempotency_key,
                            attempts = attempt + 1,
                            "giving up after retries (CALLSCOPE_RETRY_MAX_ELAPSED_MS)"
                        ),
                    }
                    return Delivery::Failed;
                }
            }
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
