-- Traces a call's core says it covers (`trace_ids`). A sender that saw spans before their call
-- id was known sends them under the trace id (32 hex) as call id; they join the call here.
CREATE TABLE call_traces (
    trace_id TEXT PRIMARY KEY NOT NULL,
    call_id  TEXT NOT NULL
);
