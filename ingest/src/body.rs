//! Reading request bodies under a byte limit, and bounded gzip decompression.

use std::io::Read;

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
}

/// Reads `body` into memory, failing as soon as it exceeds `limit` bytes or no byte of it
/// arrives for `idle` (a stalled sender must not hold its place in the server forever).
pub(crate) async fn read_limited(
    mut body: Body,
    limit: usize,
    idle: std::time::Duration,
) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge {
        limit,
        stage: "on the wire",
    };
    let mut buf = Vec::new();
    loop {
        let Ok(frame) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(BodyError::Stalled(idle));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| read_error(&e, limit))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large);
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

/// Undoes `Content-Encoding` (gzip or none), producing at most `max_decompressed` bytes.
///
/// Decompression streams into a buffer capped at `max_decompressed + 1` bytes, so a gzip bomb
/// costs at most that much memory before it is rejected.
pub(crate) fn decode(
    bytes: Bytes,
    content_encoding: Option<&str>,
    max_decompressed: usize,
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
            Ok(bytes)
        }
        Some("gzip" | "x-gzip") => {
            let cap = u64::try_from(max_decompressed)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes.as_ref())
                .take(cap)
                .read_to_end(&mut out)
                .map_err(|e| BodyError::BadGzip(e.to_string()))?;
            if out.len() > max_decompressed {
                return Err(BodyError::TooLarge {
                    limit: max_decompressed,
                    stage: "after gzip decompression",
                });
            }
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

    fn gzip(data: &[u8]) -> Bytes {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("write");
        Bytes::from(enc.finish().expect("finish"))
    }

    #[test]
    fn plain_bodies_pass_through() {
        let out = decode(Bytes::from_static(b"{}"), None, 10).expect("fits");
        assert_eq!(out.as_ref(), b"{}");
        let out = decode(Bytes::from_static(b"{}"), Some("identity"), 10).expect("fits");
        assert_eq!(out.as_ref(), b"{}");
    }

    #[test]
    fn gzip_round_trips() {
        let out = decode(gzip(b"{\"a\":1}"), Some("GZIP"), 100).expect("fits");
        assert_eq!(out.as_ref(), b"{\"a\":1}");
    }

    #[test]
    fn gzip_bomb_is_cut_at_the_cap() {
        let bomb = gzip(&vec![b'a'; 10_000_000]);
        assert!(bomb.len() < 20_000, "bomb compresses well");
        let err = decode(bomb, Some("gzip"), 1_000_000).expect_err("bomb");
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
        let out = decode(gzip(&[b'x'; 100]), Some("gzip"), 100).expect("fits");
        assert_eq!(out.len(), 100);
    }

    #[test]
    fn corrupt_gzip_and_unknown_encodings_are_rejected() {
        assert!(matches!(
            decode(Bytes::from_static(b"not gzip"), Some("gzip"), 100),
            Err(BodyError::BadGzip(_))
        ));
        assert_eq!(
            decode(Bytes::from_static(b"x"), Some("br"), 100),
            Err(BodyError::UnsupportedEncoding("br".to_owned()))
        );
    }

    #[tokio::test]
    async fn read_limited_stops_at_the_limit() {
        let ok = read_limited(Body::from(vec![0u8; 10]), 10, IDLE)
            .await
            .expect("fits");
        assert_eq!(ok.len(), 10);
        let err = read_limited(Body::from(vec![0u8; 11]), 10, IDLE)
            .await
            .expect_err("too large");
        assert!(matches!(err, BodyError::TooLarge { limit: 10, .. }));
    }
}
