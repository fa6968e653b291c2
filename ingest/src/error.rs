//! Errors of starting the server and of the storage layer.

/// What went wrong starting, running or querying the ingest server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// An environment variable or flag has a value that does not parse.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    Config {
        /// The variable (or flag) name.
        var: &'static str,
        /// The rejected value.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// No API key is configured and authentication was not explicitly disabled.
    #[error(
        "no API keys configured: set CALLSCOPE_INGEST_API_KEYS (comma list) or --api-keys, \
         or pass --no-auth to accept unauthenticated requests (development only)"
    )]
    NoApiKeys,
    /// The database URL names no supported backend.
    #[error(
        "unsupported DATABASE_URL {0:?}: use sqlite://path/to/file.db or postgres://user@host/db"
    )]
    UnsupportedDatabaseUrl(String),
    /// Connecting to the database failed.
    #[error(
        "cannot connect to the database ({backend}): {source}; check DATABASE_URL and that the server is running"
    )]
    Connect {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// Running the schema migrations failed.
    #[error("database migration failed: {0}; the schema may have been changed by hand")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server stopped with an I/O error.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("the server task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}
