//! End-to-end tests: `serve` on 127.0.0.1:0, driven over real TCP with reqwest, on every backend.

mod common;

use std::sync::Arc;

use callscope_ingest::{IngestConfig, IngestError, RunningServer, serve};
use common::{KEY, backends, core, detail, gzip, key_for};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn start(url: &str, tweak: impl FnOnce(&mut IngestConfig)) -> RunningServer {
    let mut config = IngestConfig::new(url);
    config.api_keys = vec![KEY.to_owned()];
    tweak(&mut config);
    serve(config).await.expect("server starts")
}

async fn post(
    client: &reqwest::Client,
    server: &RunningServer,
    body: &Value,
) -> (StatusCode, Value) {
    let resp = client
        .post(server.endpoint())
        .bearer_auth(KEY)
        .header("idempotency-key", key_for(body))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get_json(client: &reqwest::Client, server: &RunningServer, path: &str) -> Value {
    client
        .get(format!("http://{}{path}", server.local_addr))
        .header("x-api-key", KEY)
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("JSON reply")
}

#[tokio::test]
async fn refuses_to_start_without_keys_or_with_an_unknown_database() {
    let config = IngestConfig::new("sqlite://never-created.db");
    assert!(matches!(serve(config).await, Err(IngestError::NoApiKeys)));
    let mut config = IngestConfig::new("mysql://u:pw@h/db");
    config.no_auth = true;
    let err = serve(config).await.expect_err("unsupported URL");
    assert!(
        matches!(err, IngestError::UnsupportedDatabaseUrl(_)),
        "{err}"
    );
    assert!(!err.to_string().contains("pw"), "password leaked: {err}");
}

#[tokio::test]
async fn two_phase_delivery_over_tcp() {
    for db in backends().await {
        let server = start(&db.url, |_| {}).await;
        let client = reqwest::Client::new();
        let health = get_json(&client, &server, "/healthz").await;
        assert_eq!(health["ok"], true);

        let (status, reply) = post(&client, &server, &core("e1", "agent-1")).await;
        assert_eq!(status, StatusCode::OK, "[{}] {reply}", db.name);
        // Detail batches gzip-compressed, as a sender does for large batches.
        for (seq, body) in [
            detail("e1", 0, 0..50, None),
            detail("e1", 1, 50..80, Some(2)),
        ]
        .iter()
        .enumerate()
        {
            let resp = client
                .post(server.endpoint())
                .header("x-api-key", KEY)
                .header("idempotency-key", key_for(body))
                .header("content-encoding", "gzip")
                .header("content-type", "application/json")
                .body(gzip(body.to_string().as_bytes()))
                .send()
                .await
                .expect("request sent");
            assert_eq!(resp.status(), StatusCode::OK, "batch {seq}");
            assert!(resp.headers().contains_key("x-request-id"));
        }
        let call = get_json(&client, &server, "/v1/calls/e1").await;
        assert_eq!(call["complete"], true, "[{}] {call}", db.name);
        assert_eq!(call["spans_stored"], 80);
        assert_eq!(server.store.get_call("e1").await.expect("get"), Some(call));

        let resp = client
            .post(server.endpoint())
            .json(&core("e2", "a"))
            .send()
            .await;
        assert_eq!(resp.expect("sent").status(), StatusCode::UNAUTHORIZED);

        let store = server.store.clone();
        server.shutdown().await.expect("clean shutdown");
        assert_eq!(
            store.span_count("e1").await.expect("store still usable"),
            80
        );
        assert_eq!(store.duplicate_span_rows().await.expect("count"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_are_stored_once() {
    const TASKS: usize = 24;
    for db in backends().await {
        let server = Arc::new(start(&db.url, |_| {}).await);
        let client = reqwest::Client::new();
        for body in [core("d1", "agent-1"), detail("d1", 0, 0..40, None)] {
            let body = Arc::new(body);
            let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (client, server, body, barrier) = (
                        client.clone(),
                        server.clone(),
                        body.clone(),
                        barrier.clone(),
                    );
                    tokio::spawn(async move {
                        barrier.wait().await;
                        post(&client, &server, &body).await
                    })
                })
                .collect();
            let mut fresh = 0;
            for t in tasks {
                let (status, reply) = t.await.expect("task");
                assert_eq!(status, StatusCode::OK, "[{}] {reply}", db.name);
                if reply["duplicate"] == json!(false) {
                    fresh += 1;
                }
            }
            assert_eq!(
                fresh,
                1,
                "[{}] exactly one stores {}",
                db.name,
                key_for(&body)
            );
        }
        assert_eq!(server.store.span_count("d1").await.expect("count"), 40);

        // Different batches of one call at once: progress counters must not lose updates.
        let batches = 12u64;
        let tasks: Vec<_> = (0..batches)
            .map(|seq| {
                let (client, server) = (client.clone(), server.clone());
                let total = (seq == batches - 1).then_some(batches);
                let first = u32::try_from(seq * 10).expect("small");
                let body = detail("d2", seq, first..first + 10, total);
                tokio::spawn(async move { post(&client, &server, &body).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("task").0, StatusCode::OK);
        }
        let call = server
            .store
            .get_call("d2")
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(call["batches_received"], 12, "[{}] {call}", db.name);
        assert_eq!(call["spans_stored"], 120);
        assert_eq!(call["complete"], true);
        assert_eq!(server.store.total_span_count().await.expect("count"), 160);
        assert_eq!(server.store.duplicate_span_rows().await.expect("count"), 0);
        let server = Arc::into_inner(server).expect("all tasks done");
        server.shutdown().await.expect("clean shutdown");
    }
}

#[tokio::test]
async fn limits_hold_over_tcp() {
    for db in backends().await {
        let server = start(&db.url, |c| {
            c.max_body_bytes = 50_000;
            c.max_decompressed_bytes = 2_000_000;
        })
        .await;
        let client = reqwest::Client::new();
        let (status, reply) = post(&client, &server, &detail("l1", 0, 0..200, None)).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "[{}] {reply}",
            db.name
        );

        let bomb = gzip(&vec![b'0'; 20_000_000]);
        assert!(bomb.len() < 50_000);
        let resp = client
            .post(server.endpoint())
            .header("x-api-key", KEY)
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await
            .expect("request sent");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

        let (status, reply) = post(&client, &server, &json!({"schema_version": 1})).await;
        assert_eq!(
            (status, reply["field"].clone()),
            (StatusCode::BAD_REQUEST, json!("call_id"))
        );
        assert_eq!(server.store.total_span_count().await.expect("count"), 0);
        server.shutdown().await.expect("clean shutdown");
    }
}

/// A server on a fresh SQLite file (kept while the returned directory lives).
async fn start_on_sqlite(
    name: &str,
    tweak: impl FnOnce(&mut IngestConfig),
) -> (tempfile::TempDir, RunningServer) {
    let db = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", db.path().join(name).display());
    let server = start(&url, tweak).await;
    (db, server)
}

/// Starts a POST whose body never finishes (1,000 bytes declared, one sent): the server
/// holds a place for it until the connection closes.
async fn stalled_post(server: &RunningServer, idempotency_key: &str) -> tokio::net::TcpStream {
    stalled_post_of(server, idempotency_key, 1000).await
}

/// [`stalled_post`] declaring `length` bytes.
async fn stalled_post_of(
    server: &RunningServer,
    idempotency_key: &str,
    length: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(server.local_addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/calls HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\nidempotency-key: {idempotency_key}\r\n\
         content-length: {length}\r\n\r\n{{",
        server.local_addr
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s
}

/// `GET /healthz`, waiting (each try a round trip to the server, at most 10 s) until it
/// reports `in_flight` requests in flight.
async fn health_once_in_flight(
    client: &reqwest::Client,
    server: &RunningServer,
    in_flight: u64,
) -> Value {
    health_once(client, server, "requests_in_flight", in_flight).await
}

/// `GET /healthz`, waiting (each try a round trip to the server, at most 10 s) until its
/// `field` reads `value`.
async fn health_once(
    client: &reqwest::Client,
    server: &RunningServer,
    field: &str,
    value: u64,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let health: Value = client
            .get(format!("http://{}/healthz", server.local_addr))
            .send()
            .await
            .expect("healthz")
            .json()
            .await
            .expect("JSON");
        if health[field] == json!(value) {
            return health;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {field} = {value}, healthz says {health}"
        );
    }
}

/// Posts `body` and checks that it is refused at once (not queued until room frees, which
/// would be never while the test holds it): 503 with `Retry-After: 1`, naming `setting`.
async fn assert_refused_at_once(
    client: &reqwest::Client,
    server: &RunningServer,
    body: &Value,
    setting: &str,
) {
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client
            .post(server.endpoint())
            .bearer_auth(KEY)
            .header("idempotency-key", key_for(body))
            .json(body)
            .send(),
    )
    .await
    .expect("answered at once")
    .expect("request sent");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let reply: Value = resp.json().await.expect("JSON error");
    let message = reply["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(setting),
        "the answer names {setting}: {reply}"
    );
}

/// Holds `declared` bytes of the server's budget with a post whose body never comes (a body
/// declared but not sent holds its declared length from its head on), then posts `body` and
/// checks that it is refused for want of bytes. Returns the stalled post.
async fn refused_while_bytes_held(
    client: &reqwest::Client,
    server: &RunningServer,
    declared: usize,
    body: &Value,
) -> tokio::net::TcpStream {
    let stalled = stalled_post_of(server, "held:detail:0", declared).await;
    health_once(client, server, "body_bytes_held", declared as u64).await;
    assert_refused_at_once(client, server, body, "CALLSCOPE_INGEST_MAX_BUFFERED_BYTES").await;
    stalled
}

#[tokio::test]
async fn past_its_places_the_server_answers_busy_at_once_and_keeps_a_quarter_for_cores() {
    // Four places, one of them kept for core call logs.
    let (_db, server) = start_on_sqlite("places.db", |c| {
        c.max_in_flight = 4;
        // The stalled posts below hold their places for the whole test.
        c.body_timeout = callscope_ingest::MAX_BODY_TIMEOUT;
    })
    .await;
    let client = reqwest::Client::new();

    // Three detail batches whose bodies never finish take three places.
    let mut stalled = Vec::new();
    for seq in 0..3 {
        stalled.push(stalled_post(&server, &format!("slow:detail:{seq}")).await);
    }
    health_once_in_flight(&client, &server, 3).await;

    // A fourth batch would take the cores' place: refused at once (not queued until a place
    // frees, which would be never here), with Retry-After.
    let batch = detail("p1", 0, 0..3, Some(1));
    assert_refused_at_once(&client, &server, &batch, "CALLSCOPE_INGEST_MAX_IN_FLIGHT").await;

    // A core call log still gets in.
    let (status, reply) = post(&client, &server, &core("p1", "agent")).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    health_once_in_flight(&client, &server, 3).await;

    // With every place taken, a core is refused too.
    stalled.push(stalled_post(&server, "slow-core:core").await);
    health_once_in_flight(&client, &server, 4).await;
    let (status, reply) = post(&client, &server, &core("p2", "agent")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");

    // Senders hanging up give their places back; the refused batch now goes through.
    stalled.truncate(1);
    health_once_in_flight(&client, &server, 1).await;
    let (status, reply) = post(&client, &server, &batch).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let (status, reply) = post(&client, &server, &core("p2", "agent")).await;
    assert_eq!(status, StatusCode::OK, "{reply}");

    let health = health_once_in_flight(&client, &server, 1).await;
    assert_eq!(health["requests_refused_busy"], json!(2), "{health}");
    assert_eq!(server.store.total_span_count().await.expect("count"), 3);
    drop(stalled);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_body_that_stops_coming_is_answered_408_and_frees_its_place() {
    use tokio::io::AsyncReadExt;
    let (_db, server) = start_on_sqlite("stalled.db", |c| {
        c.max_in_flight = 2;
        c.body_timeout = std::time::Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();

    let mut stalled = stalled_post(&server, "stalled:detail:0").await;
    let mut answer = String::new();
    // The server answers and closes the connection; 10 s bounds the wait if it never does.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stalled.read_to_string(&mut answer),
    )
    .await
    .expect("answered before the test's own deadline")
    .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("CALLSCOPE_INGEST_BODY_TIMEOUT_MS"),
        "the answer names the setting: {answer}"
    );
    let health = health_once_in_flight(&client, &server, 0).await;
    assert_eq!(health["requests_refused_busy"], json!(0), "{health}");

    // The place is free again: a whole batch goes through.
    let (status, reply) = post(&client, &server, &detail("s1", 0, 0..2, Some(1))).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn past_its_byte_budget_the_server_answers_busy_and_keeps_a_quarter_for_cores() {
    let batch = detail("b1", 0, 0..3, Some(1));
    let call_log = core("b1", "agent");
    let c = serde_json::to_vec(&call_log).expect("JSON").len();
    // A post declaring three quarters of the budget leaves detail no room. The core takes c
    // on arrival and 5c while it is parsed (the body and four times it for its rows): a
    // budget of 20c + 4 holds that in the quarter kept for cores.
    let budget = 4 * (5 * c + 1);
    let declared = budget - budget / 4;
    let (_db, server) = start_on_sqlite("bytes.db", |cfg| {
        cfg.max_buffered_bytes = budget;
        // The stalled post holds its bytes for the whole test.
        cfg.body_timeout = callscope_ingest::MAX_BODY_TIMEOUT;
    })
    .await;
    let client = reqwest::Client::new();

    let stalled = refused_while_bytes_held(&client, &server, declared, &batch).await;

    // The core call log gets in, and gives its bytes back once stored.
    let (status, reply) = post(&client, &server, &call_log).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let health = health_once(&client, &server, "body_bytes_held", declared as u64).await;
    assert_eq!(health["requests_refused_bytes"], json!(1), "{health}");
    assert_eq!(health["requests_refused_busy"], json!(0), "{health}");

    // The sender hanging up gives its bytes back; the refused batch now goes through.
    drop(stalled);
    health_once(&client, &server, "body_bytes_held", 0).await;
    let (status, reply) = post(&client, &server, &batch).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(server.store.total_span_count().await.expect("count"), 3);
    health_once(&client, &server, "body_bytes_held", 0).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_body_whose_parse_would_go_past_the_budget_is_refused_before_it_is_parsed() {
    let batch = detail("p2", 0, 0..3, Some(1));
    let d = serde_json::to_vec(&batch).expect("JSON").len();
    // Detail may fill three quarters of 8d, 6d. With 3d held by a stalled post, the batch's
    // d bytes fit when it arrives; its parse would take 5d (the body, and four times it for
    // the rows), 8d in all.
    let (_db, server) = start_on_sqlite("parse.db", |cfg| {
        cfg.max_buffered_bytes = 8 * d;
        cfg.body_timeout = callscope_ingest::MAX_BODY_TIMEOUT;
    })
    .await;
    let client = reqwest::Client::new();
    let stalled = refused_while_bytes_held(&client, &server, 3 * d, &batch).await;
    let health = health_once(&client, &server, "body_bytes_held", 3 * d as u64).await;
    assert_eq!(health["requests_refused_bytes"], json!(1), "{health}");
    assert_eq!(server.store.total_span_count().await.expect("count"), 0);

    drop(stalled);
    health_once(&client, &server, "body_bytes_held", 0).await;
    let (status, reply) = post(&client, &server, &batch).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    health_once(&client, &server, "body_bytes_held", 0).await;
    server.shutdown().await.expect("clean shutdown");
}
