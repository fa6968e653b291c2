//! Configuration of the span processor: one [`Config`], read from `CALLSCOPE_*` environment
//! variables and/or set in code through [`ConfigBuilder`]. Code wins over the environment.
//!
//! Every variable has an `ENV_*` constant and, where it has one, a `DEFAULT_*` constant next to
//! it. Parsing is strict: a value that is set but invalid is a [`ConfigError`] naming the
//! variable, the value and what is accepted; nothing is silently replaced by a default.
//!
//! Rules shared by all variables:
//! - values are trimmed; an empty (or all-blank) value counts as unset;
//! - integers are plain decimal (`1500`, not `1.5e3` or `1_500`); `*_MS` values are milliseconds
//!   and at most 365 days (365 days), so deadlines computed from them cannot overflow;
//! - booleans accept `true`/`false`/`1`/`0`/`yes`/`no`, case-insensitive;
//! - lists are comma-separated, each entry trimmed, empty entries rejected.
//!
//! Parsing runs over a lookup function (`Fn(&str) -> Option<String>`), so tests never touch the
//! process environment; [`Config::from_env`] and [`ConfigBuilder::build`] plug in the real one.

use std::env::VarError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

// ---------------------------------------------------------------------------------------------
// Variables and defaults
// ---------------------------------------------------------------------------------------------

/// `CALLSCOPE_ENDPOINT`: URL the core call summary (phase 1) is POSTed to. Required unless the
/// processor is disabled; `http://` or `https://` only.
pub const ENV_ENDPOINT: &str = "CALLSCOPE_ENDPOINT";
/// Endpoint used when the processor is disabled and no endpoint is configured. Nothing is ever
/// sent to it (port 9 is the discard port); it only keeps [`Config::endpoint`] non-optional.
pub const DISABLED_PLACEHOLDER_ENDPOINT: &str = "http://127.0.0.1:9/";

/// `CALLSCOPE_DETAILED_ENDPOINT`: URL detail batches (phase 2) are POSTed to. Defaults to the
/// value of `CALLSCOPE_ENDPOINT`.
pub const ENV_DETAILED_ENDPOINT: &str = "CALLSCOPE_DETAILED_ENDPOINT";

/// `CALLSCOPE_API_KEY`: sent as `Authorization: Bearer <key>`. No default (no header).
pub const ENV_API_KEY: &str = "CALLSCOPE_API_KEY";

/// `CALLSCOPE_HEADERS`: extra request headers, `k1=v1,k2=v2`, in the format of
/// `OTEL_EXPORTER_OTLP_HEADERS` (names and values trimmed, values percent-decoded). No default.
pub const ENV_HEADERS: &str = "CALLSCOPE_HEADERS";

/// `CALLSCOPE_AGENT_ID`: `agent_id` in every payload. No default: the resource's
/// `service.name` is used.
pub const ENV_AGENT_ID: &str = "CALLSCOPE_AGENT_ID";

/// `CALLSCOPE_CALL_ID_KEYS`: span attribute / baggage keys that carry the call id, first hit wins.
pub const ENV_CALL_ID_KEYS: &str = "CALLSCOPE_CALL_ID_KEYS";
/// Default of `CALLSCOPE_CALL_ID_KEYS`.
pub const DEFAULT_CALL_ID_KEYS: &[&str] = &[
    "call_id",
    "call.id",
    "session.id",
    "conversation.id",
    "gen_ai.conversation.id",
];

/// `CALLSCOPE_ROOT_SPAN_NAMES`: span names whose end ends the call (a span without a parent
/// always does).
pub const ENV_ROOT_SPAN_NAMES: &str = "CALLSCOPE_ROOT_SPAN_NAMES";
/// Default of `CALLSCOPE_ROOT_SPAN_NAMES`.
pub const DEFAULT_ROOT_SPAN_NAMES: &[&str] = &["agent_session", "conversation", "call"];

/// `CALLSCOPE_CALL_IDLE_TIMEOUT_MS`: a call with no new span for this long is ended (>= 1 ms).
pub const ENV_CALL_IDLE_TIMEOUT_MS: &str = "CALLSCOPE_CALL_IDLE_TIMEOUT_MS";
/// Default of `CALLSCOPE_CALL_IDLE_TIMEOUT_MS`: 60 s.
pub const DEFAULT_CALL_IDLE_TIMEOUT: Duration = Duration::from_millis(60_000);

/// `CALLSCOPE_MAX_OPEN_CALLS`: beyond it the oldest open call is ended early (>= 1).
pub const ENV_MAX_OPEN_CALLS: &str = "CALLSCOPE_MAX_OPEN_CALLS";
/// Default of `CALLSCOPE_MAX_OPEN_CALLS`.
pub const DEFAULT_MAX_OPEN_CALLS: usize = 10_000;

/// `CALLSCOPE_MAX_SUMMARY_BYTES`: hard cap on the serialized core body.
pub const ENV_MAX_SUMMARY_BYTES: &str = "CALLSCOPE_MAX_SUMMARY_BYTES";
/// Default of `CALLSCOPE_MAX_SUMMARY_BYTES`.
pub const DEFAULT_MAX_SUMMARY_BYTES: usize = 500_000;
/// Smallest accepted `CALLSCOPE_MAX_SUMMARY_BYTES`.
pub const MIN_MAX_SUMMARY_BYTES: usize = 4096;

/// `CALLSCOPE_MAX_REQUEST_BYTES`: hard cap on any request body on the wire.
pub const ENV_MAX_REQUEST_BYTES: &str = "CALLSCOPE_MAX_REQUEST_BYTES";
/// Default of `CALLSCOPE_MAX_REQUEST_BYTES`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4_000_000;
/// Smallest accepted `CALLSCOPE_MAX_REQUEST_BYTES`.
pub const MIN_MAX_REQUEST_BYTES: usize = 16_384;

/// `CALLSCOPE_DETAIL`: which spans go to the detailed endpoint: `all`, `critical` or `none`.
pub const ENV_DETAIL: &str = "CALLSCOPE_DETAIL";
/// Default of `CALLSCOPE_DETAIL`.
pub const DEFAULT_DETAIL: DetailMode = DetailMode::All;

/// `CALLSCOPE_CRITICAL_MS`: in [`DetailMode::Critical`], spans longer than this are sent.
pub const ENV_CRITICAL_MS: &str = "CALLSCOPE_CRITICAL_MS";
/// Default of `CALLSCOPE_CRITICAL_MS`: 1 s.
pub const DEFAULT_CRITICAL_THRESHOLD: Duration = Duration::from_millis(1000);

/// `CALLSCOPE_COMPRESSION`: encoding of request bodies, `gzip`, `auto` or `none`.
pub const ENV_COMPRESSION: &str = "CALLSCOPE_COMPRESSION";
/// Default of `CALLSCOPE_COMPRESSION`.
pub const DEFAULT_COMPRESSION: Compression = Compression::Gzip;

/// `CALLSCOPE_TIMEOUT_MS`: timeout of one HTTP request (>= 1 ms).
pub const ENV_TIMEOUT_MS: &str = "CALLSCOPE_TIMEOUT_MS";
/// Default of `CALLSCOPE_TIMEOUT_MS`: 10 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);

/// `CALLSCOPE_QUEUE_SIZE`: spans queued to the worker; beyond it detail is dropped and counted.
pub const ENV_QUEUE_SIZE: &str = "CALLSCOPE_QUEUE_SIZE";
/// Default of `CALLSCOPE_QUEUE_SIZE`.
pub const DEFAULT_QUEUE_SIZE: usize = 65_536;
/// Largest accepted `CALLSCOPE_QUEUE_SIZE` (2^20): channels may allocate their capacity up front.
pub const MAX_QUEUE_SIZE: usize = 1 << 20;

/// `CALLSCOPE_DISABLED`: when true the processor does nothing (and needs no endpoint).
pub const ENV_DISABLED: &str = "CALLSCOPE_DISABLED";
/// Default of `CALLSCOPE_DISABLED`.
pub const DEFAULT_DISABLED: bool = false;
/// `OTEL_SDK_DISABLED`: the OpenTelemetry-wide switch; a true value also disables callscope.
/// As the OpenTelemetry specification asks, a value that is not a boolean counts as false
/// (with a warning) instead of being an error.
pub const ENV_OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// `CALLSCOPE_BATCH_TIMEOUT_MS`: a detail batch that has waited this long is sent (>= 1 ms).
pub const ENV_BATCH_TIMEOUT_MS: &str = "CALLSCOPE_BATCH_TIMEOUT_MS";
/// Default of `CALLSCOPE_BATCH_TIMEOUT_MS`: 2 s.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_millis(2000);

/// `CALLSCOPE_RETRY_MAX_ELAPSED_MS`: time budget for retrying one payload (0 = never retry).
pub const ENV_RETRY_MAX_ELAPSED_MS: &str = "CALLSCOPE_RETRY_MAX_ELAPSED_MS";
/// Default of `CALLSCOPE_RETRY_MAX_ELAPSED_MS`: 5 min.
pub const DEFAULT_RETRY_MAX_ELAPSED: Duration = Duration::from_millis(300_000);

/// `CALLSCOPE_MAX_CONCURRENT_DETAIL`: detail uploads in flight at once.
pub const ENV_MAX_CONCURRENT_DETAIL: &str = "CALLSCOPE_MAX_CONCURRENT_DETAIL";
/// Default of `CALLSCOPE_MAX_CONCURRENT_DETAIL`.
pub const DEFAULT_MAX_CONCURRENT_DETAIL: usize = 2;
/// Largest accepted `CALLSCOPE_MAX_CONCURRENT_DETAIL`.
pub const MAX_MAX_CONCURRENT_DETAIL: usize = 64;

/// `CALLSCOPE_MAX_BUFFER_BYTES`: bound on all pending detail in memory.
pub const ENV_MAX_BUFFER_BYTES: &str = "CALLSCOPE_MAX_BUFFER_BYTES";
/// Default of `CALLSCOPE_MAX_BUFFER_BYTES`: 64 MiB.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 64 << 20;
/// Smallest accepted `CALLSCOPE_MAX_BUFFER_BYTES`.
pub const MIN_MAX_BUFFER_BYTES: usize = 65_536;

/// `CALLSCOPE_SPOOL_DIR`: directory of the disk spool. Unset (the default) = no spool.
pub const ENV_SPOOL_DIR: &str = "CALLSCOPE_SPOOL_DIR";

/// `CALLSCOPE_SPOOL_MAX_BYTES`: cap on the disk spool's size (>= 1).
pub const ENV_SPOOL_MAX_BYTES: &str = "CALLSCOPE_SPOOL_MAX_BYTES";
/// Default of `CALLSCOPE_SPOOL_MAX_BYTES`: 1 GiB.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;

/// `CALLSCOPE_GZIP_LEVEL`: gzip level of request bodies, 0 (store) to 9 (smallest).
pub const ENV_GZIP_LEVEL: &str = "CALLSCOPE_GZIP_LEVEL";
/// Default of `CALLSCOPE_GZIP_LEVEL`: 1, the fastest (about 0.32 of the JSON on voice-agent
/// spans with the default zlib-rs backend); 5 gives about 1/5 for 4.7 times the compression
/// CPU (see BENCHMARKS.md).
pub const DEFAULT_GZIP_LEVEL: u32 = 1;

/// `CALLSCOPE_GZIP_LEVEL_MAX`: gzip level of detail bodies while compression has CPU to spare,
/// `CALLSCOPE_GZIP_LEVEL` to 9 (see [`Config::gzip_level_max`]).
pub const ENV_GZIP_LEVEL_MAX: &str = "CALLSCOPE_GZIP_LEVEL_MAX";
/// Default of `CALLSCOPE_GZIP_LEVEL_MAX` when `CALLSCOPE_GZIP_LEVEL` is not set either: 5, the
/// lowest level that sends about 1/5 of the JSON with the default zlib-rs backend (0.195).
/// When `CALLSCOPE_GZIP_LEVEL` is set, the maximum defaults to it: a level set alone is fixed.
pub const DEFAULT_GZIP_LEVEL_MAX: u32 = 5;

/// Longest accepted value of any `*_MS` variable (and of any duration set in code): 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Every `CALLSCOPE_*` variable, in README-table order (tests check each one).
#[cfg(test)]
const ENV_VARS: [&str; 25] = [
    ENV_ENDPOINT,
    ENV_DETAILED_ENDPOINT,
    ENV_API_KEY,
    ENV_HEADERS,
    ENV_AGENT_ID,
    ENV_CALL_ID_KEYS,
    ENV_ROOT_SPAN_NAMES,
    ENV_CALL_IDLE_TIMEOUT_MS,
    ENV_MAX_OPEN_CALLS,
    ENV_MAX_SUMMARY_BYTES,
    ENV_MAX_REQUEST_BYTES,
    ENV_DETAIL,
    ENV_CRITICAL_MS,
    ENV_COMPRESSION,
    ENV_TIMEOUT_MS,
    ENV_QUEUE_SIZE,
    ENV_DISABLED,
    ENV_BATCH_TIMEOUT_MS,
    ENV_RETRY_MAX_ELAPSED_MS,
    ENV_MAX_CONCURRENT_DETAIL,
    ENV_MAX_BUFFER_BYTES,
    ENV_SPOOL_DIR,
    ENV_SPOOL_MAX_BYTES,
    ENV_GZIP_LEVEL,
    ENV_GZIP_LEVEL_MAX,
];

// What each variable accepts, as shown in error messages.
const EXPECT_URL: &str = "an absolute http:// or https:// URL, e.g. http://127.0.0.1:4380/v1/calls";
const EXPECT_API_KEY: &str =
    "a non-empty key of printable characters usable in an HTTP header (no control characters)";
const EXPECT_HEADERS_SYNTAX: &str =
    "comma-separated name=value pairs, e.g. x-tenant=acme,x-env=prod (every entry needs '=')";
const EXPECT_HEADER_NAME: &str =
    "name=value pairs whose names are HTTP header names (letters, digits and !#$%&'*+-.^_`|~)";
const EXPECT_HEADER_VALUE: &str = "name=value pairs whose values are printable text without control \
     characters (percent-encode them, e.g. %0A)";
const EXPECT_AGENT_ID: &str = "a non-empty agent id";
const EXPECT_CALL_ID_KEYS: &str =
    "a comma-separated list of one or more non-empty keys, e.g. call_id,session.id";
const EXPECT_ROOT_SPAN_NAMES: &str =
    "a comma-separated list of non-empty span names, e.g. agent_session,conversation";
const EXPECT_MS_FROM_1: &str = "an integer number of milliseconds from 1 to 31536000000 (365 days)";
const EXPECT_MS_FROM_0: &str = "an integer number of milliseconds from 0 to 31536000000 (365 days)";
const EXPECT_INT_FROM_1: &str = "an integer >= 1";
const EXPECT_SUMMARY_BYTES: &str = "an integer >= 4096";
const EXPECT_REQUEST_BYTES: &str = "an integer >= 16384";
const EXPECT_QUEUE_SIZE: &str = "an integer from 1 to 1048576";
const EXPECT_CONCURRENT: &str = "an integer from 1 to 64";
const EXPECT_BUFFER_BYTES: &str = "an integer >= 65536";
const EXPECT_DETAIL: &str = "one of all, critical, none";
const EXPECT_COMPRESSION: &str = "one of gzip, none, auto";
const EXPECT_GZIP_LEVEL: &str = "an integer from 0 to 9";
const EXPECT_GZIP_LEVEL_MAX: &str = "an integer from 0 to 9, at least CALLSCOPE_GZIP_LEVEL (set both to the same value for a fixed level)";
const EXPECT_BOOL: &str = "one of true, false, 1, 0, yes, no";
const EXPECT_PATH: &str = "a non-empty directory path";
const HINT_ENDPOINT: &str = "set it to the URL call summaries are POSTed to, e.g. \
     http://127.0.0.1:4380/v1/calls (or set CALLSCOPE_DISABLED=true to turn callscope off)";

/// Shown instead of secrets (API key, header values) in errors and `Debug` output.
const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Which spans are sent to the detailed endpoint (phase 2). Env: `CALLSCOPE_DETAIL`, default `all`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DetailMode {
    /// `all`: every span.
    #[default]
    All,
    /// `critical`: only spans longer than [`Config::critical_threshold`], tool calls and errors.
    Critical,
    /// `none`: summaries only, no phase 2.
    None,
}

/// `as_str`, a case-insensitive `parse` and `Display` for a setting's enum, from the spelling of
/// each value in its variable.
macro_rules! spelled {
    ($ty:ident in $var:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            #[doc = concat!("The value's spelling in `", $var, "`, one of:", $(" `", $text, "`"),+, ".")]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            fn parse(raw: &str) -> Option<Self> {
                [$(Self::$variant),+]
                    .into_iter()
                    .find(|v| raw.eq_ignore_ascii_case(v.as_str()))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled!(DetailMode in "CALLSCOPE_DETAIL" {
    All => "all",
    Critical => "critical",
    None => "none",
});

/// Encoding of request bodies. Env: `CALLSCOPE_COMPRESSION`, default `gzip`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `gzip`: bodies are gzip-compressed and sent with `Content-Encoding: gzip`.
    #[default]
    Gzip,
    /// `none`: bodies are sent as plain JSON.
    None,
    /// `auto`: as `gzip`, except while compressing a detail body lately took longer (its wait
    /// for a compression thread included) than sending the bytes it saves would, and the
    /// detail held in memory is past 7/8 of `CALLSCOPE_MAX_BUFFER_BYTES`: a detail body then
    /// goes as plain JSON (counted in [`Stats::detail_bodies_uncompressed`](crate::Stats)). When
    /// compression is what the worker cannot keep up with (a burst on a busy machine), more
    /// bytes go on the wire instead of detail being dropped; a slow receiver or network, where the
    /// saved bytes are worth more, keeps getting compressed bodies. Summaries are always compressed.
    Auto,
}

spelled!(Compression in "CALLSCOPE_COMPRESSION" {
    Gzip => "gzip",
    None => "none",
    Auto => "auto",
});

/// A configuration that was rejected. Every error names the variable concerned, also when the
/// bad value was set in code through [`ConfigBuilder`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required variable is not set (only `CALLSCOPE_ENDPOINT`, when not disabled).
    #[error("{var} is not set: {hint}")]
    Missing {
        /// The variable, e.g. `CALLSCOPE_ENDPOINT`.
        var: &'static str,
        /// What to set it to.
        hint: &'static str,
    },
    /// A variable (or the matching builder value) holds a value that is not accepted.
    #[error("{var}={value:?} is invalid: expected {expected}")]
    Invalid {
        /// The variable, e.g. `CALLSCOPE_QUEUE_SIZE`.
        var: &'static str,
        /// The rejected value as given (secrets such as API keys and header values are
        /// replaced by `<redacted>`).
        value: String,
        /// What the variable accepts.
        expected: &'static str,
    },
    /// The configuration is valid but the processor could not start (HTTP client or worker
    /// thread); `var` of such an error is `CALLSCOPE_ENDPOINT`.
    #[error(
        "callscope could not start: {reason}; check CALLSCOPE_ENDPOINT and the process limits (threads, TLS roots)"
    )]
    Startup {
        /// What failed.
        reason: String,
    },
}

impl ConfigError {
    /// The variable the error is about, e.g. `CALLSCOPE_ENDPOINT`.
    pub fn var(&self) -> &'static str {
        match self {
            Self::Missing { var, .. } | Self::Invalid { var, .. } => var,
            Self::Startup { .. } => ENV_ENDPOINT,
        }
    }
}

fn invalid(var: &'static str, value: impl Into<String>, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.into(),
        expected,
    }
}

/// The processor's configuration, validated. Build it with [`Config::from_env`] or
/// [`Config::builder`]; each field names its variable and default.
///
/// `Debug` output hides the API key and header values.
#[derive(Clone)]
pub struct Config {
    /// Where core summaries (phase 1) are POSTed. Env `CALLSCOPE_ENDPOINT`, required (http or
    /// https) unless [`Config::disabled`]; a disabled config without one holds
    /// `http://127.0.0.1:9/` (never contacted).
    pub endpoint: Url,
    /// Where detail batches (phase 2) are POSTed. Env `CALLSCOPE_DETAILED_ENDPOINT`, default
    /// [`Config::endpoint`].
    pub detailed_endpoint: Url,
    /// Sent as `Authorization: Bearer <key>`. Env `CALLSCOPE_API_KEY`, default none.
    pub api_key: Option<String>,
    /// Extra headers on every request, names lowercased. Env `CALLSCOPE_HEADERS` (`k1=v1,k2=v2`,
    /// values percent-decoded), default none. Headers set in code replace env headers of the
    /// same name. `content-encoding` and `idempotency-key` are set per request by callscope;
    /// given here they are ignored, with a warning.
    pub headers: Vec<(String, String)>,
    /// `agent_id` in payloads. Env `CALLSCOPE_AGENT_ID`; `None` (default) = the resource's
    /// `service.name`.
    pub agent_id: Option<String>,
    /// Attribute / baggage keys carrying the call id, first hit wins; never empty. Env
    /// `CALLSCOPE_CALL_ID_KEYS`, default
    /// `call_id,call.id,session.id,conversation.id,gen_ai.conversation.id`.
    pub call_id_keys: Vec<String>,
    /// Span names whose end ends the call, besides spans without a parent; may be empty (set
    /// in code). Env `CALLSCOPE_ROOT_SPAN_NAMES`, default `agent_session,conversation,call`.
    pub root_span_names: Vec<String>,
    /// A call without a new span for this long is ended. Env `CALLSCOPE_CALL_IDLE_TIMEOUT_MS`,
    /// default 60 s, 1 ms to 365 days.
    pub call_idle_timeout: Duration,
    /// Open calls kept; beyond it the oldest is ended as `evicted`. Env
    /// `CALLSCOPE_MAX_OPEN_CALLS`, default 10000, >= 1.
    pub max_open_calls: usize,
    /// Cap on the serialized core body. Env `CALLSCOPE_MAX_SUMMARY_BYTES`, default
    /// 500000, >= 4096.
    pub max_summary_bytes: usize,
    /// Cap on any request body on the wire. Env `CALLSCOPE_MAX_REQUEST_BYTES`, default
    /// 4000000, >= 16384.
    pub max_request_bytes: usize,
    /// Which spans are sent as detail. Env `CALLSCOPE_DETAIL`, default [`DetailMode::All`].
    pub detail: DetailMode,
    /// Duration above which a span is critical. Env `CALLSCOPE_CRITICAL_MS`, default
    /// 1 s, 0 to 365 days.
    pub critical_threshold: Duration,
    /// Request body encoding. Env `CALLSCOPE_COMPRESSION`, default [`Compression::Gzip`].
    pub compression: Compression,
    /// Timeout of one request. Env `CALLSCOPE_TIMEOUT_MS`, default 10 s,
    /// 1 ms to 365 days.
    pub timeout: Duration,
    /// Spans queued to the worker. Env `CALLSCOPE_QUEUE_SIZE`, default 65536, 1 to 1048576.
    /// Spans travel packed in per-call chunks; the bytes of packed spans not yet serialised
    /// (in open calls' chunks or queued) are also held to half of
    /// [`max_buffer_bytes`](Self::max_buffer_bytes), or 512 bytes per queued span if that is
    /// more (32 MiB with the defaults).
    pub queue_size: usize,
    /// The processor does nothing. Env `CALLSCOPE_DISABLED`, default false; also true when
    /// `OTEL_SDK_DISABLED` is true (unless set in code).
    pub disabled: bool,
    /// A detail batch waiting this long is sent. Env `CALLSCOPE_BATCH_TIMEOUT_MS`, default
    /// 2 s, 1 ms to 365 days.
    pub batch_timeout: Duration,
    /// Time budget for retrying one payload. Env `CALLSCOPE_RETRY_MAX_ELAPSED_MS`, default
    /// 5 min, 0 to 365 days.
    pub retry_max_elapsed: Duration,
    /// Detail uploads in flight at once. Env `CALLSCOPE_MAX_CONCURRENT_DETAIL`, default
    /// 2, 1 to 64.
    pub max_concurrent_detail: usize,
    /// Bound on pending detail in the worker's memory. Env `CALLSCOPE_MAX_BUFFER_BYTES`,
    /// default 64 MiB, >= 65536. Spans packed on their way to the worker take from another half
    /// of it (see [`queue_size`](Self::queue_size)): 1.5 × in all.
    pub max_buffer_bytes: usize,
    /// Disk spool directory; `None` (default) = no spool. Env `CALLSCOPE_SPOOL_DIR`.
    pub spool_dir: Option<PathBuf>,
    /// Cap on the spool's size on disk. Env `CALLSCOPE_SPOOL_MAX_BYTES`, default
    /// 1 GiB, >= 1.
    pub spool_max_bytes: u64,
    /// Gzip level of request bodies when compression is on. Env `CALLSCOPE_GZIP_LEVEL`,
    /// default 1, 0 to 9. Detail bodies are raised to
    /// [`gzip_level_max`](Self::gzip_level_max) while compression has CPU to spare.
    pub gzip_level: u32,
    /// Gzip level of a detail body while compression has CPU to spare: the worker is not
    /// behind (no more detail waits to be sent than the free upload slots can start, none is
    /// being compressed for the spool, pending detail is under half of
    /// [`max_buffer_bytes`](Self::max_buffer_bytes)), and bodies at this level have taken at
    /// most a tenth of the time (up to 100 ms saved ahead). Otherwise, and for summaries,
    /// `gzip_level`. Counted in [`Stats::detail_bodies_level_raised`](crate::Stats).
    /// Env `CALLSCOPE_GZIP_LEVEL_MAX`, `gzip_level` to 9; default 5, or `gzip_level` when
    /// that is set (a level set alone is fixed). Equal to `gzip_level`: no raising.
    pub gzip_level_max: u32,
}

impl Config {
    /// Reads the configuration from the process environment. Strict: every invalid value is an
    /// error; `CALLSCOPE_ENDPOINT` is required unless callscope is disabled.
    /// Same as `Config::builder().build()`.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::builder().build()
    }

    /// A builder with nothing set: [`ConfigBuilder::build`] reads the environment (unless
    /// [`ConfigBuilder::without_env`]) and values set on the builder win over it.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let Config {
            endpoint,
            detailed_endpoint,
            api_key,
            headers,
            agent_id,
            call_id_keys,
            root_span_names,
            call_idle_timeout,
            max_open_calls,
            max_summary_bytes,
            max_request_bytes,
            detail,
            critical_threshold,
            compression,
            timeout,
            queue_size,
            disabled,
            batch_timeout,
            retry_max_elapsed,
            max_concurrent_detail,
            max_buffer_bytes,
            spool_dir,
            spool_max_bytes,
            gzip_level,
            gzip_level_max,
        } = self;
        f.debug_struct("Config")
            .field("endpoint", &endpoint.as_str())
            .field("detailed_endpoint", &detailed_endpoint.as_str())
            .field("api_key", &api_key.as_ref().map(|_| REDACTED))
            .field("headers", &redact_headers(headers))
            .field("agent_id", agent_id)
            .field("call_id_keys", call_id_keys)
            .field("root_span_names", root_span_names)
            .field("call_idle_timeout", call_idle_timeout)
            .field("max_open_calls", max_open_calls)
            .field("max_summary_bytes", max_summary_bytes)
            .field("max_request_bytes", max_request_bytes)
            .field("detail", detail)
            .field("critical_threshold", critical_threshold)
            .field("compression", compression)
            .field("timeout", timeout)
            .field("queue_size", queue_size)
            .field("disabled", disabled)
            .field("batch_timeout", batch_timeout)
            .field("retry_max_elapsed", retry_max_elapsed)
            .field("max_concurrent_detail", max_concurrent_detail)
            .field("max_buffer_bytes", max_buffer_bytes)
            .field("spool_dir", spool_dir)
            .field("spool_max_bytes", spool_max_bytes)
            .field("gzip_level", gzip_level)
            .field("gzip_level_max", gzip_level_max)
            .finish()
    }
}

fn redact_headers(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(name, _)| (name.as_str(), REDACTED))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Builds a [`Config`] from values set in code and, unless [`ConfigBuilder::without_env`] was
/// called, the `CALLSCOPE_*` environment. A value set here wins over its variable; it is
/// validated with the same rules, and an out-of-bounds value is a [`ConfigError::Invalid`]
/// naming the matching variable.
///
/// `Debug` output hides the API key and header values.
#[derive(Clone, Debug, Default)]
#[must_use = "a ConfigBuilder does nothing until build() is called"]
pub struct ConfigBuilder {
    endpoint: Option<String>,
    detailed_endpoint: Option<String>,
    api_key: Option<Secret>,
    headers: Vec<(String, Secret)>,
    agent_id: Option<String>,
    call_id_keys: Option<Vec<String>>,
    root_span_names: Option<Vec<String>>,
    call_idle_timeout: Option<Duration>,
    max_open_calls: Option<usize>,
    max_summary_bytes: Option<usize>,
    max_request_bytes: Option<usize>,
    detail: Option<DetailMode>,
    critical_threshold: Option<Duration>,
    compression: Option<Compression>,
    timeout: Option<Duration>,
    queue_size: Option<usize>,
    disabled: Option<bool>,
    batch_timeout: Option<Duration>,
    retry_max_elapsed: Option<Duration>,
    max_concurrent_detail: Option<usize>,
    max_buffer_bytes: Option<usize>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    gzip_level: Option<u32>,
    gzip_level_max: Option<u32>,
    /// `false` (the default) = read the environment in `build()`.
    without_env: bool,
}

/// A value set in code that `Debug` must not show (API key, header values).
#[derive(Clone, Default)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl ConfigBuilder {
    /// Core endpoint URL (http or https); see [`Config::endpoint`], env `CALLSCOPE_ENDPOINT`.
    pub fn endpoint(mut self, url: impl AsRef<str>) -> Self {
        self.endpoint = Some(url.as_ref().to_owned());
        self
    }

    /// Detail endpoint URL; see [`Config::detailed_endpoint`], env `CALLSCOPE_DETAILED_ENDPOINT`.
    pub fn detailed_endpoint(mut self, url: impl AsRef<str>) -> Self {
        self.detailed_endpoint = Some(url.as_ref().to_owned());
        self
    }

    /// Bearer API key; see [`Config::api_key`], env `CALLSCOPE_API_KEY`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(Secret(key.into()));
        self
    }

    /// Adds one header (taken as is, not percent-decoded). It replaces headers of the same
    /// name (case-insensitive) from `CALLSCOPE_HEADERS`; calling it again with the same name
    /// replaces the earlier value. See [`Config::headers`].
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        self.headers.push((name, Secret(value.into())));
        self
    }

    /// Agent id for payloads; see [`Config::agent_id`], env `CALLSCOPE_AGENT_ID`.
    pub fn agent_id(mut self, id: impl Into<String>) -> Self {
        self.agent_id = Some(id.into());
        self
    }

    /// Keys carrying the call id (at least one); see [`Config::call_id_keys`], env
    /// `CALLSCOPE_CALL_ID_KEYS`.
    pub fn call_id_keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.call_id_keys = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Span names that end a call (may be empty); see [`Config::root_span_names`], env
    /// `CALLSCOPE_ROOT_SPAN_NAMES`.
    pub fn root_span_names(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.root_span_names = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Idle time that ends a call; see [`Config::call_idle_timeout`], env
    /// `CALLSCOPE_CALL_IDLE_TIMEOUT_MS`.
    pub fn call_idle_timeout(mut self, timeout: Duration) -> Self {
        self.call_idle_timeout = Some(timeout);
        self
    }

    /// Cap on open calls; see [`Config::max_open_calls`], env `CALLSCOPE_MAX_OPEN_CALLS`.
    pub fn max_open_calls(mut self, n: usize) -> Self {
        self.max_open_calls = Some(n);
        self
    }

    /// Cap on the core body; see [`Config::max_summary_bytes`], env `CALLSCOPE_MAX_SUMMARY_BYTES`.
    pub fn max_summary_bytes(mut self, bytes: usize) -> Self {
        self.max_summary_bytes = Some(bytes);
        self
    }

    /// Cap on any request body; see [`Config::max_request_bytes`], env
    /// `CALLSCOPE_MAX_REQUEST_BYTES`.
    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = Some(bytes);
        self
    }

    /// Detail mode; see [`Config::detail`], env `CALLSCOPE_DETAIL`.
    pub fn detail(mut self, mode: DetailMode) -> Self {
        self.detail = Some(mode);
        self
    }

    /// Critical span threshold; see [`Config::critical_threshold`], env `CALLSCOPE_CRITICAL_MS`.
    pub fn critical_threshold(mut self, threshold: Duration) -> Self {
        self.critical_threshold = Some(threshold);
        self
    }

    /// Body encoding; see [`Config::compression`], env `CALLSCOPE_COMPRESSION`.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }

    /// Per-request timeout; see [`Config::timeout`], env `CALLSCOPE_TIMEOUT_MS`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Worker queue capacity; see [`Config::queue_size`], env `CALLSCOPE_QUEUE_SIZE`.
    pub fn queue_size(mut self, n: usize) -> Self {
        self.queue_size = Some(n);
        self
    }

    /// Turns the processor off (or, with `false`, on even if `OTEL_SDK_DISABLED=true`); see
    /// [`Config::disabled`], env `CALLSCOPE_DISABLED`.
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.disabled = Some(disabled);
        self
    }

    /// Age at which a detail batch is sent; see [`Config::batch_timeout`], env
    /// `CALLSCOPE_BATCH_TIMEOUT_MS`.
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.batch_timeout = Some(timeout);
        self
    }

    /// Retry time budget per payload; see [`Config::retry_max_elapsed`], env
    /// `CALLSCOPE_RETRY_MAX_ELAPSED_MS`.
    pub fn retry_max_elapsed(mut self, budget: Duration) -> Self {
        self.retry_max_elapsed = Some(budget);
        self
    }

    /// Concurrent detail uploads; see [`Config::max_concurrent_detail`], env
    /// `CALLSCOPE_MAX_CONCURRENT_DETAIL`.
    pub fn max_concurrent_detail(mut self, n: usize) -> Self {
        self.max_concurrent_detail = Some(n);
        self
    }

    /// Bound on pending detail; see [`Config::max_buffer_bytes`], env `CALLSCOPE_MAX_BUFFER_BYTES`.
    pub fn max_buffer_bytes(mut self, bytes: usize) -> Self {
        self.max_buffer_bytes = Some(bytes);
        self
    }

    /// Turns the disk spool on in `dir`; see [`Config::spool_dir`], env `CALLSCOPE_SPOOL_DIR`.
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spool_dir = Some(dir.into());
        self
    }

    /// Cap on the spool's size; see [`Config::spool_max_bytes`], env `CALLSCOPE_SPOOL_MAX_BYTES`.
    pub fn spool_max_bytes(mut self, bytes: u64) -> Self {
        self.spool_max_bytes = Some(bytes);
        self
    }

    /// Gzip level of request bodies; see [`Config::gzip_level`], env `CALLSCOPE_GZIP_LEVEL`.
    /// Set without [`gzip_level_max`](Self::gzip_level_max), it is also the maximum: a fixed
    /// level.
    pub fn gzip_level(mut self, level: u32) -> Self {
        self.gzip_level = Some(level);
        self
    }

    /// Gzip level of detail bodies while compression has CPU to spare; see
    /// [`Config::gzip_level_max`], env `CALLSCOPE_GZIP_LEVEL_MAX`.
    pub fn gzip_level_max(mut self, level: u32) -> Self {
        self.gzip_level_max = Some(level);
        self
    }

    /// Ignores the process environment entirely (also `OTEL_SDK_DISABLED`): only values set on
    /// the builder and the defaults are used.
    pub fn without_env(mut self) -> Self {
        self.without_env = true;
        self
    }

    /// Validates and returns the configuration: for each setting the builder's value, else its
    /// environment variable (unless [`ConfigBuilder::without_env`]), else the default.
    ///
    /// A variable that is not valid UTF-8 is an error, unless the builder sets its value.
    pub fn build(self) -> Result<Config, ConfigError> {
        self.resolve(&|var| match std::env::var(var) {
            Ok(value) => Ok(Some(value)),
            Err(VarError::NotPresent) => Ok(None),
            Err(VarError::NotUnicode(raw)) => {
                Err(invalid(var, raw.to_string_lossy(), "valid UTF-8 text"))
            }
        })
    }

    /// [`ConfigBuilder::build`] over `lookup` instead of the process environment (for tests,
    /// and for embedders with their own source of settings).
    #[cfg_attr(not(test), allow(dead_code, reason = "used by tests across the crate"))]
    pub(crate) fn build_with(
        self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        self.resolve(&|var| Ok(lookup(var)))
    }

    fn resolve(self, lookup: &EnvLookup<'_>) -> Result<Config, ConfigError> {
        let env = Env {
            lookup,
            enabled: !self.without_env,
        };

        let disabled = match self.disabled {
            Some(disabled) => disabled,
            None => {
                let own = match env.get(ENV_DISABLED)? {
                    Some(raw) => {
                        parse_bool(&raw).ok_or_else(|| invalid(ENV_DISABLED, raw, EXPECT_BOOL))?
                    }
                    None => DEFAULT_DISABLED,
                };
                own || env.otel_sdk_disabled()
            }
        };

        let endpoint = match env.or_code(ENV_ENDPOINT, self.endpoint)? {
            Some(url) => parse_url(ENV_ENDPOINT, &url)?,
            None if disabled => parse_url(ENV_ENDPOINT, DISABLED_PLACEHOLDER_ENDPOINT)?,
            None => {
                return Err(ConfigError::Missing {
                    var: ENV_ENDPOINT,
                    hint: HINT_ENDPOINT,
                });
            }
        };
        let detailed_endpoint = match env.or_code(ENV_DETAILED_ENDPOINT, self.detailed_endpoint)? {
            Some(url) => parse_url(ENV_DETAILED_ENDPOINT, &url)?,
            None => endpoint.clone(),
        };

        let api_key = env.or_code(ENV_API_KEY, self.api_key.map(|s| s.0))?;
        if let Some(key) = &api_key {
            check_api_key(key)?;
        }

        let mut headers = match env.get(ENV_HEADERS)? {
            Some(raw) => parse_headers(&raw)?,
            None => Vec::new(),
        };
        for (name, Secret(value)) in self.headers {
            let (name, value) = check_header(&name, value)?;
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }

        let agent_id = env.or_code(ENV_AGENT_ID, self.agent_id)?;
        if let Some(id) = &agent_id
            && id.trim().is_empty()
        {
            return Err(invalid(ENV_AGENT_ID, id.clone(), EXPECT_AGENT_ID));
        }

        let call_id_keys = resolve_list(
            &env,
            ENV_CALL_ID_KEYS,
            self.call_id_keys,
            DEFAULT_CALL_ID_KEYS,
            EXPECT_CALL_ID_KEYS,
        )?;
        if call_id_keys.is_empty() {
            return Err(invalid(ENV_CALL_ID_KEYS, "", EXPECT_CALL_ID_KEYS));
        }
        let root_span_names = resolve_list(
            &env,
            ENV_ROOT_SPAN_NAMES,
            self.root_span_names,
            DEFAULT_ROOT_SPAN_NAMES,
            EXPECT_ROOT_SPAN_NAMES,
        )?;

        let detail = match self.detail {
            Some(mode) => mode,
            None => match env.get(ENV_DETAIL)? {
                Some(raw) => DetailMode::parse(&raw)
                    .ok_or_else(|| invalid(ENV_DETAIL, raw, EXPECT_DETAIL))?,
                None => DEFAULT_DETAIL,
            },
        };
        let compression = match self.compression {
            Some(c) => c,
            None => match env.get(ENV_COMPRESSION)? {
                Some(raw) => Compression::parse(&raw)
                    .ok_or_else(|| invalid(ENV_COMPRESSION, raw, EXPECT_COMPRESSION))?,
                None => DEFAULT_COMPRESSION,
            },
        };

        let spool_dir = match self.spool_dir {
            Some(dir) => Some(dir),
            None => env.get(ENV_SPOOL_DIR)?.map(PathBuf::from),
        };
        if let Some(dir) = &spool_dir
            && dir.as_os_str().is_empty()
        {
            return Err(invalid(ENV_SPOOL_DIR, "", EXPECT_PATH));
        }

        let level_rule = UintRule {
            min: 0,
            max: 9,
            expected: EXPECT_GZIP_LEVEL,
        };
        let level_set = self.gzip_level.is_some() || env.get(ENV_GZIP_LEVEL)?.is_some();
        let gzip_level = level_rule.resolve(
            &env,
            ENV_GZIP_LEVEL,
            self.gzip_level.map(u64::from),
            u64::from(DEFAULT_GZIP_LEVEL),
        )?;
        // A level set alone stays fixed, as it was before the maximum existed.
        let max_default = if level_set {
            gzip_level
        } else {
            u64::from(DEFAULT_GZIP_LEVEL_MAX)
        };
        let gzip_level_max = level_rule.resolve(
            &env,
            ENV_GZIP_LEVEL_MAX,
            self.gzip_level_max.map(u64::from),
            max_default,
        )?;
        if gzip_level_max < gzip_level {
            return Err(invalid(
                ENV_GZIP_LEVEL_MAX,
                gzip_level_max.to_string(),
                EXPECT_GZIP_LEVEL_MAX,
            ));
        }
        // Both are 0-9 here.
        let (gzip_level, gzip_level_max) = (gzip_level as u32, gzip_level_max as u32);

        Ok(Config {
            endpoint,
            detailed_endpoint,
            api_key,
            headers,
            agent_id,
            call_id_keys,
            root_span_names,
            call_idle_timeout: MS_FROM_1.resolve(
                &env,
                ENV_CALL_IDLE_TIMEOUT_MS,
                self.call_idle_timeout,
                DEFAULT_CALL_IDLE_TIMEOUT,
            )?,
            max_open_calls: UintRule::at_least(1, EXPECT_INT_FROM_1).resolve_usize(
                &env,
                ENV_MAX_OPEN_CALLS,
                self.max_open_calls,
                DEFAULT_MAX_OPEN_CALLS,
            )?,
            max_summary_bytes: UintRule::at_least(
                MIN_MAX_SUMMARY_BYTES as u64,
                EXPECT_SUMMARY_BYTES,
            )
            .resolve_usize(
                &env,
                ENV_MAX_SUMMARY_BYTES,
                self.max_summary_bytes,
                DEFAULT_MAX_SUMMARY_BYTES,
            )?,
            max_request_bytes: UintRule::at_least(
                MIN_MAX_REQUEST_BYTES as u64,
                EXPECT_REQUEST_BYTES,
            )
            .resolve_usize(
                &env,
                ENV_MAX_REQUEST_BYTES,
                self.max_request_bytes,
                DEFAULT_MAX_REQUEST_BYTES,
            )?,
            detail,
            critical_threshold: MS_FROM_0.resolve(
                &env,
                ENV_CRITICAL_MS,
                self.critical_threshold,
                DEFAULT_CRITICAL_THRESHOLD,
            )?,
            compression,
            timeout: MS_FROM_1.resolve(&env, ENV_TIMEOUT_MS, self.timeout, DEFAULT_TIMEOUT)?,
            queue_size: UintRule {
                min: 1,
                max: MAX_QUEUE_SIZE as u64,
                expected: EXPECT_QUEUE_SIZE,
            }
            .resolve_usize(
                &env,
                ENV_QUEUE_SIZE,
                self.queue_size,
                DEFAULT_QUEUE_SIZE,
            )?,
            disabled,
            batch_timeout: MS_FROM_1.resolve(
                &env,
                ENV_BATCH_TIMEOUT_MS,
                self.batch_timeout,
                DEFAULT_BATCH_TIMEOUT,
            )?,
            retry_max_elapsed: MS_FROM_0.resolve(
                &env,
                ENV_RETRY_MAX_ELAPSED_MS,
                self.retry_max_elapsed,
                DEFAULT_RETRY_MAX_ELAPSED,
            )?,
            max_concurrent_detail: UintRule {
                min: 1,
                max: MAX_MAX_CONCURRENT_DETAIL as u64,
                expected: EXPECT_CONCURRENT,
            }
            .resolve_usize(
                &env,
                ENV_MAX_CONCURRENT_DETAIL,
                self.max_concurrent_detail,
                DEFAULT_MAX_CONCURRENT_DETAIL,
            )?,
            max_buffer_bytes: UintRule::at_least(MIN_MAX_BUFFER_BYTES as u64, EXPECT_BUFFER_BYTES)
                .resolve_usize(
                    &env,
                    ENV_MAX_BUFFER_BYTES,
                    self.max_buffer_bytes,
                    DEFAULT_MAX_BUFFER_BYTES,
                )?,
            spool_dir,
            spool_max_bytes: UintRule::at_least(1, EXPECT_INT_FROM_1).resolve(
                &env,
                ENV_SPOOL_MAX_BYTES,
                self.spool_max_bytes,
                DEFAULT_SPOOL_MAX_BYTES,
            )?,
            gzip_level,
            gzip_level_max,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers (pure)
// ---------------------------------------------------------------------------------------------

/// A variable's raw value: `Ok(None)` when unset, `Err` when it cannot be read (not UTF-8).
type EnvLookup<'a> = dyn Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a;

/// The environment as seen by `resolve`: trimmed values, empty = unset, or nothing at all
/// when the builder said `without_env`.
struct Env<'a> {
    lookup: &'a EnvLookup<'a>,
    enabled: bool,
}

impl Env<'_> {
    fn get(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        Ok((self.lookup)(var)?
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty()))
    }

    /// The value set in code if any, else the variable's (which is then not even read).
    fn or_code(
        &self,
        var: &'static str,
        code: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        match code {
            Some(value) => Ok(Some(value)),
            None => self.get(var),
        }
    }

    /// `OTEL_SDK_DISABLED` as the OpenTelemetry specification reads it: only a true value
    /// disables; anything else (even unreadable) counts as false, with a warning.
    fn otel_sdk_disabled(&self) -> bool {
        match self.get(ENV_OTEL_SDK_DISABLED) {
            Ok(None) => false,
            Ok(Some(raw)) => match parse_bool(&raw) {
                Some(value) => value,
                None => {
                    tracing::warn!(
                        "{ENV_OTEL_SDK_DISABLED}={raw:?} is not a boolean; treating it as false"
                    );
                    false
                }
            },
            Err(error) => {
                tracing::warn!("{error}; treating {ENV_OTEL_SDK_DISABLED} as false");
                false
            }
        }
    }
}

fn parse_bool(raw: &str) -> Option<bool> {
    const TRUE: [&str; 3] = ["true", "1", "yes"];
    const FALSE: [&str; 3] = ["false", "0", "no"];
    if TRUE.iter().any(|t| raw.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| raw.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

fn parse_url(var: &'static str, raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw.trim()).map_err(|_| invalid(var, raw, EXPECT_URL))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(var, raw, EXPECT_URL));
    }
    Ok(url)
}

fn check_api_key(key: &str) -> Result<(), ConfigError> {
    let usable = !key.trim().is_empty() && HeaderValue::from_str(&format!("Bearer {key}")).is_ok();
    if usable {
        Ok(())
    } else {
        Err(invalid(ENV_API_KEY, REDACTED, EXPECT_API_KEY))
    }
}

/// Parses `k1=v1,k2=v2` as `OTEL_EXPORTER_OTLP_HEADERS`: names and values trimmed, values
/// percent-decoded (a `%` not followed by two hex digits is kept as is).
fn parse_headers(raw: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut headers = Vec::new();
    for entry in raw.split(',') {
        let Some((name, value)) = entry.split_once('=') else {
            // The entry may be a mistyped secret ("Authorization: Bearer …"): don't echo it.
            return Err(invalid(ENV_HEADERS, REDACTED, EXPECT_HEADERS_SYNTAX));
        };
        let name = name.trim();
        let value = String::from_utf8(percent_decode(value.trim())).map_err(|_| {
            invalid(
                ENV_HEADERS,
                format!("{name}={REDACTED}"),
                EXPECT_HEADER_VALUE,
            )
        })?;
        headers.push(check_header(name, value)?);
    }
    Ok(headers)
}

/// Validates one header; returns it with the name lowercased.
fn check_header(name: &str, value: String) -> Result<(String, String), ConfigError> {
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(ENV_HEADERS, name, EXPECT_HEADER_NAME))?;
    if HeaderValue::from_str(&value).is_err() {
        return Err(invalid(
            ENV_HEADERS,
            format!("{name}={REDACTED}"),
            EXPECT_HEADER_VALUE,
        ));
    }
    Ok((header_name.as_str().to_owned(), value))
}

fn percent_decode(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hi) = bytes.get(i + 1).copied().and_then(hex)
            && let Some(lo) = bytes.get(i + 2).copied().and_then(hex)
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A comma-separated list from code or env: entries trimmed, empty entries rejected.
fn resolve_list(
    env: &Env<'_>,
    var: &'static str,
    code: Option<Vec<String>>,
    default: &[&str],
    expected: &'static str,
) -> Result<Vec<String>, ConfigError> {
    let (entries, shown): (Vec<String>, String) = match code {
        Some(entries) => {
            let shown = entries.join(",");
            (entries, shown)
        }
        None => match env.get(var)? {
            Some(raw) => (raw.split(',').map(str::to_owned).collect(), raw),
            None => return Ok(default.iter().map(|s| (*s).to_owned()).collect()),
        },
    };
    entries
        .iter()
        .map(|entry| match entry.trim() {
            "" => Err(invalid(var, shown.clone(), expected)),
            entry => Ok(entry.to_owned()),
        })
        .collect()
}

/// Accepted range of an integer setting, and how the range is described in errors.
struct UintRule {
    min: u64,
    max: u64,
    expected: &'static str,
}

impl UintRule {
    const fn at_least(min: u64, expected: &'static str) -> Self {
        Self {
            min,
            max: u64::MAX,
            expected,
        }
    }

    fn check(
        &self,
        var: &'static str,
        value: u64,
        shown: impl Fn() -> String,
    ) -> Result<u64, ConfigError> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(invalid(var, shown(), self.expected))
        }
    }

    fn resolve(
        &self,
        env: &Env<'_>,
        var: &'static str,
        code: Option<u64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match code {
            Some(value) => self.check(var, value, || value.to_string()),
            None => match env.get(var)? {
                Some(raw) => {
                    let value = raw
                        .parse::<u64>()
                        .map_err(|_| invalid(var, raw.clone(), self.expected))?;
                    self.check(var, value, || raw.clone())
                }
                None => Ok(default),
            },
        }
    }

    fn resolve_usize(
        &self,
        env: &Env<'_>,
        var: &'static str,
        code: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let value = self.resolve(env, var, code.map(to_u64), to_u64(default))?;
        // Only fails on targets where usize is narrower than the accepted value.
        usize::try_from(value).map_err(|_| invalid(var, value.to_string(), self.expected))
    }
}

/// Accepted range of a `*_MS` setting.
struct MsRule {
    min: Duration,
    expected: &'static str,
}

const MS_FROM_0: MsRule = MsRule {
    min: Duration::ZERO,
    expected: EXPECT_MS_FROM_0,
};
const MS_FROM_1: MsRule = MsRule {
    min: Duration::from_millis(1),
    expected: EXPECT_MS_FROM_1,
};

impl MsRule {
    fn resolve(
        &self,
        env: &Env<'_>,
        var: &'static str,
        code: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let (value, shown) = match code {
            Some(value) => (value, show_ms(value)),
            None => match env.get(var)? {
                Some(raw) => match raw.parse::<u64>() {
                    Ok(ms) => (Duration::from_millis(ms), raw),
                    Err(_) => return Err(invalid(var, raw, self.expected)),
                },
                None => return Ok(default),
            },
        };
        if (self.min..=MAX_DURATION).contains(&value) {
            Ok(value)
        } else {
            Err(invalid(var, shown, self.expected))
        }
    }
}

/// A duration set in code, shown as the milliseconds its variable would hold.
fn show_ms(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        d.as_millis().to_string()
    } else {
        format!("{}", d.as_secs_f64() * 1000.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const URL: &str = "http://127.0.0.1:4380/v1/calls";

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |var| map.get(var).cloned()
    }

    fn env_config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::builder().build_with(lookup(pairs))
    }

    fn env_err(pairs: &[(&str, &str)]) -> ConfigError {
        match env_config(pairs) {
            Ok(config) => panic!("expected an error for {pairs:?}, got {config:?}"),
            Err(error) => error,
        }
    }

    fn builder_err(builder: ConfigBuilder) -> ConfigError {
        match builder.build_with(|_| None) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error,
        }
    }

    fn base() -> ConfigBuilder {
        Config::builder().without_env().endpoint(URL)
    }

    fn assert_invalid(error: &ConfigError, var: &str) {
        assert!(
            matches!(error, ConfigError::Invalid { var: v, .. } if *v == var),
            "expected Invalid naming {var}, got {error:?}"
        );
        assert!(error.to_string().starts_with(&format!("{var}=")), "{error}");
        assert!(
            error.to_string().contains("is invalid: expected "),
            "{error}"
        );
    }

    #[test]
    fn defaults() {
        let c = env_config(&[(ENV_ENDPOINT, URL)]).unwrap();
        assert_eq!(c.endpoint.as_str(), URL);
        assert_eq!(c.detailed_endpoint, c.endpoint);
        assert_eq!(c.api_key, None);
        assert!(c.headers.is_empty());
        assert_eq!(c.agent_id, None);
        assert_eq!(c.call_id_keys, DEFAULT_CALL_ID_KEYS);
        assert_eq!(
            c.call_id_keys,
            [
                "call_id",
                "call.id",
                "session.id",
                "conversation.id",
                "gen_ai.conversation.id"
            ]
        );
        assert_eq!(c.root_span_names, ["agent_session", "conversation", "call"]);
        assert_eq!(c.call_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_open_calls, 10_000);
        assert_eq!(c.max_summary_bytes, 500_000);
        assert_eq!(c.max_request_bytes, 4_000_000);
        assert_eq!(c.detail, DetailMode::All);
        assert_eq!(c.critical_threshold, Duration::from_secs(1));
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.queue_size, 65_536);
        assert!(!c.disabled);
        assert_eq!(c.batch_timeout, Duration::from_secs(2));
        assert_eq!(c.retry_max_elapsed, Duration::from_secs(300));
        assert_eq!(c.max_concurrent_detail, 2);
        assert_eq!(c.max_buffer_bytes, 64 * 1024 * 1024);
        assert_eq!(c.spool_dir, None);
        assert_eq!(c.spool_max_bytes, 1024 * 1024 * 1024);
        assert_eq!(c.gzip_level, 1);
        assert_eq!(c.gzip_level_max, 5);
        // The enums' Default agrees with the DEFAULT_ constants.
        assert_eq!(DetailMode::default(), DEFAULT_DETAIL);
        assert_eq!(Compression::default(), DEFAULT_COMPRESSION);
    }

    #[test]
    fn every_variable_read_from_env() {
        let c = env_config(&[
            (ENV_ENDPOINT, "https://ingest.example.com/v1/calls"),
            (
                ENV_DETAILED_ENDPOINT,
                "https://detail.example.com/v1/detail",
            ),
            (ENV_API_KEY, "sk-123"),
            (ENV_HEADERS, "x-tenant=acme"),
            (ENV_AGENT_ID, "support-bot"),
            (ENV_CALL_ID_KEYS, "room.id"),
            (ENV_ROOT_SPAN_NAMES, "session"),
            (ENV_CALL_IDLE_TIMEOUT_MS, "1500"),
            (ENV_MAX_OPEN_CALLS, "7"),
            (ENV_MAX_SUMMARY_BYTES, "4096"),
            (ENV_MAX_REQUEST_BYTES, "16384"),
            (ENV_DETAIL, "critical"),
            (ENV_CRITICAL_MS, "0"),
            (ENV_COMPRESSION, "none"),
            (ENV_TIMEOUT_MS, "1"),
            (ENV_QUEUE_SIZE, "1048576"),
            (ENV_DISABLED, "no"),
            (ENV_BATCH_TIMEOUT_MS, "250"),
            (ENV_RETRY_MAX_ELAPSED_MS, "0"),
            (ENV_MAX_CONCURRENT_DETAIL, "64"),
            (ENV_MAX_BUFFER_BYTES, "65536"),
            (ENV_SPOOL_DIR, "/var/spool/callscope"),
            (ENV_SPOOL_MAX_BYTES, "1"),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_str(), "https://ingest.example.com/v1/calls");
        assert_eq!(
            c.detailed_endpoint.as_str(),
            "https://detail.example.com/v1/detail"
        );
        assert_eq!(c.api_key.as_deref(), Some("sk-123"));
        assert_eq!(c.headers, [("x-tenant".to_owned(), "acme".to_owned())]);
        assert_eq!(c.agent_id.as_deref(), Some("support-bot"));
        assert_eq!(c.call_id_keys, ["room.id"]);
        assert_eq!(c.root_span_names, ["session"]);
        assert_eq!(c.call_idle_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_open_calls, 7);
        assert_eq!(c.max_summary_bytes, 4096);
        assert_eq!(c.max_request_bytes, 16_384);
        assert_eq!(c.detail, DetailMode::Critical);
        assert_eq!(c.critical_threshold, Duration::ZERO);
        assert_eq!(c.compression, Compression::None);
        assert_eq!(c.timeout, Duration::from_millis(1));
        assert_eq!(c.queue_size, MAX_QUEUE_SIZE);
        assert!(!c.disabled);
        assert_eq!(c.batch_timeout, Duration::from_millis(250));
        assert_eq!(c.retry_max_elapsed, Duration::ZERO);
        assert_eq!(c.max_concurrent_detail, 64);
        assert_eq!(c.max_buffer_bytes, 65_536);
        assert_eq!(c.spool_dir, Some(PathBuf::from("/var/spool/callscope")));
        assert_eq!(c.spool_max_bytes, 1);
    }

    /// Invalid values for every variable that has any; each must name its variable.
    const INVALID: &[(&str, &str)] = &[
        (ENV_ENDPOINT, "not a url"),
        (ENV_ENDPOINT, "ftp://example.com/calls"),
        (ENV_ENDPOINT, "file:///tmp/calls"),
        (ENV_ENDPOINT, "127.0.0.1:4380/v1/calls"),
        (ENV_ENDPOINT, "http://"),
        (ENV_DETAILED_ENDPOINT, "ws://example.com"),
        (ENV_DETAILED_ENDPOINT, "::"),
        (ENV_API_KEY, "sk\u{1}123"),
        (ENV_API_KEY, "sk\n123"),
        (ENV_HEADERS, "novalue"),
        (ENV_HEADERS, "a=b,,c=d"),
        (ENV_HEADERS, "a=b,"),
        (ENV_HEADERS, "bad name=v"),
        (ENV_HEADERS, "=v"),
        (ENV_HEADERS, "x=a%0Ab"),
        (ENV_HEADERS, "x=%FF%FE"),
        (ENV_HEADERS, "x=a\u{7f}b"),
        (ENV_CALL_ID_KEYS, "a,,b"),
        (ENV_CALL_ID_KEYS, ","),
        (ENV_CALL_ID_KEYS, "a, "),
        (ENV_ROOT_SPAN_NAMES, ",call"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "0"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "abc"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "-1"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "1.5"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "31536000001"),
        (ENV_CALL_IDLE_TIMEOUT_MS, "99999999999999999999999"),
        (ENV_MAX_OPEN_CALLS, "0"),
        (ENV_MAX_OPEN_CALLS, "ten"),
        (ENV_MAX_OPEN_CALLS, "1e4"),
        (ENV_MAX_SUMMARY_BYTES, "4095"),
        (ENV_MAX_SUMMARY_BYTES, "500kb"),
        (ENV_MAX_REQUEST_BYTES, "16383"),
        (ENV_MAX_REQUEST_BYTES, "-4000000"),
        (ENV_DETAIL, "some"),
        (ENV_DETAIL, "al"),
        (ENV_CRITICAL_MS, "-5"),
        (ENV_CRITICAL_MS, "1s"),
        (ENV_CRITICAL_MS, "31536000001"),
        (ENV_COMPRESSION, "zstd"),
        (ENV_COMPRESSION, "false"),
        (ENV_TIMEOUT_MS, "0"),
        (ENV_TIMEOUT_MS, "10s"),
        (ENV_QUEUE_SIZE, "0"),
        (ENV_QUEUE_SIZE, "abc"),
        (ENV_QUEUE_SIZE, "1048577"),
        (ENV_DISABLED, "maybe"),
        (ENV_DISABLED, "on"),
        (ENV_DISABLED, "2"),
        (ENV_BATCH_TIMEOUT_MS, "0"),
        (ENV_BATCH_TIMEOUT_MS, "x"),
        (ENV_RETRY_MAX_ELAPSED_MS, "forever"),
        (ENV_RETRY_MAX_ELAPSED_MS, "31536000001"),
        (ENV_MAX_CONCURRENT_DETAIL, "0"),
        (ENV_MAX_CONCURRENT_DETAIL, "65"),
        (ENV_GZIP_LEVEL, "10"),
        (ENV_GZIP_LEVEL, "fast"),
        (ENV_GZIP_LEVEL_MAX, "10"),
        // Below the default CALLSCOPE_GZIP_LEVEL of 1.
        (ENV_GZIP_LEVEL_MAX, "0"),
        (ENV_MAX_BUFFER_BYTES, "65535"),
        (ENV_MAX_BUFFER_BYTES, "64MiB"),
        (ENV_SPOOL_MAX_BYTES, "0"),
        (ENV_SPOOL_MAX_BYTES, "1GiB"),
        (ENV_SPOOL_MAX_BYTES, "18446744073709551616"),
    ];

    #[test]
    fn invalid_env_values_name_their_variable() {
        for &(var, value) in INVALID {
            let error = if var == ENV_ENDPOINT {
                env_err(&[(var, value)])
            } else {
                env_err(&[(ENV_ENDPOINT, URL), (var, value)])
            };
            assert_invalid(&error, var);
            let ConfigError::Invalid { expected, .. } = &error else {
                unreachable!()
            };
            assert!(!expected.is_empty(), "{var}={value:?}");
        }
    }

    #[test]
    fn invalid_table_covers_every_variable_that_can_be_invalid() {
        // Any non-empty text is a valid agent id or spool directory.
        for var in ENV_VARS
            .iter()
            .filter(|v| ![ENV_AGENT_ID, ENV_SPOOL_DIR].contains(v))
        {
            assert!(
                INVALID.iter().any(|(v, _)| v == var),
                "no invalid value tested for {var}"
            );
        }
    }

    /// The maximum defaults to 5 only when no level is set; a level set alone is fixed; a
    /// maximum below the level is an error naming the maximum, from the environment and from
    /// code alike.
    #[test]
    fn gzip_level_max_follows_a_level_set_alone_and_never_falls_below_it() {
        let levels = |pairs: &[(&str, &str)]| {
            let mut all = vec![(ENV_ENDPOINT, URL)];
            all.extend_from_slice(pairs);
            let c = env_config(&all).unwrap();
            (c.gzip_level, c.gzip_level_max)
        };
        assert_eq!(levels(&[]), (1, 5));
        assert_eq!(levels(&[(ENV_GZIP_LEVEL, "1")]), (1, 1));
        assert_eq!(levels(&[(ENV_GZIP_LEVEL, "7")]), (7, 7));
        assert_eq!(levels(&[(ENV_GZIP_LEVEL_MAX, "9")]), (1, 9));
        assert_eq!(
            levels(&[(ENV_GZIP_LEVEL, "2"), (ENV_GZIP_LEVEL_MAX, "6")]),
            (2, 6)
        );
        assert_eq!(
            levels(&[(ENV_GZIP_LEVEL, "0"), (ENV_GZIP_LEVEL_MAX, "0")]),
            (0, 0)
        );
        let error = env_err(&[
            (ENV_ENDPOINT, URL),
            (ENV_GZIP_LEVEL, "6"),
            (ENV_GZIP_LEVEL_MAX, "5"),
        ]);
        assert_invalid(&error, ENV_GZIP_LEVEL_MAX);
        assert!(
            error.to_string().contains("at least CALLSCOPE_GZIP_LEVEL"),
            "{error}"
        );

        let c = base().gzip_level(3).build_with(|_| None).unwrap();
        assert_eq!((c.gzip_level, c.gzip_level_max), (3, 3));
        let c = base().gzip_level_max(8).build_with(|_| None).unwrap();
        assert_eq!((c.gzip_level, c.gzip_level_max), (1, 8));
        assert_invalid(
            &builder_err(base().gzip_level(4).gzip_level_max(2)),
            ENV_GZIP_LEVEL_MAX,
        );
    }

    #[test]
    fn invalid_values_are_errors_even_when_disabled() {
        let error = env_err(&[(ENV_DISABLED, "true"), (ENV_QUEUE_SIZE, "abc")]);
        assert_invalid(&error, ENV_QUEUE_SIZE);
    }

    #[test]
    fn error_messages() {
        let error = env_err(&[(ENV_ENDPOINT, URL), (ENV_QUEUE_SIZE, "abc")]);
        assert_eq!(
            error.to_string(),
            "CALLSCOPE_QUEUE_SIZE=\"abc\" is invalid: expected an integer from 1 to 1048576"
        );
        assert_eq!(error.var(), ENV_QUEUE_SIZE);

        let error = env_err(&[]);
        assert!(matches!(
            error,
            ConfigError::Missing {
                var: ENV_ENDPOINT,
                ..
            }
        ));
        let message = error.to_string();
        assert!(
            message.starts_with("CALLSCOPE_ENDPOINT is not set: set it to the URL"),
            "{message}"
        );
        assert!(
            message.contains("http://127.0.0.1:4380/v1/calls"),
            "{message}"
        );
        assert!(message.contains("CALLSCOPE_DISABLED=true"), "{message}");

        let error = env_err(&[(ENV_ENDPOINT, "ftp://x")]);
        assert_eq!(
            error.to_string(),
            "CALLSCOPE_ENDPOINT=\"ftp://x\" is invalid: expected an absolute http:// or \
             https:// URL, e.g. http://127.0.0.1:4380/v1/calls"
        );
    }

    #[test]
    fn empty_and_blank_values_count_as_unset() {
        let mut pairs: Vec<(&str, &str)> = ENV_VARS.iter().map(|v| (*v, "")).collect();
        pairs.push((ENV_ENDPOINT, URL));
        pairs.retain(|(v, value)| *v != ENV_ENDPOINT || !value.is_empty());
        let c = env_config(&pairs).unwrap();
        let d = env_config(&[(ENV_ENDPOINT, URL)]).unwrap();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));

        let c = env_config(&[
            (ENV_ENDPOINT, URL),
            (ENV_QUEUE_SIZE, "  "),
            (ENV_DETAIL, "\t"),
        ])
        .unwrap();
        assert_eq!(c.queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(c.detail, DEFAULT_DETAIL);

        // An empty endpoint is a missing endpoint.
        assert!(matches!(
            env_err(&[(ENV_ENDPOINT, "")]),
            ConfigError::Missing { .. }
        ));
    }

    #[test]
    fn values_are_trimmed() {
        let c = env_config(&[
            (ENV_ENDPOINT, "  https://example.com/calls \n"),
            (ENV_QUEUE_SIZE, " 42 "),
            (ENV_CALL_ID_KEYS, " call_id , room.id "),
            (ENV_ROOT_SPAN_NAMES, "a ,b"),
            (ENV_API_KEY, " sk-1 "),
            (ENV_AGENT_ID, " bot "),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_str(), "https://example.com/calls");
        assert_eq!(c.queue_size, 42);
        assert_eq!(c.call_id_keys, ["call_id", "room.id"]);
        assert_eq!(c.root_span_names, ["a", "b"]);
        assert_eq!(c.api_key.as_deref(), Some("sk-1"));
        assert_eq!(c.agent_id.as_deref(), Some("bot"));
    }

    #[test]
    fn enums_and_bools_are_case_insensitive() {
        for (raw, mode) in [
            ("all", DetailMode::All),
            ("ALL", DetailMode::All),
            ("Critical", DetailMode::Critical),
            ("none", DetailMode::None),
            ("NONE", DetailMode::None),
        ] {
            let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_DETAIL, raw)]).unwrap();
            assert_eq!(c.detail, mode, "{raw}");
            assert!(raw.eq_ignore_ascii_case(&mode.to_string()));
        }
        for (raw, compression) in [
            ("gzip", Compression::Gzip),
            ("GZip", Compression::Gzip),
            ("none", Compression::None),
            ("None", Compression::None),
            ("auto", Compression::Auto),
            ("AUTO", Compression::Auto),
        ] {
            let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_COMPRESSION, raw)]).unwrap();
            assert_eq!(c.compression, compression, "{raw}");
            assert!(raw.eq_ignore_ascii_case(compression.as_str()));
        }
        for (raw, value) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("Yes", true),
            ("false", false),
            ("False", false),
            ("0", false),
            ("no", false),
            ("NO", false),
        ] {
            let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_DISABLED, raw)]).unwrap();
            assert_eq!(c.disabled, value, "{raw}");
        }
    }

    #[test]
    fn code_wins_over_env() {
        let env = lookup(&[
            (ENV_ENDPOINT, "http://env.example.com/core"),
            (ENV_DETAILED_ENDPOINT, "http://env.example.com/detail"),
            (ENV_API_KEY, "env-key"),
            (ENV_AGENT_ID, "env-agent"),
            (ENV_CALL_ID_KEYS, "env.key"),
            (ENV_ROOT_SPAN_NAMES, "env_root"),
            (ENV_CALL_IDLE_TIMEOUT_MS, "5"),
            (ENV_MAX_OPEN_CALLS, "5"),
            (ENV_MAX_SUMMARY_BYTES, "5000"),
            (ENV_MAX_REQUEST_BYTES, "50000"),
            (ENV_DETAIL, "none"),
            (ENV_CRITICAL_MS, "5"),
            (ENV_COMPRESSION, "none"),
            (ENV_TIMEOUT_MS, "5"),
            (ENV_QUEUE_SIZE, "5"),
            (ENV_DISABLED, "true"),
            (ENV_BATCH_TIMEOUT_MS, "5"),
            (ENV_RETRY_MAX_ELAPSED_MS, "5"),
            (ENV_MAX_CONCURRENT_DETAIL, "5"),
            (ENV_MAX_BUFFER_BYTES, "500000"),
            (ENV_SPOOL_DIR, "/env/spool"),
            (ENV_SPOOL_MAX_BYTES, "5"),
        ]);
        let c = Config::builder()
            .endpoint("https://code.example.com/core")
            .detailed_endpoint("https://code.example.com/detail")
            .api_key("code-key")
            .agent_id("code-agent")
            .call_id_keys(["code.key"])
            .root_span_names(Vec::<String>::new())
            .call_idle_timeout(Duration::from_millis(7))
            .max_open_calls(7)
            .max_summary_bytes(7000)
            .max_request_bytes(70_000)
            .detail(DetailMode::Critical)
            .critical_threshold(Duration::from_millis(7))
            .compression(Compression::Gzip)
            .timeout(Duration::from_millis(7))
            .queue_size(7)
            .disabled(false)
            .batch_timeout(Duration::from_millis(7))
            .retry_max_elapsed(Duration::from_millis(7))
            .max_concurrent_detail(7)
            .max_buffer_bytes(700_000)
            .spool_dir("/code/spool")
            .spool_max_bytes(7)
            .build_with(env)
            .unwrap();
        assert_eq!(c.endpoint.as_str(), "https://code.example.com/core");
        assert_eq!(
            c.detailed_endpoint.as_str(),
            "https://code.example.com/detail"
        );
        assert_eq!(c.api_key.as_deref(), Some("code-key"));
        assert_eq!(c.agent_id.as_deref(), Some("code-agent"));
        assert_eq!(c.call_id_keys, ["code.key"]);
        assert!(c.root_span_names.is_empty());
        assert_eq!(c.call_idle_timeout, Duration::from_millis(7));
        assert_eq!(c.max_open_calls, 7);
        assert_eq!(c.max_summary_bytes, 7000);
        assert_eq!(c.max_request_bytes, 70_000);
        assert_eq!(c.detail, DetailMode::Critical);
        assert_eq!(c.critical_threshold, Duration::from_millis(7));
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.timeout, Duration::from_millis(7));
        assert_eq!(c.queue_size, 7);
        assert!(!c.disabled);
        assert_eq!(c.batch_timeout, Duration::from_millis(7));
        assert_eq!(c.retry_max_elapsed, Duration::from_millis(7));
        assert_eq!(c.max_concurrent_detail, 7);
        assert_eq!(c.max_buffer_bytes, 700_000);
        assert_eq!(c.spool_dir, Some(PathBuf::from("/code/spool")));
        assert_eq!(c.spool_max_bytes, 7);
    }

    #[test]
    fn a_value_set_in_code_hides_an_invalid_env_value() {
        let c = Config::builder()
            .queue_size(3)
            .detail(DetailMode::None)
            .build_with(lookup(&[
                (ENV_ENDPOINT, URL),
                (ENV_QUEUE_SIZE, "abc"),
                (ENV_DETAIL, "bogus"),
            ]))
            .unwrap();
        assert_eq!(c.queue_size, 3);
        assert_eq!(c.detail, DetailMode::None);
    }

    #[test]
    fn env_fills_what_code_leaves_unset() {
        let c = Config::builder()
            .queue_size(3)
            .build_with(lookup(&[(ENV_ENDPOINT, URL), (ENV_TIMEOUT_MS, "1234")]))
            .unwrap();
        assert_eq!(c.queue_size, 3);
        assert_eq!(c.timeout, Duration::from_millis(1234));
    }

    #[test]
    fn without_env_ignores_the_lookup() {
        let env = lookup(&[
            (ENV_ENDPOINT, URL),
            (ENV_QUEUE_SIZE, "abc"),
            (ENV_OTEL_SDK_DISABLED, "true"),
        ]);
        let error = Config::builder()
            .without_env()
            .build_with(&env)
            .unwrap_err();
        assert!(matches!(
            error,
            ConfigError::Missing {
                var: ENV_ENDPOINT,
                ..
            }
        ));

        let c = base().build_with(&env).unwrap();
        assert_eq!(c.queue_size, DEFAULT_QUEUE_SIZE);
        assert!(!c.disabled);
    }

    #[test]
    fn builder_values_out_of_bounds_name_the_variable() {
        let cases: Vec<(ConfigBuilder, &str)> = vec![
            (Config::builder().endpoint("ftp://x"), ENV_ENDPOINT),
            (base().detailed_endpoint("nope"), ENV_DETAILED_ENDPOINT),
            (base().api_key(""), ENV_API_KEY),
            (base().api_key("a\r\nX-Evil: 1"), ENV_API_KEY),
            (base().header("bad name", "v"), ENV_HEADERS),
            (base().header("", "v"), ENV_HEADERS),
            (base().header("x-ok", "line\nbreak"), ENV_HEADERS),
            (base().agent_id(" "), ENV_AGENT_ID),
            (base().call_id_keys(Vec::<String>::new()), ENV_CALL_ID_KEYS),
            (base().call_id_keys(["ok", ""]), ENV_CALL_ID_KEYS),
            (base().root_span_names(["  "]), ENV_ROOT_SPAN_NAMES),
            (
                base().call_idle_timeout(Duration::ZERO),
                ENV_CALL_IDLE_TIMEOUT_MS,
            ),
            (
                base().call_idle_timeout(Duration::from_micros(999)),
                ENV_CALL_IDLE_TIMEOUT_MS,
            ),
            (
                base().call_idle_timeout(Duration::MAX),
                ENV_CALL_IDLE_TIMEOUT_MS,
            ),
            (base().max_open_calls(0), ENV_MAX_OPEN_CALLS),
            (base().max_summary_bytes(4095), ENV_MAX_SUMMARY_BYTES),
            (base().max_request_bytes(0), ENV_MAX_REQUEST_BYTES),
            (
                base().critical_threshold(MAX_DURATION + Duration::from_nanos(1)),
                ENV_CRITICAL_MS,
            ),
            (base().timeout(Duration::ZERO), ENV_TIMEOUT_MS),
            (base().queue_size(0), ENV_QUEUE_SIZE),
            (base().queue_size(usize::MAX), ENV_QUEUE_SIZE),
            (base().batch_timeout(Duration::ZERO), ENV_BATCH_TIMEOUT_MS),
            (
                base().retry_max_elapsed(Duration::MAX),
                ENV_RETRY_MAX_ELAPSED_MS,
            ),
            (base().max_concurrent_detail(0), ENV_MAX_CONCURRENT_DETAIL),
            (
                base().max_concurrent_detail(1000),
                ENV_MAX_CONCURRENT_DETAIL,
            ),
            (base().max_buffer_bytes(1024), ENV_MAX_BUFFER_BYTES),
            (base().spool_dir(""), ENV_SPOOL_DIR),
            (base().spool_max_bytes(0), ENV_SPOOL_MAX_BYTES),
        ];
        for (builder, var) in cases {
            let error = builder_err(builder);
            assert_invalid(&error, var);
        }
    }

    #[test]
    fn builder_values_are_shown_as_their_variable_would_hold_them() {
        let error = builder_err(base().timeout(Duration::ZERO));
        assert_eq!(
            error.to_string(),
            "CALLSCOPE_TIMEOUT_MS=\"0\" is invalid: expected an integer number of milliseconds \
             from 1 to 31536000000 (365 days)"
        );
        let error = builder_err(base().timeout(Duration::from_micros(500)));
        assert!(error.to_string().contains("=\"0.5\""), "{error}");
        let error = builder_err(base().queue_size(0));
        assert!(
            error.to_string().starts_with("CALLSCOPE_QUEUE_SIZE=\"0\""),
            "{error}"
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let c = base()
            .call_idle_timeout(MAX_DURATION)
            .timeout(Duration::from_millis(1))
            .critical_threshold(Duration::ZERO)
            .retry_max_elapsed(Duration::ZERO)
            .max_summary_bytes(MIN_MAX_SUMMARY_BYTES)
            .max_request_bytes(MIN_MAX_REQUEST_BYTES)
            .queue_size(MAX_QUEUE_SIZE)
            .max_concurrent_detail(MAX_MAX_CONCURRENT_DETAIL)
            .max_buffer_bytes(MIN_MAX_BUFFER_BYTES)
            .spool_max_bytes(1)
            .build_with(|_| None)
            .unwrap();
        assert_eq!(c.call_idle_timeout, MAX_DURATION);
        let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_TIMEOUT_MS, "31536000000")]).unwrap();
        assert_eq!(c.timeout, MAX_DURATION);
        // Sub-millisecond durations are fine in code as long as they are in range.
        let c = base()
            .timeout(Duration::from_micros(1500))
            .build_with(|_| None)
            .unwrap();
        assert_eq!(c.timeout, Duration::from_micros(1500));
    }

    #[test]
    fn headers_are_parsed_like_otlp_headers() {
        let c = env_config(&[
            (ENV_ENDPOINT, URL),
            (
                ENV_HEADERS,
                " X-Tenant = acme , x-note=hello%20world%2C%3Dok,x-utf8=%E2%9C%93, x-empty= ,x-pct=50%,x-odd=%zz%4",
            ),
        ])
        .unwrap();
        let expect: Vec<(String, String)> = [
            ("x-tenant", "acme"),
            ("x-note", "hello world,=ok"),
            ("x-utf8", "\u{2713}"),
            ("x-empty", ""),
            ("x-pct", "50%"),
            ("x-odd", "%zz%4"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(c.headers, expect);
        // Values may contain '='; only the first one splits.
        let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_HEADERS, "x-b64=YWJj==")]).unwrap();
        assert_eq!(c.headers, [("x-b64".to_owned(), "YWJj==".to_owned())]);
        // Every header is usable by reqwest.
        for (name, value) in &c.headers {
            HeaderName::from_bytes(name.as_bytes()).unwrap();
            HeaderValue::from_str(value).unwrap();
        }
    }

    #[test]
    fn header_errors_do_not_leak_values() {
        let error = env_err(&[
            (ENV_ENDPOINT, URL),
            (ENV_HEADERS, "Authorization: Bearer s3cret"),
        ]);
        assert_invalid(&error, ENV_HEADERS);
        assert!(!error.to_string().contains("s3cret"), "{error}");

        let error = env_err(&[(ENV_ENDPOINT, URL), (ENV_HEADERS, "x-key=s3cret%0A")]);
        assert_invalid(&error, ENV_HEADERS);
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert!(error.to_string().contains("x-key"), "{error}");

        let error = env_err(&[(ENV_ENDPOINT, URL), (ENV_HEADERS, "bad name=s3cret")]);
        assert!(error.to_string().contains("bad name"), "{error}");
        assert!(!error.to_string().contains("s3cret"), "{error}");

        let error = env_err(&[(ENV_ENDPOINT, URL), (ENV_API_KEY, "s3cret\u{0}")]);
        assert_invalid(&error, ENV_API_KEY);
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn code_headers_replace_env_headers_of_the_same_name() {
        let c = Config::builder()
            .header("X-Tenant", "code")
            .header("x-extra", "1")
            .header("X-EXTRA", "2")
            .build_with(lookup(&[
                (ENV_ENDPOINT, URL),
                (ENV_HEADERS, "x-tenant=env,x-env=prod"),
            ]))
            .unwrap();
        let expect: Vec<(String, String)> =
            [("x-env", "prod"), ("x-tenant", "code"), ("x-extra", "2")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        assert_eq!(c.headers, expect);
        // Values from code are taken as is (not percent-decoded).
        let c = base()
            .header("x-raw", "a%20b")
            .build_with(|_| None)
            .unwrap();
        assert_eq!(c.headers, [("x-raw".to_owned(), "a%20b".to_owned())]);
    }

    #[test]
    fn endpoint_urls() {
        for ok in [
            "http://127.0.0.1:4380/v1/calls",
            "https://ingest.example.com",
            "HTTPS://Example.COM/path?x=1",
            "http://[::1]:8080/",
        ] {
            let c = env_config(&[(ENV_ENDPOINT, ok)]).unwrap();
            assert!(matches!(c.endpoint.scheme(), "http" | "https"), "{ok}");
        }
        let c = env_config(&[
            (ENV_ENDPOINT, URL),
            (
                ENV_DETAILED_ENDPOINT,
                "https://detail.example.com/v1/detail",
            ),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_str(), URL);
        assert_eq!(
            c.detailed_endpoint.as_str(),
            "https://detail.example.com/v1/detail"
        );
        // The detailed endpoint defaults to the endpoint, also when it is set in code.
        let c = base()
            .endpoint("https://code.example.com/x")
            .build_with(|_| None)
            .unwrap();
        assert_eq!(c.detailed_endpoint.as_str(), "https://code.example.com/x");
        // A detailed endpoint alone is not enough.
        let error = env_err(&[(ENV_DETAILED_ENDPOINT, URL)]);
        assert!(matches!(
            error,
            ConfigError::Missing {
                var: ENV_ENDPOINT,
                ..
            }
        ));
    }

    #[test]
    fn disabled_builds_without_endpoint() {
        for pairs in [
            &[(ENV_DISABLED, "true")][..],
            &[(ENV_DISABLED, "1")][..],
            &[(ENV_OTEL_SDK_DISABLED, "true")][..],
            &[(ENV_OTEL_SDK_DISABLED, "TRUE")][..],
            &[(ENV_DISABLED, "false"), (ENV_OTEL_SDK_DISABLED, "true")][..],
        ] {
            let c = env_config(pairs).unwrap();
            assert!(c.disabled, "{pairs:?}");
            assert_eq!(c.endpoint.as_str(), DISABLED_PLACEHOLDER_ENDPOINT);
            assert_eq!(c.detailed_endpoint, c.endpoint);
        }
        let c = base()
            .endpoint(URL)
            .disabled(true)
            .build_with(|_| None)
            .unwrap();
        assert!(c.disabled);
        assert_eq!(c.endpoint.as_str(), URL);
        let c = Config::builder()
            .without_env()
            .disabled(true)
            .build_with(|_| None)
            .unwrap();
        assert_eq!(c.endpoint.as_str(), DISABLED_PLACEHOLDER_ENDPOINT);
        // An endpoint that is set must still be valid.
        let error = env_err(&[(ENV_DISABLED, "true"), (ENV_ENDPOINT, "ftp://x")]);
        assert_invalid(&error, ENV_ENDPOINT);
    }

    #[test]
    fn otel_sdk_disabled_is_lenient_and_code_wins() {
        for raw in ["false", "0", "no", "garbage", "enabled"] {
            let c = env_config(&[(ENV_ENDPOINT, URL), (ENV_OTEL_SDK_DISABLED, raw)]).unwrap();
            assert!(!c.disabled, "{raw}");
        }
        let c = Config::builder()
            .disabled(false)
            .build_with(lookup(&[
                (ENV_ENDPOINT, URL),
                (ENV_OTEL_SDK_DISABLED, "true"),
            ]))
            .unwrap();
        assert!(!c.disabled);
        // Disabled in code but enabled in env.
        let c = Config::builder()
            .disabled(true)
            .build_with(lookup(&[(ENV_DISABLED, "false")]))
            .unwrap();
        assert!(c.disabled);
    }

    #[test]
    fn debug_hides_secrets() {
        let c = env_config(&[
            (ENV_ENDPOINT, URL),
            (ENV_API_KEY, "sk-s3cret"),
            (ENV_HEADERS, "x-token=t0ken"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
        assert!(
            shown.contains("x-token") && shown.contains(REDACTED),
            "{shown}"
        );
        let b = Config::builder()
            .api_key("sk-s3cret")
            .header("x-token", "t0ken");
        let shown = format!("{b:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(""), b"");
        assert_eq!(percent_decode("abc"), b"abc");
        assert_eq!(percent_decode("%41%62%2f%2F"), b"Ab//");
        assert_eq!(percent_decode("%"), b"%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("%G1"), b"%G1");
        assert_eq!(percent_decode("100%%41"), b"100%A");
        assert_eq!(percent_decode("%FF"), [0xFF]);
        assert_eq!(percent_decode("+"), b"+");
    }

    #[test]
    fn real_env_entry_points_do_not_panic() {
        // Reads (never writes) the process environment: whatever is set, no panic.
        let _ = Config::from_env();
        let c = Config::builder()
            .without_env()
            .endpoint(URL)
            .build()
            .unwrap();
        assert_eq!(c.endpoint.as_str(), URL);
    }
}
