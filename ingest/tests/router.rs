//! Router tests: the axum app driven with `tower::ServiceExt::oneshot`, on every backend.

mod common;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use callscope_ingest::{AppState, IngestConfig, Store, app};
use common::{KEY, backends, core, detail, gzip, key_for, span};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    app: Router,
    store: Store,
    backend: &'static str,
}

async fn harness(
    url: &str,
    backend: &'static str,
    tweak: impl FnOnce(&mut IngestConfig),
) -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let mut config = IngestConfig::new(url);
    config.api_keys = vec![KEY.to_owned(), "other-key".to_owned()];
    tweak(&mut config);
    let store = Store::connect(url).await.expect("connect and migrate");
    Harness {
        app: app(AppState::new(store.clone(), &config)),
        store,
        backend,
    }
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// POSTs `body` with the right Idempotency-Key and the API key.
    async fn post(&self, body: &Value) -> (StatusCode, Value) {
        self.post_text(&body.to_string()).await
    }

    /// POSTs the JSON `text` as it is written (key order, spacing), keyed as [`Self::post`].
    async fn post_text(&self, text: &str) -> (StatusCode, Value) {
        let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let req = Request::post("/v1/calls")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key_for(&value))
            .body(Body::from(text.to_owned()))
            .expect("request");
        self.send(req).await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let req = Request::get(uri)
            .header("x-api-key", KEY)
            .body(Body::empty())
            .expect("request");
        self.send(req).await
    }

    async fn call(&self, call_id: &str) -> Value {
        let (status, call) = self.get(&format!("/v1/calls/{call_id}")).await;
        assert_eq!(status, StatusCode::OK, "[{}] {call}", self.backend);
        assert_eq!(
            self.store.get_call(call_id).await.expect("get_call"),
            Some(call.clone()),
            "store and API agree"
        );
        call
    }
}

#[tokio::test]
async fn core_then_detail_completes_the_call() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let (status, body) = h.post(&core("c1", "agent-1")).await;
        assert_eq!(status, StatusCode::OK, "[{}] {body}", db.name);
        assert_eq!(
            body,
            json!({"ok": true, "call_id": "c1", "kind": "core", "duplicate": false})
        );

        let call = h.call("c1").await;
        assert_eq!(call["has_core"], true);
        assert_eq!(call["complete"], false);
        assert_eq!(call["summary_metrics"]["avg_latency"], 812.5);
        assert_eq!(
            call["extra"]["trace_ids"][0],
            "0af7651916cd43dd8448eb211c80319c"
        );

        let (status, body) = h.post(&detail("c1", 0, 0..3, None)).await;
        assert_eq!(status, StatusCode::OK, "[{}] {body}", db.name);
        assert_eq!(body["duplicate"], false);
        assert_eq!(body["spans_stored"], 3);
        let (_, body) = h.post(&detail("c1", 1, 3..5, Some(2))).await;
        assert_eq!(body["spans_stored"], 2);

        let call = h.call("c1").await;
        assert_eq!(call["batches_received"], 2, "[{}]", db.name);
        assert_eq!(call["spans_stored"], 5);
        assert_eq!(call["total_batches"], 2);
        assert_eq!(call["complete"], true);
        assert_eq!(call["transcript_with_metrics"][0]["llm_latency"], 245.0);
        assert_eq!(h.store.span_count("c1").await.expect("count"), 5);
        assert_eq!(h.store.total_span_count().await.expect("count"), 5);
        assert_eq!(h.store.call_count().await.expect("count"), 1);
        assert_eq!(h.store.duplicate_span_rows().await.expect("count"), 0);

        let (status, spans) = h.get("/v1/calls/c1/spans").await;
        assert_eq!(status, StatusCode::OK);
        let spans = spans["spans"].as_array().expect("spans").clone();
        assert_eq!(spans.len(), 5);
        let first = &spans[0];
        assert_eq!(first["span_id"], "0000000000000000");
        assert_eq!(first["status"], json!({"code": "ok", "message": ""}));
        assert_eq!(first["attributes"]["gen_ai.request.model"], "m");
        assert_eq!(first["events"][0]["name"], "e");
        assert_eq!(first["links"], json!([]));
        assert_eq!(first["duration_ms"], 245.1);
        assert_eq!(first["parent_span_id"], Value::Null);
        // Every column of every span as sent (each backend has its own span insert).
        for (i, stored) in spans.iter().enumerate() {
            let sent = span(i as u32);
            for k in [
                "trace_id",
                "span_id",
                "parent_span_id",
                "name",
                "operation",
                "kind",
                "start_time",
                "end_time",
                "duration_ms",
                "status",
                "attributes",
                "events",
                "links",
            ] {
                assert_eq!(stored[k], sent[k], "[{}] {k} of span {i}", db.name);
            }
            assert_eq!(stored["call_id"], "c1");
            assert_eq!(
                stored["batch_seq"],
                u64::from(i >= 3),
                "[{}] span {i}",
                db.name
            );
        }

        // A final batch without spans (a transcript-only final) completes its call.
        h.post(&core("c2", "agent-1")).await;
        let (status, body) = h.post(&detail("c2", 0, 0..0, Some(1))).await;
        assert_eq!(status, StatusCode::OK, "[{}] {body}", db.name);
        assert_eq!(body["spans_stored"], 0);
        let call = h.call("c2").await;
        assert_eq!(call["complete"], true, "[{}] {call}", db.name);
        assert_eq!(call["spans_stored"], 0);
    }
}

/// A detail body in callscope's key order (`update_type` first, so that its spans are read as
/// they come and their attributes, events and links kept as text) with spacing, escapes,
/// unsorted keys and a number PostgreSQL's `numeric` cannot hold as written (serde_json reads
/// it as 0) in those texts: each backend stores the same JSON values.
#[tokio::test]
async fn spans_read_as_they_come_keep_their_json() {
    let text = r#"{"schema_version":1,"update_type":"detailed_telemetry","call_id":"c-raw",
        "batch_seq":0,"final":true,"total_batches":1,"telemetry_data":{"session_traces":[
        {"trace_id":"0af7651916cd43dd8448eb211c80319c","span_id":"00f067aa0ba902b7",
         "name":"llm_request","attributes": { "z" : 1.5, "a":"caf\u00e9\n\"q\"",
         "n": {"k": [1, null, true, -2e-3]}, "tiny": 1e-20000 }, "events":[ {"name":"e","attributes":{}} ],
         "links": null}]}}"#;
    let sent: Value = serde_json::from_str(text).expect("JSON");
    let sent = &sent["telemetry_data"]["session_traces"][0];
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let (status, body) = h.post_text(text).await;
        assert_eq!(status, StatusCode::OK, "[{}] {body}", db.name);
        assert_eq!(body["spans_stored"], 1);
        let (_, spans) = h.get("/v1/calls/c-raw/spans").await;
        let stored = &spans["spans"][0];
        assert_eq!(stored["attributes"]["a"], "café\n\"q\"", "[{}]", db.name);
        for k in ["attributes", "events", "links"] {
            assert_eq!(stored[k], sent[k], "[{}] {k}", db.name);
        }
    }
}

#[tokio::test]
async fn detail_before_core_is_kept_and_joined() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        // Final batch first, then batch 0, then the core.
        assert_eq!(
            h.post(&detail("c2", 1, 10..12, Some(2))).await.0,
            StatusCode::OK
        );
        let call = h.call("c2").await;
        assert_eq!(call["has_core"], false, "[{}]", db.name);
        assert_eq!(call["complete"], false);
        assert_eq!(call["agent_id"], "agent-1");
        // Not listed until the core arrives.
        let (_, list) = h.get("/v1/calls").await;
        assert_eq!(list["calls"], json!([]));
        assert_eq!(h.store.call_count().await.expect("count"), 0);

        assert_eq!(h.post(&detail("c2", 0, 0..3, None)).await.0, StatusCode::OK);
        let (status, body) = h.post(&core("c2", "agent-1")).await;
        assert_eq!(
            (status, body["duplicate"].clone()),
            (StatusCode::OK, json!(false))
        );

        let call = h.call("c2").await;
        assert_eq!(call["has_core"], true);
        assert_eq!(call["complete"], true);
        assert_eq!(call["spans_stored"], 5);
        assert_eq!(call["end_reason"], "root_span_ended");
        assert_eq!(call["transcript_with_metrics"][0]["turn"], 1);
        let (_, list) = h.get("/v1/calls").await;
        assert_eq!(list["calls"][0]["call_id"], "c2");
    }
}

#[tokio::test]
async fn sequential_duplicates_are_stored_once() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let body = core("c3", "agent-1");
        assert_eq!(h.post(&body).await.1["duplicate"], false);
        assert_eq!(h.post(&body).await.1["duplicate"], true, "[{}]", db.name);

        // A second core for the same call, other key and other content, changes nothing.
        let mut other = core("c3", "agent-2");
        other["end_reason"] = json!("shutdown");
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .body(Body::from(other.to_string()))
            .expect("request");
        let (status, reply) = h.send(req).await;
        assert_eq!(
            (status, reply["duplicate"].clone()),
            (StatusCode::OK, json!(true))
        );
        let call = h.call("c3").await;
        assert_eq!(call["end_reason"], "root_span_ended");
        assert_eq!(call["agent_id"], "agent-1");

        let batch = detail("c3", 0, 0..4, None);
        assert_eq!(h.post(&batch).await.1["duplicate"], false);
        let (status, reply) = h.post(&batch).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["duplicate"], true);
        assert_eq!(reply["spans_stored"], 0);

        // Same (call_id, batch_seq) under a new key is still a duplicate ...
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .header("idempotency-key", "retry-with-new-key")
            .body(Body::from(batch.to_string()))
            .expect("request");
        assert_eq!(h.send(req).await.1["duplicate"], true);
        // ... and a key seen before is a duplicate whatever the body says.
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .header("idempotency-key", "c3:detail:0")
            .body(Body::from(detail("c3", 1, 4..8, None).to_string()))
            .expect("request");
        assert_eq!(h.send(req).await.1["duplicate"], true);

        let call = h.call("c3").await;
        assert_eq!(call["batches_received"], 1);
        assert_eq!(call["spans_stored"], 4);
        assert_eq!(h.store.span_count("c3").await.expect("count"), 4);
        assert_eq!(h.store.duplicate_span_rows().await.expect("count"), 0);

        // A span resent in another batch (e.g. after a split) is stored once.
        let (_, reply) = h.post(&detail("c3", 2, 2..6, None)).await;
        assert_eq!(reply["duplicate"], false);
        assert_eq!(reply["spans_stored"], 2);
        assert_eq!(h.store.span_count("c3").await.expect("count"), 6);
    }
}

/// A sender may number a late batch below its call's final (a 413 split moved the final past
/// it): complete means every number below `total_batches` arrived, late or not, in any order.
#[tokio::test]
async fn a_late_batch_numbered_below_the_final_counts_toward_completeness() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        h.post(&core("c5", "agent-1")).await;
        h.post(&detail("c5", 0, 0..2, None)).await;
        let mut late = detail("c5", 1, 2..3, None);
        late["late"] = json!(true);
        h.post(&late).await;
        h.post(&detail("c5", 3, 3..4, Some(4))).await;
        let call = h.call("c5").await;
        assert_eq!(call["complete"], false, "[{}] {call}", db.name);
        h.post(&detail("c5", 2, 4..5, None)).await;
        let call = h.call("c5").await;
        assert_eq!(call["complete"], true, "[{}] {call}", db.name);
        assert_eq!(call["data_batches_received"], 4);
        assert_eq!(call["spans_stored"], 5);
    }
}

#[tokio::test]
async fn late_batches_are_stored_without_breaking_completeness() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        h.post(&core("c4", "agent-1")).await;
        h.post(&detail("c4", 0, 0..2, Some(1))).await;
        assert_eq!(h.call("c4").await["complete"], true, "[{}]", db.name);
        let mut late = detail("c4", 1, 2..4, None);
        late["late"] = json!(true);
        let (status, reply) = h.post(&late).await;
        assert_eq!(
            (status, reply["spans_stored"].clone()),
            (StatusCode::OK, json!(2))
        );
        let call = h.call("c4").await;
        assert_eq!(call["complete"], true);
        assert_eq!(call["batches_received"], 2);
        assert_eq!(call["spans_stored"], 4);
        assert_eq!(call["total_batches"], 1);
    }
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let mut no_id = core("x", "a");
        no_id.as_object_mut().expect("object").remove("call_id");
        let (status, body) = h.post(&no_id).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["field"], "call_id");
        assert!(body["error"].as_str().expect("message").contains("call_id"));

        let mut wrong = core("x", "a");
        wrong["summary_metrics"] = json!("fast");
        assert_eq!(h.post(&wrong).await.1["field"], "summary_metrics");

        let mut version = core("x", "a");
        version["schema_version"] = json!(2);
        assert_eq!(h.post(&version).await.1["field"], "schema_version");

        let mut span = detail("x", 0, 0..2, None);
        span["telemetry_data"]["session_traces"][1]["trace_id"] = json!(null);
        assert_eq!(
            h.post(&span).await.1["field"],
            "telemetry_data.session_traces[1].trace_id"
        );

        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .body(Body::from("{\"call_id\": "))
            .expect("request");
        let (status, body) = h.send(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["field"], Value::Null);
        assert!(
            body["error"]
                .as_str()
                .expect("message")
                .contains("malformed JSON")
        );

        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .header(header::CONTENT_ENCODING, "br")
            .body(Body::from("{}"))
            .expect("request");
        assert_eq!(h.send(req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        assert_eq!(h.get("/v1/calls?limit=0").await.1["field"], "limit");
        assert_eq!(h.get("/v1/calls?before=nope").await.1["field"], "before");
        assert_eq!(h.get("/v1/calls/x/spans?after=z").await.1["field"], "after");
        let (status, body) = h.get("/v1/calls/unknown").await;
        assert_eq!(
            (status, body["field"].clone()),
            (StatusCode::NOT_FOUND, json!("call_id"))
        );
        // Nothing was stored by any of this.
        assert_eq!(h.store.total_span_count().await.expect("count"), 0);
    }
}

#[tokio::test]
async fn api_key_is_required_in_either_header() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let body = core("c5", "a").to_string();
        let post = |auth: Option<(&'static str, String)>| {
            let mut req = Request::post("/v1/calls");
            if let Some((name, value)) = auth {
                req = req.header(name, value);
            }
            req.body(Body::from(body.clone())).expect("request")
        };
        let (status, reply) = h.send(post(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            reply["error"]
                .as_str()
                .expect("message")
                .contains("API key")
        );
        assert_eq!(
            h.send(post(Some(("authorization", "Bearer nope".to_owned()))))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            h.send(post(Some(("x-api-key", "nope".to_owned())))).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(h.get("/v1/calls").await.0, StatusCode::OK);
        let req = Request::get("/v1/calls")
            .body(Body::empty())
            .expect("request");
        assert_eq!(h.send(req).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            h.send(post(Some(("x-api-key", "other-key".to_owned()))))
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            h.send(post(Some(("authorization", format!("Bearer {KEY}")))))
                .await
                .1["duplicate"],
            true
        );
        assert_eq!(h.store.call_count().await.expect("count"), 1);

        let req = Request::get("/healthz")
            .body(Body::empty())
            .expect("request");
        let (status, health) = h.send(req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(health["database"], db.name);

        // No keys configured and auth not disabled: the router refuses everything.
        let locked = harness(&db.url, db.name, |c| c.api_keys.clear()).await;
        let req = Request::post("/v1/calls")
            .body(Body::from(body.clone()))
            .expect("request");
        assert_eq!(locked.send(req).await.0, StatusCode::UNAUTHORIZED);
        let open = harness(&db.url, db.name, |c| {
            c.api_keys.clear();
            c.no_auth = true;
        })
        .await;
        let req = Request::post("/v1/calls")
            .body(Body::from(body.clone()))
            .expect("request");
        assert_eq!(open.send(req).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |c| {
            c.max_body_bytes = 20_000;
            c.max_decompressed_bytes = 1_000_000;
        })
        .await;
        let big = detail("c6", 0, 0..200, None);
        let bytes = big.to_string();
        assert!(bytes.len() > 20_000);
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .body(Body::from(bytes.clone()))
            .expect("request");
        let (status, body) = h.send(req).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "[{}] {body}",
            db.name
        );
        assert_eq!(body["field"], "body");

        // The same batch gzip-compressed fits on the wire and is accepted.
        let packed = gzip(bytes.as_bytes());
        assert!(packed.len() < 20_000, "compressed to {}", packed.len());
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from(packed))
            .expect("request");
        let (status, body) = h.send(req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["spans_stored"], 200);

        // A gzip bomb: tiny on the wire, far over the decompressed cap.
        let bomb = gzip(&vec![b' '; 10_000_000]);
        assert!(bomb.len() < 20_000, "bomb is {} bytes", bomb.len());
        let req = Request::post("/v1/calls")
            .header("x-api-key", KEY)
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from(bomb))
            .expect("request");
        let (status, body) = h.send(req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert!(
            body["error"]
                .as_str()
                .expect("message")
                .contains("decompression")
        );
    }
}

#[tokio::test]
async fn lists_page_newest_first() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        for i in 0..5 {
            let agent = if i % 2 == 0 { "even" } else { "odd" };
            h.post(&core(&format!("call-{i}"), agent)).await;
        }
        let mut seen = Vec::new();
        let mut uri = "/v1/calls?limit=2".to_owned();
        loop {
            let (status, page) = h.get(&uri).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            for c in page["calls"].as_array().expect("calls") {
                seen.push(c["call_id"].as_str().expect("id").to_owned());
            }
            match page["next_before"].as_str() {
                Some(cursor) => uri = format!("/v1/calls?limit=2&before={cursor}"),
                None => break,
            }
        }
        assert_eq!(
            seen,
            ["call-4", "call-3", "call-2", "call-1", "call-0"],
            "[{}]",
            db.name
        );

        let (_, page) = h.get("/v1/calls?agent_id=odd").await;
        let ids: Vec<&str> = page["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .filter_map(|c| c["call_id"].as_str())
            .collect();
        assert_eq!(ids, ["call-3", "call-1"]);
        assert_eq!(page["next_before"], Value::Null);

        h.post(&detail("call-0", 0, 0..7, None)).await;
        let mut span_ids = Vec::new();
        let mut uri = "/v1/calls/call-0/spans?limit=3".to_owned();
        loop {
            let (_, page) = h.get(&uri).await;
            for s in page["spans"].as_array().expect("spans") {
                span_ids.push(s["span_id"].as_str().expect("id").to_owned());
            }
            match page["next_after"].as_i64() {
                Some(after) => uri = format!("/v1/calls/call-0/spans?limit=3&after={after}"),
                None => break,
            }
        }
        let expected: Vec<String> = (0..7u32).map(|n| format!("{n:016x}")).collect();
        assert_eq!(span_ids, expected);
    }
}

#[tokio::test]
async fn spans_sent_under_a_trace_id_join_the_call_that_names_it() {
    for db in backends().await {
        let h = harness(&db.url, db.name, |_| {}).await;
        let trace = "0af7651916cd43dd8448eb211c80319c";
        // Sent before the sender knew the call id: keyed by the trace id.
        assert_eq!(
            h.post(&detail(trace, 0, 0..3, None)).await.0,
            StatusCode::OK
        );
        assert_eq!(h.store.span_count(trace).await.expect("count"), 3);
        // The call's own final batch, then its core naming the trace.
        assert_eq!(
            h.post(&detail("joined", 0, 3..5, Some(1))).await.0,
            StatusCode::OK
        );
        assert_eq!(h.post(&core("joined", "agent-1")).await.0, StatusCode::OK);
        let call = h.call("joined").await;
        assert_eq!(call["spans_stored"], 5, "[{}] {call}", db.name);
        assert_eq!(call["complete"], true);
        assert_eq!(h.store.span_count("joined").await.expect("count"), 5);
        assert_eq!(h.store.span_count(trace).await.expect("count"), 0);
        // Spans still arriving under the trace id go to the call as well.
        assert_eq!(
            h.post(&detail(trace, 1, 5..7, None)).await.0,
            StatusCode::OK
        );
        assert_eq!(h.store.span_count("joined").await.expect("count"), 7);
        assert_eq!(h.call("joined").await["spans_stored"], 7);
        assert_eq!(h.store.duplicate_span_rows().await.expect("dups"), 0);
    }
}
