//! Wire contract v1: turning a request body into a validated core call or detail batch.
//!
//! Pure functions, no I/O. Every rejection names the offending field so the sender can fix it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::de::StrRead;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The only wire contract version this server speaks.
pub(crate) const SCHEMA_VERSION: i64 = 1;
/// `update_type` of a detail batch.
pub(crate) const DETAILED_TELEMETRY: &str = "detailed_telemetry";
/// Longest accepted call id, agent id or span/trace id, in bytes.
const MAX_ID_BYTES: usize = 512;

/// A request the server rejects with 400: what is wrong and which field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BadRequest {
    /// Human-readable reason, saying what to send instead.
    pub message: String,
    /// Dotted path of the field at fault (`call_id`, `telemetry_data.session_traces[2].span_id`),
    /// `None` when the body as a whole is at fault.
    pub field: Option<String>,
}

impl BadRequest {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

/// A validated request body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// Phase 1: the call record.
    Core(CoreCall),
    /// Phase 2: one batch of spans (the final one also carries the per-turn transcript).
    Detail(DetailBatch),
}

/// Phase 1 body (wire contract v1, no `update_type`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoreCall {
    pub call_id: String,
    pub agent_id: String,
    pub call_started_at: String,
    pub call_ended_at: String,
    pub duration_seconds: f64,
    pub end_reason: String,
    pub transcript_json: Value,
    pub summary_metrics: Value,
    pub telemetry_summary: Value,
    pub truncated: bool,
    /// Every field the contract does not name (additions are allowed), e.g. `trace_ids`.
    pub extra: Value,
}

/// Phase 2 body (`update_type: "detailed_telemetry"`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DetailBatch {
    pub call_id: String,
    pub agent_id: Option<String>,
    pub batch_seq: i64,
    pub is_final: bool,
    /// Spans that arrived after the call ended: numbered at or past `total_batches`, except
    /// where a 413 split moved the final past them.
    pub late: bool,
    pub total_batches: Option<i64>,
    pub transcript_with_metrics: Option<Value>,
    pub spans: Vec<SpanRow>,
}

/// One span of `telemetry_data.session_traces[]`, as stored in `session_traces`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub operation: Option<String>,
    pub kind: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub duration_ms: Option<f64>,
    pub status_code: Option<String>,
    pub status_message: Option<String>,
    pub attributes: Option<RawJson>,
    pub events: Option<RawJson>,
    pub links: Option<RawJson>,
}

/// A JSON value kept as its text (a span's `attributes`, `events` or `links`): it is stored as
/// it came, so the receiver neither builds it as a `Value` tree (~3 times the text's size for
/// small attributes) nor writes it out again for the database.
#[derive(Debug, Clone)]
pub(crate) struct RawJson(Box<RawValue>);

impl RawJson {
    /// The JSON text.
    pub(crate) fn get(&self) -> &RawValue {
        &self.0
    }

    /// A captured text, kept as it came unless a number in it is one PostgreSQL could not
    /// store as written (see [`numbers_fit`]).
    fn kept(raw: Box<RawValue>) -> Self {
        if numbers_fit(raw.get()) {
            return Self(raw);
        }
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(v) => Self::of(&v),
            Err(_) => Self(raw),
        }
    }

    /// A value read as a whole (the whole-body path), written as text.
    fn of(v: &Value) -> Self {
        // Writing a parsed `Value` cannot fail (its keys are strings, its numbers finite).
        Self(serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }
}

/// Equal when the JSON values are (the texts may differ in spacing and key order).
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        let value = |r: &Self| serde_json::from_str::<Value>(r.0.get()).ok();
        value(self) == value(other)
    }
}

/// How many times its JSON's size a batch's parsed rows are expected to hold at most
/// ([`Incoming::heap_bytes`] counts 1.6 times for spans of small attributes, 1.0 times for
/// spans carrying 10 KB of text; RSS measured 1.6 and 1.1 times, BENCHMARKS.md "night
/// session"): taken from the byte budget, on top of the decoded body, before it is parsed. The
/// parse's peak was 2.6 times at most, in a body whose `telemetry_data` is kept as text
/// first; core call logs are read as `Value` trees.
pub(crate) const PARSE_EXPANSION: usize = 4;

/// What the allocator adds to each heap block (glibc: a 16-byte header, blocks rounded up to 16).
const BLOCK: usize = 16;
/// Bytes a JSON object's entry costs besides its key's text and its value's own heap: the
/// key's `String` and the `Value` in the map's node, and the node's share of its spare room.
const MAP_ENTRY: usize = 24 + 32 + 40;

/// Heap bytes of a text of `capacity` bytes (none when empty).
fn text_bytes(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else {
        (capacity + BLOCK).next_multiple_of(BLOCK)
    }
}

/// Heap bytes of `texts`.
fn texts_bytes<'a>(texts: impl IntoIterator<Item = &'a String>) -> usize {
    texts.into_iter().map(|s| text_bytes(s.capacity())).sum()
}

/// Heap bytes of `values`.
fn values_bytes<'a>(values: impl IntoIterator<Item = &'a Value>) -> usize {
    values.into_iter().map(value_bytes).sum()
}

/// Heap bytes a parsed JSON value holds, not counting the `Value` itself (an estimate: the
/// allocator's real layout varies).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => text_bytes(s.capacity()),
        Value::Array(items) => {
            text_bytes(items.capacity() * std::mem::size_of::<Value>())
                + items.iter().map(value_bytes).sum::<usize>()
        }
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| MAP_ENTRY + text_bytes(k.len()) + value_bytes(v))
            .sum(),
    }
}

impl Incoming {
    /// Heap bytes this parsed request holds until it is written, estimated from its texts and
    /// JSON values: what the receiver's byte budget counts for it once it is parsed. Against
    /// the RSS a detail batch's rows kept (BENCHMARKS.md, "night session") it read 3-4 % low.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Incoming::Core(c) => {
                texts_bytes([
                    &c.call_id,
                    &c.agent_id,
                    &c.call_started_at,
                    &c.call_ended_at,
                    &c.end_reason,
                ]) + values_bytes([
                    &c.transcript_json,
                    &c.summary_metrics,
                    &c.telemetry_summary,
                    &c.extra,
                ])
            }
            Incoming::Detail(d) => {
                texts_bytes(std::iter::once(&d.call_id).chain(&d.agent_id))
                    + values_bytes(&d.transcript_with_metrics)
                    + text_bytes(d.spans.capacity() * std::mem::size_of::<SpanRow>())
                    + d.spans.iter().map(SpanRow::heap_bytes).sum::<usize>()
            }
        }
    }
}

impl SpanRow {
    fn heap_bytes(&self) -> usize {
        let optional = [
            &self.parent_span_id,
            &self.operation,
            &self.kind,
            &self.start_time,
            &self.end_time,
            &self.status_code,
            &self.status_message,
        ];
        let raw = [&self.attributes, &self.events, &self.links];
        texts_bytes([&self.trace_id, &self.span_id, &self.name])
            + texts_bytes(optional.into_iter().flatten())
            + raw
                .into_iter()
                .flatten()
                .map(|r| text_bytes(r.0.get().len()))
                .sum::<usize>()
    }
}

/// Parses and validates a (decompressed) request body.
///
/// A detail batch's spans are turned into rows one by one as they are read, and each span's
/// attributes, events and links kept as text: the batch is never held as one
/// `serde_json::Value` tree, which took 7.7 times the JSON's size for spans of small
/// attributes (BENCHMARKS.md). When `update_type` comes before `telemetry_data` (as callscope
/// writes it) the spans are read straight from the body; in the other order `telemetry_data`
/// is first kept as text, then read the same way. The answer is the whole-body path's either
/// way, and a body that is not valid JSON gets that path's message.
pub(crate) fn parse(body: &[u8]) -> Result<Incoming, BadRequest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = de.deserialize_any(TopVisitor);
    let top = match read.and_then(|top| de.end().map(|()| top)) {
        Ok(top) => top,
        // Not valid JSON, or a span's kept text that the strict check refused: the whole-body
        // path's answer, so that the message is the same whichever way the body was read.
        Err(_) => return refused(body),
    };
    let Some(Top {
        mut map,
        telemetry_data,
    }) = top
    else {
        return Err(not_an_object());
    };
    let detail = map.get("update_type").and_then(Value::as_str) == Some(DETAILED_TELEMETRY);
    match telemetry_data {
        Some(Telemetry::Streamed(spans)) if detail => parse_top(map, Some(spans)),
        // A later `update_type` that took back "detail" (the last of duplicate keys counts):
        // the spans read as rows are not the body's `telemetry_data` any more. Rare, and the
        // answer stays the whole-body path's.
        Some(Telemetry::Streamed(rows)) => {
            drop(rows);
            parse_whole(body)
        }
        Some(Telemetry::Kept(text)) => match nested(text, detail) {
            Ok(Nested::Spans(spans)) => parse_top(map, Some(spans)),
            Ok(Nested::Value(value)) => {
                map.insert("telemetry_data".to_owned(), value);
                parse_top(map, None)
            }
            Err(_) => refused(body),
        },
        None => parse_top(map, None),
    }
}

/// The whole-body path's answer to a body a streamed read refused: its JSON error, found by
/// reading the body as strictly as a `Value` parse without building the tree (the same
/// deserializer meets the same error at the same place).
fn refused(body: &[u8]) -> Result<Incoming, BadRequest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match Strict(usize::MAX)
        .deserialize(&mut de)
        .and_then(|()| de.end())
    {
        Err(e) if !e.to_string().starts_with(TOKEN_SEEN) => Err(malformed(e)),
        // serde_json's raw-value key, which a `Value` parse reads its own way; or valid JSON
        // (not expected: the streamed read refuses only what is not).
        _ => parse_whole(body),
    }
}

/// The key by which serde_json (its `raw_value` feature, on through axum and sqlx) marks a map
/// that stands for JSON text: a `Value` parse reads a map whose first key it is unlike any
/// other. Bodies that hold it anywhere are read as a whole, for that parse's answer.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";
/// The error message that sends a body holding [`RAW_VALUE_TOKEN`] to the whole-body parse.
const TOKEN_SEEN: &str = "serde_json's raw-value key";

/// Refuses [`RAW_VALUE_TOKEN`] (as a key, or a string: either sends the body to the
/// whole-body parse, whose answer stands).
fn no_token<E: de::Error>(text: &str) -> Result<(), E> {
    if text == RAW_VALUE_TOKEN {
        return Err(E::custom(TOKEN_SEEN));
    }
    Ok(())
}

/// Reads a `telemetry_data` kept as text with `read`, wrapped in one array: nested as deep
/// as in the body's top-level object, so that `serde_json`'s nesting limit falls where it
/// does on the whole body.
fn in_place<T>(
    text: &RawValue,
    read: impl FnOnce(&mut serde_json::Deserializer<StrRead<'_>>) -> serde_json::Result<T>,
) -> serde_json::Result<T> {
    let wrapped = format!("[{}]", text.get());
    let mut de = serde_json::Deserializer::from_str(&wrapped);
    let value = read(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Checks a `telemetry_data` kept as text that a later duplicate replaced, as strictly as in
/// its place in the body.
fn check_kept(text: &RawValue) -> serde_json::Result<()> {
    in_place(text, |de| Strict(usize::MAX).deserialize(de))
}

/// `telemetry_data` kept as text, read as it would have been in its place in the body: its
/// spans when the body is detail, else a value (a core call log keeps it in `extra`).
fn nested(text: &RawValue, detail: bool) -> serde_json::Result<Nested> {
    in_place(text, |de| de.deserialize_seq(Only { detail }))
}

/// What [`nested`] read.
enum Nested {
    Spans(Streamed),
    Value(Value),
}

/// The one element of [`nested`]'s array.
struct Only {
    detail: bool,
}

impl<'de> Visitor<'de> for Only {
    type Value = Nested;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("telemetry_data")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nested, A::Error> {
        let read = if self.detail {
            seq.next_element_seed(TelemetrySeed)?.map(Nested::Spans)
        } else {
            seq.next_element::<Value>()?.map(Nested::Value)
        };
        read.ok_or_else(|| de::Error::invalid_length(0, &self))
    }
}

/// [`parse`] with the whole body read as one `Value` first.
fn parse_whole(body: &[u8]) -> Result<Incoming, BadRequest> {
    match serde_json::from_slice(body).map_err(malformed)? {
        Value::Object(map) => parse_top(map, None),
        _ => Err(not_an_object()),
    }
}

fn malformed(e: serde_json::Error) -> BadRequest {
    BadRequest {
        message: format!("malformed JSON ({e}); send one UTF-8 JSON object per request"),
        field: None,
    }
}

fn not_an_object() -> BadRequest {
    BadRequest {
        message: "the body must be a JSON object".to_owned(),
        field: None,
    }
}

/// Visitor methods that answer `$answer` to each JSON scalar kind listed, for the visitors
/// below that take (or refuse) every value of a kind alike.
macro_rules! scalars {
    ($answer:expr => $($kind:ident)*) => { $(scalars!(@ $kind, $answer);)* };
    (@ bool, $a:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
    (@ i64, $a:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
    (@ u64, $a:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
    (@ f64, $a:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
    (@ str, $a:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
    (@ unit, $a:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($a)
        }
    };
}

/// The spans of a detail batch read as they came: the rows, or the first span's error.
type Streamed = Result<Vec<SpanRow>, BadRequest>;

/// The top-level object; `None` for any other JSON value.
struct Top<'de> {
    /// Every field but `telemetry_data`.
    map: Map<String, Value>,
    telemetry_data: Option<Telemetry<'de>>,
}

/// `telemetry_data` as [`TopVisitor`] read it.
enum Telemetry<'de> {
    /// Its spans, read as they came (`update_type` had said detail).
    Streamed(Streamed),
    /// Its text, to be read once the whole object is known.
    Kept(&'de RawValue),
}

/// Reads the top-level object into a map, streaming `telemetry_data` once `update_type` said
/// the body is detail, and keeping it as text before that.
struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Option<Top<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        let mut telemetry_data = None;
        let mut detail = false;
        while let Some(key) = access.next_key::<String>()? {
            no_token(&key)?;
            // The last of duplicate keys counts, as in a `Map`; a kept text it replaces is
            // still checked, as a `Value` parse reads every copy.
            if key == "telemetry_data" {
                if let Some(Telemetry::Kept(old)) = telemetry_data.take() {
                    check_kept(old).map_err(de::Error::custom)?;
                }
                telemetry_data = Some(if detail {
                    Telemetry::Streamed(access.next_value_seed(TelemetrySeed)?)
                } else {
                    Telemetry::Kept(access.next_value()?)
                });
                continue;
            }
            let value: Value = access.next_value()?;
            if key == "update_type" {
                detail = value.as_str() == Some(DETAILED_TELEMETRY);
            }
            map.insert(key, value);
        }
        Ok(Some(Top {
            map,
            telemetry_data,
        }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(None)
    }

    scalars!(None => bool i64 u64 f64 str unit);
}

/// A seed for one field of a detail body that must hold one kind of JSON value, read as
/// `$own` says: null is an empty list of spans (as when the field is absent), any other kind
/// is answered `$message` for `$field`. What a refused value holds is still read as a `Value`
/// and dropped, so that it is checked as strictly as the whole-body path checks it
/// (`IgnoredAny` would let invalid UTF-8, lone surrogates, numbers out of range and nesting
/// past the recursion limit through).
macro_rules! streamed_field {
    (
        $(#[$doc:meta])*
        $name:ident, $field:literal, $message:literal, refusing $other:ident, $own:item
    ) => {
        $(#[$doc])*
        struct $name;

        impl $name {
            fn refused() -> Streamed {
                Err(BadRequest::field($field, $message))
            }
        }

        impl<'de> DeserializeSeed<'de> for $name {
            type Value = Streamed;

            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Streamed, D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for $name {
            type Value = Streamed;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($field)
            }

            $own

            scalars!(Ok(Vec::new()) => unit);
            scalars!(Self::refused() => bool i64 u64 f64 str);
            streamed_field!(@refuse $other);
        }
    };
    (@refuse seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Streamed, A::Error> {
            while seq.next_element::<Value>()?.is_some() {}
            Ok(Self::refused())
        }
    };
    (@refuse map) => {
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Streamed, A::Error> {
            while access.next_entry::<String, Value>()?.is_some() {}
            Ok(Self::refused())
        }
    };
}

streamed_field!(
    /// `telemetry_data` of a detail batch: its `session_traces` read span by span (other keys
    /// are read and dropped, as the whole-body path ignores them).
    TelemetrySeed,
    "telemetry_data",
    "telemetry_data must be an object with a session_traces array",
    refusing seq,
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Streamed, A::Error> {
        let mut spans = Ok(Vec::new());
        while let Some(key) = access.next_key::<String>()? {
            no_token(&key)?;
            if key == "session_traces" {
                spans = access.next_value_seed(SpansSeed)?;
            } else {
                access.next_value::<Value>()?;
            }
        }
        Ok(spans)
    }
);

streamed_field!(
    /// `telemetry_data.session_traces`: each span turned into a row as soon as it is read; past
    /// the first span in error the rest are read (one at a time) and dropped, so that a JSON
    /// error after it still wins, as it does on the whole-body path.
    SpansSeed,
    "telemetry_data.session_traces",
    "telemetry_data.session_traces must be an array of spans",
    refusing map,
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Streamed, A::Error> {
        let mut rows = Vec::new();
        let mut index = 0;
        while let Some(span) = seq.next_element_seed(SpanSeed)? {
            match span_row(index, span) {
                Ok(row) => rows.push(row),
                Err(bad) => {
                    while seq.next_element::<Value>()?.is_some() {}
                    return Ok(Err(bad));
                }
            }
            index += 1;
        }
        rows.shrink_to_fit();
        Ok(Ok(rows))
    }
);

/// A span's fields as read: the ones kept as text (see [`RAW_FIELDS`]) apart, as they came
/// (absent: none); `None` when the span is not a JSON object.
type SpanRead = Option<(Map<String, Value>, [Option<Box<RawValue>>; 3])>;

/// The span fields kept as JSON text, and the kind of value each must be.
const RAW_FIELDS: [(&str, Kind); 3] = [
    ("attributes", Kind::Object),
    ("events", Kind::Array),
    ("links", Kind::Array),
];

/// How deep a kept text may nest, counting itself: a span's `attributes` object is the fifth
/// level of a detail body, and `serde_json` refuses a 128th, as the whole-body path would.
const RAW_DEPTH: usize = 127 - 4;

/// One span of `session_traces` read as it comes: its [`RAW_FIELDS`] captured as text, each
/// checked as strictly as a `Value` parse checks it (the capture alone does not look inside
/// strings or numbers); the others read as values.
struct SpanSeed;

impl<'de> DeserializeSeed<'de> for SpanSeed {
    type Value = SpanRead;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<SpanRead, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SpanSeed {
    type Value = SpanRead;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a span")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<SpanRead, A::Error> {
        let mut map = Map::new();
        let mut raw = [None, None, None];
        while let Some(key) = access.next_key::<String>()? {
            no_token(&key)?;
            match RAW_FIELDS.iter().position(|(name, _)| *name == key) {
                Some(i) => {
                    let text: Box<RawValue> = access.next_value()?;
                    let mut de = serde_json::Deserializer::from_str(text.get());
                    Strict(RAW_DEPTH)
                        .deserialize(&mut de)
                        .map_err(de::Error::custom)?;
                    // The last of duplicate keys counts, as in a `Map`.
                    raw[i] = Some(text);
                }
                None => {
                    let value: Value = access.next_value()?;
                    map.insert(key, value);
                }
            }
        }
        Ok(Some((map, raw)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SpanRead, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(None)
    }
    scalars!(None => bool i64 u64 f64 str unit);
}

/// Reads a JSON value as strictly as a `Value` parse does (UTF-8, escapes, lone surrogates,
/// numbers in range) without building it, refusing nesting past the levels it holds.
struct Strict(usize);

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while access.next_key_seed(Strict(0))?.is_some() {
            access.next_value_seed(Strict(inner))?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(Strict(inner))?.is_some() {}
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        no_token(v)
    }
    scalars!(() => bool i64 u64 f64 unit);
}

impl Strict {
    /// The levels left inside this array or object, or an error when it is one too many.
    fn inner<E: de::Error>(&self) -> Result<usize, E> {
        self.0
            .checked_sub(1)
            .ok_or_else(|| E::custom("nested too deep"))
    }
}

/// Checks the version and the kind of a top-level object; `streamed`: its spans, if they were
/// read as they came.
fn parse_top(
    mut map: Map<String, Value>,
    streamed: Option<Streamed>,
) -> Result<Incoming, BadRequest> {
    let version = map.remove("schema_version");
    match version.as_ref().map(Value::as_i64) {
        Some(Some(SCHEMA_VERSION)) => {}
        None => {
            return Err(BadRequest::field(
                "schema_version",
                "missing field schema_version: this server speaks wire contract version 1",
            ));
        }
        Some(_) => {
            return Err(BadRequest::field(
                "schema_version",
                "unsupported schema_version: this server speaks wire contract version 1",
            ));
        }
    }
    match map.remove("update_type") {
        None | Some(Value::Null) => parse_core(map).map(Incoming::Core),
        Some(Value::String(t)) if t == DETAILED_TELEMETRY => {
            parse_detail(map, streamed).map(Incoming::Detail)
        }
        Some(_) => Err(BadRequest::field(
            "update_type",
            "unknown update_type: omit it for a core call log, or send \"detailed_telemetry\"",
        )),
    }
}

fn parse_core(mut map: Map<String, Value>) -> Result<CoreCall, BadRequest> {
    let m = &mut map;
    let call = CoreCall {
        call_id: id(m, "", "call_id")?,
        agent_id: id(m, "", "agent_id")?,
        call_started_at: string(m, "", "call_started_at")?,
        call_ended_at: string(m, "", "call_ended_at")?,
        duration_seconds: number(m, "", "duration_seconds")?,
        end_reason: string(m, "", "end_reason")?,
        transcript_json: typed(m, "", "transcript_json", Kind::Array)?,
        summary_metrics: typed(m, "", "summary_metrics", Kind::Object)?,
        telemetry_summary: typed(m, "", "telemetry_summary", Kind::Object)?,
        truncated: opt_bool(m, "", "truncated")?.unwrap_or(false),
        extra: Value::Null,
    };
    Ok(CoreCall {
        extra: Value::Object(map),
        ..call
    })
}

fn parse_detail(
    mut map: Map<String, Value>,
    streamed: Option<Streamed>,
) -> Result<DetailBatch, BadRequest> {
    let m = &mut map;
    let call_id = id(m, "", "call_id")?;
    let agent_id = opt_string(m, "", "agent_id")?;
    let batch_seq = non_negative(m, "", "batch_seq")?
        .ok_or_else(|| BadRequest::field("batch_seq", "missing field batch_seq (0, 1, 2, …)"))?;
    let is_final = opt_bool(m, "", "final")?.unwrap_or(false);
    let late = opt_bool(m, "", "late")?.unwrap_or(false);
    let total_batches = non_negative(m, "", "total_batches")?;
    if is_final && total_batches.is_none() {
        return Err(BadRequest::field(
            "total_batches",
            "the final batch must carry total_batches (its batch_seq + 1: every batch numbered below it belongs to the call)",
        ));
    }
    let transcript_with_metrics = match m.remove("transcript_with_metrics") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Array(_)) => Some(v),
        Some(_) => {
            return Err(BadRequest::field(
                "transcript_with_metrics",
                "transcript_with_metrics must be an array of turns",
            ));
        }
    };
    let spans = match streamed {
        Some(spans) => spans?,
        None => spans_of(m.remove("telemetry_data"))?,
    };
    Ok(DetailBatch {
        call_id,
        agent_id,
        batch_seq,
        is_final,
        late,
        total_batches,
        transcript_with_metrics,
        spans,
    })
}

/// The spans of a `telemetry_data` value parsed as a whole.
fn spans_of(telemetry_data: Option<Value>) -> Result<Vec<SpanRow>, BadRequest> {
    Ok(match telemetry_data {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(mut data)) => match data.remove("session_traces") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, span)| parse_span(i, span))
                .collect::<Result<_, _>>()?,
            Some(_) => return SpansSeed::refused(),
        },
        Some(_) => return TelemetrySeed::refused(),
    })
}

/// A span of a body read as a whole: its [`RAW_FIELDS`] written back as text.
fn parse_span(index: usize, span: Value) -> Result<SpanRow, BadRequest> {
    let read = match span {
        Value::Object(mut map) => {
            let raw = RAW_FIELDS.map(|(name, _)| map.remove(name).map(|v| RawJson::of(&v).0));
            Some((map, raw))
        }
        _ => None,
    };
    span_row(index, read)
}

/// Checks span `index` of `session_traces` and turns it into a row.
fn span_row(index: usize, span: SpanRead) -> Result<SpanRow, BadRequest> {
    let Some((mut map, [attributes, events, links])) = span else {
        return Err(BadRequest::field(
            format!("telemetry_data.session_traces[{index}]"),
            "each span must be a JSON object",
        ));
    };
    let prefix = format!("telemetry_data.session_traces[{index}].");
    let p = prefix.as_str();
    let m = &mut map;
    let (status_code, status_message) = match m.remove("status") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(mut s)) => (
            opt_string(&mut s, &format!("{p}status."), "code")?,
            opt_string(&mut s, &format!("{p}status."), "message")?,
        ),
        Some(_) => {
            return Err(BadRequest::field(
                format!("{p}status"),
                "status must be an object {\"code\": \"unset|ok|error\", \"message\": \"…\"}",
            ));
        }
    };
    let [a, e, l] = RAW_FIELDS;
    Ok(SpanRow {
        trace_id: id(m, p, "trace_id")?,
        span_id: id(m, p, "span_id")?,
        parent_span_id: opt_string(m, p, "parent_span_id")?,
        name: string(m, p, "name")?,
        operation: opt_string(m, p, "operation")?,
        kind: opt_string(m, p, "kind")?,
        start_time: opt_string(m, p, "start_time")?,
        end_time: opt_string(m, p, "end_time")?,
        duration_ms: opt_number(m, p, "duration_ms")?,
        status_code,
        status_message,
        attributes: raw_typed(attributes, p, a)?,
        events: raw_typed(events, p, e)?,
        links: raw_typed(links, p, l)?,
    })
}

/// A kept text of kind `kind` (null: none).
fn raw_typed(
    raw: Option<Box<RawValue>>,
    prefix: &str,
    (name, kind): (&str, Kind),
) -> Result<Option<RawJson>, BadRequest> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    // A captured value's text starts at its first character.
    match (raw.get().as_bytes().first(), kind) {
        (Some(b'n'), _) => Ok(None),
        (Some(b'{'), Kind::Object) | (Some(b'['), Kind::Array) => Ok(Some(RawJson::kept(raw))),
        _ => Err(wrong(prefix, name, kind.what())),
    }
}

/// Whether every number in the JSON `text` is stored as written. serde_json reads
/// `1e-20000` (as 0) and numbers of thousands of digits, which PostgreSQL's `numeric` (inside
/// `jsonb`) refuses past its scale: such texts are stored as serde_json writes their values,
/// as they were before texts were kept.
fn numbers_fit(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // To the closing quote, over escaped characters.
                i += 1;
                while let Some(at) = b.get(i..).and_then(|r| memchr::memchr2(b'"', b'\\', r)) {
                    i += at;
                    if b[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let number = &text[start..i];
                let exponent = number
                    .find(['e', 'E'])
                    .map(|e| number[e + 1..].trim_start_matches(['+', '-']));
                if number.len() > 40
                    || exponent.is_some_and(|e| e.parse::<u16>().map_or(true, |x| x > 999))
                {
                    return false;
                }
            }
            _ => i += 1,
        }
    }
    true
}

#[derive(Clone, Copy)]
enum Kind {
    Array,
    Object,
}

impl Kind {
    /// How an error message names the kind.
    fn what(self) -> &'static str {
        match self {
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

fn missing(prefix: &str, name: &str, what: &str) -> BadRequest {
    BadRequest::field(
        format!("{prefix}{name}"),
        format!("missing field {prefix}{name} ({what}, wire contract v1)"),
    )
}

fn wrong(prefix: &str, name: &str, what: &str) -> BadRequest {
    BadRequest::field(
        format!("{prefix}{name}"),
        format!("field {prefix}{name} must be {what}"),
    )
}

fn opt_string(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<String>, BadRequest> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong(prefix, name, "a string")),
    }
}

fn string(m: &mut Map<String, Value>, prefix: &str, name: &str) -> Result<String, BadRequest> {
    opt_string(m, prefix, name)?.ok_or_else(|| missing(prefix, name, "a string"))
}

/// A required non-empty identifier of bounded length.
fn id(m: &mut Map<String, Value>, prefix: &str, name: &str) -> Result<String, BadRequest> {
    let s = string(m, prefix, name)?;
    if s.is_empty() || s.len() > MAX_ID_BYTES {
        return Err(wrong(
            prefix,
            name,
            "a non-empty string of at most 512 bytes",
        ));
    }
    Ok(s)
}

fn opt_number(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<f64>, BadRequest> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| wrong(prefix, name, "a finite number")),
        Some(_) => Err(wrong(prefix, name, "a number")),
    }
}

fn number(m: &mut Map<String, Value>, prefix: &str, name: &str) -> Result<f64, BadRequest> {
    opt_number(m, prefix, name)?.ok_or_else(|| missing(prefix, name, "a number"))
}

fn non_negative(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<i64>, BadRequest> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n)),
            _ => Err(wrong(prefix, name, "a non-negative integer")),
        },
    }
}

fn opt_bool(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
) -> Result<Option<bool>, BadRequest> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(wrong(prefix, name, "true or false")),
    }
}

fn opt_typed(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
    kind: Kind,
) -> Result<Option<Value>, BadRequest> {
    match (m.remove(name), kind) {
        (None | Some(Value::Null), _) => Ok(None),
        (Some(v @ Value::Array(_)), Kind::Array) | (Some(v @ Value::Object(_)), Kind::Object) => {
            Ok(Some(v))
        }
        (Some(_), _) => Err(wrong(prefix, name, kind.what())),
    }
}

fn typed(
    m: &mut Map<String, Value>,
    prefix: &str,
    name: &str,
    kind: Kind,
) -> Result<Value, BadRequest> {
    opt_typed(m, prefix, name, kind)?.ok_or_else(|| missing(prefix, name, kind.what()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A valid core body of call `call_id` (for the crate's other unit tests too).
    pub(crate) fn core_body(call_id: &str) -> Value {
        let mut v = core();
        v["call_id"] = json!(call_id);
        v
    }

    /// A valid detail body of call `call_id`: its final batch, one span.
    pub(crate) fn detail_body(call_id: &str) -> Value {
        let mut v = detail();
        v["call_id"] = json!(call_id);
        v
    }

    fn core() -> Value {
        json!({
            "schema_version": 1, "call_id": "c1", "agent_id": "a1",
            "call_started_at": "2026-11-24T10:00:00Z", "call_ended_at": "2026-11-24T10:05:00Z",
            "duration_seconds": 300.0, "end_reason": "root_span_ended",
            "transcript_json": [{"role": "user", "content": "hi"}],
            "summary_metrics": {"avg_latency": 800.0}, "telemetry_summary": {"total_spans": 3},
            "truncated": false, "trace_ids": ["ab"]
        })
    }

    fn parse_value(v: &Value) -> Result<Incoming, BadRequest> {
        parse(&serde_json::to_vec(v).expect("serialize"))
    }

    fn field_of(v: &Value) -> Option<String> {
        parse_value(v).expect_err("must be rejected").field
    }

    #[test]
    fn core_parses_and_keeps_extra_fields() {
        let Incoming::Core(c) = parse_value(&core()).expect("valid") else {
            panic!("expected core");
        };
        assert_eq!(c.call_id, "c1");
        assert_eq!(c.duration_seconds, 300.0);
        assert_eq!(c.extra, json!({"trace_ids": ["ab"]}));
    }

    #[test]
    fn every_required_core_field_is_named_when_missing() {
        for name in [
            "schema_version",
            "call_id",
            "agent_id",
            "call_started_at",
            "call_ended_at",
            "duration_seconds",
            "end_reason",
            "transcript_json",
            "summary_metrics",
            "telemetry_summary",
        ] {
            let mut v = core();
            v.as_object_mut().expect("object").remove(name);
            assert_eq!(field_of(&v).as_deref(), Some(name), "missing {name}");
        }
    }

    #[test]
    fn wrong_types_are_named() {
        for (name, bad) in [
            ("call_id", json!(5)),
            ("call_id", json!("")),
            ("duration_seconds", json!("long")),
            ("transcript_json", json!({})),
            ("summary_metrics", json!([])),
            ("truncated", json!("no")),
            ("schema_version", json!(2)),
            ("update_type", json!("other")),
        ] {
            let mut v = core();
            v[name] = bad;
            assert_eq!(field_of(&v).as_deref(), Some(name), "bad {name}");
        }
    }

    #[test]
    fn malformed_json_has_no_field() {
        let err = parse(b"{\"call_id\": ").expect_err("malformed");
        assert_eq!(err.field, None);
        assert!(err.message.contains("malformed JSON"));
        assert_eq!(parse(b"[1]").expect_err("not an object").field, None);
    }

    fn detail() -> Value {
        json!({
            "schema_version": 1, "call_id": "c1", "agent_id": "a1",
            "update_type": "detailed_telemetry", "batch_seq": 2, "final": true,
            "total_batches": 3,
            "telemetry_data": {"session_traces": [{
                "trace_id": "t", "span_id": "s", "parent_span_id": null, "name": "llm_request",
                "operation": "llm", "kind": "internal", "start_time": "x", "end_time": "y",
                "duration_ms": 12.5, "status": {"code": "ok", "message": ""},
                "attributes": {"k": 1}, "events": [], "links": []
            }]},
            "transcript_with_metrics": [{"turn": 1}]
        })
    }

    #[test]
    fn detail_parses() {
        let Incoming::Detail(d) = parse_value(&detail()).expect("valid") else {
            panic!("expected detail");
        };
        assert_eq!(d.batch_seq, 2);
        assert!(d.is_final);
        assert_eq!(d.total_batches, Some(3));
        assert_eq!(d.spans.len(), 1);
        assert_eq!(d.spans[0].status_code.as_deref(), Some("ok"));
        assert_eq!(d.spans[0].duration_ms, Some(12.5));
        let text = d.spans[0].attributes.as_ref().map(|r| r.get().get());
        assert_eq!(text, Some(r#"{"k":1}"#));
    }

    #[test]
    fn detail_errors_name_the_field() {
        let mut v = detail();
        v.as_object_mut().expect("object").remove("total_batches");
        assert_eq!(field_of(&v).as_deref(), Some("total_batches"));

        let mut v = detail();
        v["batch_seq"] = json!(-1);
        assert_eq!(field_of(&v).as_deref(), Some("batch_seq"));

        let mut v = detail();
        v["telemetry_data"]["session_traces"][0]
            .as_object_mut()
            .expect("object")
            .remove("span_id");
        assert_eq!(
            field_of(&v).as_deref(),
            Some("telemetry_data.session_traces[0].span_id")
        );

        let mut v = detail();
        v["telemetry_data"]["session_traces"][0]["status"]["code"] = json!(1);
        assert_eq!(
            field_of(&v).as_deref(),
            Some("telemetry_data.session_traces[0].status.code")
        );
    }

    #[test]
    fn a_batch_without_spans_is_fine() {
        let v = json!({"schema_version": 1, "call_id": "c", "update_type": "detailed_telemetry",
                       "batch_seq": 0});
        let Incoming::Detail(d) = parse_value(&v).expect("valid") else {
            panic!("expected detail");
        };
        assert!(d.spans.is_empty());
        assert!(!d.is_final);
    }

    /// `v`'s top-level keys written with `update_type` first (as callscope writes them, so
    /// the spans are read as they come) or last (so the body is parsed as a whole first).
    fn ordered(v: &Value, update_type_first: bool) -> Vec<u8> {
        let map = v.as_object().expect("an object");
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_by_key(|k| (k.as_str() == "update_type") != update_type_first);
        let fields: Vec<String> = keys
            .iter()
            .map(|k| format!("{}:{}", Value::from(k.as_str()), map[k.as_str()]))
            .collect();
        format!("{{{}}}", fields.join(",")).into_bytes()
    }

    /// `v` written as [`ordered`] writes it, with the string `"PLACEHOLDER"` in it replaced by
    /// the JSON text `json` (text a `Value` cannot hold, or should not be written from).
    fn placed(v: &Value, update_type_first: bool, json: &str) -> String {
        String::from_utf8(ordered(v, update_type_first))
            .expect("UTF-8")
            .replace("\"PLACEHOLDER\"", json)
    }

    /// A core body's fields but `update_type`, written as inside its braces.
    fn core_head() -> String {
        let mut fields = core();
        fields
            .as_object_mut()
            .expect("object")
            .remove("update_type");
        let head = String::from_utf8(ordered(&fields, true)).expect("UTF-8");
        head[1..head.len() - 1].to_owned()
    }

    /// How `body`'s `telemetry_data` is read first: spans as they come (`Some(true)`), or kept
    /// as text (`Some(false)`); `None` without one.
    fn read_as(body: &[u8]) -> Option<bool> {
        let mut de = serde_json::Deserializer::from_slice(body);
        match de
            .deserialize_any(TopVisitor)
            .expect("JSON")?
            .telemetry_data?
        {
            Telemetry::Streamed(_) => Some(true),
            Telemetry::Kept(_) => Some(false),
        }
    }

    /// Whether `body`'s spans are read as they come.
    fn streams(body: &[u8]) -> bool {
        read_as(body) == Some(true)
    }

    /// Parses `v` in both orders (checking that the first reads the spans as they come and
    /// the second keeps `telemetry_data` as text first) and checks that both answers are the
    /// whole-body path's.
    fn both_orders(v: &Value) -> Result<Incoming, BadRequest> {
        let (first, last) = (ordered(v, true), ordered(v, false));
        if v.get("telemetry_data").is_some() {
            let detail = v.get("update_type") == Some(&json!(DETAILED_TELEMETRY));
            assert_eq!(read_as(&first), Some(detail), "{v}");
            assert_eq!(read_as(&last), Some(false), "{v}");
        }
        let streamed = parse(&first);
        assert_eq!(streamed, parse(&last), "{v}");
        assert_eq!(streamed, parse_whole(&first), "{v}");
        streamed
    }

    #[test]
    fn spans_read_as_they_come_parse_as_the_whole_body_does() {
        let mut batch = detail();
        let span = batch["telemetry_data"]["session_traces"][0].clone();
        batch["telemetry_data"]["session_traces"] = json!([span, span, span]);
        batch["telemetry_data"]["other"] = json!({"ignored": [1, 2]});
        let Incoming::Detail(d) = both_orders(&batch).expect("valid") else {
            panic!("expected detail");
        };
        assert_eq!(d.spans.len(), 3);

        // Each way of getting the spans wrong is answered the same.
        let mut bad_span = batch.clone();
        bad_span["telemetry_data"]["session_traces"][1]
            .as_object_mut()
            .expect("object")
            .remove("span_id");
        let mut not_a_span = batch.clone();
        not_a_span["telemetry_data"]["session_traces"][2] = json!("x");
        let mut wrong_kinds = Vec::new();
        for traces in [
            json!("x"),
            json!(3),
            json!({"a": 1}),
            json!(true),
            Value::Null,
        ] {
            let mut v = batch.clone();
            v["telemetry_data"]["session_traces"] = traces;
            wrong_kinds.push(v);
        }
        for data in [json!("x"), json!([1]), json!(2.5), Value::Null, json!({})] {
            let mut v = batch.clone();
            v["telemetry_data"] = data;
            wrong_kinds.push(v);
        }
        // A span in error, and a field checked before the spans also wrong: that field is named.
        let mut two_errors = bad_span.clone();
        two_errors["batch_seq"] = json!(-1);
        let fields: Vec<Option<String>> = [&bad_span, &not_a_span, &two_errors]
            .into_iter()
            .map(|v| both_orders(v).expect_err("refused").field)
            .collect();
        assert_eq!(
            fields,
            [
                Some("telemetry_data.session_traces[1].span_id".to_owned()),
                Some("telemetry_data.session_traces[2]".to_owned()),
                Some("batch_seq".to_owned()),
            ]
        );
        let answers: Vec<Option<String>> = wrong_kinds
            .iter()
            .map(|v| both_orders(v).err().and_then(|e| e.field))
            .collect();
        let traces = Some("telemetry_data.session_traces".to_owned());
        let data = Some("telemetry_data".to_owned());
        // Null and an object without session_traces are no spans.
        assert_eq!(
            answers,
            [
                traces.clone(),
                traces.clone(),
                traces.clone(),
                traces,
                None,
                data.clone(),
                data.clone(),
                data,
                None,
                None
            ]
        );
        assert_eq!(
            both_orders(&batch_with_missing_span_id())
                .expect_err("bad span")
                .field
                .as_deref(),
            Some("telemetry_data.session_traces[0].span_id")
        );
    }

    fn batch_with_missing_span_id() -> Value {
        let mut v = detail();
        v["telemetry_data"]["session_traces"][0]
            .as_object_mut()
            .expect("object")
            .remove("span_id");
        v
    }

    #[test]
    fn json_errors_after_a_span_in_error_still_say_malformed_json() {
        let mut v = batch_with_missing_span_id();
        let span = detail()["telemetry_data"]["session_traces"][0].clone();
        v["telemetry_data"]["session_traces"] =
            json!([v["telemetry_data"]["session_traces"][0].clone(), span]);
        v["telemetry_data"]["other"] = json!("OTHER");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        // In the span after the one in error (its name), or beside session_traces: each is
        // malformed JSON whichever way the body is read.
        let name = "\"llm_request\"";
        let other = "\"OTHER\"";
        let surrogate = "\"\\ud800\"";
        for (mark, bad) in [
            (name, surrogate),
            (name, "1e400"),
            (name, deep.as_str()),
            (other, deep.as_str()),
            (other, surrogate),
        ] {
            for first in [true, false] {
                let text = String::from_utf8(ordered(&v, first)).expect("UTF-8");
                let at = text.rfind(mark).expect("mark");
                let body = format!("{}{bad}{}", &text[..at], &text[at + mark.len()..]);
                let err = parse(body.as_bytes()).expect_err("malformed");
                assert_eq!(err.field, None, "{bad} first={first}: {err:?}");
                assert!(err.message.starts_with("malformed JSON"), "{bad}: {err:?}");
            }
        }
    }

    /// A span's attributes, events and links are kept as text: what the capture does not look
    /// at (escapes, numbers, nesting) is still refused as the whole-body path refuses it.
    #[test]
    fn kept_texts_are_checked_as_strictly_as_values() {
        let nested = |levels: usize| {
            let mut v = detail();
            let inner = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            v["telemetry_data"]["session_traces"][0]["attributes"] = json!({"k": "PLACEHOLDER"});
            placed(&v, true, &inner)
        };
        // The attributes object is the fifth level; serde_json refuses a 128th.
        let deepest = nested(127 - 5);
        let too_deep = nested(128 - 5);
        let read = |text: &str| {
            let mut de = serde_json::Deserializer::from_slice(text.as_bytes());
            de.deserialize_any(TopVisitor).map(|top| top.is_some())
        };
        assert!(read(&deepest).is_ok(), "the streamed read takes 127 levels");
        assert!(read(&too_deep).is_err(), "and refuses 128");
        assert!(parse(deepest.as_bytes()).is_ok());
        assert_eq!(parse(too_deep.as_bytes()), parse_whole(too_deep.as_bytes()));

        // `telemetry_data` kept as text (before `update_type`) is read as deep as in its place:
        // at the second level, so 126 arrays in it reach the 127th.
        for levels in [126, 127] {
            let mut v = core();
            v["telemetry_data"] = json!("PLACEHOLDER");
            let arrays = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            let body = placed(&v, false, &arrays);
            assert_eq!(read_as(body.as_bytes()), Some(false));
            assert_eq!(parse(body.as_bytes()).is_ok(), levels == 126, "{levels}");
            assert_eq!(parse(body.as_bytes()), parse_whole(body.as_bytes()));
        }

        let mut v = detail();
        v["telemetry_data"]["session_traces"][0]["events"] = json!([{"name": "PLACEHOLDER"}]);
        for bad in ["\"\\ud800\"", "1e400", "\"\\x\""] {
            for first in [true, false] {
                let body = placed(&v, first, bad);
                let err = parse(body.as_bytes()).expect_err("malformed");
                assert_eq!(err.field, None, "{bad}: {err:?}");
                assert!(err.message.starts_with("malformed JSON"), "{bad}: {err:?}");
                assert_eq!(Err(err), parse_whole(body.as_bytes()), "{bad}");
            }
        }
        // Kinds are checked on the text: each wrong one is named, in both orders.
        for (field, value) in [
            ("attributes", json!([1])),
            ("events", json!({})),
            ("links", json!("x")),
        ] {
            let mut v = detail();
            v["telemetry_data"]["session_traces"][0][field] = value;
            assert_eq!(
                both_orders(&v).expect_err("wrong kind").field,
                Some(format!("telemetry_data.session_traces[0].{field}"))
            );
        }
    }

    /// Bodies a streamed read could answer unlike a `Value` parse, found in review: each is
    /// answered as the whole-body parse answers it.
    #[test]
    fn odd_bodies_get_the_whole_body_answer() {
        let head = core_head();
        let detail_text = String::from_utf8(ordered(&detail(), true)).expect("UTF-8");
        let detail_head = &detail_text[1..detail_text.len() - 1];
        let token = RAW_VALUE_TOKEN;
        let bodies = [
            // A kept telemetry_data replaced by a later copy is still read strictly.
            format!(r#"{{"telemetry_data":"\ud800",{head},"telemetry_data":null}}"#),
            format!(r#"{{"telemetry_data":[1e400],{detail_head}}}"#),
            format!(
                r#"{{"telemetry_data":{}{},{head},"telemetry_data":1}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
            // serde_json's raw-value key, which a `Value` parse reads its own way.
            detail_text.replace(
                r#""attributes":{"#,
                &format!(r#""attributes":{{"{token}":"x","#),
            ),
            detail_text.replace(
                r#""attributes":{"#,
                &format!(r#""attributes":{{"{token}":"[1]","#),
            ),
            format!(r#"{{"{token}":"{{}}"}}"#),
            format!(r#"{{"a":{{"{token}":"x"}},"b":1e400}}"#),
        ];
        for body in &bodies {
            let whole = parse_whole(body.as_bytes());
            assert!(whole.is_err(), "{body}: {whole:?}");
            assert_eq!(parse(body.as_bytes()), whole, "{body}");
        }
    }

    /// A number PostgreSQL's `numeric` cannot hold as written (serde_json reads it as 0) is
    /// stored as serde_json writes it; other texts as they came.
    #[test]
    fn numbers_postgres_cannot_store_are_written_out() {
        let long = format!("0.{}1", "0".repeat(400));
        let mut v = detail();
        v["telemetry_data"]["session_traces"][0]["attributes"] = json!({"k": "PLACEHOLDER"});
        for (number, kept) in [
            ("1e-20000", false),
            (long.as_str(), false),
            ("1e-1000", false),
            ("1E+301", true),
            ("12.5e-3", true),
            ("-0", true),
        ] {
            let body = placed(&v, true, number);
            let Ok(Incoming::Detail(d)) = parse(body.as_bytes()) else {
                panic!("{number}: expected detail");
            };
            let stored = d.spans[0]
                .attributes
                .as_ref()
                .expect("attributes")
                .get()
                .get();
            assert_eq!(stored.contains(number), kept, "{number}: {stored}");
            assert!(numbers_fit(stored), "{number}: {stored}");
            let value: Value = serde_json::from_str(stored).expect("JSON");
            let sent: Value = serde_json::from_str(&format!(r#"{{"k":{number}}}"#)).expect("JSON");
            assert_eq!(value, sent, "{number}");
        }
        assert!(numbers_fit(r#"{"a":"x\"1e-99999","b":[1,2]}"#));
        assert!(!numbers_fit(r#"{"a":"x\\","b":1e-99999}"#));
    }

    #[test]
    fn an_update_type_that_takes_back_detail_is_read_as_a_whole() {
        // Detail first, then null (the last of duplicate keys counts): a core call log, its
        // telemetry_data kept in `extra`, as the whole-body path reads it.
        let head = core_head();
        let body = format!(
            r#"{{"update_type":"detailed_telemetry","telemetry_data":{{"session_traces":[{{}}]}},{head},"update_type":null}}"#
        );
        assert!(streams(body.as_bytes()));
        let answer = parse(body.as_bytes());
        assert_eq!(answer, parse_whole(body.as_bytes()));
        let Ok(Incoming::Core(c)) = answer else {
            panic!("expected a core: {answer:?}");
        };
        assert_eq!(c.extra["telemetry_data"], json!({"session_traces": [{}]}));
    }

    /// A detail batch of `spans` spans with eight small attributes and, when `text > 0`, one
    /// of `text` bytes.
    fn batch_of(spans: usize, text: usize) -> Vec<u8> {
        let traces: Vec<Value> = (0..spans)
            .map(|i| {
                let mut attrs = json!({
                    "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 300,
                    "gen_ai.usage.output_tokens": 40, "lk.response.ttft": 0.12,
                    "lk.speech_id": "speech_5f2c1a9e", "lk.room_name": "room-support-0042",
                    "lk.participant_identity": "sip_+15550100", "lk.agent_name": "support-bot"
                });
                if text > 0 {
                    attrs["lk.debug.payload"] = json!("word ".repeat(text / 5));
                }
                json!({
                    "trace_id": format!("{i:032x}"), "span_id": format!("{i:016x}"),
                    "parent_span_id": null, "name": "llm_request", "operation": "llm",
                    "kind": "internal", "start_time": "2026-12-07T20:00:00.123456789Z",
                    "end_time": "2026-12-07T20:00:00.323456789Z", "duration_ms": 200.0,
                    "status": {"code": "unset", "message": ""}, "attributes": attrs,
                    "events": [], "links": []
                })
            })
            .collect();
        let mut v = detail();
        v["final"] = json!(false);
        v["telemetry_data"]["session_traces"] = Value::Array(traces);
        ordered(&v, true)
    }

    #[test]
    fn parsed_rows_are_estimated_above_their_texts_and_within_the_parse_reservation() {
        for (text, low, high) in [(0, 1.2, 2.0), (10_000, 1.0, 1.3)] {
            let body = batch_of(500, text);
            let Incoming::Detail(d) = parse(&body).expect("valid") else {
                panic!("expected detail");
            };
            let estimate = Incoming::Detail(d.clone()).heap_bytes();
            let texts: usize = d
                .spans
                .iter()
                .map(|s| s.trace_id.len() + s.span_id.len() + s.name.len())
                .sum();
            assert!(estimate > texts, "{estimate} <= {texts}");
            let ratio = estimate as f64 / body.len() as f64;
            assert!(
                (low..high).contains(&ratio),
                "text {text}: rows {estimate} for {} bytes of JSON ({ratio:.2}x)",
                body.len()
            );
            assert!(estimate <= body.len() * PARSE_EXPANSION, "{ratio:.2}x");
        }
    }
}
