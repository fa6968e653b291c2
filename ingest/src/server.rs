//! Starting and stopping the server.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{AppState, app};
use crate::config::IngestConfig;
use crate::error::IngestError;
use crate::store::Store;

/// A server started by [`serve`]: where it listens, its store, and the handle to stop it.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address (the real port when the config asked for port 0).
    pub local_addr: SocketAddr,
    /// The server's store, for checking what was stored. Stays usable after shutdown.
    pub store: Store,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Validates `config`, connects to the database (running migrations), binds `config.addr` and
/// serves the [`app`] in a background task; returns as soon as the server accepts connections.
///
/// # Errors
/// [`IngestError::NoApiKeys`] when no key is configured and `no_auth` is false;
/// [`IngestError::Config`] for a setting out of range; connection, migration or bind errors.
pub async fn serve(config: IngestConfig) -> Result<RunningServer, IngestError> {
    if config.api_keys.is_empty() && !config.no_auth {
        return Err(IngestError::NoApiKeys);
    }
    config.validate()?;
    let largest_post = config
        .max_body_bytes
        .saturating_add(config.max_decompressed_bytes);
    if config.max_buffered_bytes < largest_post {
        tracing::warn!(
            max_buffered_bytes = config.max_buffered_bytes,
            largest_post,
            "CALLSCOPE_INGEST_MAX_BUFFERED_BYTES is below one post of the largest size \
             (max body + max decompressed): such a post gets in only when nothing else is held"
        );
    }
    let store = Store::connect(&config.database_url).await?;
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| IngestError::Bind {
        addr: config.addr,
        source,
    })?;
    let router = app(AppState::new(store.clone(), &config));
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                // A dropped sender also means stop.
                let _ = stop.await;
            })
            .await
    });
    tracing::info!(
        addr = %local_addr,
        database = store.backend_name(),
        auth = !config.no_auth,
        "callscope-ingest listening"
    );
    Ok(RunningServer {
        local_addr,
        store,
        shutdown,
        task,
    })
}

impl RunningServer {
    /// `http://<local_addr>/v1/calls`, the endpoint senders post to.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/calls", self.local_addr)
    }

    /// Stops accepting connections, lets in-flight requests finish, and waits for the server task.
    ///
    /// # Errors
    /// [`IngestError::Serve`] or [`IngestError::Task`] when the server had failed.
    pub async fn shutdown(self) -> Result<(), IngestError> {
        let _ = self.shutdown.send(());
        self.task.await?.map_err(IngestError::Serve)
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully and closes the
    /// database pool. Returns early with the error if the server fails on its own.
    ///
    /// # Errors
    /// As [`shutdown`](Self::shutdown).
    pub async fn run_until_signal(mut self) -> Result<(), IngestError> {
        let store = self.store.clone();
        let result = tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("shutdown signal received; draining requests");
                self.shutdown().await
            }
            ended = &mut self.task => ended?.map_err(IngestError::Serve),
        };
        store.close().await;
        result
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
