//! Voice-agent call simulators shared by the examples, the tests and the benches
//! (included with `#[path]`): LiveKit- and Pipecat-shaped span trees with virtual timestamps,
//! plus the truth each call should summarise to.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

/// What a simulated call should summarise to.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    pub call_id: String,
    pub total_spans: u64,
    pub errors: u64,
    pub op_counts: BTreeMap<&'static str, u64>,
    pub op_sum_ms: BTreeMap<&'static str, f64>,
    /// Every span's duration (ms), to derive the top-5.
    pub durations: Vec<(f64, String)>,
    pub tokens: u64,
    pub turns: u64,
    /// (role, text) in time order.
    pub transcript: Vec<(&'static str, String)>,
    pub root_end: Option<SystemTime>,
}

impl Truth {
    pub fn avg(&self, op: &str) -> Option<f64> {
        let n = *self.op_counts.get(op)? as f64;
        Some(self.op_sum_ms[op] / n)
    }

    /// The five largest durations, slowest first.
    pub fn top5(&self) -> Vec<f64> {
        let mut d: Vec<f64> = self.durations.iter().map(|(d, _)| *d).collect();
        d.sort_by(|a, b| b.total_cmp(a));
        d.truncate(5);
        d
    }

    fn note(&mut self, op: &'static str, name: &str, start: SystemTime, end: SystemTime) {
        let ms = end.duration_since(start).unwrap_or_default().as_secs_f64() * 1000.0;
        self.total_spans += 1;
        *self.op_counts.entry(op).or_default() += 1;
        *self.op_sum_ms.entry(op).or_default() += ms;
        self.durations.push((ms, name.to_owned()));
    }
}

/// Shape and size of a simulated call.
#[derive(Debug, Clone)]
pub struct CallShape {
    pub turns: u32,
    /// Bytes of payload text per span (LiveKit puts prompts and chat contexts on spans).
    pub span_bytes: usize,
    /// Every `tool_every`-th agent turn calls a tool (0 = never).
    pub tool_every: u32,
    /// Use the newer `lk.pii.*` attribute names on odd turns.
    pub mix_pii_names: bool,
    /// Reach this many spans per call with extra `tts_request` chunks (TTS streams sentence by
    /// sentence), spread over the turns; `None` = the natural count.
    pub target_spans: Option<u32>,
    /// Real time to wait after each turn (the demo's time compression); timestamps stay virtual.
    pub turn_pause: Duration,
}

impl CallShape {
    /// Spans a call of this shape emits.
    pub fn spans(&self) -> u64 {
        self.natural_spans()
            .max(u64::from(self.target_spans.unwrap_or(0)))
    }

    fn tools(&self) -> u64 {
        self.turns.checked_div(self.tool_every).map_or(0, u64::from)
    }

    fn natural_spans(&self) -> u64 {
        1 + u64::from(self.turns) * 8 + self.tools()
    }

    /// Extra tts chunks in turn `i`.
    fn extra_in_turn(&self, i: u32) -> u64 {
        let extra = self.spans() - self.natural_spans();
        let n = u64::from(self.turns.max(1));
        (u64::from(i) + 1) * extra / n - u64::from(i) * extra / n
    }
}

impl Default for CallShape {
    fn default() -> Self {
        CallShape {
            turns: 5,
            span_bytes: 64,
            tool_every: 3,
            mix_pii_names: true,
            target_spans: None,
            turn_pause: Duration::ZERO,
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "caller",
    "asked",
    "about",
    "their",
    "booking",
    "for",
    "tomorrow",
    "evening",
    "table",
    "four",
    "people",
    "window",
    "seat",
    "please",
    "confirm",
    "reservation",
    "number",
    "agent",
    "checked",
    "availability",
    "restaurant",
    "downtown",
    "parking",
    "menu",
    "vegetarian",
    "options",
    "allergy",
    "gluten",
    "price",
    "total",
    "deposit",
    "card",
    "ending",
    "thanks",
];

/// Deterministic pseudo-text of about `len` bytes (compresses like real prompts do).
pub fn text(seed: u64, len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        s.push(if x.is_multiple_of(11) { '.' } else { ' ' });
    }
    s.truncate(len);
    s
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Emits spans with explicit timestamps through a tracer; records the truth as it goes.
pub struct Emitter<'t, T: Tracer> {
    pub tracer: &'t T,
    pub truth: Truth,
    seed: u64,
    span_bytes: usize,
}

impl<'t, T> Emitter<'t, T>
where
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    /// An emitter for one call, its truth starting empty.
    fn new(tracer: &'t T, call_id: &str, seed: u64, span_bytes: usize) -> Self {
        Emitter {
            tracer,
            truth: Truth {
                call_id: call_id.into(),
                ..Truth::default()
            },
            seed,
            span_bytes,
        }
    }

    #[allow(clippy::too_many_arguments)] // a fixture: one line per span reads best at call sites
    fn span(
        &mut self,
        parent: &Context,
        name: &'static str,
        op: &'static str,
        start: SystemTime,
        end: SystemTime,
        mut attrs: Vec<KeyValue>,
        error: bool,
    ) {
        self.seed += 1;
        if self.span_bytes > 0 {
            attrs.push(KeyValue::new(
                "lk.debug.payload",
                text(self.seed, self.span_bytes),
            ));
        }
        let mut s = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(self.tracer, parent);
        if error {
            s.set_status(Status::error("tool failed"));
            self.truth.errors += 1;
        }
        s.end_with_timestamp(end);
        self.truth.note(op, name, start, end);
    }

    /// Starts a parent span and returns its context; end it with `close`.
    fn open(
        &mut self,
        parent: &Context,
        name: &'static str,
        start: SystemTime,
        mut attrs: Vec<KeyValue>,
    ) -> Context {
        self.seed += 1;
        if self.span_bytes > 0 {
            attrs.push(KeyValue::new(
                "lk.debug.payload",
                text(self.seed, self.span_bytes),
            ));
        }
        let s = self
            .tracer
            .span_builder(name)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(self.tracer, parent);
        parent.with_span(s)
    }

    fn close(
        &mut self,
        cx: &Context,
        name: &'static str,
        op: &'static str,
        start: SystemTime,
        end: SystemTime,
    ) {
        cx.span().end_with_timestamp(end);
        self.truth.note(op, name, start, end);
    }
}

/// A LiveKit-Agents-shaped call: `agent_session` root with `call_id`, then per turn a
/// `user_turn` (stt, eou_detection) and an `agent_turn` (llm_node → llm_request, tts_node →
/// tts_request, sometimes function_tool). Timestamps are virtual, starting at `t0`.
/// Spans per call: 1 + turns × (4 + 5) + tools.
pub fn livekit_call<T>(
    tracer: &T,
    call_id: &str,
    shape: &CallShape,
    t0: SystemTime,
    seed: u64,
) -> Truth
where
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    let mut e = Emitter::new(tracer, call_id, seed, shape.span_bytes);
    let root_cx = e.open(
        &Context::new(),
        "agent_session",
        t0,
        vec![
            KeyValue::new("call_id", call_id.to_owned()),
            KeyValue::new("lk.agent_name", "support-bot"),
        ],
    );
    let mut t = t0 + ms(200);
    for turn in 0..shape.turns {
        let pii = shape.mix_pii_names && turn % 2 == 1;
        let jitter = (seed.wrapping_add(u64::from(turn)) * 37) % 400;
        // user turn
        let user_text = format!("user line {turn}: {}", text(seed + u64::from(turn), 40));
        let ut_start = t;
        let ut_cx = e.open(
            &root_cx,
            "user_turn",
            ut_start,
            vec![KeyValue::new(
                if pii {
                    "lk.pii.user_transcript"
                } else {
                    "lk.user_transcript"
                },
                user_text.clone(),
            )],
        );
        e.span(
            &ut_cx,
            "stt",
            "stt",
            ut_start,
            ut_start + ms(300 + jitter),
            vec![],
            false,
        );
        e.span(
            &ut_cx,
            "eou_detection",
            "eou",
            ut_start + ms(300 + jitter),
            ut_start + ms(380 + jitter),
            vec![],
            false,
        );
        let ut_end = ut_start + ms(400 + jitter);
        e.close(&ut_cx, "user_turn", "turn", ut_start, ut_end);
        e.truth.transcript.push(("user", user_text));
        // agent turn
        let at_start = ut_end + ms(20);
        let at_cx = e.open(&root_cx, "agent_turn", at_start, vec![]);
        let mut c = at_start;
        if shape.tool_every > 0 && turn % shape.tool_every == shape.tool_every - 1 {
            let fail = turn % (shape.tool_every * 2) == shape.tool_every * 2 - 1;
            e.span(
                &at_cx,
                "function_tool",
                "tool",
                c,
                c + ms(150 + jitter),
                vec![KeyValue::new("lk.function_tool.name", "lookup_booking")],
                fail,
            );
            c += ms(150 + jitter);
        }
        let reply = format!(
            "agent line {turn}: {}",
            text(seed * 7 + u64::from(turn), 60)
        );
        let llm_dur = 200 + jitter * 2;
        let ln_cx = e.open(
            &at_cx,
            "llm_node",
            c,
            vec![
                KeyValue::new(
                    if pii {
                        "lk.pii.response.text"
                    } else {
                        "lk.response.text"
                    },
                    reply.clone(),
                ),
                KeyValue::new("lk.response.ttft", 0.12_f64),
            ],
        );
        let (input, output) = (300 + i64::from(turn), 40 + i64::from(turn % 7));
        e.span(
            &ln_cx,
            "llm_request",
            "llm",
            c + ms(5),
            c + ms(llm_dur - 5),
            vec![
                KeyValue::new("gen_ai.request.model", "gpt-4o-mini"),
                KeyValue::new("gen_ai.usage.input_tokens", input),
                KeyValue::new("gen_ai.usage.output_tokens", output),
            ],
            false,
        );
        e.truth.tokens += (input + output) as u64;
        e.close(&ln_cx, "llm_node", "llm", c, c + ms(llm_dur));
        e.truth.transcript.push(("assistant", reply));
        c += ms(llm_dur);
        let tts_dur = 150 + jitter;
        let tn_cx = e.open(
            &at_cx,
            "tts_node",
            c,
            vec![KeyValue::new("lk.response.ttfb", 0.08_f64)],
        );
        let chunks = 1 + shape.extra_in_turn(turn);
        let step = ((tts_dur - 4) / chunks).max(1);
        for k in 0..chunks {
            let s0 = c + ms(2 + k * step);
            e.span(
                &tn_cx,
                "tts_request",
                "tts",
                s0,
                s0 + ms(step),
                vec![],
                false,
            );
        }
        e.close(&tn_cx, "tts_node", "tts", c, c + ms(tts_dur));
        c += ms(tts_dur);
        e.close(&at_cx, "agent_turn", "turn", at_start, c);
        e.truth.turns += 1;
        t = c + ms(500);
        if !shape.turn_pause.is_zero() {
            std::thread::sleep(shape.turn_pause);
        }
    }
    e.close(&root_cx, "agent_session", "session", t0, t);
    e.truth.root_end = Some(t);
    e.truth
}

/// A Pipecat-shaped call: `conversation` root with `conversation.id`, `turn` spans with
/// `turn.number` holding `stt` (transcript), `llm` (output, old llm.usage.* token keys,
/// metrics.ttfb) and `tts` (text).
pub fn pipecat_call<T>(tracer: &T, conversation_id: &str, turns: u32, t0: SystemTime) -> Truth
where
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    let mut e = Emitter::new(tracer, conversation_id, 99, 0);
    let root = e.open(
        &Context::new(),
        "conversation",
        t0,
        vec![KeyValue::new("conversation.id", conversation_id.to_owned())],
    );
    let mut t = t0;
    for n in 1..=turns {
        let turn_cx = e.open(
            &root,
            "turn",
            t,
            vec![KeyValue::new("turn.number", i64::from(n))],
        );
        let said = format!("pipecat user {n}");
        e.span(
            &turn_cx,
            "stt",
            "stt",
            t,
            t + ms(100 * u64::from(n)),
            vec![
                KeyValue::new("transcript", said.clone()),
                KeyValue::new("metrics.ttfb", 0.05_f64),
            ],
            false,
        );
        e.truth.transcript.push(("user", said));
        let reply = format!("pipecat reply {n}");
        let l0 = t + ms(100 * u64::from(n));
        e.span(
            &turn_cx,
            "llm",
            "llm",
            l0,
            l0 + ms(300),
            vec![
                KeyValue::new("output", reply.clone()),
                KeyValue::new("llm.usage.prompt_tokens", 100_i64),
                KeyValue::new("llm.usage.completion_tokens", 10_i64),
                KeyValue::new("metrics.ttfb", 0.2_f64),
            ],
            false,
        );
        e.truth.tokens += 110;
        e.truth.transcript.push(("assistant", reply.clone()));
        e.span(
            &turn_cx,
            "tts",
            "tts",
            l0 + ms(300),
            l0 + ms(500),
            vec![KeyValue::new("text", reply)],
            false,
        );
        let end = l0 + ms(500);
        e.close(&turn_cx, "turn", "turn", t, end);
        e.truth.turns += 1;
        t = end + ms(100);
    }
    e.close(&root, "conversation", "session", t0, t);
    e.truth.root_end = Some(t);
    e.truth
}
