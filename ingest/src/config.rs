//! Server configuration: every environment variable next to its default.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::IngestError;

/// Environment variable for the listen address (default [`DEFAULT_ADDR`]).
pub const ENV_ADDR: &str = "CALLSCOPE_INGEST_ADDR";
/// Default listen address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:4380";
/// Environment variable for the database URL (default [`DEFAULT_DATABASE_URL`]).
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// Default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://callscope.db";
/// Environment variable holding the accepted API keys, comma separated.
pub const ENV_API_KEYS: &str = "CALLSCOPE_INGEST_API_KEYS";
/// Environment variable for the largest accepted request body on the wire, in bytes.
pub const ENV_MAX_BODY_BYTES: &str = "CALLSCOPE_INGEST_MAX_BODY_BYTES";
/// Default largest request body on the wire: 6,000,000 bytes (the AWS Lambda synchronous limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 6_000_000;
/// Environment variable for the largest accepted body after gzip decompression, in bytes.
pub const ENV_MAX_DECOMPRESSED_BYTES: &str = "CALLSCOPE_INGEST_MAX_DECOMPRESSED_BYTES";
/// Default largest body after decompression: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 64 * 1024 * 1024;
/// Environment variable for the `POST /v1/calls` requests handled at once.
pub const ENV_MAX_IN_FLIGHT: &str = "CALLSCOPE_INGEST_MAX_IN_FLIGHT";
/// Default of [`ENV_MAX_IN_FLIGHT`]: 128 requests, a quarter of them kept for core call logs.
/// One callscope processor at its busiest has up to 128 summaries and
/// `CALLSCOPE_MAX_CONCURRENT_DETAIL` (default 2) detail uploads in flight: a receiver for many
/// processors raises it, as far as its memory allows (see [`IngestConfig::max_in_flight`]).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;
/// Largest accepted [`ENV_MAX_IN_FLIGHT`].
pub const MAX_MAX_IN_FLIGHT: usize = 65_536;
/// Environment variable for the bytes of request bodies held at once.
pub const ENV_MAX_BUFFERED_BYTES: &str = "CALLSCOPE_INGEST_MAX_BUFFERED_BYTES";
/// Default of [`ENV_MAX_BUFFERED_BYTES`]: 1 GiB, a quarter of it kept for core call logs.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 1024 * 1024 * 1024;
/// Environment variable for how long a request body may send nothing, in milliseconds.
pub const ENV_BODY_TIMEOUT_MS: &str = "CALLSCOPE_INGEST_BODY_TIMEOUT_MS";
/// Default of [`ENV_BODY_TIMEOUT_MS`]: 30 s without a byte of the body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted [`ENV_BODY_TIMEOUT_MS`]: one hour.
pub const MAX_BODY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Everything the server needs to run.
///
/// Build it with [`IngestConfig::new`] (code) or [`IngestConfig::from_env`] (environment), then
/// override fields as needed; code wins over the environment.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Address to listen on; port 0 picks a free port. Env [`ENV_ADDR`], default [`DEFAULT_ADDR`].
    pub addr: SocketAddr,
    /// `sqlite://path` (created if missing) or `postgres://…`/`postgresql://…`.
    /// Env [`ENV_DATABASE_URL`], default [`DEFAULT_DATABASE_URL`].
    pub database_url: String,
    /// Accepted API keys, sent as `Authorization: Bearer <key>` or `x-api-key: <key>`.
    /// Env [`ENV_API_KEYS`] (comma separated). Empty means the server refuses to start unless
    /// [`no_auth`](Self::no_auth) is set.
    pub api_keys: Vec<String>,
    /// Accept requests without an API key. Only for local development and tests.
    pub no_auth: bool,
    /// Largest request body on the wire (compressed or not); larger bodies get 413.
    /// Env [`ENV_MAX_BODY_BYTES`], default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Largest body after gzip decompression; larger bodies (e.g. gzip bombs) get 413.
    /// Env [`ENV_MAX_DECOMPRESSED_BYTES`], default [`DEFAULT_MAX_DECOMPRESSED_BYTES`].
    pub max_decompressed_bytes: usize,
    /// `POST /v1/calls` requests handled at once, from reading the body to the end of its
    /// write (a write goes on, and counts, after its sender hung up). A request past it gets
    /// 503 with `Retry-After` at once, before its body is read. A quarter of the places (at least
    /// one, given two or more) are kept for core call logs (`Idempotency-Key: <call_id>:core`):
    /// a detail batch is refused when only those are free, so phase 1 does not wait behind
    /// detail.
    /// So the server holds at most this many request bodies at once, each up to
    /// [`max_body_bytes`](Self::max_body_bytes) on the wire and
    /// [`max_decompressed_bytes`](Self::max_decompressed_bytes) decoded, plus its parsed form.
    /// From 1 to [`MAX_MAX_IN_FLIGHT`]. Env [`ENV_MAX_IN_FLIGHT`], default
    /// [`DEFAULT_MAX_IN_FLIGHT`]. [`max_buffered_bytes`](Self::max_buffered_bytes) bounds the
    /// bytes those bodies hold.
    pub max_in_flight: usize,
    /// Bytes of `POST /v1/calls` bodies and their parsed rows the server holds at once. Each
    /// request counts, as soon as its head arrives, its `Content-Length` and, for a gzip body,
    /// four times that (what it is expected to decode to, up to
    /// [`max_decompressed_bytes`](Self::max_decompressed_bytes)); then any bytes past those as
    /// they arrive or are decoded; while it is parsed, five times its decoded size (the body and
    /// its rows); then its rows' estimated heap until its write is over. A request that would
    /// go past it gets 503 with `Retry-After`, before its body is read unless it has no
    /// `Content-Length` or decodes to more than expected. Detail batches may fill three
    /// quarters of it, core call logs all of it. A request alone in the server always passes,
    /// so a body larger than this still gets in when nothing else is held. Env
    /// [`ENV_MAX_BUFFERED_BYTES`], default [`DEFAULT_MAX_BUFFERED_BYTES`].
    pub max_buffered_bytes: usize,
    /// How long a request body may send nothing before the request is answered 408 and its
    /// place freed (a sender that stalls or vanishes mid-upload must not hold a place, or
    /// keep a graceful shutdown waiting, for ever). From 1 ms to [`MAX_BODY_TIMEOUT`].
    /// Env [`ENV_BODY_TIMEOUT_MS`], default [`DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
}

impl IngestConfig {
    /// A configuration for `database_url` listening on `127.0.0.1:0` (a free port), with no API
    /// keys, authentication required (so set [`api_keys`](Self::api_keys) or
    /// [`no_auth`](Self::no_auth)) and the default limits. Reads no environment.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.into(),
            api_keys: Vec::new(),
            no_auth: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }

    /// Reads the configuration from the environment variables named by the `ENV_*` constants,
    /// using the defaults for unset ones.
    ///
    /// # Errors
    /// [`IngestError::Config`] naming the variable when a value does not parse.
    pub fn from_env() -> Result<Self, IngestError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env) but reads variables through `lookup` (testable).
    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, IngestError> {
        let addr_text = lookup(ENV_ADDR).unwrap_or_else(|| DEFAULT_ADDR.to_owned());
        let addr = parse_addr(ENV_ADDR, &addr_text)?;
        let database_url =
            lookup(ENV_DATABASE_URL).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        let api_keys = lookup(ENV_API_KEYS)
            .map(|v| parse_api_keys(&v))
            .unwrap_or_default();
        let max_body_bytes = setting(
            &lookup,
            ENV_MAX_BODY_BYTES,
            parse_bytes,
            DEFAULT_MAX_BODY_BYTES,
        )?;
        let max_decompressed_bytes = setting(
            &lookup,
            ENV_MAX_DECOMPRESSED_BYTES,
            parse_bytes,
            DEFAULT_MAX_DECOMPRESSED_BYTES,
        )?;
        let max_in_flight = setting(
            &lookup,
            ENV_MAX_IN_FLIGHT,
            parse_in_flight,
            DEFAULT_MAX_IN_FLIGHT,
        )?;
        let max_buffered_bytes = setting(
            &lookup,
            ENV_MAX_BUFFERED_BYTES,
            parse_bytes,
            DEFAULT_MAX_BUFFERED_BYTES,
        )?;
        let body_timeout = setting(
            &lookup,
            ENV_BODY_TIMEOUT_MS,
            parse_body_timeout,
            DEFAULT_BODY_TIMEOUT,
        )?;
        Ok(Self {
            addr,
            database_url,
            api_keys,
            no_auth: false,
            max_body_bytes,
            max_decompressed_bytes,
            max_in_flight,
            max_buffered_bytes,
            body_timeout,
        })
    }

    /// Checks what the environment's parsing checks, for a configuration built in code.
    ///
    /// # Errors
    /// [`IngestError::Config`] naming the setting out of range.
    pub(crate) fn validate(&self) -> Result<(), IngestError> {
        parse_in_flight(ENV_MAX_IN_FLIGHT, &self.max_in_flight.to_string())?;
        parse_bytes(ENV_MAX_BUFFERED_BYTES, &self.max_buffered_bytes.to_string())?;
        parse_body_timeout(
            ENV_BODY_TIMEOUT_MS,
            &self.body_timeout.as_millis().to_string(),
        )?;
        Ok(())
    }
}

/// Variable `var` read through `lookup` and parsed by `parse`, or `default` when it is unset.
fn setting<T>(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    parse: impl Fn(&'static str, &str) -> Result<T, IngestError>,
    default: T,
) -> Result<T, IngestError> {
    lookup(var).map_or(Ok(default), |v| parse(var, &v))
}

/// Splits a comma list of API keys, trimming blanks and dropping empty entries.
pub fn parse_api_keys(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses a listen address, naming `var` in the error.
pub(crate) fn parse_addr(var: &'static str, value: &str) -> Result<SocketAddr, IngestError> {
    value.trim().parse().map_err(|_| IngestError::Config {
        var,
        value: value.to_owned(),
        expected: "a socket address such as 127.0.0.1:4380",
    })
}

/// Parses a positive byte count, naming `var` in the error.
pub(crate) fn parse_bytes(var: &'static str, value: &str) -> Result<usize, IngestError> {
    parse_count(
        var,
        value,
        usize::MAX,
        "a positive number of bytes such as 6000000",
    )
}

/// Parses a number of requests in flight, naming `var` in the error.
pub(crate) fn parse_in_flight(var: &'static str, value: &str) -> Result<usize, IngestError> {
    parse_count(var, value, MAX_MAX_IN_FLIGHT, "an integer from 1 to 65536")
}

/// Parses a body timeout in milliseconds, naming `var` in the error.
pub(crate) fn parse_body_timeout(var: &'static str, value: &str) -> Result<Duration, IngestError> {
    let max = usize::try_from(MAX_BODY_TIMEOUT.as_millis()).unwrap_or(usize::MAX);
    let ms = parse_count(var, value, max, "milliseconds from 1 to 3600000")?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
}

/// Parses an integer from 1 to `max` (`_` separators allowed), naming `var` in the error.
fn parse_count(
    var: &'static str,
    value: &str,
    max: usize,
    expected: &'static str,
) -> Result<usize, IngestError> {
    match value.trim().replace('_', "").parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(IngestError::Config {
            var,
            value: value.to_owned(),
            expected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_nothing_is_set() {
        let c = IngestConfig::from_lookup(|_| None).expect("defaults parse");
        assert_eq!(c.addr.to_string(), DEFAULT_ADDR);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert!(c.api_keys.is_empty());
        assert!(!c.no_auth);
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.max_decompressed_bytes, DEFAULT_MAX_DECOMPRESSED_BYTES);
        assert_eq!(c.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(c.max_buffered_bytes, DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(c.body_timeout, DEFAULT_BODY_TIMEOUT);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn reads_every_variable() {
        let c = IngestConfig::from_lookup(|name| {
            Some(
                match name {
                    ENV_ADDR => "0.0.0.0:9000",
                    ENV_DATABASE_URL => "postgres://u@h/db",
                    ENV_API_KEYS => " a, b ,,c",
                    ENV_MAX_BODY_BYTES => "1_000",
                    ENV_MAX_DECOMPRESSED_BYTES => "2000",
                    ENV_MAX_IN_FLIGHT => "8",
                    ENV_MAX_BUFFERED_BYTES => "3_000",
                    ENV_BODY_TIMEOUT_MS => "250",
                    _ => return None,
                }
                .to_owned(),
            )
        })
        .expect("values parse");
        assert_eq!(c.addr.port(), 9000);
        assert_eq!(c.database_url, "postgres://u@h/db");
        assert_eq!(c.api_keys, vec!["a", "b", "c"]);
        assert_eq!(c.max_body_bytes, 1000);
        assert_eq!(c.max_decompressed_bytes, 2000);
        assert_eq!(c.max_in_flight, 8);
        assert_eq!(c.max_buffered_bytes, 3000);
        assert_eq!(c.body_timeout, Duration::from_millis(250));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = IngestConfig::from_lookup(|name| {
            (name == ENV_MAX_BODY_BYTES).then(|| "lots".to_owned())
        })
        .expect_err("must fail");
        assert!(err.to_string().contains(ENV_MAX_BODY_BYTES), "{err}");
        let err = IngestConfig::from_lookup(|name| (name == ENV_ADDR).then(|| "nope".to_owned()))
            .expect_err("must fail");
        assert!(err.to_string().contains(ENV_ADDR), "{err}");
        for bad in ["0", "65537", "-1", "many"] {
            let err = IngestConfig::from_lookup(|name| {
                (name == ENV_MAX_IN_FLIGHT).then(|| bad.to_owned())
            })
            .expect_err("must fail");
            assert!(err.to_string().contains(ENV_MAX_IN_FLIGHT), "{bad}: {err}");
        }
        assert!(
            IngestConfig::from_lookup(|name| {
                (name == ENV_MAX_IN_FLIGHT).then(|| "65536".to_owned())
            })
            .is_ok()
        );
        for bad in ["0", "3600001", "1.5s"] {
            let err = IngestConfig::from_lookup(|name| {
                (name == ENV_BODY_TIMEOUT_MS).then(|| bad.to_owned())
            })
            .expect_err("must fail");
            assert!(
                err.to_string().contains(ENV_BODY_TIMEOUT_MS),
                "{bad}: {err}"
            );
        }
        // Set in code instead: `serve` checks the same ranges.
        let mut c = IngestConfig::new("sqlite://x.db");
        c.max_in_flight = 0;
        let err = c.validate().expect_err("0 places");
        assert!(err.to_string().contains(ENV_MAX_IN_FLIGHT), "{err}");
        let mut c = IngestConfig::new("sqlite://x.db");
        c.body_timeout = Duration::ZERO;
        let err = c.validate().expect_err("no time for a body");
        assert!(err.to_string().contains(ENV_BODY_TIMEOUT_MS), "{err}");
        let mut c = IngestConfig::new("sqlite://x.db");
        c.max_buffered_bytes = 0;
        let err = c.validate().expect_err("no byte for a body");
        assert!(err.to_string().contains(ENV_MAX_BUFFERED_BYTES), "{err}");
    }

    #[test]
    fn new_listens_on_a_free_port() {
        let c = IngestConfig::new("sqlite://x.db");
        assert_eq!(c.addr.port(), 0);
        assert!(c.api_keys.is_empty());
    }
}
