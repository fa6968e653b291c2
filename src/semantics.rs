//! What a span is: its operation type, and the call id, transcript text, tokens and
//! time-to-first-token it carries. One pass over the attributes, no allocation.
//!
//! Sources mapped (old and new names both): LiveKit Agents, Pipecat and the OpenTelemetry
//! GenAI semantic conventions; see DESIGN.md "Knowing what a span is".

use opentelemetry::{KeyValue, Value};

/// The operation types callscope aggregates by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Operation {
    Llm,
    Tts,
    Stt,
    Tool,
    Eou,
    Turn,
    Session,
    Other,
}

impl Operation {
    /// Every operation, in index order.
    pub(crate) const ALL: [Operation; 8] = [
        Operation::Llm,
        Operation::Tts,
        Operation::Stt,
        Operation::Tool,
        Operation::Eou,
        Operation::Turn,
        Operation::Session,
        Operation::Other,
    ];

    /// The name used on the wire (`operation`, `operation_counts` keys).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Llm => "llm",
            Operation::Tts => "tts",
            Operation::Stt => "stt",
            Operation::Tool => "tool",
            Operation::Eou => "eou",
            Operation::Turn => "turn",
            Operation::Session => "session",
            Operation::Other => "other",
        }
    }

    /// The operation at [`index`](Self::index) `i`.
    pub(crate) fn from_u8(i: u8) -> Option<Operation> {
        Self::ALL.get(usize::from(i)).copied()
    }

    /// Dense index for per-operation arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Operation from the span name alone; `None` when the name says nothing.
fn operation_by_name(name: &str) -> Option<Operation> {
    Some(match name {
        // LiveKit Agents
        "agent_session" => Operation::Session,
        "agent_turn" | "user_turn" => Operation::Turn,
        "llm_node" | "llm_request" => Operation::Llm,
        "tts_node" | "tts_request" => Operation::Tts,
        "stt" | "stt_request" | "user_speaking" => Operation::Stt,
        "eou_detection" => Operation::Eou,
        "function_tool" => Operation::Tool,
        // Pipecat
        "conversation" => Operation::Session,
        "turn" => Operation::Turn,
        "llm" => Operation::Llm,
        "tts" => Operation::Tts,
        // generic
        "call" | "session" => Operation::Session,
        "tool" | "tool_call" => Operation::Tool,
        _ => return None,
    })
}

/// Operation from `gen_ai.operation.name`.
fn operation_by_genai(op: &str) -> Operation {
    match op {
        "chat" | "text_completion" | "generate_content" | "embeddings" => Operation::Llm,
        "execute_tool" => Operation::Tool,
        _ => Operation::Other,
    }
}

/// Whether a span of this name is a user turn (its end is "end of user speech").
pub(crate) fn is_user_turn(name: &str) -> bool {
    name == "user_turn"
}

/// Everything callscope reads from one span's attributes, borrowed from the span.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct SpanFacts<'a> {
    /// The call id found under one of the configured keys (first configured key wins).
    pub call_id: Option<CallIdValue<'a>>,
    /// What the user said (LiveKit `lk.user_transcript`, Pipecat `transcript` on stt spans).
    pub user_text: Option<&'a str>,
    /// What the agent said (LiveKit `lk.response.text`, Pipecat `output` on llm spans).
    pub assistant_text: Option<&'a str>,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Total tokens when only a total is given.
    pub total_tokens: u64,
    /// Time to first token / byte in milliseconds.
    pub ttft_ms: Option<f64>,
    /// Pipecat `turn.number`.
    pub turn_number: Option<u64>,
}

/// A call id as found in an attribute: borrowed text, or an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum CallIdValue<'a> {
    Str(&'a str),
    Int(i64),
}

impl<'a> SpanFacts<'a> {
    /// Total tokens of the span: input + output, or the explicit total when that is all there is.
    pub(crate) fn tokens(&self) -> u64 {
        let sum = self.input_tokens.saturating_add(self.output_tokens);
        if sum > 0 { sum } else { self.total_tokens }
    }
}

fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::I64(i) => u64::try_from(*i).ok(),
        Value::F64(f) if f.is_finite() && *f >= 0.0 => Some(*f as u64),
        Value::String(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F64(f) if f.is_finite() => Some(*f),
        Value::I64(i) => Some(*i as f64),
        Value::String(s) => s
            .as_str()
            .trim()
            .parse()
            .ok()
            .filter(|f: &f64| f.is_finite()),
        _ => None,
    }
}

/// Non-empty text or nothing.
fn text(v: &Value) -> Option<&str> {
    as_str(v).filter(|s| !s.trim().is_empty())
}

/// The configured call-id keys (`CALLSCOPE_CALL_ID_KEYS`) with a mask of their lengths, so
/// that almost every attribute key is ruled out by one bit test instead of string compares.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallIdKeys {
    keys: Vec<String>,
    lens: u64,
}

fn len_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl CallIdKeys {
    pub(crate) fn new(keys: &[String]) -> Self {
        CallIdKeys {
            lens: keys.iter().fold(0, |m, k| m | len_bit(k.len())),
            keys: keys.to_vec(),
        }
    }

    /// The keys, first wins.
    pub(crate) fn as_slice(&self) -> &[String] {
        &self.keys
    }

    /// Position of `key` among the call-id keys.
    #[inline]
    fn rank(&self, key: &str) -> Option<usize> {
        if self.lens & len_bit(key.len()) == 0 {
            return None;
        }
        self.keys.iter().position(|k| k == key)
    }
}

/// Keeps the call id of the best-ranked key seen so far (`best`) up to date with one attribute.
#[inline]
fn offer_call_id<'a>(
    best: &mut Option<(usize, CallIdValue<'a>)>,
    keys: &CallIdKeys,
    kv: &'a KeyValue,
) {
    let Some(rank) = keys.rank(kv.key.as_str()) else {
        return;
    };
    if best.as_ref().is_some_and(|(r, _)| *r <= rank) {
        return;
    }
    let id = match &kv.value {
        Value::String(s) if !s.as_str().is_empty() => CallIdValue::Str(s.as_str()),
        Value::I64(i) => CallIdValue::Int(*i),
        _ => return,
    };
    *best = Some((rank, id));
}

/// Finds a call id under `keys` (first key in `keys` order wins) in attributes.
pub(crate) fn find_call_id<'a>(
    attrs: &'a [KeyValue],
    keys: &CallIdKeys,
) -> Option<CallIdValue<'a>> {
    let mut best = None;
    for kv in attrs {
        offer_call_id(&mut best, keys, kv);
    }
    best.map(|(_, id)| id)
}

/// What an attribute key tells about a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    UserText,
    AssistantText,
    /// Pipecat's generic `transcript` (user text on an stt span).
    Transcript,
    /// Pipecat's generic `output` (assistant text on an llm span).
    Output,
    InputTokens,
    OutputTokens,
    TotalTokens,
    Ttft,
    TurnNumber,
    GenAiOperation,
    ToolName,
}

/// The attribute keys callscope reads (LiveKit Agents, Pipecat, OpenTelemetry GenAI).
const SEMANTIC_KEYS: [(&str, Field); 22] = [
    ("lk.user_transcript", Field::UserText),
    ("lk.pii.user_transcript", Field::UserText),
    ("lk.response.text", Field::AssistantText),
    ("lk.pii.response.text", Field::AssistantText),
    ("transcript", Field::Transcript),
    ("output", Field::Output),
    ("gen_ai.usage.input_tokens", Field::InputTokens),
    ("gen_ai.usage.prompt_tokens", Field::InputTokens),
    ("llm.usage.prompt_tokens", Field::InputTokens),
    ("gen_ai.usage.output_tokens", Field::OutputTokens),
    ("gen_ai.usage.completion_tokens", Field::OutputTokens),
    ("llm.usage.completion_tokens", Field::OutputTokens),
    ("llm.usage.total_tokens", Field::TotalTokens),
    ("gen_ai.usage.total_tokens", Field::TotalTokens),
    ("lk.response.ttft", Field::Ttft),
    ("lk.response.ttfb", Field::Ttft),
    ("metrics.ttfb", Field::Ttft),
    ("metrics.ttft", Field::Ttft),
    ("turn.number", Field::TurnNumber),
    ("gen_ai.operation.name", Field::GenAiOperation),
    ("lk.function_tool.name", Field::ToolName),
    ("gen_ai.tool.name", Field::ToolName),
];

/// Where a key of `len` bytes ending in `last` falls in [`KEY_FILTER`].
const fn key_slot(len: usize, last: u8) -> usize {
    (len.wrapping_mul(31) ^ last as usize) & 255
}

/// One bit per [`key_slot`] of a [`SEMANTIC_KEYS`] key: most other keys (an agent sets many)
/// are ruled out by one test instead of string compares against every key of their length.
const KEY_FILTER: [u64; 4] = {
    let mut f = [0u64; 4];
    let mut i = 0;
    while i < SEMANTIC_KEYS.len() {
        let k = SEMANTIC_KEYS[i].0.as_bytes();
        let s = key_slot(k.len(), k[k.len() - 1]);
        f[s / 64] |= 1 << (s % 64);
        i += 1;
    }
    f
};

/// What `key` tells, if it is one of [`SEMANTIC_KEYS`].
#[inline]
fn field_of(key: &str) -> Option<Field> {
    let &last = key.as_bytes().last()?;
    let s = key_slot(key.len(), last);
    if KEY_FILTER[s / 64] & (1 << (s % 64)) == 0 {
        return None;
    }
    SEMANTIC_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|&(_, field)| field)
}

/// Classifies a span and reads its facts (call id included) in one pass over the attributes.
pub(crate) fn read_span<'a>(
    name: &str,
    attrs: &'a [KeyValue],
    call_id_keys: &CallIdKeys,
) -> (Operation, SpanFacts<'a>) {
    let by_name = operation_by_name(name);
    let mut genai_op: Option<&str> = None;
    let mut has_tool_name = false;
    let mut f = SpanFacts::default();
    let mut best_id = None;
    // Pipecat's generic keys (`transcript`, `output`) only count on the right span type,
    // which may only be known after the pass (gen_ai.operation.name): keep them aside.
    let mut generic_transcript: Option<&str> = None;
    let mut generic_output: Option<&str> = None;
    for kv in attrs {
        offer_call_id(&mut best_id, call_id_keys, kv);
        let v = &kv.value;
        let Some(field) = field_of(kv.key.as_str()) else {
            continue;
        };
        match field {
            Field::UserText => f.user_text = text(v).or(f.user_text),
            Field::AssistantText => f.assistant_text = text(v).or(f.assistant_text),
            Field::Transcript => generic_transcript = text(v),
            Field::Output => generic_output = text(v),
            Field::InputTokens => f.input_tokens = as_u64(v).unwrap_or(0),
            Field::OutputTokens => f.output_tokens = as_u64(v).unwrap_or(0),
            Field::TotalTokens => f.total_tokens = as_u64(v).unwrap_or(0),
            // LiveKit and Pipecat report these in seconds.
            Field::Ttft => f.ttft_ms = as_f64(v).map(|s| s * 1000.0).or(f.ttft_ms),
            Field::TurnNumber => f.turn_number = as_u64(v),
            Field::GenAiOperation => genai_op = as_str(v),
            Field::ToolName => has_tool_name = true,
        }
    }
    f.call_id = best_id.map(|(_, id)| id);
    let op = by_name.unwrap_or_else(|| match genai_op {
        Some(g) => operation_by_genai(g),
        None if has_tool_name => Operation::Tool,
        None => Operation::Other,
    });
    match op {
        Operation::Stt => f.user_text = f.user_text.or(generic_transcript),
        Operation::Llm => f.assistant_text = f.assistant_text.or(generic_output),
        _ => {}
    }
    (op, f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys() -> CallIdKeys {
        let keys: Vec<String> = ["call_id", "session.id", "conversation.id"]
            .into_iter()
            .map(String::from)
            .collect();
        CallIdKeys::new(&keys)
    }

    #[test]
    fn every_semantic_key_passes_the_filter_and_others_do_not_match() {
        for (k, field) in SEMANTIC_KEYS {
            assert_eq!(field_of(k), Some(field), "{k}");
        }
        for k in [
            "",
            "x",
            "lk.speech_id",
            "gen_ai.request.model",
            "lk.response.tex",
            "lk.response.textx",
            "metrics.ttfx",
            "turn.numbe\u{e9}",
        ] {
            assert_eq!(field_of(k), None, "{k}");
        }
    }

    #[test]
    fn livekit_names_map_to_operations() {
        for (name, op) in [
            ("agent_session", Operation::Session),
            ("agent_turn", Operation::Turn),
            ("user_turn", Operation::Turn),
            ("llm_node", Operation::Llm),
            ("llm_request", Operation::Llm),
            ("tts_node", Operation::Tts),
            ("tts_request", Operation::Tts),
            ("stt", Operation::Stt),
            ("eou_detection", Operation::Eou),
            ("function_tool", Operation::Tool),
            ("conversation", Operation::Session),
            ("turn", Operation::Turn),
            ("llm", Operation::Llm),
            ("tts", Operation::Tts),
            ("something_else", Operation::Other),
        ] {
            assert_eq!(read_span(name, &[], &keys()).0, op, "{name}");
        }
    }

    #[test]
    fn genai_operation_and_tool_attributes_classify_unknown_names() {
        let chat = [KeyValue::new("gen_ai.operation.name", "chat")];
        assert_eq!(read_span("chat gpt-4o", &chat, &keys()).0, Operation::Llm);
        let tool = [KeyValue::new("gen_ai.operation.name", "execute_tool")];
        assert_eq!(
            read_span("execute_tool x", &tool, &keys()).0,
            Operation::Tool
        );
        let lk_tool = [KeyValue::new("lk.function_tool.name", "lookup")];
        assert_eq!(read_span("my_tool", &lk_tool, &keys()).0, Operation::Tool);
    }

    #[test]
    fn transcript_keys_old_and_new() {
        let user_old = [KeyValue::new("lk.user_transcript", "hello")];
        assert_eq!(
            read_span("user_turn", &user_old, &keys()).1.user_text,
            Some("hello")
        );
        let user_new = [KeyValue::new("lk.pii.user_transcript", "hi")];
        assert_eq!(
            read_span("user_turn", &user_new, &keys()).1.user_text,
            Some("hi")
        );
        let asst = [KeyValue::new("lk.pii.response.text", "sure")];
        assert_eq!(
            read_span("llm_node", &asst, &keys()).1.assistant_text,
            Some("sure")
        );
        // Pipecat generic keys only on their own span types.
        let stt = [KeyValue::new("transcript", "book a table")];
        assert_eq!(
            read_span("stt", &stt, &keys()).1.user_text,
            Some("book a table")
        );
        assert_eq!(read_span("tts", &stt, &keys()).1.user_text, None);
        let out = [KeyValue::new("output", "done")];
        assert_eq!(
            read_span("llm", &out, &keys()).1.assistant_text,
            Some("done")
        );
        assert_eq!(read_span("other", &out, &keys()).1.assistant_text, None);
        // Blank text is no text.
        let blank = [KeyValue::new("lk.user_transcript", "  ")];
        assert_eq!(read_span("user_turn", &blank, &keys()).1.user_text, None);
    }

    #[test]
    fn tokens_new_and_old_keys() {
        let new = [
            KeyValue::new("gen_ai.usage.input_tokens", 100_i64),
            KeyValue::new("gen_ai.usage.output_tokens", 20_i64),
        ];
        assert_eq!(read_span("llm_request", &new, &keys()).1.tokens(), 120);
        let old = [
            KeyValue::new("llm.usage.prompt_tokens", 7_i64),
            KeyValue::new("llm.usage.completion_tokens", 3_i64),
        ];
        assert_eq!(read_span("llm_request", &old, &keys()).1.tokens(), 10);
        let total = [KeyValue::new("llm.usage.total_tokens", 42_i64)];
        assert_eq!(read_span("llm_request", &total, &keys()).1.tokens(), 42);
        let negative = [KeyValue::new("gen_ai.usage.input_tokens", -5_i64)];
        assert_eq!(read_span("llm_request", &negative, &keys()).1.tokens(), 0);
    }

    #[test]
    fn ttft_in_seconds_becomes_ms() {
        let lk = [KeyValue::new("lk.response.ttft", 0.25_f64)];
        assert_eq!(read_span("llm_node", &lk, &keys()).1.ttft_ms, Some(250.0));
        let pc = [KeyValue::new("metrics.ttfb", 0.5_f64)];
        assert_eq!(read_span("tts", &pc, &keys()).1.ttft_ms, Some(500.0));
    }

    #[test]
    fn call_id_first_configured_key_wins() {
        let attrs = [
            KeyValue::new("conversation.id", "conv"),
            KeyValue::new("call_id", "call"),
        ];
        assert_eq!(
            find_call_id(&attrs, &keys()),
            Some(CallIdValue::Str("call"))
        );
        let int = [KeyValue::new("session.id", 77_i64)];
        assert_eq!(find_call_id(&int, &keys()), Some(CallIdValue::Int(77)));
        let empty = [KeyValue::new("call_id", "")];
        assert_eq!(find_call_id(&empty, &keys()), None);
    }
}
