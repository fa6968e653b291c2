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

/// Rank of a key that is not a call-id key.
const NOT_AN_ID: u16 = u16::MAX;
/// The end of a chain in [`KeyTable::slots`] / [`Entry::next`].
const NONE: u16 = 0;

/// One key callscope reads: what it tells, and its place among the call-id keys.
#[derive(Debug, Clone)]
struct Entry {
    key: Box<str>,
    field: Option<Field>,
    /// Position among `CALLSCOPE_CALL_ID_KEYS` (first wins), or [`NOT_AN_ID`].
    rank: u16,
    /// Next entry of the same slot, as index + 1 ([`NONE`] ends the chain).
    next: u16,
}

/// Every attribute key callscope reads — the configured call-id keys
/// (`CALLSCOPE_CALL_ID_KEYS`) and [`SEMANTIC_KEYS`] — in one small hash table, so that the
/// single pass over a span's attributes looks each key up once: a table load rules out almost
/// every other key (an agent sets many), and a key that passes is compared with one entry.
#[derive(Debug, Clone)]
pub(crate) struct KeyTable {
    /// The call-id keys in configured order (baggage is read by these).
    ids: Vec<String>,
    /// Slot (see [`slot`](Self::slot)) → first entry of its chain, as index + 1.
    slots: Box<[u16; 256]>,
    entries: Vec<Entry>,
    /// The slot hash's multiplier, chosen for the fewest collisions among the keys.
    mult: u32,
}

impl Default for KeyTable {
    /// The semantic keys with no call-id key.
    fn default() -> Self {
        KeyTable::new(&[])
    }
}

/// Odd multipliers tried for the slot hash; the first with the shortest longest chain wins.
const MULTIPLIERS: [u32; 8] = [
    0x9E37_79B1,
    0x85EB_CA77,
    0xC2B2_AE3D,
    0x27D4_EB2F,
    0x1656_67B1,
    0xD3A2_646D,
    0xFD70_46C5,
    0xB55A_4F09,
];

impl KeyTable {
    /// The table for `call_id_keys` (first wins; repeats ignored) and the semantic keys.
    pub(crate) fn new(call_id_keys: &[String]) -> Self {
        let mut entries: Vec<Entry> = Vec::new();
        let mut ids = Vec::new();
        for (field_key, field) in SEMANTIC_KEYS {
            entries.push(Entry {
                key: field_key.into(),
                field: Some(field),
                rank: NOT_AN_ID,
                next: NONE,
            });
        }
        for k in call_id_keys {
            if k.is_empty() || ids.contains(k) || ids.len() >= usize::from(NOT_AN_ID - 1) {
                continue;
            }
            let rank = ids.len() as u16;
            ids.push(k.clone());
            match entries.iter_mut().find(|e| *e.key == **k) {
                Some(e) => e.rank = rank,
                None => entries.push(Entry {
                    key: k.as_str().into(),
                    field: None,
                    rank,
                    next: NONE,
                }),
            }
        }
        // Entries beyond u16 indices cannot be chained (never with a validated config).
        entries.truncate(usize::from(u16::MAX - 1));
        let chain = |mult: u32| {
            let mut per = [0usize; 256];
            for e in &entries {
                per[Self::slot_with(mult, e.key.as_bytes())] += 1;
            }
            per.into_iter().max().unwrap_or(0)
        };
        let mult = MULTIPLIERS
            .into_iter()
            .min_by_key(|m| chain(*m))
            .unwrap_or(MULTIPLIERS[0]);
        let mut slots = Box::new([NONE; 256]);
        for i in (0..entries.len()).rev() {
            let s = Self::slot_with(mult, entries[i].key.as_bytes());
            entries[i].next = slots[s];
            slots[s] = i as u16 + 1;
        }
        KeyTable {
            ids,
            slots,
            entries,
            mult,
        }
    }

    /// The call-id keys, first wins.
    pub(crate) fn as_slice(&self) -> &[String] {
        &self.ids
    }

    /// The slot of a non-empty key: its length and first and last bytes, mixed.
    #[inline]
    fn slot_with(mult: u32, b: &[u8]) -> usize {
        let (first, last) = match (b.first(), b.last()) {
            (Some(f), Some(l)) => (*f, *l),
            _ => (0, 0),
        };
        let x = (b.len() as u32) ^ (u32::from(first) << 8) ^ (u32::from(last) << 16);
        (x.wrapping_mul(mult) >> 24) as usize
    }

    /// The entry of `key`, if callscope reads it.
    #[inline]
    fn lookup(&self, key: &str) -> Option<&Entry> {
        let b = key.as_bytes();
        if b.is_empty() {
            return None;
        }
        let mut i = self.slots[Self::slot_with(self.mult, b)];
        while i != NONE {
            let e = self.entries.get(usize::from(i - 1))?;
            if *e.key == *key {
                return Some(e);
            }
            i = e.next;
        }
        None
    }
}

/// Keeps the call id of the best-ranked key seen so far (`best`) up to date with one attribute
/// whose key ranks `rank` among the call-id keys.
#[inline]
fn offer_call_id<'a>(best: &mut Option<(u16, CallIdValue<'a>)>, rank: u16, value: &'a Value) {
    if rank == NOT_AN_ID || best.as_ref().is_some_and(|(r, _)| *r <= rank) {
        return;
    }
    let id = match value {
        Value::String(s) if !s.as_str().is_empty() => CallIdValue::Str(s.as_str()),
        Value::I64(i) => CallIdValue::Int(*i),
        _ => return,
    };
    *best = Some((rank, id));
}

/// Finds a call id under `keys` (first key in `keys` order wins) in attributes.
pub(crate) fn find_call_id<'a>(attrs: &'a [KeyValue], keys: &KeyTable) -> Option<CallIdValue<'a>> {
    let mut best = None;
    for kv in attrs {
        if let Some(e) = keys.lookup(kv.key.as_str()) {
            offer_call_id(&mut best, e.rank, &kv.value);
        }
    }
    best.map(|(_, id)| id)
}

/// Classifies a span and reads its facts (call id included) in one pass over the attributes.
pub(crate) fn read_span<'a>(
    name: &str,
    attrs: &'a [KeyValue],
    keys: &KeyTable,
) -> (Operation, SpanFacts<'a>) {
    let mut f = SpanFacts::default();
    let op = read_span_into(name, attrs, keys, &mut f);
    (op, f)
}

/// [`read_span`] into `f` (which starts as `SpanFacts::default()`): the hot path reads the
/// facts straight into the span's view instead of moving them there.
#[inline]
pub(crate) fn read_span_into<'a>(
    name: &str,
    attrs: &'a [KeyValue],
    keys: &KeyTable,
    f: &mut SpanFacts<'a>,
) -> Operation {
    let by_name = operation_by_name(name);
    let mut genai_op: Option<&str> = None;
    let mut has_tool_name = false;
    let mut best_id = None;
    // Pipecat's generic keys (`transcript`, `output`) only count on the right span type,
    // which may only be known after the pass (gen_ai.operation.name): keep them aside.
    let mut generic_transcript: Option<&str> = None;
    let mut generic_output: Option<&str> = None;
    for kv in attrs {
        let Some(e) = keys.lookup(kv.key.as_str()) else {
            continue;
        };
        let v = &kv.value;
        offer_call_id(&mut best_id, e.rank, v);
        let Some(field) = e.field else {
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
    op
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys() -> KeyTable {
        let keys: Vec<String> = ["call_id", "session.id", "conversation.id"]
            .into_iter()
            .map(String::from)
            .collect();
        KeyTable::new(&keys)
    }

    fn field_of(t: &KeyTable, k: &str) -> Option<Field> {
        t.lookup(k).and_then(|e| e.field)
    }

    fn rank_of(t: &KeyTable, k: &str) -> Option<u16> {
        t.lookup(k).map(|e| e.rank).filter(|r| *r != NOT_AN_ID)
    }

    #[test]
    fn every_semantic_key_is_found_and_others_are_not() {
        let t = keys();
        for (k, field) in SEMANTIC_KEYS {
            assert_eq!(field_of(&t, k), Some(field), "{k}");
            assert_eq!(rank_of(&t, k), None, "{k}");
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
            assert!(t.lookup(k).is_none(), "{k}");
        }
        assert_eq!(rank_of(&t, "call_id"), Some(0));
        assert_eq!(rank_of(&t, "conversation.id"), Some(2));
    }

    #[test]
    fn a_call_id_key_may_also_be_a_semantic_key_and_repeats_keep_the_first_rank() {
        let ids: Vec<String> = ["turn.number", "call_id", "turn.number", "call_id"]
            .into_iter()
            .map(String::from)
            .collect();
        let t = KeyTable::new(&ids);
        assert_eq!(t.as_slice(), ["turn.number", "call_id"]);
        assert_eq!(field_of(&t, "turn.number"), Some(Field::TurnNumber));
        assert_eq!(rank_of(&t, "turn.number"), Some(0));
        assert_eq!(rank_of(&t, "call_id"), Some(1));
        let attrs = [
            KeyValue::new("call_id", "c"),
            KeyValue::new("turn.number", 7_i64),
        ];
        let (_, f) = read_span("turn", &attrs, &t);
        assert_eq!(f.call_id, Some(CallIdValue::Int(7)));
        assert_eq!(f.turn_number, Some(7));
    }

    proptest::proptest! {
        /// Whatever keys are configured (many colliding in one slot included), the table finds
        /// exactly the configured and semantic keys, each with its first rank.
        #[test]
        fn the_key_table_equals_a_linear_search(
            ids in proptest::collection::vec("[a-z._]{0,12}", 0..200),
            probes in proptest::collection::vec("[a-z._]{0,12}", 0..50),
        ) {
            let t = KeyTable::new(&ids);
            let want_rank = |k: &str| {
                let mut seen: Vec<&str> = Vec::new();
                for id in &ids {
                    if id.is_empty() || seen.contains(&id.as_str()) { continue; }
                    if id == k { return Some(seen.len() as u16); }
                    seen.push(id);
                }
                None
            };
            let want_field = |k: &str| SEMANTIC_KEYS.iter().find(|(s, _)| *s == k).map(|(_, f)| *f);
            for k in ids.iter().chain(&probes).map(String::as_str)
                .chain(SEMANTIC_KEYS.iter().map(|(k, _)| *k))
            {
                proptest::prop_assert_eq!(rank_of(&t, k), want_rank(k), "{}", k);
                proptest::prop_assert_eq!(field_of(&t, k), want_field(k), "{}", k);
            }
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
