//! The project's content digest, defined so that a GPU can compute it in parallel and the CPU
//! can reproduce it bit for bit.
//!
//! Definition: split the bytes into [`CHUNK_BYTES`] chunks (the last one may be shorter; empty
//! input has zero chunks), take xxh64 (seed 0) of each chunk, and the digest is xxh64 (seed 0)
//! of the chunk digests concatenated as 8-byte little-endian words.

use std::fmt;

use xxhash_rust::xxh64::{xxh64, Xxh64};

/// Size of one digest chunk; one GPU work item hashes one chunk.
pub const CHUNK_BYTES: usize = 4096;

const SEED: u64 = 0;

fn chunk_digest(chunk: &[u8]) -> u64 {
    xxh64(chunk, SEED)
}

/// Digest of a whole byte region.
pub fn digest(bytes: &[u8]) -> u64 {
    // Stream chunk digests into the outer hasher so large regions need no allocation.
    let mut outer = Xxh64::new(SEED);
    for chunk in bytes.chunks(CHUNK_BYTES) {
        outer.update(&chunk_digest(chunk).to_le_bytes());
    }
    outer.digest()
}

/// Per-chunk digests of a region (what a GPU kernel produces before combining).
pub fn chunk_digests(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks(CHUNK_BYTES).map(chunk_digest).collect()
}

/// Combine chunk digests as the definition says.
pub fn combine(chunk_digests: &[u64]) -> u64 {
    let mut outer = Xxh64::new(SEED);
    for d in chunk_digests {
        outer.update(&d.to_le_bytes());
    }
    outer.digest()
}

/// Digest of bytes arriving in arbitrary pieces (e.g. a tensor written bucket by bucket);
/// equals [`digest`] of the concatenation.
///
/// Full chunks are hashed straight from the input slice; only a trailing partial chunk
/// (fewer than [`CHUNK_BYTES`] bytes) is buffered until more bytes arrive.
#[derive(Clone)]
pub struct Digester {
    outer: Xxh64,
    /// Always shorter than `CHUNK_BYTES` between calls: a chunk is hashed as soon as it is full.
    partial: Vec<u8>,
    bytes_seen: u64,
}

impl Digester {
    pub fn new() -> Self {
        Digester { outer: Xxh64::new(SEED), partial: Vec::new(), bytes_seen: 0 }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.bytes_seen += bytes.len() as u64;

        // Top up a pending partial chunk first so chunk boundaries stay where digest() puts them.
        if !self.partial.is_empty() {
            let take = (CHUNK_BYTES - self.partial.len()).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.partial.extend_from_slice(head);
            bytes = rest;
            if self.partial.len() < CHUNK_BYTES {
                return;
            }
            self.outer.update(&chunk_digest(&self.partial).to_le_bytes());
            self.partial.clear();
        }

        let mut chunks = bytes.chunks_exact(CHUNK_BYTES);
        for chunk in &mut chunks {
            self.outer.update(&chunk_digest(chunk).to_le_bytes());
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    /// Total number of bytes passed to [`update`](Self::update) so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Digest of everything seen so far. Takes `&self` so callers can peek and keep going.
    pub fn finish(&self) -> u64 {
        if self.partial.is_empty() {
            return self.outer.digest();
        }
        // The pending partial chunk is the last chunk only if nothing else arrives, so hash it
        // into a copy of the outer state rather than into the real one.
        let mut outer = self.outer.clone();
        outer.update(&chunk_digest(&self.partial).to_le_bytes());
        outer.digest()
    }
}

impl Default for Digester {
    fn default() -> Self {
        Self::new()
    }
}

// Xxh64 does not implement Debug, so show the parts that matter.
impl fmt::Debug for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digester")
            .field("bytes_seen", &self.bytes_seen)
            .field("partial_len", &self.partial.len())
            .field("digest_so_far", &self.finish())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// The definition written out naively, independent of the streaming code above.
    fn reference(bytes: &[u8]) -> u64 {
        let mut concat = Vec::new();
        let mut start = 0;
        while start < bytes.len() {
            let end = (start + 4096).min(bytes.len());
            concat.extend_from_slice(&xxh64(&bytes[start..end], 0).to_le_bytes());
            start = end;
        }
        xxh64(&concat, 0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[test]
    fn empty_input_is_xxh64_of_nothing() {
        assert_eq!(digest(&[]), xxh64(&[], 0));
        assert!(chunk_digests(&[]).is_empty());
        assert_eq!(combine(&[]), xxh64(&[], 0));
        assert_eq!(Digester::new().finish(), xxh64(&[], 0));
    }

    #[test]
    fn edge_lengths_match_reference() {
        for len in [1, 4095, 4096, 4097, 3 * 4096] {
            let bytes = pattern(len);
            let want = reference(&bytes);
            assert_eq!(digest(&bytes), want, "digest, len {len}");
            assert_eq!(combine(&chunk_digests(&bytes)), want, "combine, len {len}");
            let mut d = Digester::new();
            d.update(&bytes);
            assert_eq!(d.finish(), want, "Digester, len {len}");
        }
    }

    #[test]
    fn one_byte_is_hash_of_its_chunk_digest() {
        let inner = xxh64(&[0xAB], 0);
        assert_eq!(digest(&[0xAB]), xxh64(&inner.to_le_bytes(), 0));
        // The definition hashes twice, so it must differ from plain xxh64.
        assert_ne!(digest(&[0xAB]), inner);
    }

    #[test]
    fn chunk_counts_follow_chunk_size() {
        assert_eq!(chunk_digests(&pattern(1)).len(), 1);
        assert_eq!(chunk_digests(&pattern(4096)).len(), 1);
        assert_eq!(chunk_digests(&pattern(4097)).len(), 2);
        assert_eq!(chunk_digests(&pattern(3 * 4096)).len(), 3);
        let bytes = pattern(4097);
        assert_eq!(chunk_digests(&bytes)[1], xxh64(&bytes[4096..], 0));
    }

    #[test]
    fn bytes_seen_counts_every_piece() {
        let mut d = Digester::new();
        assert_eq!(d.bytes_seen(), 0);
        let mut total = 0u64;
        for len in [0, 1, 4095, 4096, 10_000, 3] {
            d.update(&pattern(len));
            total += len as u64;
            assert_eq!(d.bytes_seen(), total);
        }
        assert_eq!(total, 18_195);
    }

    #[test]
    fn finish_is_a_peek() {
        let bytes = pattern(9000);
        let mut d = Digester::new();
        d.update(&bytes[..5000]);
        assert_eq!(d.finish(), digest(&bytes[..5000]));
        assert_eq!(d.finish(), digest(&bytes[..5000]));
        d.update(&bytes[5000..]);
        assert_eq!(d.finish(), digest(&bytes));
    }

    #[test]
    fn partial_buffer_stays_below_one_chunk() {
        let mut d = Digester::new();
        for len in [1, 4095, 4096, 7000, 1] {
            d.update(&pattern(len));
            assert!(d.partial.len() < CHUNK_BYTES);
        }
    }

    proptest! {
        #[test]
        fn pieces_whole_and_chunks_agree(
            bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
            cuts in proptest::collection::vec(any::<Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut d = Digester::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                d.update(&bytes[start..cut]);
                start = cut;
            }
            let whole = digest(&bytes);
            prop_assert_eq!(d.bytes_seen(), bytes.len() as u64);
            prop_assert_eq!(d.finish(), whole);
            prop_assert_eq!(combine(&chunk_digests(&bytes)), whole);
            prop_assert_eq!(reference(&bytes), whole);
        }

        #[test]
        fn flipping_a_byte_changes_the_digest(
            bytes in proptest::collection::vec(any::<u8>(), 1..20_000),
            at in any::<Index>(),
            mask in 1u8..=255,
        ) {
            let mut flipped = bytes.clone();
            flipped[at.index(bytes.len())] ^= mask;
            prop_assert_ne!(digest(&flipped), digest(&bytes));
        }
    }
}
