//! A small latency histogram for per-operation percentiles: four buckets per power of two of
//! microseconds (each bucket at most 25 % wide, so an estimate is within ~12.5 % of the truth),
//! from 64 µs to ~268 s, with 16-bit counts. Allocated on the first span of an operation.

use std::time::Duration;

/// Buckets below this power of two of µs go to the underflow bucket.
const MIN_OCTAVE: u32 = 6;
/// Powers of two covered.
const OCTAVES: u32 = 22;
/// Buckets per power of two.
const SUB: u32 = 4;
/// Underflow + covered + overflow.
const BUCKETS: usize = (OCTAVES * SUB) as usize + 2;

/// Counts of durations per logarithmic bucket.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    counts: Option<Box<[u16; BUCKETS]>>,
}

fn bucket(us: u64) -> usize {
    if us < 1 << MIN_OCTAVE {
        return 0;
    }
    let oct = 63 - us.leading_zeros();
    if oct >= MIN_OCTAVE + OCTAVES {
        return BUCKETS - 1;
    }
    // the two bits after the leading one
    let sub = ((us >> (oct - 2)) & 3) as u32;
    (1 + (oct - MIN_OCTAVE) * SUB + sub) as usize
}

/// Lower and upper bound (µs) of bucket `i`; the overflow bucket's upper bound is `u64::MAX`.
fn bounds(i: usize) -> (u64, u64) {
    if i == 0 {
        return (0, 1 << MIN_OCTAVE);
    }
    if i == BUCKETS - 1 {
        return (1 << (MIN_OCTAVE + OCTAVES), u64::MAX);
    }
    let k = (i - 1) as u32;
    let oct = MIN_OCTAVE + k / SUB;
    let step = 1u64 << (oct - 2);
    let lo = (1u64 << oct) + u64::from(k % SUB) * step;
    (lo, lo + step)
}

impl Histogram {
    /// Counts one duration.
    #[inline]
    pub(crate) fn add(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let c = self.counts.get_or_insert_with(|| Box::new([0; BUCKETS]));
        let slot = &mut c[bucket(us)];
        *slot = slot.saturating_add(1);
    }

    /// Adds another histogram's counts.
    pub(crate) fn merge(&mut self, o: &Histogram) {
        let Some(oc) = &o.counts else { return };
        let c = self.counts.get_or_insert_with(|| Box::new([0; BUCKETS]));
        for (a, b) in c.iter_mut().zip(oc.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile (0..=1) in ms: the middle of the bucket holding that rank, kept within
    /// `[min_ms, max_ms]` (the exact extremes). `None` when empty.
    pub(crate) fn quantile_ms(&self, q: f64, min_ms: f64, max_ms: f64) -> Option<f64> {
        let c = self.counts.as_ref()?;
        let total: u64 = c.iter().map(|n| u64::from(*n)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, n) in c.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                let (lo, hi) = bounds(i);
                let mid_us = if hi == u64::MAX {
                    lo as f64
                } else {
                    (lo + hi) as f64 / 2.0
                };
                return Some((mid_us / 1000.0).clamp(min_ms, max_ms));
            }
        }
        Some(max_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut prev_hi = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i}");
            assert!(hi > lo);
            prev_hi = hi;
            if hi != u64::MAX {
                assert_eq!(bucket(lo), i);
                assert_eq!(bucket(hi - 1), i);
            }
        }
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(Histogram::default().quantile_ms(0.5, 0.0, 1.0), None);
    }

    proptest! {
        /// Every quantile estimate is within the relative width of its bucket of the exact value
        /// of that rank (for durations in the covered range).
        #[test]
        fn quantiles_are_close_to_exact(ms in prop::collection::vec(0.1f64..200_000.0, 1..400), q in 0.0f64..1.0) {
            let mut h = Histogram::default();
            for m in &ms {
                h.add(Duration::from_secs_f64(m / 1000.0));
            }
            let mut sorted = ms.clone();
            sorted.sort_by(f64::total_cmp);
            let rank = ((q * ms.len() as f64).ceil() as usize).max(1);
            let exact = sorted[rank - 1];
            let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
            let est = h.quantile_ms(q, min, max).unwrap();
            // bucket width ≤ 25 %: the midpoint is within 12.5 % of the bucket's values (plus
            // the 64 µs underflow bucket, and µs rounding)
            prop_assert!((est - exact).abs() <= exact * 0.13 + 0.065, "q {q}: {est} vs {exact}");
        }
    }
}
