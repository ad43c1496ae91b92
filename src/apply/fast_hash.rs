//! A cheap hash for the applier's per-change lookups, instead of the standard library's
//! SipHash, which was ~5 % of a sidecar's instructions per applied row (counted with
//! callgrind, docs/benchmarks.md): FxHash's step (as rustc uses), a word at a time, with
//! the golden-ratio multiplier, which spreads consecutive relation ids evenly over the
//! top bits that hashbrown keeps as a tag (FxHash's own constant, close to 1/π, left
//! 128 consecutive ids only ~60 of 128 tags).
//!
//! Unlike SipHash it is not keyed, so whoever chooses many keys can make them collide.
//! It is used only where that costs nothing worth having: keys nobody writes (relation
//! ids, which the upstream's PostgreSQL assigns; origin names, from the configuration;
//! statement shapes, which the applier makes from a relation's columns) and sets bounded
//! by a small constant (the row keys of one run of at most 128 changes, where even keys
//! that all collide cost a few thousand comparisons).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub(super) type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Default, Clone, Copy)]
pub(super) struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(t: &T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(t)
    }

    #[test]
    fn consecutive_relation_ids_spread_over_the_top_bits_hashbrown_groups_by() {
        // hashbrown keeps the top 7 bits of a hash as a tag: OIDs made one after another
        // must not share it.
        let tags: HashSet<u64> = (16_384u32..16_512).map(|id| hash(&id) >> 57).collect();
        assert!(tags.len() > 100, "{} distinct tags of 128", tags.len());
    }

    #[test]
    fn byte_strings_that_differ_only_in_their_last_partial_word_differ() {
        assert_ne!(
            hash(&b"order-000000001".to_vec()),
            hash(&b"order-000000002".to_vec())
        );
        assert_ne!(hash(&b"ab".to_vec()), hash(&b"ab\0".to_vec()));
    }
}
