//! Shared test support: the backends every storage test runs on, and wire-contract bodies.
#![allow(dead_code)] // each test crate uses a different subset

use std::io::Write;

use serde_json::{Value, json};
use sqlx::Connection;

/// Environment variable naming the PostgreSQL server the PostgreSQL variants run against.
pub const PG_ENV: &str = "CALLSCOPE_TEST_DATABASE_URL";
/// The API key tests configure.
pub const KEY: &str = "test-key-1";

/// A database for one test: a SQLite file in a temporary directory, or a fresh PostgreSQL
/// schema (dropped on drop).
pub struct TestDb {
    /// `sqlite` or `postgres`.
    pub name: &'static str,
    /// URL to hand to `Store::connect` / `IngestConfig::new`.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin_url, schema)) = self.pg.take() else {
            return;
        };
        // Drop may run inside a tokio runtime: clean up on a thread with its own runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                    // Never hang a test run on a lock some leaked connection holds.
                    let _ = sqlx::query("SET lock_timeout = '10s'")
                        .execute(&mut conn)
                        .await;
                    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// The backends to run a storage test on: always SQLite; PostgreSQL when [`PG_ENV`] is set
/// (otherwise says it is skipped).
pub async fn backends() -> Vec<TestDb> {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("ingest.db").display());
    let mut dbs = vec![TestDb {
        name: "sqlite",
        url,
        _dir: Some(dir),
        pg: None,
    }];
    match std::env::var(PG_ENV) {
        Ok(admin_url) if !admin_url.is_empty() => {
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("connect to CALLSCOPE_TEST_DATABASE_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&mut conn)
                .await
                .expect("create test schema");
            conn.close().await.expect("close admin connection");
            let sep = if admin_url.contains('?') { '&' } else { '?' };
            let url = format!("{admin_url}{sep}options=-csearch_path%3D{schema}");
            dbs.push(TestDb {
                name: "postgres",
                url,
                _dir: None,
                pg: Some((admin_url, schema)),
            });
        }
        _ => {
            #[allow(clippy::print_stderr)] // the skip must be visible in the test output
            {
                eprintln!("PostgreSQL variant skipped: set {PG_ENV}=postgres://… to run it");
            }
        }
    }
    dbs
}

/// A valid core (phase 1) body.
pub fn core(call_id: &str, agent_id: &str) -> Value {
    json!({
        "schema_version": 1, "call_id": call_id, "agent_id": agent_id,
        "call_started_at": "2026-11-24T10:00:00Z", "call_ended_at": "2026-11-24T10:05:12.4Z",
        "duration_seconds": 312.4, "end_reason": "root_span_ended",
        "transcript_json": [{"role": "user", "content": "hello", "at": "2026-11-24T10:00:01Z"}],
        "summary_metrics": {"avg_latency": 812.5, "total_turns": 1, "total_tokens": 10},
        "telemetry_summary": {"total_spans": 4, "error_count": 0, "operation_counts": {"llm": 4}},
        "truncated": false, "trace_ids": ["0af7651916cd43dd8448eb211c80319c"]
    })
}

/// One span of a detail batch; `n` makes the span id. Odd spans are children of the span
/// before them, even ones have no parent.
pub fn span(n: u32) -> Value {
    let parent = (n % 2 == 1).then(|| format!("{:016x}", n - 1));
    json!({
        "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": format!("{n:016x}"),
        "parent_span_id": parent, "name": "llm_request", "operation": "llm", "kind": "internal",
        "start_time": "2026-11-24T10:00:01Z", "end_time": "2026-11-24T10:00:02Z",
        "duration_ms": 245.1, "status": {"code": "ok", "message": ""},
        "attributes": {"gen_ai.request.model": "m", "n": n},
        "events": [{"name": "e", "time": "2026-11-24T10:00:01.5Z", "attributes": {}}],
        "links": []
    })
}

/// A detail batch with spans numbered `spans`; `total` makes it the final batch.
pub fn detail(call_id: &str, seq: u64, spans: std::ops::Range<u32>, total: Option<u64>) -> Value {
    let mut v = json!({
        "schema_version": 1, "call_id": call_id, "agent_id": "agent-1",
        "update_type": "detailed_telemetry", "batch_seq": seq, "final": total.is_some(),
        "telemetry_data": {"session_traces": spans.map(span).collect::<Vec<_>>()},
    });
    if let Some(total) = total {
        v["total_batches"] = json!(total);
        v["transcript_with_metrics"] = json!([{"turn": 1, "role": "assistant", "content": "hi",
            "llm_latency": 245.0, "tokens": 10}]);
    }
    v
}

/// The Idempotency-Key a sender uses for a body built by [`core`] or [`detail`].
pub fn key_for(body: &Value) -> String {
    let call_id = body["call_id"].as_str().unwrap_or_default();
    match body["batch_seq"].as_u64() {
        Some(seq) => format!("{call_id}:detail:{seq}"),
        None => format!("{call_id}:core"),
    }
}

/// Gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("gzip write");
    enc.finish().expect("gzip finish")
}
