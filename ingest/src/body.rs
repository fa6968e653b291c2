//! Reading request bodies under a byte limit and a budget shared by all requests, and bounded
//! gzip decompression.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum BodyError {
    /// The body is larger than allowed (`stage` says where: on the wire or decompressed).
    #[error("request body exceeds {limit} bytes {stage}; split the batch into smaller requests")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
        /// `"on the wire"` or `"after gzip decompression"`.
        stage: &'static str,
    },
    /// A `Content-Encoding` other than gzip or identity.
    #[error("unsupported Content-Encoding {0:?}; send gzip or an uncompressed body")]
    UnsupportedEncoding(String),
    /// The gzip stream is corrupt.
    #[error("invalid gzip body ({0}); compress the whole body with gzip")]
    BadGzip(String),
    /// The connection failed while reading.
    #[error("could not read the request body: {0}")]
    Read(String),
    /// No byte of the body arrived for this long.
    #[error(
        "no byte of the request body arrived for {0:?} (CALLSCOPE_INGEST_BODY_TIMEOUT_MS); \
         send the request again"
    )]
    Stalled(std::time::Duration),
    /// Holding the body would take the server past its budget of body bytes.
    #[error(
        "the server holds as many request bytes as it takes ({cap} bytes, \
         CALLSCOPE_INGEST_MAX_BUFFERED_BYTES, a quarter of them kept for core call logs); \
         retry after the Retry-After delay"
    )]
    Busy {
        /// The budget in bytes.
        cap: usize,
    },
}

/// Bytes of request bodies the server holds at once ([`IngestConfig::max_buffered_bytes`]),
/// taken by each request through its [`Held`] as its body arrives and is decoded.
///
/// [`IngestConfig::max_buffered_bytes`]: crate::IngestConfig::max_buffered_bytes
#[derive(Debug)]
pub(crate) struct BodyBudget {
    used: AtomicUsize,
    cap: usize,
    /// Requests refused because their bytes did not fit.
    refused: AtomicU64,
}

impl BodyBudget {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            cap,
            refused: AtomicU64::new(0),
        })
    }

    /// A request's share, empty so far: a core call log may fill the whole budget, anything
    /// else three quarters of it.
    pub(crate) fn hold(self: &Arc<Self>, core: bool) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
            limit: if core {
                self.cap
            } else {
                self.cap - self.cap / 4
            },
        }
    }

    /// Bytes held now by all requests.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Requests refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The bytes one request holds of the [`BodyBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
    limit: usize,
}

impl Held {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes `n` more bytes, or refuses ([`BodyError::Busy`]) when the budget would go past
    /// this request's limit. A request holding everything taken (alone in the server) always
    /// gets them, so one body larger than the budget still passes an idle server.
    pub(crate) fn grow(&mut self, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let used = &self.budget.used;
        let mut now = used.load(Ordering::Acquire);
        loop {
            let others = now.saturating_sub(self.bytes);
            let after = now.checked_add(n);
            if after.is_none() || (others > 0 && after > Some(self.limit)) {
                let refused = self.budget.refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    max_buffered_bytes = self.budget.cap,
                    held = now,
                    wanted = n,
                    refused,
                    "request refused: the server holds as many body bytes as it takes"
                );
                return Err(BodyError::Busy {
                    cap: self.budget.cap,
                });
            }
            match used.compare_exchange_weak(now, now + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        self.bytes += n;
        Ok(())
    }

    /// Holds `n` bytes in all (takes more or gives some back).
    pub(crate) fn set(&mut self, n: usize) -> Result<(), BodyError> {
        if n > self.bytes {
            return self.grow(n - self.bytes);
        }
        self.budget.used.fetch_sub(self.bytes - n, Ordering::AcqRel);
        self.bytes = n;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// Reads `body` (`declared` bytes long, when its length was declared) into memory, failing as
/// soon as it exceeds `limit` bytes, no byte of it arrives for `idle` (a stalled sender must not
/// hold its place in the server forever), or `held` cannot take the bytes read (what it holds
/// already, e.g. the declared length, counts).
pub(crate) async fn read_limited(
    mut body: Body,
    limit: usize,
    idle: std::time::Duration,
    held: &mut Held,
    declared: usize,
) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge {
        limit,
        stage: "on the wire",
    };
    // The declared length (not what `held` holds, which counts the decoded bytes expected
    // too), up to a bound: what is allocated before the bytes come is not left to the sender.
    let mut buf = Vec::with_capacity(declared.min(limit).min(MAX_PREALLOCATED));
    loop {
        let Ok(frame) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(BodyError::Stalled(idle));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| read_error(&e, limit))?;
        if let Ok(data) = frame.into_data() {
            let len = buf.len() + data.len();
            if len > limit {
                return Err(too_large);
            }
            if len > held.bytes() {
                held.set(len)?;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

/// The body reader may already enforce a limit (tower-http); report that as too large too.
fn read_error(e: &axum::Error, limit: usize) -> BodyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return BodyError::TooLarge {
                limit,
                stage: "on the wire",
            };
        }
        source = err.source();
    }
    BodyError::Read(e.to_string())
}

/// Most bytes of decompressed body taken from the budget at a time.
const DECODE_STEP: usize = 1024 * 1024;
/// Fewest bytes of decompressed body taken at a time (the steps grow with the body).
const MIN_DECODE_STEP: usize = 64 * 1024;
/// Most bytes allocated for a body before they arrive (its declared length, up to this).
const MAX_PREALLOCATED: usize = 8 * 1024 * 1024;
/// Decompressed bytes per wire byte a gzip body is expected to hold (callscope's JSON
/// deflates to about 0.2–0.32 of its size): [`expected_decoded`] reserves that much before
/// the body is read.
const GZIP_EXPANSION: usize = 4;

/// Bytes a body declared at `wire` bytes is expected to hold decoded under `content_encoding`,
/// beyond its wire bytes (up to `max_decompressed`): taken from the budget before the body is
/// read, so that a post the budget cannot hold is refused before its upload.
pub(crate) fn expected_decoded(
    wire: usize,
    content_encoding: Option<&str>,
    max_decompressed: usize,
) -> usize {
    match content_encoding
        .map(|e| e.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("gzip" | "x-gzip") => wire.saturating_mul(GZIP_EXPANSION).min(max_decompressed),
        _ => 0,
    }
}

/// Undoes `Content-Encoding` (gzip or none), producing at most `max_decompressed` bytes;
/// `held` then holds the decoded body's length (the wire bytes are given back).
///
/// Decompression streams into a buffer capped at `max_decompressed + 1` bytes, so a gzip bomb
/// costs at most that much memory before it is rejected; `held` holds the wire bytes and
/// the decoded ones, each step of them taken before it is decompressed (beyond what `held`
/// took already, see [`expected_decoded`]).
pub(crate) fn decode(
    bytes: Bytes,
    content_encoding: Option<&str>,
    max_decompressed: usize,
    held: &mut Held,
) -> Result<Bytes, BodyError> {
    let encoding = content_encoding.map(|e| e.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("" | "identity") => {
            if bytes.len() > max_decompressed {
                return Err(BodyError::TooLarge {
                    limit: max_decompressed,
                    stage: "after gzip decompression",
                });
            }
            held.set(bytes.len())?;
            Ok(bytes)
        }
        Some("gzip" | "x-gzip") => {
            let cap = max_decompressed.saturating_add(1);
            let wire = bytes.len();
            let mut decoder = flate2::read::MultiGzDecoder::new(bytes.as_ref());
            let mut out = Vec::new();
            while out.len() < cap {
                let step = out
                    .len()
                    .clamp(MIN_DECODE_STEP, DECODE_STEP)
                    .min(cap - out.len());
                let need = wire + out.len() + step;
                if need > held.bytes() {
                    held.set(need)?;
                }
                out.reserve_exact(step);
                let n = (&mut decoder)
                    .take(step as u64)
                    .read_to_end(&mut out)
                    .map_err(|e| BodyError::BadGzip(e.to_string()))?;
                if n < step {
                    break;
                }
            }
            if out.len() > max_decompressed {
                return Err(BodyError::TooLarge {
                    limit: max_decompressed,
                    stage: "after gzip decompression",
                });
            }
            drop(decoder);
            drop(bytes);
            out.shrink_to_fit();
            held.set(out.len())?;
            Ok(Bytes::from(out))
        }
        Some(other) => Err(BodyError::UnsupportedEncoding(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

    /// A share of a budget nothing else uses.
    fn free() -> Held {
        BodyBudget::new(usize::MAX).hold(false)
    }

    fn gzip(data: &[u8]) -> Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("write");
        Bytes::from(enc.finish().expect("finish"))
    }

    #[test]
    fn plain_bodies_pass_through() {
        let out = decode(Bytes::from_static(b"{}"), None, 10, &mut free()).expect("fits");
        assert_eq!(out.as_ref(), b"{}");
        let out =
            decode(Bytes::from_static(b"{}"), Some("identity"), 10, &mut free()).expect("fits");
        assert_eq!(out.as_ref(), b"{}");
    }

    #[test]
    fn gzip_round_trips() {
        let out = decode(gzip(b"{\"a\":1}"), Some("GZIP"), 100, &mut free()).expect("fits");
        assert_eq!(out.as_ref(), b"{\"a\":1}");
    }

    #[test]
    fn gzip_bomb_is_cut_at_the_cap() {
        let bomb = gzip(&vec![b'a'; 10_000_000]);
        assert!(bomb.len() < 20_000, "bomb compresses well");
        let err = decode(bomb, Some("gzip"), 1_000_000, &mut free()).expect_err("bomb");
        assert!(matches!(
            err,
            BodyError::TooLarge {
                limit: 1_000_000,
                ..
            }
        ));
    }

    #[test]
    fn exactly_at_the_cap_is_accepted() {
        let out = decode(gzip(&[b'x'; 100]), Some("gzip"), 100, &mut free()).expect("fits");
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn corrupt_gzip_and_unknown_encodings_are_rejected() {
        assert!(matches!(
            decode(
                Bytes::from_static(b"not gzip"),
                Some("gzip"),
                100,
                &mut free()
            ),
            Err(BodyError::BadGzip(_))
        ));
        assert_eq!(
            decode(Bytes::from_static(b"x"), Some("br"), 100, &mut free()),
            Err(BodyError::UnsupportedEncoding("br".to_owned()))
        );
    }

    #[tokio::test]
    async fn read_limited_stops_at_the_limit() {
        let ok = read_limited(Body::from(vec![0u8; 10]), 10, IDLE, &mut free(), 10)
            .await
            .expect("fits");
        assert_eq!(ok.len(), 10);
        let err = read_limited(Body::from(vec![0u8; 11]), 10, IDLE, &mut free(), 11)
            .await
            .expect_err("too large");
        assert!(matches!(err, BodyError::TooLarge { limit: 10, .. }));
    }

    #[test]
    fn detail_fills_three_quarters_of_the_budget_and_cores_all_of_it() {
        let budget = BodyBudget::new(1000);
        let mut first = budget.hold(false);
        first.grow(700).expect("the first request");
        let mut detail = budget.hold(false);
        detail.grow(50).expect("up to 750");
        assert_eq!(
            detail.grow(1).expect_err("past three quarters"),
            BodyError::Busy { cap: 1000 }
        );
        let mut core = budget.hold(true);
        core.grow(250).expect("a core takes the last quarter");
        assert!(core.grow(1).is_err(), "nothing is left past the budget");
        assert_eq!(budget.used(), 1000);
        assert_eq!(budget.refused(), 2);
        // What a request held goes back when it is dropped, or when it holds less.
        drop(first);
        assert_eq!(budget.used(), 300);
        core.set(10).expect("shrinking never fails");
        assert_eq!(budget.used(), 60);
        detail.grow(690).expect("room again");
        drop((detail, core));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_request_alone_passes_whatever_its_size() {
        let budget = BodyBudget::new(100);
        let mut alone = budget.hold(false);
        alone.grow(80).expect("alone");
        alone.grow(1000).expect("still alone");
        let mut other = budget.hold(true);
        assert!(other.grow(1).is_err(), "a second request waits for room");
        drop(alone);
        other.grow(1).expect("room after the first is done");
    }

    #[test]
    fn decoding_takes_the_decompressed_bytes_from_the_budget_and_gives_the_wire_back() {
        let data = vec![b'y'; 3 * DECODE_STEP + 7];
        let body = gzip(&data);
        let wire = body.len();
        let budget = BodyBudget::new(usize::MAX);
        let mut held = budget.hold(false);
        held.grow(wire).expect("the wire bytes");
        let out = decode(body, Some("gzip"), data.len(), &mut held).expect("fits");
        assert_eq!(out.len(), data.len());
        assert_eq!(held.bytes(), data.len());
        assert_eq!(budget.used(), data.len());
    }

    #[test]
    fn a_small_gzip_body_takes_small_steps() {
        // 200 KiB of room: a fixed 1 MiB step would be refused.
        let budget = BodyBudget::new(4 * DECODE_STEP);
        let mut other = budget.hold(true);
        other
            .grow(3 * DECODE_STEP - 200 * 1024)
            .expect("another request's bytes");
        let data = vec![b'q'; 10_000];
        let body = gzip(&data);
        let mut held = budget.hold(false);
        held.grow(body.len()).expect("the wire bytes");
        let out = decode(body, Some("gzip"), 64 * DECODE_STEP, &mut held).expect("fits");
        assert_eq!(out.as_ref(), &data[..]);
        assert_eq!(held.bytes(), data.len());
    }

    #[test]
    fn gzip_bodies_are_expected_to_decode_to_four_times_their_size() {
        assert_eq!(expected_decoded(1000, Some(" GZIP"), 1 << 20), 4000);
        assert_eq!(expected_decoded(1000, Some("x-gzip"), 3000), 3000);
        assert_eq!(expected_decoded(usize::MAX, Some("gzip"), 5), 5);
        assert_eq!(expected_decoded(1000, None, 1 << 20), 0);
        assert_eq!(expected_decoded(1000, Some("identity"), 1 << 20), 0);
    }

    #[test]
    fn nothing_and_too_much_are_answered_without_harm() {
        let budget = BodyBudget::new(10);
        let mut full = budget.hold(true);
        full.grow(10).expect("alone");
        let mut empty = budget.hold(false);
        empty.grow(0).expect("nothing always fits");
        assert!(full.grow(usize::MAX).is_err(), "past usize::MAX");
        assert_eq!(budget.used(), 10);
        assert_eq!(budget.refused(), 1);
    }

    #[test]
    fn decoding_past_the_budget_is_refused_before_the_step_is_decompressed() {
        let budget = BodyBudget::new(4 * DECODE_STEP);
        let mut other = budget.hold(true);
        other.grow(DECODE_STEP).expect("another request's bytes");
        let body = gzip(&vec![b'z'; 2 * DECODE_STEP]);
        let wire = body.len();
        let mut held = budget.hold(false);
        held.grow(wire).expect("the wire bytes fit");
        let err = decode(body, Some("gzip"), 64 * DECODE_STEP, &mut held).expect_err("busy");
        assert_eq!(
            err,
            BodyError::Busy {
                cap: 4 * DECODE_STEP
            }
        );
        // Steps of 64, 64, 128, 256 and 512 KiB fitted in the 3 MiB detail may fill (1 MiB
        // decoded); the next, 1 MiB more, did not.
        assert_eq!(held.bytes(), wire + DECODE_STEP);
        drop(held);
        assert_eq!(budget.used(), DECODE_STEP);
    }

    #[tokio::test]
    async fn reading_takes_what_arrives_past_the_declared_length() {
        let budget = BodyBudget::new(100);
        let mut other = budget.hold(false);
        other.grow(50).expect("another request");
        let mut held = budget.hold(false);
        held.grow(10).expect("declared 10");
        let ok = read_limited(Body::from(vec![0u8; 20]), 1000, IDLE, &mut held, 10)
            .await
            .expect("fits in the budget");
        assert_eq!((ok.len(), held.bytes()), (20, 20));
        let mut late = budget.hold(false);
        let err = read_limited(Body::from(vec![0u8; 10]), 1000, IDLE, &mut late, 0)
            .await
            .expect_err("past three quarters of 100");
        assert_eq!(err, BodyError::Busy { cap: 100 });
        assert_eq!(late.bytes(), 0);
    }
}
