-- callscope-ingest schema (PostgreSQL). JSON columns are JSONB; times are RFC 3339 text as sent.

-- One row per call. Created by the core (phase 1) or, when detail arrives first, by the first
-- detail batch (has_core = false until the core comes).
CREATE TABLE call_logs (
    call_id                 TEXT    PRIMARY KEY,
    agent_id                TEXT,
    has_core                BOOLEAN NOT NULL DEFAULT FALSE,
    schema_version          BIGINT,
    call_started_at         TEXT,
    call_ended_at           TEXT,
    duration_seconds        DOUBLE PRECISION,
    end_reason              TEXT,
    transcript_json         JSONB,
    summary_metrics         JSONB,
    telemetry_summary       JSONB,
    truncated               BOOLEAN,
    extra                   JSONB,
    transcript_with_metrics JSONB,
    first_seen_us           BIGINT  NOT NULL,
    core_received_us        BIGINT,
    batches_received        BIGINT  NOT NULL DEFAULT 0,
    data_batches_received   BIGINT  NOT NULL DEFAULT 0,
    spans_stored            BIGINT  NOT NULL DEFAULT 0,
    total_batches           BIGINT,
    complete                BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX call_logs_recent ON call_logs (core_received_us DESC, call_id DESC) WHERE has_core;
CREATE INDEX call_logs_agent_recent
    ON call_logs (agent_id, core_received_us DESC, call_id DESC) WHERE has_core;

-- One row per (call_id, batch_seq): detail batch progress and exactly-once delivery.
CREATE TABLE detail_batches (
    call_id        TEXT    NOT NULL,
    batch_seq      BIGINT  NOT NULL,
    is_final       BOOLEAN NOT NULL,
    late           BOOLEAN NOT NULL,
    total_batches  BIGINT,
    span_count     BIGINT  NOT NULL,
    received_us    BIGINT  NOT NULL,
    PRIMARY KEY (call_id, batch_seq)
);

-- One row per span; span_id is unique per call.
CREATE TABLE session_traces (
    id             BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_id        TEXT    NOT NULL,
    trace_id       TEXT    NOT NULL,
    span_id        TEXT    NOT NULL,
    parent_span_id TEXT,
    name           TEXT    NOT NULL,
    operation      TEXT,
    kind           TEXT,
    start_time     TEXT,
    end_time       TEXT,
    duration_ms    DOUBLE PRECISION,
    status_code    TEXT,
    status_message TEXT,
    attributes     JSONB,
    events         JSONB,
    links          JSONB,
    batch_seq      BIGINT  NOT NULL,
    UNIQUE (call_id, span_id)
);
CREATE INDEX session_traces_call_page ON session_traces (call_id, id);
CREATE INDEX session_traces_trace ON session_traces (trace_id);

-- Every Idempotency-Key seen, stored once.
CREATE TABLE idempotency_keys (
    key         TEXT   PRIMARY KEY,
    call_id     TEXT   NOT NULL,
    received_us BIGINT NOT NULL
);
