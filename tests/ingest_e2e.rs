//! The processor and the real ingest server end to end: processor → HTTP → database rows.
//! Runs on SQLite, and on PostgreSQL when `CALLSCOPE_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::time::{Duration, UNIX_EPOCH};

use callscope::{CallSpanProcessor, CallSpanProcessorBuilder, Compression, StatsHandle};
use callscope_ingest::{IngestConfig, serve};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use support::voice::{self, CallShape};

/// Database URLs to run on: a fresh SQLite file, and a fresh PostgreSQL schema when configured.
fn databases(tmp: &tempfile::TempDir, name: &str) -> Vec<(String, Option<String>)> {
    let mut v = vec![(
        format!(
            "sqlite://{}",
            tmp.path().join(format!("{name}.db")).display()
        ),
        None,
    )];
    match std::env::var("CALLSCOPE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let schema = format!("e2e_{name}_{:08x}", fastrand::u32(..));
            let sep = if url.contains('?') { '&' } else { '?' };
            v.push((
                format!("{url}{sep}options=-csearch_path%3D{schema}"),
                Some(schema),
            ));
        }
        _ => eprintln!("{name}: PostgreSQL variant skipped (CALLSCOPE_TEST_DATABASE_URL not set)"),
    }
    v
}

async fn create_schema(schema: &str) {
    let url = std::env::var("CALLSCOPE_TEST_DATABASE_URL").unwrap();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .unwrap();
}

async fn drop_schema(schema: &str) {
    let url = std::env::var("CALLSCOPE_TEST_DATABASE_URL").unwrap();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// A tracer provider whose processor sends to `endpoint` with the e2e key, configured further
/// by `tune`; and the processor's stats.
fn provider_to(
    endpoint: String,
    tune: impl FnOnce(CallSpanProcessorBuilder) -> CallSpanProcessorBuilder,
) -> (SdkTracerProvider, StatsHandle) {
    let processor = tune(
        CallSpanProcessor::builder()
            .without_env()
            .endpoint(endpoint)
            .api_key("e2e-key"),
    )
    .build()
    .unwrap();
    let stats = processor.stats_handle();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .build();
    (provider, stats)
}

/// Three calls of 500 spans × 10 KB (5 MB each, uncompressed on the wire) under the ingest
/// server's 6 MB body limit: every span stored exactly once, every call complete.
#[test]
fn lambda_sized_limit_is_honoured_end_to_end() {
    support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let rt = support::fault::runtime();
    for (url, schema) in databases(&tmp, "limit") {
        if let Some(s) = &schema {
            rt.block_on(create_schema(s));
        }
        let mut cfg = IngestConfig::new(url.clone());
        cfg.api_keys = vec!["e2e-key".into()];
        cfg.max_body_bytes = 6_000_000;
        let server = rt.block_on(serve(cfg)).unwrap();
        let (provider, stats) = provider_to(server.endpoint(), |b| {
            b.compression(Compression::None)
                .max_request_bytes(6_000_000)
        });
        let tracer = provider.tracer("e2e");
        let shape = CallShape {
            turns: 50,
            span_bytes: 10_000,
            tool_every: 4,
            mix_pii_names: true,
            target_spans: Some(500),
            ..CallShape::default()
        };
        let mut emitted = Vec::new();
        for i in 0..3u64 {
            let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i * 1000);
            let truth = voice::livekit_call(&tracer, &format!("e2e-{i}"), &shape, t0, i);
            assert_eq!(truth.total_spans, 500);
            emitted.push(truth);
        }
        provider.force_flush().unwrap();
        let s = stats.snapshot();
        assert_eq!(s.summaries_sent, 3, "{url}: {s:?}");
        assert_eq!(s.spans_dropped(), 0, "{url}: {s:?}");
        assert_eq!(s.detail_batches_failed, 0, "{url}: {s:?}");
        let store = server.store.clone();
        rt.block_on(async {
            assert_eq!(store.call_count().await.unwrap(), 3);
            for t in &emitted {
                assert_eq!(store.span_count(&t.call_id).await.unwrap(), 500, "{url}");
                let call = store.get_call(&t.call_id).await.unwrap().unwrap();
                assert_eq!(call["complete"], true, "{url}: {call}");
                assert_eq!(call["telemetry_summary"]["total_spans"], 500);
                assert!(call["transcript_with_metrics"].as_array().unwrap().len() >= 50);
            }
            assert_eq!(store.total_span_count().await.unwrap(), 1500);
            assert_eq!(store.duplicate_span_rows().await.unwrap(), 0);
        });
        // 5 MB per call in bodies of up to 6 MB: none rejected by the server (413 would fail above)
        assert!(s.detail_batches_sent >= 3, "{s:?}");
        provider.shutdown().unwrap();
        rt.block_on(server.shutdown()).unwrap();
        if let Some(s) = &schema {
            rt.block_on(drop_schema(s));
        }
    }
}

/// `GET /healthz` of the server at `addr`.
fn health(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> serde_json::Value {
    rt.block_on(async {
        let body = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    })
}

/// Waits (each try a round trip to the server, at most 30 s) until `/healthz` says `ok`.
fn health_until(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(rt, addr);
        if ok(&h) {
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "healthz never said so: {h}"
        );
    }
}

/// A receiver refusing posts, for want of places or of body bytes, with a post whose body
/// never comes holding them (it declares `declared` bytes; `held` says when the receiver took
/// it): the processor's detail batches are refused (503 + Retry-After, or the connection closed
/// under an unread body, counted in `/healthz`'s `refused`) while its core logs get in through
/// what is kept for them; once the stalled post is gone every refused batch is retried, every
/// span stored exactly once and every call complete. Returns the processor's counters and the
/// receiver's last `/healthz`.
fn refused_then_retried_until_stored(
    name: &str,
    tweak: impl FnOnce(&mut IngestConfig),
    declared: usize,
    held: impl Fn(&serde_json::Value) -> bool,
    refused: &str,
) -> (callscope::Stats, serde_json::Value) {
    support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let rt = support::fault::runtime();
    let url = format!(
        "sqlite://{}",
        tmp.path().join(format!("{name}.db")).display()
    );
    let mut cfg = IngestConfig::new(url);
    cfg.api_keys = vec!["e2e-key".into()];
    tweak(&mut cfg);
    let server = rt.block_on(serve(cfg)).unwrap();
    let addr = server.local_addr;
    // Held until a refusal is seen, whatever the timing of the uploads.
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(
        &mut stalled,
        format!(
            "POST /v1/calls HTTP/1.1\r\nhost: x\r\nx-api-key: e2e-key\r\n\
             idempotency-key: held:detail:0\r\ncontent-length: {declared}\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    health_until(&rt, addr, held);
    let (provider, stats) = provider_to(server.endpoint(), |b| {
        b.max_request_bytes(64 * 1024).max_concurrent_detail(4)
    });
    let tracer = provider.tracer("e2e");
    let shape = CallShape {
        turns: 10,
        span_bytes: 2_000,
        ..CallShape::default()
    };
    let mut emitted = Vec::new();
    for i in 0..3u64 {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i * 1000);
        emitted.push(voice::livekit_call(
            &tracer,
            &format!("{name}-{i}"),
            &shape,
            t0,
            i,
        ));
    }
    health_until(&rt, addr, |h| h[refused].as_u64() > Some(0));
    // The core logs get in while the detail is refused (polled: the store gives no signal).
    let store = server.store.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt.block_on(store.call_count()).unwrap() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "core logs kept out: {}",
            health(&rt, addr)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stalled);
    provider.force_flush().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.summaries_sent, 3, "{s:?}");
    assert_eq!(s.spans_dropped(), 0, "{s:?}");
    assert_eq!(s.detail_batches_failed, 0, "{s:?}");
    let h = health(&rt, addr);
    let n = h[refused].as_u64().unwrap();
    assert!(
        s.requests_retried >= n,
        "every refusal retried: {n} refused, {s:?}"
    );
    rt.block_on(async {
        for t in &emitted {
            assert_eq!(store.span_count(&t.call_id).await.unwrap(), t.total_spans);
            let call = store.get_call(&t.call_id).await.unwrap().unwrap();
            assert_eq!(call["complete"], true, "{call}");
        }
        assert_eq!(store.duplicate_span_rows().await.unwrap(), 0);
    });
    // Everything taken is given back.
    health_until(&rt, addr, |h| {
        h["requests_in_flight"] == 0 && h["body_bytes_held"] == 0
    });
    provider.shutdown().unwrap();
    rt.block_on(server.shutdown()).unwrap();
    (s, h)
}

/// The real receiver with a byte budget of 1 MiB, three quarters of it held by a stalled
/// post's declared length: every detail batch (a gzip body, taking its length and four times
/// that) finds no room in the three quarters detail may fill; the core logs get in through the
/// last quarter.
#[test]
fn a_receiver_out_of_body_bytes_refuses_and_the_processor_retries_until_everything_is_stored() {
    let (_, h) = refused_then_retried_until_stored(
        "bytes",
        |c| c.max_buffered_bytes = 1024 * 1024,
        768 * 1024,
        |h| h["body_bytes_held"] == 768 * 1024,
        "requests_refused_bytes",
    );
    assert_eq!(h["requests_refused_busy"], 0, "no place was short: {h}");
}

/// A receiver at its cap on requests in flight (`CALLSCOPE_INGEST_MAX_IN_FLIGHT`: two places,
/// one kept for core logs), its general place held by the stalled post.
#[test]
fn a_receiver_at_its_cap_refuses_and_the_processor_retries_until_everything_is_stored() {
    let (s, _) = refused_then_retried_until_stored(
        "cap",
        |c| c.max_in_flight = 2,
        1000,
        |h| h["requests_in_flight"] == 1,
        "requests_refused_busy",
    );
    assert!(
        s.detail_batches_sent >= 8,
        "enough batches to meet the cap: {s:?}"
    );
}
