//! Receiver for callscope's wire contract v1: stores call logs (phase 1) and span batches
//! (phase 2) in SQLite (embedded default) or PostgreSQL.
//!
//! `POST /v1/calls` takes both phases (`update_type: "detailed_telemetry"` marks detail),
//! optionally gzip-compressed; each Idempotency-Key and each (call_id, batch_seq) is stored once,
//! also under concurrent duplicates. `GET /v1/calls`, `GET /v1/calls/{call_id}`,
//! `GET /v1/calls/{call_id}/spans` read it back; `GET /healthz` is open.
//!
//! # Quick start
//! ```no_run
//! # async fn run() -> Result<(), callscope_ingest::IngestError> {
//! use callscope_ingest::{IngestConfig, serve};
//!
//! let mut config = IngestConfig::new("sqlite:///tmp/callscope.db");
//! config.api_keys = vec!["secret".to_owned()];
//! let server = serve(config).await?;
//! println!("post to {}", server.endpoint());
//! // … senders post with `Authorization: Bearer secret` …
//! assert_eq!(server.store.duplicate_span_rows().await?, 0);
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! In tests, drive the router directly with [`app`] and `tower::ServiceExt::oneshot`.

mod api;
mod body;
mod config;
mod error;
mod payload;
mod server;
mod store;

pub use api::{AppState, app};
pub use config::{
    DEFAULT_ADDR, DEFAULT_BODY_TIMEOUT, DEFAULT_DATABASE_URL, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_DECOMPRESSED_BYTES, DEFAULT_MAX_IN_FLIGHT, ENV_ADDR,
    ENV_API_KEYS, ENV_BODY_TIMEOUT_MS, ENV_DATABASE_URL, ENV_MAX_BODY_BYTES,
    ENV_MAX_BUFFERED_BYTES, ENV_MAX_DECOMPRESSED_BYTES, ENV_MAX_IN_FLIGHT, IngestConfig,
    MAX_BODY_TIMEOUT, MAX_MAX_IN_FLIGHT, parse_api_keys,
};
pub use error::IngestError;
pub use server::{RunningServer, serve};
pub use store::Store;
