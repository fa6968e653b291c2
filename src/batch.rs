//! Byte-capped batching of serialized spans, per call. Pure: no I/O, no clock of its own.

use std::time::Instant;

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

    /// Splits into two halves by span count (for a receiver that answered 413).
    pub(crate) fn split(self) -> (SpanList, SpanList) {
        let mid = self.ends.len() / 2;
        if mid == 0 {
            return (self, SpanList::default());
        }
        let cut = self.ends[mid - 1];
        let first = SpanList {
            bytes: self.bytes[..cut].to_vec(),
            ends: self.ends[..mid].to_vec(),
        };
        // skip the comma after the cut
        let rest = &self.bytes[cut + 1..];
        let ends = self.ends[mid..].iter().map(|e| e - cut - 1).collect();
        (
            first,
            SpanList {
                bytes: rest.to_vec(),
                ends,
            },
        )
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn split_keeps_every_span_once() {
        let mut l = SpanList::default();
        for i in 0..5 {
            l.push(&span(i, 30));
        }
        let (a, b) = l.split();
        assert_eq!(ids(&a), vec![0, 1]);
        assert_eq!(ids(&b), vec![2, 3, 4]);
        assert_eq!(b.ends.last().copied(), Some(b.bytes.len()));
    }

    #[test]
    fn split_of_one_is_itself() {
        let mut l = SpanList::default();
        l.push(&span(0, 30));
        let (a, b) = l.split();
        assert_eq!(a.len(), 1);
        assert!(b.is_empty());
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
                // splitting keeps it all too
                let n = b.len();
                let (x, y) = SpanList { bytes: b.bytes.clone(), ends: b.ends.clone() }.split();
                prop_assert_eq!(x.len() + y.len(), n);
            }
            prop_assert_eq!(seen, (0..sizes.len() as u64).collect::<Vec<_>>());
        }
    }
}
