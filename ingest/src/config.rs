//! Server configuration: every environment variable next to its default.

use std::net::SocketAddr;

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
        let max_body_bytes = match lookup(ENV_MAX_BODY_BYTES) {
            Some(v) => parse_bytes(ENV_MAX_BODY_BYTES, &v)?,
            None => DEFAULT_MAX_BODY_BYTES,
        };
        let max_decompressed_bytes = match lookup(ENV_MAX_DECOMPRESSED_BYTES) {
            Some(v) => parse_bytes(ENV_MAX_DECOMPRESSED_BYTES, &v)?,
            None => DEFAULT_MAX_DECOMPRESSED_BYTES,
        };
        Ok(Self {
            addr,
            database_url,
            api_keys,
            no_auth: false,
            max_body_bytes,
            max_decompressed_bytes,
        })
    }
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
    match value.trim().replace('_', "").parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(IngestError::Config {
            var,
            value: value.to_owned(),
            expected: "a positive number of bytes such as 6000000",
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
    }

    #[test]
    fn new_listens_on_a_free_port() {
        let c = IngestConfig::new("sqlite://x.db");
        assert_eq!(c.addr.port(), 0);
        assert!(c.api_keys.is_empty());
    }
}
