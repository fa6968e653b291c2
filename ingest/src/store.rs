//! Storage: SQLite (embedded default) or PostgreSQL behind one [`Store`].
//!
//! Every query is written once, in SQL both backends accept (`$N` parameters, `ON CONFLICT`,
//! `COALESCE`), and [`on_pool!`] expands it for the pool at hand. Exactly-once delivery rests on
//! unique keys plus `INSERT … ON CONFLICT DO NOTHING` inside one transaction per request, so
//! concurrent duplicates (on one server or many sharing a PostgreSQL) store nothing twice.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::types::Json;
use sqlx::{FromRow, QueryBuilder};
use tokio::sync::{Mutex, MutexGuard};

use crate::error::IngestError;
use crate::payload::{CoreCall, DetailBatch, RawJson, SpanRow};
use serde_json::value::RawValue;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Rows per multi-row span `INSERT` (16 parameters each; well under both backends' limits).
const SPAN_INSERT_CHUNK: usize = 256;
/// How long a SQLite writer waits for the write lock before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle to the database: cheap to clone, shared by all requests.
///
/// Open it with [`Store::connect`]; it runs the migrations. The query methods here are what the
/// demo and end-to-end tests use to check what was stored.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    /// With its writers' line ([`WriteGate`]), shared by the store's clones.
    Sqlite(SqlitePool, Arc<WriteGate>),
    /// No line: row locks let writers of different calls run at once.
    Postgres(PgPool),
}

/// SQLite lets one connection write at a time. Left to SQLite, a writer that finds the lock
/// taken sleeps in its busy handler (steps of 1, 2, 5 … up to 100 ms) and is not woken when
/// the lock frees: with detail batches streaming, a core summary's phase-1 p99 was 60–246 ms
/// in the demo although each batch writes in a few ms. Here writers wait in line in the
/// process instead, woken the moment the write before them commits, and at most one detail
/// batch is ever in line ahead of a core summary (cores ahead of it still go first).
///
/// Two steps, so that waiting writers still overlap what does not write: a detail batch
/// first takes its place among the batches ([`batch_line`](Self::batch_line)) before it
/// takes a pooled connection (waiting batches never hold the connections a core needs);
/// then every writer begins its transaction and takes [`write`](Self::write) until it has
/// committed or rolled back. Each wait is bounded by SQLite's own busy timeout, and past it
/// the write is answered as a busy database is (503, retry later).
///
/// The line is per [`Store`]: two stores (or two servers) on one SQLite file fall back on
/// the busy handler between them.
#[derive(Debug)]
struct WriteGate {
    /// Held from before a write's first statement until its transaction is over; handed over
    /// in the order writers asked for it (after their connection and `BEGIN`).
    write: Mutex<()>,
    /// Held by a detail batch from before it takes a connection until its transaction is over.
    batches: Mutex<()>,
    /// Longest wait for either lock.
    wait: Duration,
}

impl WriteGate {
    fn new(wait: Duration) -> Self {
        WriteGate {
            write: Mutex::new(()),
            batches: Mutex::new(()),
            wait,
        }
    }

    /// A detail batch's place among the batches.
    async fn batch_line(&self) -> Result<MutexGuard<'_, ()>, sqlx::Error> {
        self.bounded(&self.batches).await
    }

    /// The write lock.
    async fn write(&self) -> Result<MutexGuard<'_, ()>, sqlx::Error> {
        self.bounded(&self.write).await
    }

    /// Waits for `m` at most [`wait`](Self::wait) (SQLite's busy timeout, as long as its busy
    /// handler would have waited); past that a pool time-out, which the API answers as a busy
    /// database.
    async fn bounded<'a>(&self, m: &'a Mutex<()>) -> Result<MutexGuard<'a, ()>, sqlx::Error> {
        tokio::time::timeout(self.wait, m.lock())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }
}

/// How a write transaction's body ends.
enum Finish<T> {
    Commit(T),
    /// Nothing to store (a duplicate): undo what the body did.
    RollBack(T),
}

/// Commits or rolls back `tx` as its body asked, and rolls it back after an error too, before
/// the caller lets go of SQLite's write line: a transaction only dropped would roll back after
/// the next writer was let in (sqlx queues the rollback), and that writer would find the lock
/// taken and sleep in SQLite's busy handler.
async fn finish<DB: sqlx::Database, T>(
    tx: sqlx::Transaction<'_, DB>,
    ended: Result<Finish<T>, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    match ended {
        Ok(Finish::Commit(v)) => {
            tx.commit().await?;
            Ok(v)
        }
        Ok(Finish::RollBack(v)) => {
            tx.rollback().await?;
            Ok(v)
        }
        Err(e) => {
            // The body's error is the one to report; a failed rollback ends with the connection.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds; the body is compiled once
/// per backend, so one SQL text serves both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($pool, _) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` as a write transaction `$tx` on the store's pool: it begins, takes SQLite's
/// write lock, claims the idempotency key first (a key seen before rolls back with
/// `$duplicate`), and ends with [`finish`] before the lock is let go. `$body` evaluates to a
/// `Result<Finish<T>, sqlx::Error>`; `?` in it ends the transaction with that error.
macro_rules! write_tx {
    ($store:expr, $tx:ident, claim($key:expr, $call:expr, $now:expr) else $duplicate:expr, $body:block) => {
        on_pool!($store, pool => {
            let mut $tx = pool.begin().await?;
            let write = $store.write_lock().await?;
            let ended = async {
                if !claim_key(&mut $tx, $key, $call, $now).await? {
                    return Ok(Finish::RollBack($duplicate));
                }
                $body
            }
            .await;
            let result = finish($tx, ended).await;
            drop(write);
            result
        })
    };
}

/// Result of storing a detail batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DetailOutcome {
    /// The batch (or its Idempotency-Key) was already stored; nothing changed.
    pub duplicate: bool,
    /// Spans newly stored by this batch (spans already stored for the call are skipped).
    pub spans_inserted: u64,
}

/// Which page of the call list to read.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallListQuery {
    pub agent_id: Option<String>,
    /// Cursor: only calls strictly older than this (received µs, call id).
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

impl Store {
    /// Opens the database named by `url` and brings its schema up to date.
    ///
    /// `sqlite://path` (file created if missing; WAL mode, busy timeout) or
    /// `postgres://…` / `postgresql://…`.
    ///
    /// # Errors
    /// [`IngestError::UnsupportedDatabaseUrl`], [`IngestError::Connect`] or
    /// [`IngestError::Migrate`].
    pub async fn connect(url: &str) -> Result<Self, IngestError> {
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(|source| IngestError::Connect {
                    backend: "postgres",
                    source,
                })?;
            POSTGRES_MIGRATIONS.run(&pool).await?;
            Backend::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let connect_error = |source| IngestError::Connect {
                backend: "sqlite",
                source,
            };
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                // No longer than a sender waits for its answer (10 s by default): a write whose
                // sender hung up does not hold its place much past that.
                .acquire_timeout(SQLITE_BUSY_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(connect_error)?;
            SQLITE_MIGRATIONS.run(&pool).await?;
            Backend::Sqlite(pool, Arc::new(WriteGate::new(SQLITE_BUSY_TIMEOUT)))
        } else {
            return Err(IngestError::UnsupportedDatabaseUrl(redact(url)));
        };
        Ok(Self { backend })
    }

    /// SQLite: [`WriteGate::batch_line`], before a detail batch takes a connection.
    /// PostgreSQL: nothing to wait for.
    async fn batch_line(&self) -> Result<Option<MutexGuard<'_, ()>>, sqlx::Error> {
        match &self.backend {
            Backend::Sqlite(_, g) => g.batch_line().await.map(Some),
            Backend::Postgres(_) => Ok(None),
        }
    }

    /// SQLite: [`WriteGate::write`], once the transaction has begun. PostgreSQL: nothing to
    /// wait for.
    async fn write_lock(&self) -> Result<Option<MutexGuard<'_, ()>>, sqlx::Error> {
        match &self.backend {
            Backend::Sqlite(_, g) => g.write().await.map(Some),
            Backend::Postgres(_) => Ok(None),
        }
    }

    /// Holds SQLite's write lock, as a write in progress would (tests of the API's writes).
    #[cfg(test)]
    pub(crate) async fn hold_write_lock(&self) -> MutexGuard<'_, ()> {
        let Backend::Sqlite(_, g) = &self.backend else {
            panic!("only a SQLite store has a write line")
        };
        g.write.lock().await
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(..) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Closes every pooled connection (waits for checked-out ones to come back).
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }

    /// Checks the database answers.
    ///
    /// # Errors
    /// [`IngestError::Database`] when it does not.
    pub async fn ping(&self) -> Result<(), IngestError> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Number of calls whose core (phase 1) is stored.
    ///
    /// # Errors
    /// [`IngestError::Database`].
    pub async fn call_count(&self) -> Result<u64, IngestError> {
        self.count("SELECT COUNT(*) FROM call_logs WHERE has_core", None)
            .await
    }

    /// Number of spans stored for `call_id`.
    ///
    /// # Errors
    /// [`IngestError::Database`].
    pub async fn span_count(&self, call_id: &str) -> Result<u64, IngestError> {
        self.count(
            "SELECT COUNT(*) FROM session_traces WHERE call_id = $1",
            Some(call_id),
        )
        .await
    }

    /// Number of spans stored over all calls.
    ///
    /// # Errors
    /// [`IngestError::Database`].
    pub async fn total_span_count(&self) -> Result<u64, IngestError> {
        self.count("SELECT COUNT(*) FROM session_traces", None)
            .await
    }

    /// Number of span rows whose (call_id, span_id) occurs more than once. Zero by construction
    /// (a unique key); tests and the demo use it to prove exactly-once storage.
    ///
    /// # Errors
    /// [`IngestError::Database`].
    pub async fn duplicate_span_rows(&self) -> Result<u64, IngestError> {
        self.count(
            "SELECT COUNT(*) FROM session_traces s WHERE EXISTS (SELECT 1 FROM session_traces o \
             WHERE o.call_id = s.call_id AND o.span_id = s.span_id AND o.id <> s.id)",
            None,
        )
        .await
    }

    async fn count(&self, sql: &'static str, arg: Option<&str>) -> Result<u64, IngestError> {
        let n: i64 = on_pool!(self, pool => {
            let q = sqlx::query_scalar(sql);
            let q = match arg {
                Some(a) => q.bind(a),
                None => q,
            };
            q.fetch_one(pool).await
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The call as `GET /v1/calls/{call_id}` shows it: core fields, `transcript_with_metrics`
    /// and detail progress (`batches_received`, `spans_stored`, `total_batches`, `complete`).
    /// `None` when nothing (neither core nor detail) is stored for the call.
    ///
    /// # Errors
    /// [`IngestError::Database`].
    pub async fn get_call(&self, call_id: &str) -> Result<Option<Value>, IngestError> {
        let sql = "SELECT * FROM call_logs WHERE call_id = $1";
        let row: Option<CallRow> = on_pool!(self, pool => {
            sqlx::query_as(sql).bind(call_id).fetch_optional(pool).await
        })?;
        Ok(row.map(CallRow::into_json))
    }

    /// Stores a core call. Returns `false` (duplicate, nothing changed) when the idempotency key
    /// or a core for this call_id is already stored.
    pub(crate) async fn insert_core(
        &self,
        core: &CoreCall,
        idempotency_key: Option<&str>,
        now_us: i64,
    ) -> Result<bool, IngestError> {
        const UPSERT: &str = "INSERT INTO call_logs (call_id, agent_id, has_core, schema_version, \
             call_started_at, call_ended_at, duration_seconds, end_reason, transcript_json, \
             summary_metrics, telemetry_summary, truncated, extra, first_seen_us, core_received_us) \
             VALUES ($1, $2, TRUE, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
             ON CONFLICT (call_id) DO UPDATE SET agent_id = excluded.agent_id, has_core = TRUE, \
             schema_version = excluded.schema_version, call_started_at = excluded.call_started_at, \
             call_ended_at = excluded.call_ended_at, duration_seconds = excluded.duration_seconds, \
             end_reason = excluded.end_reason, transcript_json = excluded.transcript_json, \
             summary_metrics = excluded.summary_metrics, \
             telemetry_summary = excluded.telemetry_summary, truncated = excluded.truncated, \
             extra = excluded.extra, core_received_us = excluded.core_received_us \
             WHERE call_logs.has_core = FALSE";
        let traces = joinable_traces(&core.extra, &core.call_id);
        let stored = write_tx!(self, tx, claim(idempotency_key, &core.call_id, now_us) else false, {
            let done = sqlx::query(UPSERT)
                .bind(&core.call_id)
                .bind(&core.agent_id)
                .bind(&core.call_started_at)
                .bind(&core.call_ended_at)
                .bind(core.duration_seconds)
                .bind(&core.end_reason)
                .bind(Json(&core.transcript_json))
                .bind(Json(&core.summary_metrics))
                .bind(Json(&core.telemetry_summary))
                .bind(core.truncated)
                .bind(Json(&core.extra))
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(Finish::RollBack(false));
            }
            // Spans stored under one of the call's trace ids (sent before the sender knew
            // the call id) join the call now; later ones are redirected by insert_detail.
            for trace in &traces {
                sqlx::query(CLAIM_TRACE)
                    .bind(trace)
                    .bind(&core.call_id)
                    .execute(&mut *tx)
                    .await?;
                let moved = sqlx::query(MOVE_SPANS)
                    .bind(&core.call_id)
                    .bind(trace)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if moved > 0 {
                    let moved = i64::try_from(moved).unwrap_or(i64::MAX);
                    let deltas = [(core.call_id.as_str(), moved), (trace.as_str(), -moved)];
                    for (call, delta) in deltas {
                        sqlx::query(ADD_SPANS)
                            .bind(call)
                            .bind(delta)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            Ok::<_, sqlx::Error>(Finish::Commit(true))
        })?;
        Ok(stored)
    }

    /// Stores one detail batch and its spans, creating the call row if the core has not come
    /// yet, and updates the call's detail progress — all in one transaction.
    pub(crate) async fn insert_detail(
        &self,
        batch: &DetailBatch,
        idempotency_key: Option<&str>,
        now_us: i64,
    ) -> Result<DetailOutcome, IngestError> {
        const DUPLICATE: DetailOutcome = DetailOutcome {
            duplicate: true,
            spans_inserted: 0,
        };
        const CLAIM_BATCH: &str = "INSERT INTO detail_batches (call_id, batch_seq, is_final, \
             late, total_batches, span_count, received_us) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT DO NOTHING";
        const ENSURE_CALL: &str = "INSERT INTO call_logs (call_id, agent_id, first_seen_us) \
             VALUES ($1, $2, $3) ON CONFLICT (call_id) DO NOTHING";
        // Until the final's total_batches is known, a batch counts toward completeness unless it
        // is marked late; COMPLETE then recounts from the batch numbers below the total.
        const PROGRESS: &str = "UPDATE call_logs SET \
             batches_received = batches_received + 1, \
             data_batches_received = data_batches_received + CASE \
                 WHEN $2 THEN 0 \
                 WHEN COALESCE($3, total_batches) IS NULL THEN 1 \
                 WHEN $4 < COALESCE($3, total_batches) THEN 1 ELSE 0 END, \
             spans_stored = spans_stored + $5, \
             total_batches = COALESCE($3, total_batches), \
             transcript_with_metrics = COALESCE($6, transcript_with_metrics), \
             agent_id = COALESCE(agent_id, $7) \
             WHERE call_id = $1";
        // Runs after PROGRESS in the same transaction, which holds the row lock: sees its values.
        // Once the final's total_batches is known, the data batches are the numbers below it
        // that arrived, late-marked or not: a sender's 413 split can move the final past a
        // late batch, which then sits below the total.
        const COMPLETE: &str = "UPDATE call_logs SET \
             data_batches_received = CASE WHEN total_batches IS NULL \
                 THEN data_batches_received ELSE (SELECT COUNT(*) FROM detail_batches d \
                 WHERE d.call_id = call_logs.call_id AND d.batch_seq < call_logs.total_batches) END, \
             complete = (total_batches IS NOT NULL AND (SELECT COUNT(*) FROM detail_batches d \
                 WHERE d.call_id = call_logs.call_id AND d.batch_seq < call_logs.total_batches) \
                 >= total_batches) \
             WHERE call_id = $1";

        let span_count = i64::try_from(batch.spans.len()).unwrap_or(i64::MAX);
        // Insert in span_id order: concurrent batches that share spans then take their unique
        // index locks in the same order and cannot deadlock each other in PostgreSQL.
        let mut spans: Vec<&SpanRow> = batch.spans.iter().collect();
        spans.sort_unstable_by(|a, b| a.span_id.cmp(&b.span_id));
        let _line = self.batch_line().await?;
        let outcome = write_tx!(self, tx, claim(idempotency_key, &batch.call_id, now_us) else DUPLICATE, {
            let claimed = sqlx::query(CLAIM_BATCH)
                .bind(&batch.call_id)
                .bind(batch.batch_seq)
                .bind(batch.is_final)
                .bind(batch.late)
                .bind(batch.total_batches)
                .bind(span_count)
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
            if claimed.rows_affected() == 0 {
                return Ok(Finish::RollBack(DUPLICATE));
            }
            // A batch sent under a trace id whose call is known: its spans belong to that call.
            let owner: Option<String> = if is_trace_id(&batch.call_id) {
                sqlx::query_scalar(OWNER_OF_TRACE)
                    .bind(&batch.call_id)
                    .fetch_optional(&mut *tx)
                    .await?
            } else {
                None
            };
            let span_call = owner.as_deref().unwrap_or(&batch.call_id);
            // A final without spans (its transcript only) needs no insert.
            let inserted = if spans.is_empty() {
                0
            } else {
                (*tx)
                    .insert_spans(span_call, &spans, batch.batch_seq)
                    .await?
            };
            sqlx::query(ENSURE_CALL)
                .bind(&batch.call_id)
                .bind(&batch.agent_id)
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
            let inserted_i64 = i64::try_from(inserted).unwrap_or(i64::MAX);
            if owner.is_some() && inserted > 0 {
                sqlx::query(ADD_SPANS)
                    .bind(span_call)
                    .bind(inserted_i64)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(PROGRESS)
                .bind(&batch.call_id)
                .bind(batch.late)
                .bind(batch.total_batches)
                .bind(batch.batch_seq)
                .bind(if owner.is_some() { 0 } else { inserted_i64 })
                .bind(batch.transcript_with_metrics.as_ref().map(Json))
                .bind(&batch.agent_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(COMPLETE)
                .bind(&batch.call_id)
                .execute(&mut *tx)
                .await?;
            Ok::<_, sqlx::Error>(Finish::Commit(DetailOutcome {
                duplicate: false,
                spans_inserted: inserted,
            }))
        })?;
        Ok(outcome)
    }

    /// One page of calls with a stored core, newest (by receipt) first.
    pub(crate) async fn list_calls(&self, q: &CallListQuery) -> Result<Vec<Value>, IngestError> {
        let rows: Vec<CallSummaryRow> = on_pool!(self, pool => {
            let mut qb = QueryBuilder::new(
                "SELECT call_id, agent_id, call_started_at, call_ended_at, duration_seconds, \
                 end_reason, truncated, core_received_us, batches_received, spans_stored, \
                 total_batches, complete FROM call_logs WHERE has_core",
            );
            if let Some(agent) = &q.agent_id {
                qb.push(" AND agent_id = ").push_bind(agent);
            }
            if let Some((us, id)) = &q.before {
                qb.push(" AND (core_received_us < ")
                    .push_bind(*us)
                    .push(" OR (core_received_us = ")
                    .push_bind(*us)
                    .push(" AND call_id < ")
                    .push_bind(id)
                    .push("))");
            }
            qb.push(" ORDER BY core_received_us DESC, call_id DESC LIMIT ")
                .push_bind(q.limit);
            qb.build_query_as().fetch_all(pool).await
        })?;
        Ok(rows.into_iter().map(CallSummaryRow::into_json).collect())
    }

    /// One page of a call's spans in storage order, after the row id `after`.
    pub(crate) async fn list_spans(
        &self,
        call_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Value>, IngestError> {
        let sql = "SELECT * FROM session_traces WHERE call_id = $1 AND id > $2 \
                   ORDER BY id LIMIT $3";
        let rows: Vec<SpanDbRow> = on_pool!(self, pool => {
            sqlx::query_as(sql)
                .bind(call_id)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await
        })?;
        Ok(rows.into_iter().map(SpanDbRow::into_json).collect())
    }
}

/// Records the Idempotency-Key (if any) inside `tx`; `false` when it was already recorded.
async fn claim_key<'c, DB>(
    tx: &mut sqlx::Transaction<'c, DB>,
    key: Option<&str>,
    call_id: &str,
    now_us: i64,
) -> Result<bool, sqlx::Error>
where
    DB: sqlx::Database,
    for<'a> &'a mut DB::Connection: sqlx::Executor<'a, Database = DB>,
    for<'a> &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: for<'a> sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> DB::Arguments: sqlx::IntoArguments<DB>,
    DB::QueryResult: RowsAffected,
{
    let Some(key) = key else {
        return Ok(true);
    };
    let done = sqlx::query::<DB>(
        "INSERT INTO idempotency_keys (key, call_id, received_us) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(key)
    .bind(call_id)
    .bind(now_us)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows() > 0)
}

/// Columns of `session_traces` a batch's spans fill, in the order both inserts bind them (a
/// macro, so that `concat!` builds each statement as a constant).
macro_rules! span_columns {
    () => {
        "call_id, trace_id, span_id, parent_span_id, name, operation, kind, start_time, \
         end_time, duration_ms, status_code, status_message, attributes, events, links, batch_seq"
    };
}

/// PostgreSQL's span insert: one array per column, unnested in the spans' order.
const INSERT_SPANS_PG: &str = concat!(
    "INSERT INTO session_traces (",
    span_columns!(),
    ") SELECT $1, t.trace_id, t.span_id, t.parent_span_id, t.name, t.operation, t.kind, \
     t.start_time, t.end_time, t.duration_ms, t.status_code, t.status_message, t.attributes, \
     t.events, t.links, $2 \
     FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
     $9::text[], $10::text[], $11::float8[], $12::text[], $13::text[], $14::jsonb[], \
     $15::jsonb[], $16::jsonb[]) WITH ORDINALITY AS t(trace_id, span_id, parent_span_id, name, \
     operation, kind, start_time, end_time, duration_ms, status_code, status_message, \
     attributes, events, links, n) \
     ORDER BY t.n ON CONFLICT (call_id, span_id) DO NOTHING"
);

/// Stores a detail batch's spans (sorted by span id) under `call_id`, skipping span ids the call
/// already has; returns how many rows were inserted. The one query not written once for both
/// backends: PostgreSQL takes the whole batch as one array per column.
trait InsertSpans {
    async fn insert_spans(
        &mut self,
        call_id: &str,
        spans: &[&SpanRow],
        batch_seq: i64,
    ) -> Result<u64, sqlx::Error>;
}

impl InsertSpans for sqlx::SqliteConnection {
    /// Multi-row `VALUES` lists of [`SPAN_INSERT_CHUNK`] rows.
    async fn insert_spans(
        &mut self,
        call_id: &str,
        spans: &[&SpanRow],
        batch_seq: i64,
    ) -> Result<u64, sqlx::Error> {
        let mut inserted = 0;
        for chunk in spans.chunks(SPAN_INSERT_CHUNK) {
            let mut qb = QueryBuilder::new(concat!(
                "INSERT INTO session_traces (",
                span_columns!(),
                ") "
            ));
            qb.push_values(chunk, |mut row, span: &&SpanRow| {
                row.push_bind(call_id)
                    .push_bind(&span.trace_id)
                    .push_bind(&span.span_id)
                    .push_bind(&span.parent_span_id)
                    .push_bind(&span.name)
                    .push_bind(&span.operation)
                    .push_bind(&span.kind)
                    .push_bind(&span.start_time)
                    .push_bind(&span.end_time)
                    .push_bind(span.duration_ms)
                    .push_bind(&span.status_code)
                    .push_bind(&span.status_message)
                    .push_bind(json_or_null(&span.attributes))
                    .push_bind(json_or_null(&span.events))
                    .push_bind(json_or_null(&span.links))
                    .push_bind(batch_seq);
            });
            qb.push(" ON CONFLICT (call_id, span_id) DO NOTHING");
            inserted += qb.build().execute(&mut *self).await?.rows_affected();
        }
        Ok(inserted)
    }
}

impl InsertSpans for sqlx::PgConnection {
    /// One statement per batch: a column array each, unnested in the spans' order (`WITH
    /// ORDINALITY`, so that concurrent batches still take their index locks in span-id order).
    /// One prepared statement serves every batch size, where `VALUES` lists of 16 parameters
    /// a row need one per size and bind each parameter on its own.
    async fn insert_spans(
        &mut self,
        call_id: &str,
        spans: &[&SpanRow],
        batch_seq: i64,
    ) -> Result<u64, sqlx::Error> {
        fn col<'s, T>(spans: &[&'s SpanRow], f: impl Fn(&'s SpanRow) -> T) -> Vec<T> {
            spans.iter().map(|s| f(s)).collect()
        }
        let done = sqlx::query(INSERT_SPANS_PG)
            .bind(call_id)
            .bind(batch_seq)
            .bind(col(spans, |s| s.trace_id.as_str()))
            .bind(col(spans, |s| s.span_id.as_str()))
            .bind(col(spans, |s| s.parent_span_id.as_deref()))
            .bind(col(spans, |s| s.name.as_str()))
            .bind(col(spans, |s| s.operation.as_deref()))
            .bind(col(spans, |s| s.kind.as_deref()))
            .bind(col(spans, |s| s.start_time.as_deref()))
            .bind(col(spans, |s| s.end_time.as_deref()))
            .bind(col(spans, |s| s.duration_ms))
            .bind(col(spans, |s| s.status_code.as_deref()))
            .bind(col(spans, |s| s.status_message.as_deref()))
            .bind(col(spans, |s| json_or_null(&s.attributes)))
            .bind(col(spans, |s| json_or_null(&s.events)))
            .bind(col(spans, |s| json_or_null(&s.links)))
            .execute(&mut *self)
            .await?;
        Ok(done.rows_affected())
    }
}

/// `rows_affected` of either backend's query result, for code generic over the backend.
trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

fn json_or_null(v: &Option<RawJson>) -> Option<Json<&RawValue>> {
    v.as_ref().map(|r| Json(r.get()))
}

/// `url` without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

fn us_to_ms(us: Option<i64>) -> Option<i64> {
    us.map(|u| u / 1000)
}

#[derive(FromRow)]
struct CallRow {
    call_id: String,
    agent_id: Option<String>,
    has_core: bool,
    schema_version: Option<i64>,
    call_started_at: Option<String>,
    call_ended_at: Option<String>,
    duration_seconds: Option<f64>,
    end_reason: Option<String>,
    transcript_json: Option<Json<Value>>,
    summary_metrics: Option<Json<Value>>,
    telemetry_summary: Option<Json<Value>>,
    truncated: Option<bool>,
    extra: Option<Json<Value>>,
    transcript_with_metrics: Option<Json<Value>>,
    first_seen_us: i64,
    core_received_us: Option<i64>,
    batches_received: i64,
    data_batches_received: i64,
    spans_stored: i64,
    total_batches: Option<i64>,
    complete: bool,
}

impl CallRow {
    fn into_json(self) -> Value {
        let unwrap = |j: Option<Json<Value>>| j.map(|Json(v)| v);
        json!({
            "call_id": self.call_id,
            "agent_id": self.agent_id,
            "has_core": self.has_core,
            "schema_version": self.schema_version,
            "call_started_at": self.call_started_at,
            "call_ended_at": self.call_ended_at,
            "duration_seconds": self.duration_seconds,
            "end_reason": self.end_reason,
            "transcript_json": unwrap(self.transcript_json),
            "summary_metrics": unwrap(self.summary_metrics),
            "telemetry_summary": unwrap(self.telemetry_summary),
            "truncated": self.truncated,
            "extra": unwrap(self.extra),
            "transcript_with_metrics": unwrap(self.transcript_with_metrics),
            "first_seen_unix_ms": self.first_seen_us / 1000,
            "received_at_unix_ms": us_to_ms(self.core_received_us),
            "batches_received": self.batches_received,
            "data_batches_received": self.data_batches_received,
            "spans_stored": self.spans_stored,
            "total_batches": self.total_batches,
            "complete": self.complete,
        })
    }
}

#[derive(FromRow)]
struct CallSummaryRow {
    call_id: String,
    agent_id: Option<String>,
    call_started_at: Option<String>,
    call_ended_at: Option<String>,
    duration_seconds: Option<f64>,
    end_reason: Option<String>,
    truncated: Option<bool>,
    core_received_us: Option<i64>,
    batches_received: i64,
    spans_stored: i64,
    total_batches: Option<i64>,
    complete: bool,
}

impl CallSummaryRow {
    fn into_json(self) -> Value {
        json!({
            "call_id": self.call_id,
            "agent_id": self.agent_id,
            "call_started_at": self.call_started_at,
            "call_ended_at": self.call_ended_at,
            "duration_seconds": self.duration_seconds,
            "end_reason": self.end_reason,
            "truncated": self.truncated,
            "received_at_unix_ms": us_to_ms(self.core_received_us),
            "cursor": self.core_received_us.map(|us| format!("{us}:{}", self.call_id)),
            "batches_received": self.batches_received,
            "spans_stored": self.spans_stored,
            "total_batches": self.total_batches,
            "complete": self.complete,
        })
    }
}

#[derive(FromRow)]
struct SpanDbRow {
    id: i64,
    call_id: String,
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    name: String,
    operation: Option<String>,
    kind: Option<String>,
    start_time: Option<String>,
    end_time: Option<String>,
    duration_ms: Option<f64>,
    status_code: Option<String>,
    status_message: Option<String>,
    attributes: Option<Json<Value>>,
    events: Option<Json<Value>>,
    links: Option<Json<Value>>,
    batch_seq: i64,
}

impl SpanDbRow {
    fn into_json(self) -> Value {
        let unwrap = |j: Option<Json<Value>>| j.map(|Json(v)| v);
        json!({
            "id": self.id,
            "call_id": self.call_id,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "operation": self.operation,
            "kind": self.kind,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "duration_ms": self.duration_ms,
            "status": {"code": self.status_code, "message": self.status_message},
            "attributes": unwrap(self.attributes),
            "events": unwrap(self.events),
            "links": unwrap(self.links),
            "batch_seq": self.batch_seq,
        })
    }
}

/// Records that a trace belongs to a call (the first call to name it keeps it).
const CLAIM_TRACE: &str =
    "INSERT INTO call_traces (trace_id, call_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
/// Moves the spans stored under a trace id ($2) to the call ($1), skipping any the call has.
const MOVE_SPANS: &str = "UPDATE session_traces SET call_id = $1 WHERE call_id = $2 \
     AND span_id NOT IN (SELECT span_id FROM session_traces WHERE call_id = $1)";
/// Adjusts a call's stored-span count.
const ADD_SPANS: &str = "UPDATE call_logs SET spans_stored = spans_stored + $2 WHERE call_id = $1";
/// The call a trace id belongs to.
const OWNER_OF_TRACE: &str = "SELECT call_id FROM call_traces WHERE trace_id = $1";
/// Trace ids joined per core at most (the sender lists at most 256).
const MAX_JOINED_TRACES: usize = 256;

/// Whether `s` is a trace id in the wire format: 32 lowercase hex digits.
fn is_trace_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The core's `trace_ids` (an addition to the contract) that can name a trace-keyed call.
fn joinable_traces(extra: &Value, call_id: &str) -> Vec<String> {
    extra
        .get("trace_ids")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Value::as_str)
                .filter(|t| is_trace_id(t) && *t != call_id)
                .take(MAX_JOINED_TRACES)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::{Pin, pin};
    use std::sync::Arc;
    use std::task::Poll;
    use std::time::Duration;

    use tokio::sync::MutexGuard;

    use super::{Backend, SQLITE_BUSY_TIMEOUT, Store, WriteGate, redact};
    use crate::error::IngestError;
    use crate::payload::tests::{core_body, detail_body};
    use crate::payload::{CoreCall, DetailBatch, Incoming, parse};

    #[test]
    fn redact_hides_credentials() {
        assert_eq!(redact("mysql://u:secret@h/db"), "mysql://…@h/db");
        assert_eq!(redact("nonsense"), "nonsense");
    }

    /// Polls `f` once; `Pending` keeps its place in whatever line it waits in.
    async fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let mut f = Some(f);
        std::future::poll_fn(|cx| Poll::Ready(f.take().map(|f| f.poll(cx))))
            .await
            .expect("polled once")
    }

    type Turn<'a> = (MutexGuard<'a, ()>, Option<MutexGuard<'a, ()>>);

    /// A detail batch's turn, both steps as the store takes them.
    async fn batch_turn(gate: &WriteGate) -> Turn<'_> {
        let line = gate.batch_line().await.expect("in line");
        (gate.write().await.expect("write lock"), Some(line))
    }

    /// A core summary's turn.
    async fn core_turn(gate: &WriteGate) -> Turn<'_> {
        (gate.write().await.expect("write lock"), None)
    }

    #[tokio::test]
    async fn at_most_one_detail_batch_is_in_line_ahead_of_a_core_summary() {
        let gate = WriteGate::new(SQLITE_BUSY_TIMEOUT);
        let writing = batch_turn(&gate).await;
        // Two more batches and then a core arrive while the first batch writes.
        let mut second = pin!(batch_turn(&gate));
        let mut third = pin!(batch_turn(&gate));
        let mut core = pin!(core_turn(&gate));
        assert!(poll_once(second.as_mut()).await.is_pending());
        assert!(poll_once(third.as_mut()).await.is_pending());
        assert!(poll_once(core.as_mut()).await.is_pending());
        drop(writing);
        // The core writes next, although both batches came before it.
        let Poll::Ready(core_writes) = poll_once(core.as_mut()).await else {
            panic!("the core summary did not get the write lock after the batch writing before it");
        };
        assert!(poll_once(second.as_mut()).await.is_pending());
        assert!(poll_once(third.as_mut()).await.is_pending());
        drop(core_writes);
        // Then the batches, in the order they came.
        let Poll::Ready(second_writes) = poll_once(second.as_mut()).await else {
            panic!("the second batch did not write after the core");
        };
        assert!(poll_once(third.as_mut()).await.is_pending());
        drop(second_writes);
        assert!(poll_once(third.as_mut()).await.is_ready());
    }

    fn core_call(call_id: &str) -> CoreCall {
        match parse(core_body(call_id).to_string().as_bytes()) {
            Ok(Incoming::Core(c)) => c,
            other => panic!("not a core: {other:?}"),
        }
    }

    fn detail_batch(call_id: &str) -> DetailBatch {
        match parse(detail_body(call_id).to_string().as_bytes()) {
            Ok(Incoming::Detail(d)) => d,
            other => panic!("not a detail batch: {other:?}"),
        }
    }

    fn is_busy<T: std::fmt::Debug>(r: &Result<T, IngestError>) -> bool {
        matches!(r, Err(IngestError::Database(sqlx::Error::PoolTimedOut)))
    }

    #[tokio::test]
    async fn sqlite_writes_wait_in_the_line_and_give_up_as_busy_past_its_wait() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("line.db").display());
        let mut store = Store::connect(&url).await.expect("SQLite store");
        // A short wait, so the refusals below come quickly; the store's is SQLite's busy timeout.
        let gate = Arc::new(WriteGate::new(Duration::from_millis(100)));
        let Backend::Sqlite(_, line) = &mut store.backend else {
            panic!("not SQLite")
        };
        *line = gate.clone();
        let (core, batch) = (core_call("call-1"), detail_batch("call-1"));

        // While another write holds the write lock, both kinds wait, then answer busy.
        let held = gate.write.lock().await;
        assert!(is_busy(&store.insert_core(&core, None, 1).await));
        assert!(is_busy(&store.insert_detail(&batch, None, 1).await));
        drop(held);

        // While another batch is in line, a batch waits and a core does not.
        let held = gate.batches.lock().await;
        assert!(is_busy(&store.insert_detail(&batch, None, 1).await));
        assert!(
            store
                .insert_core(&core, None, 1)
                .await
                .expect("core stored")
        );
        drop(held);

        // Nothing of the refused writes was stored; the batch goes through once it can.
        assert_eq!(store.span_count("call-1").await.expect("count"), 0);
        let stored = store
            .insert_detail(&batch, None, 2)
            .await
            .expect("batch stored");
        assert!(!stored.duplicate);
        assert_eq!(store.span_count("call-1").await.expect("count"), 1);
    }
}
