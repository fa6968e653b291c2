//! `callscope-ingest`: the receiver service for callscope's wire contract v1.
//!
//! Wires flags and environment to [`callscope_ingest::serve`]; see `--help`.

use std::net::SocketAddr;
use std::process::ExitCode;

use callscope_ingest::{
    DEFAULT_ADDR, DEFAULT_BODY_TIMEOUT, DEFAULT_DATABASE_URL, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_DECOMPRESSED_BYTES, DEFAULT_MAX_IN_FLIGHT, ENV_ADDR,
    ENV_API_KEYS, ENV_BODY_TIMEOUT_MS, ENV_DATABASE_URL, ENV_MAX_BODY_BYTES,
    ENV_MAX_BUFFERED_BYTES, ENV_MAX_DECOMPRESSED_BYTES, ENV_MAX_IN_FLIGHT, IngestConfig,
    MAX_BODY_TIMEOUT, MAX_MAX_IN_FLIGHT, serve,
};
use clap::Parser;
use clap::builder::TypedValueParser;
use tracing_subscriber::EnvFilter;

/// Receiver for callscope call logs and span batches (wire contract v1).
///
/// POST /v1/calls takes core call logs and detail batches (JSON, optionally gzip); GET /v1/calls,
/// /v1/calls/{call_id} and /v1/calls/{call_id}/spans read them back; GET /healthz is open.
/// Stores in SQLite by default, or PostgreSQL when --database-url is postgres://… (several
/// instances may share one PostgreSQL). Logs go to stderr; set RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(name = "callscope-ingest", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = ENV_ADDR, default_value = DEFAULT_ADDR)]
    addr: SocketAddr,

    /// Database: sqlite://path/to/file.db (created if missing) or postgres://user@host/db.
    #[arg(long, env = ENV_DATABASE_URL, default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,

    /// Accepted API keys, comma separated; senders use `Authorization: Bearer <key>` or
    /// `x-api-key: <key>`. Required unless --no-auth.
    #[arg(long, env = ENV_API_KEYS, value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,

    /// Accept requests without an API key (local development only).
    #[arg(long)]
    no_auth: bool,

    /// Largest request body on the wire in bytes; larger requests get 413.
    #[arg(long, env = ENV_MAX_BODY_BYTES, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,

    /// Largest body after gzip decompression in bytes; larger bodies get 413.
    #[arg(long, env = ENV_MAX_DECOMPRESSED_BYTES, default_value_t = DEFAULT_MAX_DECOMPRESSED_BYTES)]
    max_decompressed_bytes: usize,

    /// POST requests handled at once (reading, decoding, storing); past it, 503 with
    /// Retry-After at once. A quarter is kept for core call logs.
    #[arg(
        long,
        env = ENV_MAX_IN_FLIGHT,
        default_value_t = DEFAULT_MAX_IN_FLIGHT,
        value_parser = clap::value_parser!(u32).range(1..=MAX_MAX_IN_FLIGHT as i64).map(|n| n as usize),
    )]
    max_in_flight: usize,

    /// Bytes of request bodies held at once (on the wire and decompressed); past it, 503 with
    /// Retry-After. Detail batches may fill three quarters, core call logs all of it.
    #[arg(long, env = ENV_MAX_BUFFERED_BYTES, default_value_t = DEFAULT_MAX_BUFFERED_BYTES)]
    max_buffered_bytes: usize,

    /// Milliseconds a request body may send nothing before the request is answered 408.
    #[arg(
        long,
        env = ENV_BODY_TIMEOUT_MS,
        default_value_t = DEFAULT_BODY_TIMEOUT.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(1..=MAX_BODY_TIMEOUT.as_millis() as u64),
    )]
    body_timeout_ms: u64,
}

impl Cli {
    fn into_config(self) -> IngestConfig {
        let mut config = IngestConfig::new(self.database_url);
        config.addr = self.addr;
        config.api_keys = self
            .api_keys
            .into_iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        config.no_auth = self.no_auth;
        config.max_body_bytes = self.max_body_bytes;
        config.max_decompressed_bytes = self.max_decompressed_bytes;
        config.max_in_flight = self.max_in_flight;
        config.max_buffered_bytes = self.max_buffered_bytes;
        config.body_timeout = std::time::Duration::from_millis(self.body_timeout_ms);
        config
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = async {
        let server = serve(cli.into_config()).await?;
        server.run_until_signal().await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)] // telling the operator why it stopped is main's job
            {
                eprintln!("callscope-ingest: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
