//! A small, fast hasher for the hot path's maps (trace id → call, call id → state, span id →
//! turn accumulator). std's SipHash costs ~100 instructions per lookup; this is a
//! multiply-rotate mix over 8-byte words, seeded per process so that keys chosen from outside
//! (call ids) cannot be made to collide offline. Not for untrusted input at large.

use std::hash::{BuildHasher, Hasher};

const K: u64 = 0xf135_7aea_2e62_a9c5;

/// Builds [`FastHasher`]s sharing one random seed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastState {
    seed: u64,
}

impl Default for FastState {
    fn default() -> Self {
        FastState {
            seed: fastrand::u64(..),
        }
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher { h: self.seed }
    }
}

/// See the module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastHasher {
    h: u64,
}

impl FastHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(K).rotate_left(26);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // Spread the last word's bits over the high bits too (DashMap picks shards by them).
        let h = self.h.wrapping_mul(K);
        h ^ (h >> 32)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.add(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn sequential_ids_spread_over_high_and_low_bits() {
        let s = FastState::default();
        let hs: Vec<u64> = (0u128..4096).map(|i| s.hash_one(i)).collect();
        let low: HashSet<u64> = hs.iter().map(|h| h & 0xfff).collect();
        let high: HashSet<u64> = hs.iter().map(|h| h >> 52).collect();
        assert!(low.len() > 2000, "{}", low.len());
        assert!(high.len() > 2000, "{}", high.len());
        assert_ne!(s.hash_one("call-1"), s.hash_one("call-2"));
        assert_ne!(s.hash_one("ab"), s.hash_one("ab\0"));
    }
}
