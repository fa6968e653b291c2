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

/// The name of LiveKit's user turn span: its end is "end of user speech".
const USER_TURN: &str = "user_turn";

/// Span names that say the operation (LiveKit Agents, Pipecat, generic).
const OPERATION_NAMES: &[(&str, Operation)] = &[
    // LiveKit Agents
    ("agent_session", Operation::Session),
    ("agent_turn", Operation::Turn),
    (USER_TURN, Operation::Turn),
    ("llm_node", Operation::Llm),
    ("llm_request", Operation::Llm),
    ("tts_node", Operation::Tts),
    ("tts_request", Operation::Tts),
    ("stt", Operation::Stt),
    ("stt_request", Operation::Stt),
    ("user_speaking", Operation::Stt),
    ("eou_detection", Operation::Eou),
    ("function_tool", Operation::Tool),
    // Pipecat
    ("conversation", Operation::Session),
    ("turn", Operation::Turn),
    ("llm", Operation::Llm),
    ("tts", Operation::Tts),
    // generic
    ("call", Operation::Session),
    ("session", Operation::Session),
    ("tool", Operation::Tool),
    ("tool_call", Operation::Tool),
];

/// Operation from `gen_ai.operation.name`.
fn operation_by_genai(op: &str) -> Operation {
    match op {
        "chat" | "text_completion" | "generate_content" | "embeddings" => Operation::Llm,
        "execute_tool" => Operation::Tool,
        _ => Operation::Other,
    }
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
/// The end of a chain in [`Table::slots`] / [`Entry::next`].
const NONE: u16 = 0;

/// What callscope reads from an attribute key.
#[derive(Debug, Clone, Copy)]
struct KeyInfo {
    field: Option<Field>,
    /// Position among `CALLSCOPE_CALL_ID_KEYS` (first wins), or [`NOT_AN_ID`].
    rank: u16,
}

/// What a span name tells: its operation, whether it is a user turn, whether its end ends
/// the call (`CALLSCOPE_ROOT_SPAN_NAMES`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NameInfo {
    pub op: Option<Operation>,
    pub user_turn: bool,
    pub root: bool,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    key: Box<str>,
    info: T,
    /// Next entry of the same slot, as index + 1 ([`NONE`] ends the chain).
    next: u16,
}

/// A small string → `T` hash table for a fixed set of strings known at startup: the slot of a
/// string mixes its length and first and last bytes, so one load rules out almost every
/// string not in the table, and a string that passes is compared with one entry (chains for
/// collisions).
#[derive(Debug, Clone)]
struct Table<T> {
    /// Slot → first entry of its chain, as index + 1.
    slots: Box<[u16; 256]>,
    entries: Vec<Entry<T>>,
    /// The slot hash's multiplier, chosen for the fewest collisions among the strings.
    mult: u32,
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

impl<T> Table<T> {
    /// The table of `entries` (strings unique); beyond u16 indices they are left out (never
    /// with a validated configuration).
    fn new(mut entries: Vec<Entry<T>>) -> Self {
        entries.truncate(usize::from(u16::MAX - 1));
        let chain = |mult: u32| {
            let mut per = [0usize; 256];
            for e in &entries {
                per[slot(mult, e.key.as_bytes())] += 1;
            }
            per.into_iter().max().unwrap_or(0)
        };
        let mult = MULTIPLIERS
            .into_iter()
            .min_by_key(|m| chain(*m))
            .unwrap_or(MULTIPLIERS[0]);
        let mut slots = Box::new([NONE; 256]);
        for i in (0..entries.len()).rev() {
            let s = slot(mult, entries[i].key.as_bytes());
            entries[i].next = slots[s];
            slots[s] = i as u16 + 1;
        }
        Table {
            slots,
            entries,
            mult,
        }
    }

    /// The entry of `key`, if in the table.
    #[inline]
    fn get(&self, key: &str) -> Option<&T> {
        let b = key.as_bytes();
        if b.is_empty() {
            return None;
        }
        let mut i = self.slots[slot(self.mult, b)];
        while i != NONE {
            let e = self.entries.get(usize::from(i - 1))?;
            if same(e.key.as_bytes(), b) {
                return Some(&e.info);
            }
            i = e.next;
        }
        None
    }
}

/// `a == b`, for the short strings keys and span names are without a call to `memcmp`: two
/// words from each end (overlapping in the middle) for 8 to 32 bytes.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    fn ends<const W: usize>(a: &[u8], b: &[u8]) -> bool {
        let n = a.len();
        let word = |s: &[u8], at: usize| -> [u8; W] {
            let mut w = [0u8; W];
            w.copy_from_slice(&s[at..at + W]);
            w
        };
        word(a, 0) == word(b, 0) && word(a, n - W) == word(b, n - W)
    }
    if a.len() != b.len() {
        return false;
    }
    match a.len() {
        8..=16 => ends::<8>(a, b),
        17..=32 => ends::<16>(a, b),
        _ => a == b,
    }
}

/// The slot of a non-empty string: its length and first and last bytes, mixed.
#[inline]
fn slot(mult: u32, b: &[u8]) -> usize {
    let (first, last) = match (b.first(), b.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => (0, 0),
    };
    let x = (b.len() as u32) ^ (u32::from(first) << 8) ^ (u32::from(last) << 16);
    (x.wrapping_mul(mult) >> 24) as usize
}

/// Every string callscope looks up per span, each in one [`Table`]: attribute keys (the
/// configured call-id keys, `CALLSCOPE_CALL_ID_KEYS`, and [`SEMANTIC_KEYS`]) and span names
/// (the known operation names and `CALLSCOPE_ROOT_SPAN_NAMES`).
#[derive(Debug, Clone)]
pub(crate) struct KeyTable {
    /// The call-id keys in configured order (baggage is read by these).
    ids: Vec<String>,
    keys: Table<KeyInfo>,
    names: Table<NameInfo>,
}

impl Default for KeyTable {
    /// The semantic keys and operation names, with no call-id key and no root name.
    fn default() -> Self {
        KeyTable::new(&[])
    }
}

/// Pushes `key` with `info`, or updates the entry `key` already has.
fn upsert<T>(entries: &mut Vec<Entry<T>>, key: &str, info: T, update: impl FnOnce(&mut T)) {
    match entries.iter_mut().find(|e| *e.key == *key) {
        Some(e) => update(&mut e.info),
        None => entries.push(Entry {
            key: key.into(),
            info,
            next: NONE,
        }),
    }
}

impl KeyTable {
    /// The table for `call_id_keys` (first wins; repeats ignored), no root names.
    pub(crate) fn new(call_id_keys: &[String]) -> Self {
        Self::with_roots(call_id_keys, &[])
    }

    /// The table for `call_id_keys` (first wins; repeats ignored) and the span names whose
    /// end ends their call (`root_names`).
    pub(crate) fn with_roots(call_id_keys: &[String], root_names: &[String]) -> Self {
        let mut keys: Vec<Entry<KeyInfo>> = Vec::new();
        for (k, field) in SEMANTIC_KEYS {
            let info = KeyInfo {
                field: Some(field),
                rank: NOT_AN_ID,
            };
            upsert(&mut keys, k, info, |_| {});
        }
        let mut ids = Vec::new();
        for k in call_id_keys {
            if k.is_empty() || ids.contains(k) || ids.len() >= usize::from(NOT_AN_ID - 1) {
                continue;
            }
            let rank = ids.len() as u16;
            ids.push(k.clone());
            let info = KeyInfo { field: None, rank };
            upsert(&mut keys, k, info, |i| i.rank = rank);
        }
        let mut names: Vec<Entry<NameInfo>> = Vec::new();
        for &(name, op) in OPERATION_NAMES {
            let info = NameInfo {
                op: Some(op),
                user_turn: name == USER_TURN,
                root: false,
            };
            upsert(&mut names, name, info, |_| {});
        }
        for name in root_names.iter().filter(|n| !n.is_empty()) {
            let info = NameInfo {
                root: true,
                ..NameInfo::default()
            };
            upsert(&mut names, name, info, |i| i.root = true);
        }
        KeyTable {
            ids,
            keys: Table::new(keys),
            names: Table::new(names),
        }
    }

    /// The call-id keys, first wins.
    pub(crate) fn as_slice(&self) -> &[String] {
        &self.ids
    }

    #[inline]
    fn key(&self, key: &str) -> Option<&KeyInfo> {
        self.keys.get(key)
    }

    /// What a span name tells (all defaults for a name callscope does not know).
    #[inline]
    pub(crate) fn name(&self, name: &str) -> NameInfo {
        self.names.get(name).copied().unwrap_or_default()
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
        if let Some(e) = keys.key(kv.key.as_str()) {
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
    let (op, _) = read_span_into(name, attrs, keys, &mut f);
    (op, f)
}

/// [`read_span`] into `f` (which starts as `SpanFacts::default()`), with what the span's name
/// tells: the hot path reads the facts straight into the span's view instead of moving them
/// there.
#[inline]
pub(crate) fn read_span_into<'a>(
    name: &str,
    attrs: &'a [KeyValue],
    keys: &KeyTable,
    f: &mut SpanFacts<'a>,
) -> (Operation, NameInfo) {
    let named = keys.name(name);
    let mut genai_op: Option<&str> = None;
    let mut has_tool_name = false;
    let mut best_id = None;
    // Pipecat's generic keys (`transcript`, `output`) only count on the right span type,
    // which may only be known after the pass (gen_ai.operation.name): keep them aside.
    let mut generic_transcript: Option<&str> = None;
    let mut generic_output: Option<&str> = None;
    for kv in attrs {
        let Some(e) = keys.key(kv.key.as_str()) else {
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
    let op = named.op.unwrap_or_else(|| match genai_op {
        Some(g) => operation_by_genai(g),
        None if has_tool_name => Operation::Tool,
        None => Operation::Other,
    });
    match op {
        Operation::Stt => f.user_text = f.user_text.or(generic_transcript),
        Operation::Llm => f.assistant_text = f.assistant_text.or(generic_output),
        _ => {}
    }
    (op, named)
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
        t.key(k).and_then(|e| e.field)
    }

    fn rank_of(t: &KeyTable, k: &str) -> Option<u16> {
        t.key(k).map(|e| e.rank).filter(|r| *r != NOT_AN_ID)
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
            assert!(t.key(k).is_none(), "{k}");
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

    proptest::proptest! {
        /// The word-wise compare agrees with `==` for every length around the word sizes.
        #[test]
        fn same_equals_eq(a in "[ab]{0,40}", flip in 0usize..40) {
            let b: String = a
                .char_indices()
                .map(|(i, c)| if i == flip { if c == 'a' { 'b' } else { 'a' } } else { c })
                .collect();
            proptest::prop_assert!(same(a.as_bytes(), a.as_bytes()));
            proptest::prop_assert_eq!(same(a.as_bytes(), b.as_bytes()), a == b);
            let shorter = &a[..a.len().saturating_sub(1)];
            proptest::prop_assert_eq!(same(a.as_bytes(), shorter.as_bytes()), a == shorter);
        }
    }

    #[test]
    fn names_say_operation_user_turn_and_root() {
        let ids: Vec<String> = vec!["call_id".into()];
        let roots: Vec<String> = ["agent_session", "my_root", ""]
            .into_iter()
            .map(String::from)
            .collect();
        let t = KeyTable::with_roots(&ids, &roots);
        let n = t.name("agent_session");
        assert_eq!(
            (n.op, n.user_turn, n.root),
            (Some(Operation::Session), false, true)
        );
        let n = t.name("user_turn");
        assert_eq!(
            (n.op, n.user_turn, n.root),
            (Some(Operation::Turn), true, false)
        );
        let n = t.name("my_root");
        assert_eq!((n.op, n.user_turn, n.root), (None, false, true));
        assert_eq!(t.name("agent_turn").op, Some(Operation::Turn));
        assert_eq!(t.name(""), NameInfo::default());
        assert_eq!(t.name("user_turnx"), NameInfo::default());
        for &(name, op) in OPERATION_NAMES {
            assert_eq!(t.name(name).op, Some(op), "{name}");
            assert!(!KeyTable::default().name(name).root, "{name}");
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
