//! Byte-capped batching of serialized spans, per call, and the rework of a detail body the
//! receiver refused with 413 (split in halves, renumber, shorten a lone span). Pure: no I/O, no
//! clock of its own.

use std::time::Instant;

use serde_json::Value;

/// Appended to a string value shortened to fit (the same mark as the payload encoder's).
const TRUNCATION_MARK: &str = "…[truncated by callscope]";
/// Attribute on a span saying how many of its values were shortened.
const TRUNCATED_VALUES_KEY: &str = "callscope.truncated_values";

/// Serialized spans waiting to be sent for one call: comma-joined JSON objects.
#[derive(Debug, Default)]
pub(crate) struct SpanList {
    /// `{..},{..},{..}`
    pub bytes: Vec<u8>,
    /// End offset of each span in `bytes` (so a batch can be split in halves).
    pub ends: Vec<usize>,
}

impl SpanList {
    /// Number of spans.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no spans.
    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends a span object.
    pub(crate) fn push(&mut self, span: &[u8]) {
        if !self.bytes.is_empty() {
            self.bytes.push(b',');
        }
        self.bytes.extend_from_slice(span);
        self.ends.push(self.bytes.len());
    }

    /// Size after appending a span of `len` bytes.
    pub(crate) fn len_with(&self, len: usize) -> usize {
        self.bytes.len() + usize::from(!self.bytes.is_empty()) + len
    }
}

/// One call's open batch.
#[derive(Debug, Default)]
pub(crate) struct CallBuffer {
    pub list: SpanList,
    /// When the oldest span in `list` arrived (for the batch timeout).
    pub since: Option<Instant>,
    /// Sequence number the next batch of this call gets.
    pub next_seq: u32,
}

impl CallBuffer {
    /// Adds a span; when it would take the batch past `budget` bytes, first returns the spans
    /// held so far as a full batch. A span larger than `budget` alone still travels alone.
    pub(crate) fn push(&mut self, span: &[u8], budget: usize, now: Instant) -> Option<SpanList> {
        let full = if !self.list.is_empty() && self.list.len_with(span.len()) > budget {
            Some(self.take())
        } else {
            None
        };
        if self.list.is_empty() {
            self.since = Some(now);
        }
        self.list.push(span);
        full
    }

    /// Takes the spans held (the batch to send now).
    pub(crate) fn take(&mut self) -> SpanList {
        self.since = None;
        std::mem::take(&mut self.list)
    }

    /// Hands out the next batch sequence number.
    pub(crate) fn seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }
}

/// A detail body parsed for rework (413 handling, renumbering). Rare path: parsing is fine here.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DetailDoc(Value);

impl DetailDoc {
    /// Parses a detail body; `None` if it is not one.
    pub(crate) fn parse(json: &[u8]) -> Option<DetailDoc> {
        let v: Value = serde_json::from_slice(json).ok()?;
        v.get("telemetry_data")?.get("session_traces")?.as_array()?;
        Some(DetailDoc(v))
    }

    fn spans_mut(&mut self) -> Option<&mut Vec<Value>> {
        self.0
            .get_mut("telemetry_data")?
            .get_mut("session_traces")?
            .as_array_mut()
    }

    /// Number of spans.
    pub(crate) fn span_count(&self) -> usize {
        self.0["telemetry_data"]["session_traces"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Whether this is the final batch.
    pub(crate) fn is_final(&self) -> bool {
        self.0.get("final") == Some(&Value::Bool(true))
    }

    /// Splits the spans in halves: the first half becomes a non-final batch, the second keeps
    /// everything else (the final part, if any). `None` with fewer than two spans.
    pub(crate) fn split(mut self) -> Option<(DetailDoc, DetailDoc)> {
        let spans = self.spans_mut()?;
        if spans.len() < 2 {
            return None;
        }
        let second = spans.split_off(spans.len() / 2);
        let mut first = self.clone();
        first.make_plain();
        if let Some(s) = self.spans_mut() {
            *s = second;
        }
        Some((first, self))
    }

    /// Turns the body into a plain (non-final) batch: no `total_batches`, no transcript.
    pub(crate) fn make_plain(&mut self) {
        if let Some(m) = self.0.as_object_mut() {
            m.insert("final".into(), Value::Bool(false));
            m.remove("total_batches");
            m.remove("transcript_with_metrics");
        }
    }

    /// Sets `batch_seq`, and `total_batches = seq + 1` on a final batch.
    pub(crate) fn renumber(&mut self, seq: u32) {
        let fin = self.is_final();
        if let Some(m) = self.0.as_object_mut() {
            m.insert("batch_seq".into(), seq.into());
            if fin {
                m.insert("total_batches".into(), (u64::from(seq) + 1).into());
            }
        }
    }

    /// Shortens the largest string attribute values of every span (halving the longest until
    /// the body is at most `budget` bytes or nothing long is left), marking each shortened span
    /// with `callscope.truncated_values`. Returns how many values were cut.
    pub(crate) fn shorten(&mut self, budget: usize) -> u64 {
        let mut cut = 0;
        // Each round halves the longest value: a few dozen rounds reach any budget.
        for _ in 0..64 {
            if self.to_vec().len() <= budget {
                break;
            }
            let Some(spans) = self.spans_mut() else { break };
            let mut longest: Option<(usize, String, usize)> = None;
            for (i, s) in spans.iter().enumerate() {
                let Some(attrs) = s.get("attributes").and_then(Value::as_object) else {
                    continue;
                };
                for (k, v) in attrs {
                    if let Some(t) = v.as_str()
                        && t.len() > 64
                        && longest.as_ref().is_none_or(|l| t.len() > l.2)
                    {
                        longest = Some((i, k.clone(), t.len()));
                    }
                }
            }
            let Some((i, key, len)) = longest else { break };
            let Some(attrs) = spans[i]
                .get_mut("attributes")
                .and_then(Value::as_object_mut)
            else {
                break;
            };
            if let Some(Value::String(t)) = attrs.get_mut(&key) {
                let base = t.strip_suffix(TRUNCATION_MARK).unwrap_or(t);
                let was_cut = base.len() != t.len();
                let kept = crate::call::truncate_str(base, len / 2).to_owned();
                *t = kept + TRUNCATION_MARK;
                if !was_cut {
                    cut += 1;
                    let n = attrs
                        .get(TRUNCATED_VALUES_KEY)
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    attrs.insert(TRUNCATED_VALUES_KEY.into(), (n + 1).into());
                }
            }
        }
        cut
    }

    /// The body again.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn doc(n: usize, last: bool) -> DetailDoc {
        let spans: Vec<Value> = (0..n)
            .map(|i| serde_json::json!({"span_id": format!("{i:016}"), "attributes": {"big": "x".repeat(1000), "n": i}}))
            .collect();
        let mut v = serde_json::json!({"schema_version": 1, "call_id": "c", "batch_seq": 3,
            "update_type": "detailed_telemetry", "final": last,
            "telemetry_data": {"session_traces": spans}});
        if last {
            v["total_batches"] = 4.into();
            v["transcript_with_metrics"] = serde_json::json!([{"turn": 1}]);
        }
        DetailDoc::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    #[test]
    fn splitting_a_final_keeps_one_final_with_the_second_half() {
        let (a, mut b) = doc(5, true).split().unwrap();
        assert_eq!((a.span_count(), b.span_count()), (2, 3));
        assert!(!a.is_final());
        assert!(a.0.get("total_batches").is_none() && a.0.get("transcript_with_metrics").is_none());
        assert!(b.is_final());
        b.renumber(7);
        assert_eq!(b.0["batch_seq"], 7);
        assert_eq!(b.0["total_batches"], 8);
        assert!(doc(1, false).split().is_none());
        assert!(DetailDoc::parse(b"{\"a\":1}").is_none());
        assert!(DetailDoc::parse(b"not json").is_none());
    }

    #[test]
    fn shortening_a_lone_span_marks_and_counts() {
        let mut d = doc(1, false);
        let before = d.to_vec().len();
        let cut = d.shorten(600);
        assert_eq!(cut, 1);
        let after = d.to_vec();
        assert!(
            after.len() <= 600 && after.len() < before,
            "{}",
            after.len()
        );
        let span = &d.0["telemetry_data"]["session_traces"][0];
        assert_eq!(span["attributes"][TRUNCATED_VALUES_KEY], 1);
        assert!(
            span["attributes"]["big"]
                .as_str()
                .unwrap()
                .ends_with(TRUNCATION_MARK)
        );
        // Nothing long left to cut: the budget cannot be met, and it stops.
        assert_eq!(d.shorten(10), 0);
    }

    fn span(i: usize, len: usize) -> Vec<u8> {
        let body = format!("{{\"i\":{i},\"p\":\"");
        let mut v = body.into_bytes();
        v.resize(len.max(v.len() + 2) - 2, b'x');
        v.extend_from_slice(b"\"}");
        v
    }

    fn ids(list: &SpanList) -> Vec<u64> {
        let json = format!("[{}]", String::from_utf8_lossy(&list.bytes));
        let v: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        v.iter().map(|s| s["i"].as_u64().unwrap()).collect()
    }

    proptest! {
        /// No batch passes its budget (unless one span alone is larger), and the batches
        /// together hold every span exactly once, in order.
        #[test]
        fn batcher_never_exceeds_cap(sizes in prop::collection::vec(12usize..3000, 1..200), budget in 100usize..8000) {
            let mut buf = CallBuffer::default();
            let now = Instant::now();
            let mut batches = Vec::new();
            for (i, len) in sizes.iter().enumerate() {
                if let Some(full) = buf.push(&span(i, *len), budget, now) {
                    batches.push(full);
                }
            }
            batches.push(buf.take());
            let mut seen = Vec::new();
            for b in &batches {
                prop_assert!(b.bytes.len() <= budget || b.len() == 1, "batch of {} bytes, budget {}", b.bytes.len(), budget);
                seen.extend(ids(b));
            }
            prop_assert_eq!(seen, (0..sizes.len() as u64).collect::<Vec<_>>());
        }
    }
}
