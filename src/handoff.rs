//! The hand-off of span detail from the app's threads to the worker.
//!
//! A channel send per span costs the caller a write to cache lines the worker thread reads
//! (the channel's indices and its slot), which is most of what the SDK's `BatchSpanProcessor`
//! costs per span. Here each app thread appends to its own stripe (a mutex nobody else takes,
//! save the worker when it sweeps) and ships a whole chunk through the bounded channel once the
//! stripe holds `chunk` spans: per span, one uncontended lock and a push.
//!
//! Spans left in a stripe are taken by the worker's [`Stripes::sweep`]: on every tick (so a
//! quiet thread's spans wait at most one tick), and before it handles a call end, a flush or
//! shutdown. Ordering: a chunk is sent and counted in [`Stripes::shipped`] while its stripe is
//! locked, so after a sweep, every span pushed before the sweep began was either swept or is
//! counted in `shipped` — which is the mark the worker waits for.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most spans gathered per chunk.
pub(crate) const MAX_CHUNK: usize = 64;

/// One stripe, on its own cache lines so two threads' stripes never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe<T>(Mutex<Vec<T>>);

/// The stripes, shared by the processor (pushes) and the worker (sweeps).
#[derive(Debug)]
pub(crate) struct Stripes<T> {
    stripes: Box<[Stripe<T>]>,
    /// Spans shipped through the channel so far (counted under the stripe's lock).
    shipped: AtomicU64,
}

/// The processor's side: the stripes and the sending end of the chunk channel.
#[derive(Debug)]
pub(crate) struct Handoff<T> {
    pub stripes: Arc<Stripes<T>>,
    tx: SyncSender<Vec<T>>,
    chunk: usize,
}

/// What became of a pushed span.
#[derive(Debug)]
pub(crate) enum Pushed<T> {
    /// Kept in the stripe.
    Kept,
    /// The stripe's chunk went to the worker; `shipped` spans have been shipped so far.
    Shipped { shipped: u64 },
    /// The channel was full (or closed): this chunk could not be shipped; the caller counts
    /// and drops it (outside the lock).
    Refused { chunk: Vec<T>, closed: bool },
}

fn lock<T>(m: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
    // Pushing to a Vec cannot leave it inconsistent: a poisoned stripe is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe number (taken on its first span, round robin over threads).
    static THREAD_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn thread_slot() -> usize {
    THREAD_SLOT.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
        s.set(v);
        v
    })
}

/// Chunk size for a queue of `queue_size` spans: the channel holds `queue_size / chunk` chunks,
/// and a small queue gets small chunks (a queue of one ships every span).
pub(crate) fn chunk_for(queue_size: usize) -> usize {
    (queue_size / 16).clamp(1, MAX_CHUNK)
}

/// A hand-off for `queue_size` spans in flight through the channel (plus at most one chunk per
/// stripe gathering), and the worker's receiving end.
pub(crate) fn new<T>(queue_size: usize) -> (Handoff<T>, Receiver<Vec<T>>) {
    let chunk = chunk_for(queue_size);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let n = (threads * 4).next_power_of_two().clamp(4, 64);
    let (tx, rx) = sync_channel((queue_size / chunk).max(1));
    let stripes = Arc::new(Stripes {
        stripes: (0..n).map(|_| Stripe(Mutex::new(Vec::new()))).collect(),
        shipped: AtomicU64::new(0),
    });
    (Handoff { stripes, tx, chunk }, rx)
}

impl<T> Handoff<T> {
    /// Appends `item` to the calling thread's stripe; ships the stripe's chunk when full.
    /// Never blocks on anything but that stripe's lock (held for a push, or a `try_send`).
    #[inline]
    pub(crate) fn push(&self, item: T) -> Pushed<T> {
        let s = &self.stripes.stripes[thread_slot() & (self.stripes.stripes.len() - 1)];
        let mut g = lock(&s.0);
        if g.capacity() == 0 {
            g.reserve_exact(self.chunk);
        }
        g.push(item);
        if g.len() < self.chunk {
            return Pushed::Kept;
        }
        let full = std::mem::replace(&mut *g, Vec::with_capacity(self.chunk));
        let n = full.len() as u64;
        match self.tx.try_send(full) {
            Ok(()) => {
                let shipped = self.stripes.shipped.fetch_add(n, Ordering::SeqCst) + n;
                drop(g);
                Pushed::Shipped { shipped }
            }
            Err(TrySendError::Full(chunk)) => Pushed::Refused {
                chunk,
                closed: false,
            },
            Err(TrySendError::Disconnected(chunk)) => Pushed::Refused {
                chunk,
                closed: true,
            },
        }
    }
}

impl<T> Stripes<T> {
    /// Spans shipped through the channel so far.
    pub(crate) fn shipped(&self) -> u64 {
        self.shipped.load(Ordering::SeqCst)
    }

    /// Takes every span waiting in a stripe, stripe by stripe (each lock held only for the
    /// take), and hands them to `f`. Returns how many.
    pub(crate) fn sweep(&self, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        for s in self.stripes.iter() {
            let taken = {
                let mut g = lock(&s.0);
                if g.is_empty() {
                    continue;
                }
                let cap = g.capacity();
                std::mem::replace(&mut *g, Vec::with_capacity(cap))
            };
            n += taken.len();
            taken.into_iter().for_each(&mut f);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_stripe_ships_one_chunk_and_counts_it() {
        let (h, rx) = new::<u32>(64);
        let chunk = chunk_for(64);
        assert_eq!(chunk, 4);
        for i in 0..chunk as u32 - 1 {
            assert!(matches!(h.push(i), Pushed::Kept));
        }
        assert!(rx.try_recv().is_err());
        assert!(matches!(h.push(99), Pushed::Shipped { shipped: 4 }));
        assert_eq!(rx.try_recv().unwrap(), vec![0, 1, 2, 99]);
        assert_eq!(h.stripes.shipped(), 4);
    }

    #[test]
    fn a_full_channel_refuses_the_chunk_and_keeps_accepting() {
        let (h, rx) = new::<u32>(16); // chunk 1, channel of 16 chunks
        for i in 0..16 {
            assert!(matches!(h.push(i), Pushed::Shipped { .. }));
        }
        match h.push(16) {
            Pushed::Refused { chunk, closed } => {
                assert_eq!(chunk, vec![16]);
                assert!(!closed);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(h.stripes.shipped(), 16);
        drop(rx);
        assert!(matches!(h.push(17), Pushed::Refused { closed: true, .. }));
    }

    #[test]
    fn sweep_takes_what_every_thread_left_behind() {
        let (h, _rx) = new::<u32>(1 << 16); // chunk 64: nothing ships
        let h = Arc::new(h);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..10 {
                        assert!(matches!(h.push(t * 100 + i), Pushed::Kept));
                    }
                });
            }
        });
        let mut got = Vec::new();
        assert_eq!(h.stripes.sweep(|v| got.push(v)), 40);
        got.sort_unstable();
        let want: Vec<u32> = (0..4).flat_map(|t| (0..10).map(move |i| t * 100 + i)).collect();
        assert_eq!(got, want);
        assert_eq!(h.stripes.sweep(|_| {}), 0);
    }
}
