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

/// The chunk digests of one piece of a tensor: computed by any thread, from the bytes at
/// `offset..offset + len` of a tensor of `tensor_len` bytes. Whole chunks are digested here;
/// the partial chunks at either end are kept as fragments for [`ChunkDigests`] to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceDigests {
    first_chunk: u64,
    digests: Vec<u64>,
    fragments: Vec<(u64, Vec<u8>)>,
}

/// Where a piece's whole chunks and partial edges lie, in bytes of its tensor: the split
/// [`PieceDigests::new`] makes, for a digester elsewhere (a GPU) to hash the whole chunks and
/// hand the edges back to [`PieceDigests::from_chunks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceLayout {
    /// Index of the first whole chunk.
    pub first_chunk: u64,
    /// Bytes of the tensor the whole chunks cover (empty when there are none): chunk-aligned
    /// at the start; at the end aligned, or the tensor's end.
    pub whole: std::ops::Range<u64>,
    /// Bytes of the tensor outside whole chunks (at most two ranges, in order).
    pub fragments: Vec<std::ops::Range<u64>>,
}

impl PieceLayout {
    /// The layout of bytes `offset..offset + len` of a tensor of `tensor_len` bytes.
    pub fn new(tensor_len: u64, offset: u64, len: u64) -> PieceLayout {
        let chunk = CHUNK_BYTES as u64;
        let end = offset + len;
        // Whole chunks: those starting inside the piece that also end inside it (the last
        // chunk of the tensor may be short).
        let first_chunk = offset.div_ceil(chunk);
        let mut c = first_chunk;
        while c * chunk < end && (c * chunk + chunk).min(tensor_len) <= end {
            c += 1;
        }
        let whole = if c == first_chunk { offset..offset } else { first_chunk * chunk..(c * chunk).min(tensor_len) };
        let mut fragments = Vec::new();
        if whole.is_empty() {
            if len > 0 {
                fragments.push(offset..end);
            }
        } else {
            if offset < whole.start {
                fragments.push(offset..whole.start);
            }
            if whole.end < end {
                fragments.push(whole.end..end);
            }
        }
        PieceLayout { first_chunk, whole, fragments }
    }

    /// How many whole chunks the piece holds.
    pub fn chunks(&self) -> u64 {
        (self.whole.end - self.whole.start).div_ceil(CHUNK_BYTES as u64)
    }
}

impl PieceDigests {
    pub fn new(tensor_len: u64, offset: u64, bytes: &[u8]) -> PieceDigests {
        let layout = PieceLayout::new(tensor_len, offset, bytes.len() as u64);
        let at = |r: &std::ops::Range<u64>| &bytes[(r.start - offset) as usize..(r.end - offset) as usize];
        let digests = at(&layout.whole).chunks(CHUNK_BYTES).map(chunk_digest).collect();
        let fragments = layout.fragments.iter().map(|r| (r.start, at(r).to_vec())).collect();
        PieceDigests { first_chunk: layout.first_chunk, digests, fragments }
    }

    /// A piece whose whole chunks were digested elsewhere: `digests` are the chunk digests of
    /// `layout.whole` (one per chunk, in order) and `fragments` the bytes of
    /// `layout.fragments`, in order. None when the counts or lengths disagree with the layout.
    pub fn from_chunks(layout: &PieceLayout, digests: Vec<u64>, fragments: Vec<Vec<u8>>) -> Option<PieceDigests> {
        let lengths_agree = fragments.len() == layout.fragments.len()
            && fragments.iter().zip(&layout.fragments).all(|(b, r)| b.len() as u64 == r.end - r.start);
        (digests.len() as u64 == layout.chunks() && lengths_agree).then(|| PieceDigests {
            first_chunk: layout.first_chunk,
            digests,
            fragments: layout.fragments.iter().map(|r| r.start).zip(fragments).collect(),
        })
    }
}

/// A tensor's digest gathered from [`PieceDigests`] in any order: whole chunks as they come,
/// partial chunks once all their fragments have arrived. Chunk digests are folded into the
/// outer hash as soon as they are next in line, so memory stays small when pieces arrive
/// roughly in order (as executors deliver them), however large the tensor.
#[derive(Clone)]
pub struct ChunkDigests {
    len: u64,
    chunks: u64,
    /// Chunks folded into `outer` so far: all chunks before this index.
    next: u64,
    outer: Xxh64,
    /// Chunk digests that arrived ahead of `next`: slot `i` holds chunk `next + i`. A window
    /// rather than a map: constant time a chunk, which a MoE model's millions of chunks
    /// arriving out of order need.
    waiting: std::collections::VecDeque<Option<u64>>,
    /// Fragments of chunks not yet complete, by chunk index: (offset in tensor, bytes).
    pending: std::collections::HashMap<u64, Vec<(u64, Vec<u8>)>>,
}

impl fmt::Debug for ChunkDigests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkDigests")
            .field("len", &self.len)
            .field("folded", &self.next)
            .field("waiting", &self.waiting.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ChunkDigests {
    pub fn new(tensor_len: u64) -> ChunkDigests {
        ChunkDigests {
            len: tensor_len,
            chunks: tensor_len.div_ceil(CHUNK_BYTES as u64),
            next: 0,
            outer: Xxh64::new(SEED),
            waiting: Default::default(),
            pending: Default::default(),
        }
    }

    pub fn add(&mut self, piece: PieceDigests) {
        for (i, d) in piece.digests.into_iter().enumerate() {
            self.chunk_done(piece.first_chunk + i as u64, d);
        }
        let chunk = CHUNK_BYTES as u64;
        for (offset, bytes) in piece.fragments {
            // A fragment may span the end of one chunk and the start of the next when the
            // piece is smaller than a chunk: file each part under its own chunk.
            let mut at = offset;
            let mut rest: &[u8] = &bytes;
            while !rest.is_empty() {
                let c = at / chunk;
                let take = ((c + 1) * chunk - at).min(rest.len() as u64) as usize;
                let list = self.pending.entry(c).or_default();
                list.push((at, rest[..take].to_vec()));
                let chunk_len = ((c + 1) * chunk).min(self.len) - c * chunk;
                if list.iter().map(|(_, b)| b.len() as u64).sum::<u64>() == chunk_len {
                    let mut parts = self.pending.remove(&c).expect("just inserted");
                    parts.sort_unstable_by_key(|(o, _)| *o);
                    let whole: Vec<u8> = parts.into_iter().flat_map(|(_, b)| b).collect();
                    self.chunk_done(c, chunk_digest(&whole));
                }
                at += take as u64;
                rest = &rest[take..];
            }
        }
    }

    fn chunk_done(&mut self, index: u64, digest: u64) {
        // A chunk already folded cannot come again (pieces do not overlap); nor can one past
        // the tensor's end.
        if index < self.next || index >= self.chunks {
            return;
        }
        let at = (index - self.next) as usize;
        if at >= self.waiting.len() {
            self.waiting.resize(at + 1, None);
        }
        self.waiting[at] = Some(digest);
        while let Some(Some(d)) = self.waiting.front() {
            self.outer.update(&d.to_le_bytes());
            self.next += 1;
            self.waiting.pop_front();
        }
    }

    /// The tensor's digest, or None while some chunk is missing.
    pub fn finish(&self) -> Option<u64> {
        (self.next == self.chunks).then(|| self.outer.digest())
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

    proptest! {
        /// Pieces of a tensor digested separately, fed in any order, give the same digest.
        #[test]
        fn pieces_in_any_order_give_the_whole_digest(
            len in 0usize..20_000,
            cuts in prop::collection::vec(0usize..20_000, 0..12),
            seed in any::<u64>(),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1).rotate_left(17) as u8).collect();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            bounds.extend([0, len]);
            bounds.sort_unstable();
            bounds.dedup();
            let mut pieces: Vec<PieceDigests> = bounds.windows(2)
                .map(|w| PieceDigests::new(len as u64, w[0] as u64, &bytes[w[0]..w[1]]))
                .collect();
            pieces.reverse();
            let third = pieces.len() / 3;
            pieces.rotate_left(third);
            let mut acc = ChunkDigests::new(len as u64);
            for p in pieces {
                acc.add(p);
            }
            prop_assert_eq!(acc.finish(), Some(digest(&bytes)));
        }
    }

    proptest! {
        /// A piece digested elsewhere from its layout equals the piece digested here.
        #[test]
        fn pieces_from_chunks_equal_pieces_digested_here(
            len in 0u64..20_000,
            a in 0u64..20_001,
            b in 0u64..20_001,
        ) {
            let (start, end) = (a.min(b) % (len + 1), a.max(b) % (len + 1));
            let (start, end) = (start.min(end), start.max(end));
            let bytes: Vec<u8> = (0..len).map(|i| (i * 131 + i / 4093) as u8).collect();
            let layout = PieceLayout::new(len, start, end - start);
            let whole = &bytes[layout.whole.start as usize..layout.whole.end as usize];
            let fragments = layout.fragments.iter().map(|r| bytes[r.start as usize..r.end as usize].to_vec()).collect();
            let built = PieceDigests::from_chunks(&layout, chunk_digests(whole), fragments);
            prop_assert_eq!(built, Some(PieceDigests::new(len, start, &bytes[start as usize..end as usize])));
            let covered = (layout.whole.end - layout.whole.start)
                + layout.fragments.iter().map(|r| r.end - r.start).sum::<u64>();
            prop_assert_eq!(covered, end - start);
        }
    }

    #[test]
    fn from_chunks_refuses_a_layout_it_does_not_match() {
        let layout = PieceLayout::new(10_000, 100, 9_000);
        assert_eq!((layout.whole.clone(), layout.chunks()), (4096..8192, 1));
        assert_eq!(layout.fragments, vec![100..4096, 8192..9100]);
        assert_eq!(PieceDigests::from_chunks(&layout, vec![1, 2], vec![vec![0; 3996], vec![0; 908]]), None);
        assert_eq!(PieceDigests::from_chunks(&layout, vec![1], vec![vec![0; 3996]]), None);
        assert_eq!(PieceDigests::from_chunks(&layout, vec![1], vec![vec![0; 3996], vec![0; 907]]), None);
        assert!(PieceDigests::from_chunks(&layout, vec![1], vec![vec![0; 3996], vec![0; 908]]).is_some());
    }

    #[test]
    fn a_missing_piece_leaves_the_digest_unknown() {
        let bytes = vec![7u8; 10_000];
        let mut acc = ChunkDigests::new(10_000);
        acc.add(PieceDigests::new(10_000, 0, &bytes[..6000]));
        assert_eq!(acc.finish(), None);
        acc.add(PieceDigests::new(10_000, 6000, &bytes[6000..]));
        assert_eq!(acc.finish(), Some(digest(&bytes)));
    }
}
