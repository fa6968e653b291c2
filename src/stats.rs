//! Counters kept by the processor and the snapshot [`Stats`] that `stats()` returns.
//!
//! Every drop, truncation and give-up increments a counter here; nothing is lost silently.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots of a [`Striped`] counter.
const STRIPES: usize = 8;

/// A counter every span updates, kept in one slot per app thread (threads share slots round
/// robin past [`STRIPES`]): a single atomic would move its cache line between cores on every
/// span when two threads record at once.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

/// One slot on its own cache line (two, for adjacent-line prefetch).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    /// Adds one in this thread's slot.
    #[inline]
    pub(crate) fn inc(&self) {
        self.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The sum of the slots.
    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

/// This thread's slot, handed out round robin at its first span.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    SLOT.with(|s| *s)
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of the processor's counters, taken by
        /// [`CallSpanProcessor::stats`](crate::CallSpanProcessor::stats).
        ///
        /// Counters only grow; `calls_open` is the number of calls open at the snapshot.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            /// Calls open (spans seen, not yet ended) at the time of the snapshot.
            pub calls_open: u64,
            $( $(#[$doc])* pub $name: u64, )*
        }

        /// The live counters behind [`Stats`].
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: AtomicU64, )*
            /// Where `on_end` counts `spans_seen` (added to the field of that name).
            pub(crate) seen: Striped,
            /// Where `on_end` counts `detail_spans_filtered` (every span, under
            /// `CALLSCOPE_DETAIL=none`).
            pub(crate) filtered: Striped,
        }

        impl Counters {
            pub(crate) fn snapshot(&self, calls_open: u64) -> Stats {
                let mut s = Stats {
                    calls_open,
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                };
                s.spans_seen += self.seen.sum();
                s.detail_spans_filtered += self.filtered.sum();
                s
            }
        }
    };
}

counters! {
    /// Spans handed to `on_end` while enabled.
    spans_seen,
    /// Calls opened (first span of a call id seen).
    calls_started,
    /// Calls ended because their root span ended (`end_reason: "root_span_ended"`).
    calls_ended_root,
    /// Calls ended after `CALLSCOPE_CALL_IDLE_TIMEOUT_MS` without a span (`"idle_timeout"`).
    calls_ended_idle,
    /// Calls ended by `shutdown` (`"shutdown"`).
    calls_ended_shutdown,
    /// Calls ended early because `CALLSCOPE_MAX_OPEN_CALLS` was reached (`"evicted"`).
    calls_ended_evicted,
    /// Provisional calls (keyed by trace id) joined into the call whose id showed up later.
    calls_joined,
    /// Core summaries acknowledged by the receiver.
    summaries_sent,
    /// Core summaries given up on (rejected, retries exhausted, or shutdown timed out).
    summaries_failed,
    /// Ended calls whose summary was dropped because more than `CALLSCOPE_MAX_OPEN_CALLS`
    /// ended calls were already waiting for the worker (a flood of call ends); also in
    /// `summaries_failed`.
    summaries_dropped_backlog,
    /// Core summaries whose transcript was shortened to fit `CALLSCOPE_MAX_SUMMARY_BYTES`.
    summaries_truncated,
    /// Detail batches acknowledged by the receiver.
    detail_batches_sent,
    /// Detail batches given up on.
    detail_batches_failed,
    /// Spans in acknowledged detail batches.
    detail_spans_sent,
    /// Spans not sent as detail because of `CALLSCOPE_DETAIL` (`critical` or `none`): by choice, not loss.
    detail_spans_filtered,
    /// Spans whose detail was dropped because the worker queue was full: `CALLSCOPE_QUEUE_SIZE`
    /// spans, or the byte bound on packed spans not yet serialised (half of
    /// `CALLSCOPE_MAX_BUFFER_BYTES`, or 512 bytes per `CALLSCOPE_QUEUE_SIZE` span if more).
    spans_dropped_queue_full,
    /// Spans whose detail was dropped because pending detail passed `CALLSCOPE_MAX_BUFFER_BYTES`
    /// (no spool set).
    spans_dropped_buffer_full,
    /// Spans in detail batches that were given up on.
    spans_dropped_send_failed,
    /// Spans ended after `shutdown` (ignored).
    spans_dropped_after_shutdown,
    /// Spans that arrived for a call that had already ended (sent as late detail).
    late_spans,
    /// Request bodies sent, as bytes on the wire (after compression), acknowledged or not.
    bytes_sent,
    /// Request bodies before compression.
    bytes_uncompressed,
    /// Detail bodies sent as plain JSON under `CALLSCOPE_COMPRESSION=auto` because compressing
    /// cost uploads more time than the bytes it saves while pending detail was past 7/8 of
    /// `CALLSCOPE_MAX_BUFFER_BYTES`.
    detail_bodies_uncompressed,
    /// Detail bodies compressed at `CALLSCOPE_GZIP_LEVEL_MAX` (compression had CPU to spare)
    /// rather than at `CALLSCOPE_GZIP_LEVEL`.
    detail_bodies_level_raised,
    /// HTTP requests retried.
    requests_retried,
    /// Payloads the receiver refused with a status that retrying cannot fix (400, 401, 403, 404...).
    requests_rejected,
    /// Payloads given up because `CALLSCOPE_RETRY_MAX_ELAPSED_MS` ran out.
    retry_budget_exhausted,
    /// Detail batches split in halves because the receiver answered 413.
    batches_split,
    /// Detail batches dropped (oldest first) because pending detail passed
    /// `CALLSCOPE_MAX_BUFFER_BYTES` and no spool is set; their spans are in `spans_dropped_buffer_full`.
    detail_batches_dropped_buffer_full,
    /// Spans dropped because the spool was full (`CALLSCOPE_SPOOL_MAX_BYTES`); oldest detail first.
    spans_dropped_spool_full,
    /// Payloads written to the disk spool.
    spool_records_written,
    /// Detail bodies among them written gzip-compressed, as they go on the wire (the others
    /// went as JSON and are compressed when sent: summaries, and detail bodies made while
    /// the bodies waiting for a deflate thread took 1/8 of `CALLSCOPE_MAX_BUFFER_BYTES`, or
    /// while `CALLSCOPE_COMPRESSION=auto` found compression behind).
    spool_records_compressed,
    /// Payloads read back from the spool at start (left by an earlier run or a crash).
    spool_records_replayed,
    /// Spool segments whose tail was torn or corrupt (cut off; the records before it replayed).
    spool_corrupt_tails,
    /// Spool I/O errors (the payload then stays in memory only).
    spool_errors,
    /// Detail bodies let go from memory because pending detail passed `CALLSCOPE_MAX_BUFFER_BYTES`
    /// (they stay in the spool and are read back when their turn comes).
    spool_spills,
    /// Summaries left undelivered in the spool at shutdown (sent by the next start).
    summaries_left_in_spool,
    /// Spans left undelivered in the spool at shutdown (sent by the next start).
    spans_left_in_spool,
    /// Texts (transcript lines, turn records) cut or left out to keep a call within its bounds.
    text_truncations,
    /// Attribute values shortened so a single span fits `CALLSCOPE_MAX_REQUEST_BYTES`.
    attributes_truncated,
    /// Call ids longer than 256 bytes, cut.
    call_ids_truncated,
    /// Traces left out of the trace → call index because it was full (64 traces per
    /// `CALLSCOPE_MAX_OPEN_CALLS`, at least 65,536): their spans without a call id of their own
    /// go to a call keyed by the trace id instead of the call another span named.
    traces_not_indexed,
}

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    #[inline]
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one to a counter and returns the new count when it is a power of two: where a
    /// repeated drop is logged, so that a flood of them cannot flood the log too.
    #[inline]
    pub(crate) fn inc_at_powers_of_two(c: &AtomicU64) -> Option<u64> {
        Self::add_at_powers_of_two(c, 1)
    }

    /// Adds `n` to a counter and returns the new count when it passed a power of two (see
    /// [`inc_at_powers_of_two`](Self::inc_at_powers_of_two)).
    #[inline]
    pub(crate) fn add_at_powers_of_two(c: &AtomicU64, n: u64) -> Option<u64> {
        let before = c.fetch_add(n, Ordering::Relaxed);
        let after = before.saturating_add(n);
        let passed = n > 0 && (before == 0 || after.ilog2() > before.ilog2());
        passed.then_some(after)
    }
}

impl Stats {
    /// Spans whose detail was lost for any reason (not counting `detail_spans_filtered`).
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_queue_full
            + self.spans_dropped_buffer_full
            + self.spans_dropped_send_failed
            + self.spans_dropped_after_shutdown
            + self.spans_dropped_spool_full
    }

    /// Calls ended for any reason.
    pub fn calls_ended(&self) -> u64 {
        self.calls_ended_root
            + self.calls_ended_idle
            + self.calls_ended_shutdown
            + self.calls_ended_evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_two_are_reported_once_whatever_the_step() {
        let c = AtomicU64::new(0);
        let seen: Vec<u64> = (0..20)
            .filter_map(|_| Counters::inc_at_powers_of_two(&c))
            .collect();
        assert_eq!(seen, vec![1, 2, 4, 8, 16]);
        let c = AtomicU64::new(0);
        // Steps of 3: 3 (passed 1, 2), 6 (4), 9 (8), 12, 15, 18 (16).
        let seen: Vec<u64> = (0..6)
            .filter_map(|_| Counters::add_at_powers_of_two(&c, 3))
            .collect();
        assert_eq!(seen, vec![3, 6, 9, 18]);
        assert_eq!(Counters::add_at_powers_of_two(&c, 0), None);
    }

    #[test]
    fn spans_seen_sums_every_threads_slot() {
        let c = Counters::default();
        std::thread::scope(|s| {
            for _ in 0..(STRIPES + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.seen.inc();
                    }
                });
            }
        });
        assert_eq!(c.snapshot(0).spans_seen, 1000 * (STRIPES as u64 + 3));
    }
}
