//! The work of one update that both sides do the same way: which buckets, in which order, and
//! moving bytes in cache-sized pieces, spread over threads, digesting each piece while it is
//! hot. Digests are per 4 KiB chunk, so pieces may be digested in any order on any thread.

use std::collections::HashMap;
use std::ops::Range;

use weightlift_core::digest::{self, ChunkDigests, PieceDigests, PieceLayout};
use weightlift_core::quant::Scaled;
use weightlift_core::{buckets, exec, pieces, Bucket, BucketError, CopyOp, Plan};

use weightlift_cuda::{AlignedBuffer, FileReader, ReadError, ReadMode, DIRECT_ALIGN};

use crate::tensors::{DestinationTensors, SourceTensors};

/// Bytes moved per step: small enough to still be in a core's L2 cache when digested, large
/// enough that per-piece bookkeeping stays small (256 KiB pieces measured 20% slower).
const PIECE_BYTES: u64 = 1 << 20;

/// Every core this process may run on, asked once (the answer comes from cgroup files, read
/// anew on every ask, and staging asks per bucket).
pub fn all_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads per side when none is asked for: half the cores (the other side may share the
/// host), at most 8 (beyond that memory bandwidth, not hashing, is the limit).
pub fn default_threads() -> usize {
    (all_cores() / 2).clamp(1, 8)
}

/// The buckets of one update (the plan less the skipped destinations), cut into pieces, and
/// what they write. Built when a connection starts (and again only for a delta update that
/// skips tensors), so updates themselves do no planning work.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub buckets: Vec<Bucket>,
    /// Each bucket's pieces, in payload order.
    pieces: Vec<Vec<Piece>>,
    /// Destinations this update writes.
    pub written: Vec<bool>,
    /// Destinations written front to back in contiguous runs: digested piece by piece.
    /// The others (none in the presets) are digested once complete. For a share of a plan
    /// over several senders ([`Plan::share_of`]), a destination it writes only part of is
    /// sequential when each of its ops is one contiguous run.
    pub sequential: Vec<bool>,
    /// What each destination's digest covers: all its bytes, or (a destination a share
    /// writes only part of) the share's bytes of it, its ops' blocks one after another in
    /// plan order. Both sides of a share digest the same way: the sender from its sources,
    /// the receiver from what its tensor then holds.
    shares: Vec<Option<ShareRuns>>,
    pub bytes: u64,
    /// Per bucket, the destinations whose last bytes it carries.
    pub completes: Vec<Vec<u32>>,
}

impl Schedule {
    pub fn new(plan: &Plan, skip: &[u32], bucket_bytes: u64) -> Result<Schedule, BucketError> {
        let mut written = vec![true; plan.destinations.len()];
        for &d in skip {
            written[d as usize] = false;
        }
        // A scale tensor is written with its weight, and only then: both sides skip the pair
        // together whatever `skip` says of the scale.
        for s in &plan.scaled {
            written[s.scale as usize] = written[s.weight as usize];
        }
        let mut kept = plan.clone();
        kept.ops.retain(|op| written[op.dst as usize]);
        Ok(Schedule::of(plan, buckets(&kept, bucket_bytes)?, written))
    }

    /// The schedule of a streaming receiver's updates: every destination whole in one bucket
    /// of `bucket_bytes` (or, if larger, alone in a run of them), nothing skipped.
    pub fn whole(plan: &Plan, bucket_bytes: u64) -> Result<Schedule, BucketError> {
        let buckets = weightlift_core::whole_tensor_buckets(plan, bucket_bytes)?;
        Ok(Schedule::of(plan, buckets, vec![true; plan.destinations.len()]))
    }

    fn of(plan: &Plan, buckets: Vec<Bucket>, written: Vec<bool>) -> Schedule {
        let bytes = buckets.iter().map(|b| b.bytes).sum();
        let shares = ShareRuns::of(plan);
        let mut sequential = plan.sequential_destinations();
        for (d, share) in shares.iter().enumerate() {
            if let Some(share) = share {
                sequential[d] = share.contiguous;
            }
        }
        let pieces = buckets.iter().map(|b| bucket_pieces(plan, &sequential, &shares, b)).collect();
        let mut last = vec![None; plan.destinations.len()];
        for (k, bucket) in buckets.iter().enumerate() {
            for entry in &bucket.entries {
                last[entry.op.dst as usize] = Some(k);
            }
        }
        // A weight's scales are complete when its last block is.
        for s in &plan.scaled {
            last[s.scale as usize] = last[s.weight as usize];
        }
        let mut completes = vec![Vec::new(); buckets.len()];
        for (d, k) in last.iter().enumerate() {
            if let Some(k) = k {
                completes[*k].push(d as u32);
            }
        }
        Schedule { buckets, pieces, written, sequential, shares, bytes, completes }
    }

    /// The schedule for an update skipping `skip`: this (full) one when nothing is skipped.
    pub fn for_skip<'a>(
        &'a self,
        plan: &Plan,
        skip: &[u32],
        bucket_bytes: u64,
    ) -> Result<std::borrow::Cow<'a, Schedule>, BucketError> {
        if skip.is_empty() {
            Ok(std::borrow::Cow::Borrowed(self))
        } else {
            Schedule::new(plan, skip, bucket_bytes).map(std::borrow::Cow::Owned)
        }
    }

    /// One accumulator per destination (of the share's bytes of it, for a part of one).
    pub fn digests(&self, plan: &Plan) -> Vec<ChunkDigests> {
        let len = |(d, spec): (usize, &weightlift_core::TensorSpec)| {
            self.shares[d].as_ref().map_or(spec.byte_len(), |s| s.bytes)
        };
        plan.destinations.iter().enumerate().map(|d| ChunkDigests::new(len(d))).collect()
    }

    /// Destinations of which this schedule's plan writes only a part (a share of a plan over
    /// several senders): their digests are of that part.
    pub fn partial(&self) -> Vec<u32> {
        (0..self.shares.len() as u32).filter(|&d| self.shares[d as usize].is_some()).collect()
    }

    /// The written destinations in the order the buckets complete them, cut into parts a
    /// sender digests and sends one after another to a streaming receiver: the first of
    /// about `first_bytes` (so the receiver's first hand-over waits for little), each next
    /// one twice the last, up to [`DIGEST_PART_MAX_BYTES`] (so a large model takes tens of
    /// messages, not one per bucket). Every written destination is in exactly one part.
    pub fn digest_parts(&self, plan: &Plan, first_bytes: u64) -> Vec<Vec<u32>> {
        let mut parts: Vec<Vec<u32>> = Vec::new();
        let (mut part, mut bytes, mut target) = (Vec::new(), 0u64, first_bytes.max(1));
        let mut placed = vec![false; plan.destinations.len()];
        let written = self.completes.iter().flatten().copied().filter(|&d| self.written[d as usize]);
        // A destination of no bytes completes in no bucket: last, so none is left out.
        let rest = (0..plan.destinations.len() as u32).filter(|&d| self.written[d as usize]);
        for d in written.chain(rest) {
            if std::mem::replace(&mut placed[d as usize], true) {
                continue;
            }
            part.push(d);
            bytes += plan.destinations[d as usize].byte_len();
            if bytes >= target {
                parts.push(std::mem::take(&mut part));
                (bytes, target) = (0, (target * 2).min(DIGEST_PART_MAX_BYTES.max(first_bytes)));
            }
        }
        if !part.is_empty() {
            parts.push(part);
        }
        parts
    }
}

/// The most bytes of destinations one part of [`Schedule::digest_parts`] covers.
pub const DIGEST_PART_MAX_BYTES: u64 = 1 << 30;

/// The part of one destination a share writes, for digesting it: each op's run (bytes of
/// the destination) and where it starts in the share, sorted by where it lies.
#[derive(Debug, Clone)]
struct ShareRuns {
    /// Bytes of the share.
    bytes: u64,
    /// Every op of the destination is one contiguous run of it.
    contiguous: bool,
    /// (start in the destination, length, start in the share), by start in the destination;
    /// only when `contiguous`.
    runs: Vec<(u64, u64, u64)>,
}

impl ShareRuns {
    /// Per destination: None when the plan writes all of it, else its share.
    fn of(plan: &Plan) -> Vec<Option<ShareRuns>> {
        let written = plan.share_bytes();
        let mut shares: Vec<Option<ShareRuns>> = plan
            .destinations
            .iter()
            .zip(&written)
            .map(|(d, &w)| (w < d.byte_len()).then(|| ShareRuns { bytes: w, contiguous: true, runs: Vec::new() }))
            .collect();
        for op in &plan.ops {
            let d = op.dst as usize;
            let Some(share) = shares[d].as_mut() else { continue };
            let elt = plan.destinations[d].dtype.size();
            let at: u64 = share.runs.iter().map(|r| r.1).sum();
            match plan.strided(op).as_slice() {
                [one] if one.rows <= 1 || one.dst_stride == one.row_elems => {
                    share.runs.push((one.dst_offset * elt, plan.op_bytes(op), at))
                }
                _ => share.contiguous = false,
            }
        }
        for share in shares.iter_mut().flatten() {
            share.runs.sort_unstable();
            if !share.contiguous {
                share.runs.clear();
            }
        }
        shares
    }

    /// Where destination byte `at` (inside one of the runs) lies in the share.
    fn offset_of(&self, at: u64) -> u64 {
        let i = self.runs.partition_point(|r| r.0 <= at) - 1;
        let (start, _, share_at) = self.runs[i];
        share_at + (at - start)
    }
}

/// Where a piece's bytes lie in what its destination's digest covers.
#[derive(Debug, Clone, Copy)]
struct DigestAt {
    /// Bytes the digest covers.
    len: u64,
    offset: u64,
}

/// One piece of a bucket: what to copy, where its bytes sit in the payload, (for a
/// sequential destination) where they land in the destination, and (when packing would copy
/// them unchanged) where they sit in the source, in bytes.
#[derive(Debug, Clone)]
struct Piece {
    op: CopyOp,
    payload: Range<usize>,
    dst_bytes: Option<Range<usize>>,
    /// For a sequential destination: where the piece lies in its digest.
    digest_at: Option<DigestAt>,
    verbatim: Option<Range<usize>>,
}

fn bucket_pieces(plan: &Plan, sequential: &[bool], shares: &[Option<ShareRuns>], bucket: &Bucket) -> Vec<Piece> {
    let mut out = Vec::new();
    for entry in &bucket.entries {
        let mut at = entry.payload_offset as usize;
        for op in pieces(plan, &entry.op, PIECE_BYTES) {
            let len = plan.op_bytes(&op) as usize;
            let d = op.dst as usize;
            let dst_bytes = sequential[d].then(|| {
                let elt = plan.destinations[d].dtype.size() as usize;
                let start = plan.strided(&op)[0].dst_offset as usize * elt;
                start..start + len
            });
            let digest_at = dst_bytes.as_ref().map(|r| match &shares[d] {
                None => DigestAt { len: plan.destinations[d].byte_len(), offset: r.start as u64 },
                Some(share) => DigestAt { len: share.bytes, offset: share.offset_of(r.start as u64) },
            });
            let verbatim = exec::verbatim_source(plan, &op);
            out.push(Piece { op, payload: at..at + len, dst_bytes, digest_at, verbatim });
            at += len;
        }
    }
    out
}

/// Splits `items` into at most `threads` runs of roughly equal bytes, keeping order.
fn split_runs<T>(items: Vec<T>, threads: usize, bytes: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let total: usize = items.iter().map(&bytes).sum();
    let target = total.div_ceil(threads.max(1)).max(1);
    let mut runs = vec![Vec::new()];
    let mut in_run = 0;
    for item in items {
        if in_run >= target && runs.len() < threads {
            runs.push(Vec::new());
            in_run = 0;
        }
        in_run += bytes(&item);
        runs.last_mut().expect("one run at least").push(item);
    }
    runs
}

/// Runs `work` on each run, on scoped threads when there is more than one.
fn in_parallel<T: Send, R: Send>(runs: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    if runs.len() <= 1 {
        return runs.into_iter().map(&work).collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs.into_iter().map(|run| scope.spawn(|| work(run))).collect();
        handles.into_iter().map(|h| h.join().expect("a copy thread panicked")).collect()
    })
}

/// Packs one piece into `bytes` (its place in a payload), and its digests when its destination
/// is digested piece by piece.
fn pack_piece(
    plan: &Plan,
    piece: &Piece,
    sources: &dyn SourceTensors,
    bytes: &mut [u8],
) -> Option<(u32, PieceDigests)> {
    exec::pack(plan, &piece.op, sources.bytes(piece.op.src as usize), bytes).expect("plans match their sources' sizes");
    piece_digests(piece, bytes)
}

/// The digests of a piece's bytes as its destination will hold them (None for a destination
/// digested once complete).
fn piece_digests(piece: &Piece, bytes: &[u8]) -> Option<(u32, PieceDigests)> {
    let at = piece.digest_at?;
    Some((piece.op.dst, PieceDigests::new(at.len, at.offset, bytes)))
}

/// Sender: packs `bucket` into `payload` (cast to the destination dtypes), digesting what it
/// means the receiver to hold.
pub fn pack(
    plan: &Plan,
    schedule: &Schedule,
    bucket: usize,
    sources: &dyn SourceTensors,
    payload: &mut [u8],
    digests: &mut [ChunkDigests],
    threads: usize,
) {
    let pieces: Vec<&Piece> = schedule.pieces[bucket].iter().collect();
    let runs = split_runs(pieces, threads, |p| p.payload.len());
    // Hand each run the part of the payload its pieces fill (runs are contiguous in it).
    let mut rest = payload;
    let mut consumed = 0;
    let mut work = Vec::with_capacity(runs.len());
    for run in runs {
        let end = run.last().map_or(consumed, |p| p.payload.end);
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(end - consumed);
        work.push((run, mine, consumed));
        rest = tail;
        consumed = end;
    }
    let results = in_parallel(work, |(run, out, base)| {
        let mut found = Vec::new();
        for piece in run {
            let bytes = &mut out[piece.payload.start - base..piece.payload.end - base];
            found.extend(pack_piece(plan, piece, sources, bytes));
        }
        found
    });
    for (d, piece) in results.into_iter().flatten() {
        digests[d as usize].add(piece);
    }
}

/// Sender, before the copy engines write bucket `bucket` into device memory: packs into
/// `scratch` (at the pieces' payload offsets) the pieces that need packing (a cast, a block
/// strided in its source), digesting them, and returns what the engines copy to each payload
/// offset: the sources' own bytes where packing would copy them unchanged, `scratch`
/// otherwise, with ranges that continue each other on both sides merged. The pieces copied
/// from the sources are digested by [`digest_verbatim`].
pub fn stage_for_copies<'a>(
    plan: &Plan,
    schedule: &Schedule,
    bucket: usize,
    sources: &'a dyn SourceTensors,
    scratch: &'a mut [u8],
    digests: &mut [ChunkDigests],
    threads: usize,
) -> Vec<(usize, &'a [u8])> {
    pack_changed(plan, schedule, bucket, sources, scratch, digests, threads);
    let scratch: &'a [u8] = scratch;
    copy_runs(&schedule.pieces[bucket])
        .into_iter()
        .map(|(at, origin, range)| match origin {
            Origin::Source(i) => (at, &sources.bytes(i as usize)[range]),
            Origin::Scratch => (at, &scratch[range]),
        })
        .collect()
}

/// Where a staged bucket's pieces copied as they are come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageReads {
    /// From the sources' memory (a checkpoint's pages are faulted in through its map).
    Memory,
    /// From the sources' files, read as `ReadMode` says (see [`SourceTensors::on_disk`]);
    /// sources with no file come from memory.
    Files(ReadMode),
}

/// Sender, for sources the copy engines should not read in place (not page-locked, or on
/// disk): stages `bucket` whole in `scratch`, the pieces that need packing as
/// [`stage_for_copies`] does, the others copied in from where `reads` says, on `threads`
/// threads, and returns the one copy of it. `buffers` are the threads' aligned read buffers
/// for files, kept by the caller from bucket to bucket (each touches its pages when made).
#[allow(clippy::too_many_arguments)]
pub fn stage_whole<'a>(
    plan: &Plan,
    schedule: &Schedule,
    bucket: usize,
    sources: &dyn SourceTensors,
    scratch: &'a mut [u8],
    digests: &mut [ChunkDigests],
    threads: usize,
    reads: StageReads,
    buffers: &mut Vec<Option<AlignedBuffer>>,
) -> Result<&'a [u8], ReadError> {
    pack_changed(plan, schedule, bucket, sources, scratch, digests, threads);
    let bytes = schedule.buckets[bucket].bytes as usize;
    let runs = copy_runs(&schedule.pieces[bucket]).into_iter().filter_map(|(at, origin, range)| match origin {
        Origin::Source(src) => Some(((src, range.clone()), at..at + range.len())),
        Origin::Scratch => None,
    });
    let work = cut_runs(carve(&mut scratch[..bytes], runs), bytes.div_ceil(threads.max(1)));
    let runs = split_runs(work, threads, |(_, dst)| dst.len());
    if buffers.len() < runs.len() {
        buffers.resize_with(runs.len(), || None);
    }
    let read = in_parallel(runs.into_iter().zip(buffers.iter_mut()).collect(), |(run, buffer)| {
        for ((src, range), dst) in run {
            let on_disk = match reads {
                StageReads::Files(mode) => sources.on_disk(src as usize, mode),
                StageReads::Memory => None,
            };
            let Some((reader, offset)) = on_disk else {
                dst.copy_from_slice(&sources.bytes(src as usize)[range]);
                continue;
            };
            let at = offset + range.start as u64;
            if reader.mode() == ReadMode::Buffered {
                reader.read_at(at, dst)?;
                continue;
            }
            for (i, piece) in dst.chunks_mut(READ_BYTES).enumerate() {
                let at = at + (i * READ_BYTES) as u64;
                let needed = FileReader::span(at, piece.len());
                if buffer.as_ref().is_none_or(|b| b.len() < needed) {
                    *buffer = Some(AlignedBuffer::new(FileReader::span(0, READ_BYTES).max(needed)));
                }
                let buffer = buffer.as_mut().expect("made just above");
                piece.copy_from_slice(reader.read_range(at, piece.len(), buffer)?);
            }
        }
        Ok(())
    });
    read.into_iter().collect::<Result<(), ReadError>>()?;
    Ok(&scratch[..bytes])
}

/// `work` with every run longer than `most` bytes (but at least 1 MiB, at a 4 KiB multiple)
/// cut into runs of that length: a bucket is often one run (a large tensor, or neighbours
/// merged for the copy engines), which one thread alone would copy at a fraction of what the
/// memory takes.
fn cut_runs(work: Vec<SourceRun<'_>>, most: usize) -> Vec<SourceRun<'_>> {
    let most = most.max(CUT_AT_LEAST).next_multiple_of(4096);
    let mut out = Vec::with_capacity(work.len());
    for ((src, range), dst) in work {
        let mut start = range.start;
        for part in dst.chunks_mut(most) {
            let len = part.len();
            out.push(((src, start..start + len), part));
            start += len;
        }
    }
    out
}

/// A run of a source's bytes `(source, range in it)` and the place it is copied to.
type SourceRun<'a> = ((u32, Range<usize>), &'a mut [u8]);

/// Runs are not cut shorter than this: a thread's copy should outweigh its start.
const CUT_AT_LEAST: usize = 1 << 20;

/// What the copy engines copy for a bucket staged in a scratch: `(payload offset, range of
/// the scratch)`.
pub type StagedCopies = Vec<(usize, Range<usize>)>;

/// Sender, for a bucket whose every piece is its source's bytes as they are, in files: reads
/// the file ranges the bucket needs straight into `scratch` as the files lay them out (merged
/// where they touch, each span at a block-aligned place, so that direct reads need no bounce
/// and nothing is copied on the host), in reads of at most `read_bytes` on at most `threads`
/// threads, and returns what the copy engines copy to each payload offset. None when the
/// bucket does not qualify (a piece needs packing, a source is in memory, or the spans do not
/// fit `scratch`, whose start must be block-aligned): [`stage_whole`] stages it then.
#[allow(clippy::too_many_arguments)]
pub fn stage_file_spans(
    schedule: &Schedule,
    bucket: usize,
    sources: &dyn SourceTensors,
    scratch: &mut [u8],
    mode: ReadMode,
    threads: usize,
    read_bytes: usize,
) -> Result<Option<StagedCopies>, ReadError> {
    // (reader, file offset, length, payload offset) of every run.
    let mut runs = Vec::new();
    for (at, origin, range) in copy_runs(&schedule.pieces[bucket]) {
        let Origin::Source(src) = origin else { return Ok(None) };
        let Some((reader, offset)) = sources.on_disk(src as usize, mode) else { return Ok(None) };
        if !range.is_empty() {
            runs.push((reader, offset + range.start as u64, range.len(), at));
        }
    }
    let key = |r: &FileReader| r as *const FileReader as usize;
    runs.sort_by_key(|&(reader, start, _, _)| (key(reader), start));
    // Spans: (reader, aligned file start, aligned length, place in the scratch).
    let mut spans: Vec<(&FileReader, u64, usize, usize)> = Vec::new();
    let mut placed = Vec::with_capacity(runs.len());
    let align = DIRECT_ALIGN as u64;
    let mut used = 0;
    for &(reader, start, len, at) in &runs {
        let end = start + len as u64;
        if end > reader.len() {
            return Err(ReadError::PastEnd {
                path: reader.path().into(),
                offset: start,
                len: len as u64,
                file_len: reader.len(),
            });
        }
        let joins = spans.last().is_some_and(|&(r, s, l, _)| key(r) == key(reader) && start <= s + l as u64);
        if joins {
            let last = spans.last_mut().expect("checked above");
            let new_len = (end.next_multiple_of(align) - last.1) as usize;
            if new_len > last.2 {
                used += new_len - last.2;
                last.2 = new_len;
            }
        } else {
            let aligned = start / align * align;
            let span_len = (end.next_multiple_of(align) - aligned) as usize;
            spans.push((reader, aligned, span_len, used));
            used += span_len;
        }
        let &(_, span_start, _, place) = spans.last().expect("pushed or joined");
        let from = place + (start - span_start) as usize;
        placed.push((at, from..from + len));
        if used > scratch.len() {
            return Ok(None);
        }
    }
    let mut reads = Vec::new();
    for (item, dst) in
        carve(scratch, spans.iter().map(|&(reader, start, len, place)| ((reader, start), place..place + len)))
    {
        let (reader, start) = item;
        for (i, piece) in dst.chunks_mut(read_bytes).enumerate() {
            reads.push((reader, start + (i * read_bytes) as u64, piece));
        }
    }
    let runs = split_runs(reads, threads, |(_, _, dst)| dst.len());
    let read = in_parallel(runs, |run| {
        for (reader, offset, dst) in run {
            reader.read_into(offset, dst)?;
        }
        Ok(())
    });
    read.into_iter().collect::<Result<(), ReadError>>()?;
    Ok(Some(placed))
}

/// Reads from disk go in pieces of this many bytes (through one aligned buffer per thread).
const READ_BYTES: usize = 8 << 20;

/// Packs into `scratch` (at the pieces' payload offsets) the pieces of `bucket` that need
/// packing (a cast, a block strided in its source), digesting them.
fn pack_changed(
    plan: &Plan,
    schedule: &Schedule,
    bucket: usize,
    sources: &dyn SourceTensors,
    scratch: &mut [u8],
    digests: &mut [ChunkDigests],
    threads: usize,
) {
    let packed = schedule.pieces[bucket].iter().filter(|p| p.verbatim.is_none()).map(|p| (p, p.payload.clone()));
    let work: Vec<(&Piece, &mut [u8])> = carve(scratch, packed);
    let runs = split_runs(work, threads, |(p, _)| p.payload.len());
    let results = in_parallel(runs, |run| {
        let mut found = Vec::new();
        for (piece, bytes) in run {
            found.extend(pack_piece(plan, piece, sources, bytes));
        }
        found
    });
    for (d, piece) in results.into_iter().flatten() {
        digests[d as usize].add(piece);
    }
}

/// `buffer` carved into the disjoint places `ranges` (ascending, not overlapping), each with
/// its item, so threads can fill them side by side.
fn carve<T>(buffer: &mut [u8], ranges: impl Iterator<Item = (T, Range<usize>)>) -> Vec<(T, &mut [u8])> {
    let mut out = Vec::new();
    let (mut rest, mut consumed) = (buffer, 0);
    for (item, range) in ranges {
        let (_, from_start) = std::mem::take(&mut rest).split_at_mut(range.start - consumed);
        let (mine, tail) = from_start.split_at_mut(range.len());
        out.push((item, mine));
        (rest, consumed) = (tail, range.end);
    }
    out
}

/// Where a run of a bucket's bytes comes from.
#[derive(PartialEq)]
enum Origin {
    Source(u32),
    Scratch,
}

/// The bucket's payload as runs `(payload offset, origin, range in the origin)`: a source's
/// own bytes where packing would copy them unchanged, the scratch otherwise, with ranges
/// that continue each other on both sides merged.
fn copy_runs(pieces: &[Piece]) -> Vec<(usize, Origin, Range<usize>)> {
    let mut runs: Vec<(usize, Origin, Range<usize>)> = Vec::new();
    for piece in pieces {
        let (origin, range) = match &piece.verbatim {
            Some(r) => (Origin::Source(piece.op.src), r.clone()),
            None => (Origin::Scratch, piece.payload.clone()),
        };
        if let Some((at, last_origin, last)) = runs.last_mut() {
            if *last_origin == origin && last.end == range.start && *at + last.len() == piece.payload.start {
                last.end = range.end;
                continue;
            }
        }
        runs.push((piece.payload.start, origin, range));
    }
    runs
}

/// Where each piece of bucket `bucket` sits in the payload (in payload order, side by side),
/// its op, and where packing would copy it from the source unchanged, if it would.
pub fn bucket_pieces_of(
    schedule: &Schedule,
    bucket: usize,
) -> impl Iterator<Item = (&CopyOp, Range<usize>, Option<Range<usize>>)> {
    schedule.pieces[bucket].iter().map(|p| (&p.op, p.payload.clone(), p.verbatim.clone()))
}

/// Sender: digests every piece of the update that [`stage_for_copies`] has the copy engines
/// move straight from the sources, reading them where they are, spread over `threads`
/// threads; each thread takes a run of the update in order. Runs beside the copies, for the
/// whole update: a digest is needed only by the end, not before each bucket is handed over.
pub fn digest_verbatim(schedule: &Schedule, sources: &dyn SourceTensors, threads: usize) -> Vec<(u32, PieceDigests)> {
    let pieces: Vec<&Piece> =
        schedule.pieces.iter().flatten().filter(|p| p.verbatim.is_some() && p.dst_bytes.is_some()).collect();
    let runs = split_runs(pieces, threads, |p| p.payload.len());
    in_parallel(runs, |run| {
        run.into_iter()
            .filter_map(|piece| {
                let range = piece.verbatim.clone().expect("verbatim pieces only");
                piece_digests(piece, &sources.bytes(piece.op.src as usize)[range])
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// A piece of a bucket copied from its source as it is, to be digested where the copies put
/// it: its whole chunks at `whole_at` bytes of the bucket (by a GPU, say), its partial chunks
/// (under a chunk at either end) from the `fragments` bytes of the bucket's payload, by the CPU
/// from the host bytes the copies read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandedPiece {
    pub dst: u32,
    pub layout: PieceLayout,
    pub whole_at: Range<usize>,
    pub fragments: Vec<Range<usize>>,
}

/// The pieces of `bucket` that [`digest_verbatim`] would digest from the sources, laid out to
/// be digested from the bucket instead.
pub fn landed_pieces(schedule: &Schedule, bucket: usize) -> Vec<LandedPiece> {
    schedule.pieces[bucket]
        .iter()
        .filter_map(|piece| {
            // Verbatim: bytes of the destination map one to one onto the payload (and the source).
            let dst = piece.verbatim.as_ref().and(piece.dst_bytes.as_ref())?;
            let at = piece.digest_at.expect("sequential pieces have a place in their digest");
            let layout = PieceLayout::new(at.len, at.offset, dst.len() as u64);
            let payload_of = |x: u64| piece.payload.start + (x - at.offset) as usize;
            Some(LandedPiece {
                dst: piece.op.dst,
                whole_at: payload_of(layout.whole.start)..payload_of(layout.whole.end),
                fragments: layout.fragments.iter().map(|r| payload_of(r.start)..payload_of(r.end)).collect(),
                layout,
            })
        })
        .collect()
}

/// Receiver: writes `bucket` from `payload` into the destinations in place, digesting the
/// bytes it now holds (read back from the destination, not taken from the payload).
pub fn unpack(
    plan: &Plan,
    schedule: &Schedule,
    bucket: usize,
    payload: &[u8],
    destinations: &mut dyn DestinationTensors,
    digests: &mut [ChunkDigests],
    threads: usize,
) {
    let (sequential, strided): (Vec<&Piece>, Vec<&Piece>) =
        schedule.pieces[bucket].iter().partition(|p| p.dst_bytes.is_some());

    // Carve each destination into the disjoint byte ranges its pieces write.
    let mut order: Vec<usize> = (0..sequential.len()).collect();
    order.sort_unstable_by_key(|&i| (sequential[i].op.dst, sequential[i].dst_bytes.as_ref().map(|r| r.start)));
    let mut tensors = destinations.all_mut();
    let mut targets: Vec<Option<&mut [u8]>> = (0..sequential.len()).map(|_| None).collect();
    let mut cursor: Vec<usize> = vec![0; tensors.len()];
    for i in order {
        let d = sequential[i].op.dst as usize;
        let range = sequential[i].dst_bytes.clone().expect("sequential pieces have a range");
        let tensor = std::mem::take(&mut tensors[d]);
        let (_, from_start) = tensor.split_at_mut(range.start - cursor[d]);
        let (mine, rest) = from_start.split_at_mut(range.len());
        targets[i] = Some(mine);
        tensors[d] = rest;
        cursor[d] = range.end;
    }
    let work: Vec<(&Piece, &mut [u8])> =
        sequential.into_iter().zip(targets).map(|(p, t)| (p, t.expect("every piece carved"))).collect();
    let runs = split_runs(work, threads, |(p, _)| p.payload.len());
    let results = in_parallel(runs, |run| {
        let mut found = Vec::new();
        for (piece, target) in run {
            target.copy_from_slice(&payload[piece.payload.clone()]);
            let at = piece.digest_at.expect("sequential pieces have a place in their digest");
            found.push((piece.op.dst, PieceDigests::new(at.len, at.offset, target)));
        }
        found
    });
    drop(tensors);
    for (d, piece) in results.into_iter().flatten() {
        digests[d as usize].add(piece);
    }
    let (quantized, strided): (Vec<&Piece>, Vec<&Piece>) =
        strided.into_iter().partition(|p| plan.scaled_of(p.op.dst).is_some());
    for piece in strided {
        exec::unpack(plan, &piece.op, &payload[piece.payload.clone()], destinations.bytes_mut(piece.op.dst as usize))
            .expect("plans match their destinations' sizes");
    }
    // Quantized where they land: the blocks on every thread, then their e4m3 bytes and scales
    // placed in the weights and scale tensors (a copy, small next to the quantizing).
    let runs = split_runs(quantized, threads, |p| p.payload.len());
    let blocks = in_parallel(runs, |run| {
        run.into_iter()
            .map(|piece| {
                let block = exec::quantize_block(plan, &piece.op, &payload[piece.payload.clone()]);
                (piece, block.expect("plans match their payloads' sizes"))
            })
            .collect::<Vec<_>>()
    });
    let mut all = destinations.all_mut();
    for (piece, block) in blocks.into_iter().flatten() {
        let s = plan.scaled_of(piece.op.dst).expect("quantized pieces only");
        let (weight, scale) = exec::two_mut(&mut all, s.weight as usize, s.scale as usize);
        exec::place_quantized(plan, &piece.op, &block, weight, scale).expect("plans match their destinations' sizes");
    }
}

/// The digest each written destination should have, as the sender computes it: gathered
/// while packing where possible, otherwise by assembling the tensor once.
pub fn sender_digests(
    plan: &Plan,
    schedule: &Schedule,
    sources: &dyn SourceTensors,
    digests: &[ChunkDigests],
) -> Vec<(u32, u64)> {
    let mut quantized = QuantDigests::new(plan);
    (0..plan.destinations.len())
        .filter(|&d| schedule.written[d])
        .map(|d| {
            let value = match schedule.sequential[d] {
                true => digests[d].finish().expect("every chunk of a written tensor was packed"),
                false => assemble_digest(plan, schedule, sources, d as u32, &mut quantized),
            };
            (d as u32, value)
        })
        .collect()
}

/// The sender's digest of each destination bucket `k` completes, once it is packed.
pub fn completed_digests(
    plan: &Plan,
    schedule: &Schedule,
    k: usize,
    sources: &dyn SourceTensors,
    digests: &[ChunkDigests],
) -> Vec<(u32, u64)> {
    let mut quantized = QuantDigests::new(plan);
    schedule.completes[k]
        .iter()
        .map(|&d| {
            let value = match schedule.sequential[d as usize] {
                true => digests[d as usize].finish().expect("every chunk of a completed tensor was packed"),
                false => assemble_digest(plan, schedule, sources, d, &mut quantized),
            };
            (d, value)
        })
        .collect()
}

/// Every destination's digest as the sources would make it, without sending anything
/// (delta mode compares these with the receiver's); `schedule` is the full one.
pub fn expected_digests(plan: &Plan, schedule: &Schedule, sources: &dyn SourceTensors) -> Vec<u64> {
    let mut digests = schedule.digests(plan);
    let mut scratch = Vec::new();
    for piece in schedule.pieces.iter().flatten() {
        let Some(at) = piece.digest_at else { continue };
        scratch.resize(piece.payload.len(), 0);
        exec::pack(plan, &piece.op, sources.bytes(piece.op.src as usize), &mut scratch).expect("sizes match");
        digests[piece.op.dst as usize].add(PieceDigests::new(at.len, at.offset, &scratch));
    }
    let mut quantized = QuantDigests::new(plan);
    (0..plan.destinations.len())
        .map(|d| match schedule.sequential[d] {
            true => digests[d].finish().expect("every chunk was packed"),
            false => assemble_digest(plan, schedule, sources, d as u32, &mut quantized),
        })
        .collect()
}

/// The digests of quantized weights and their scales, made a pair at a time.
struct QuantDigests {
    /// Each quantized weight and each scale tensor, to its pair.
    pair_of: HashMap<u32, Scaled>,
    digests: HashMap<u32, u64>,
}

impl QuantDigests {
    fn new(plan: &Plan) -> QuantDigests {
        let pair_of = plan.scaled.iter().flat_map(|&s| [(s.weight, s), (s.scale, s)]).collect();
        QuantDigests { pair_of, digests: HashMap::new() }
    }
}

fn assemble_digest(
    plan: &Plan,
    schedule: &Schedule,
    sources: &dyn SourceTensors,
    dst: u32,
    quantized: &mut QuantDigests,
) -> u64 {
    if let Some(&known) = quantized.digests.get(&dst) {
        return known;
    }
    if let Some(&s) = quantized.pair_of.get(&dst) {
        // What the engine will hold once quantized: the sender quantizes too, for its digest,
        // once for the weight and its scales both.
        let spec = |d: u32| &plan.destinations[d as usize];
        let (mut weight, mut scale) =
            (vec![0u8; spec(s.weight).byte_len() as usize], vec![0u8; spec(s.scale).byte_len() as usize]);
        for op in plan.ops.iter().filter(|op| op.dst == s.weight) {
            exec::copy_quantized(plan, op, sources.bytes(op.src as usize), &mut weight, &mut scale)
                .expect("sizes match");
        }
        quantized.digests.insert(s.weight, digest::digest(&weight));
        quantized.digests.insert(s.scale, digest::digest(&scale));
        return quantized.digests[&dst];
    }
    if schedule.shares[dst as usize].is_some() {
        // A part of the destination: its ops' blocks one after another, in plan order.
        let mut digester = digest::Digester::new();
        let mut block = Vec::new();
        for op in plan.ops.iter().filter(|op| op.dst == dst) {
            block.resize(plan.op_bytes(op) as usize, 0);
            exec::pack(plan, op, sources.bytes(op.src as usize), &mut block).expect("sizes match");
            digester.update(&block);
        }
        return digester.finish();
    }
    let mut tensor = vec![0u8; plan.destinations[dst as usize].byte_len() as usize];
    for op in plan.ops.iter().filter(|op| op.dst == dst) {
        exec::copy(plan, op, sources.bytes(op.src as usize), &mut tensor).expect("sizes match");
    }
    digest::digest(&tensor)
}

/// The receiver's digest of each written destination after the last bucket (None for one
/// whose chunks did not all arrive).
pub fn receiver_digests(
    plan: &Plan,
    schedule: &Schedule,
    destinations: &dyn DestinationTensors,
    digests: &[ChunkDigests],
) -> Vec<Option<u64>> {
    (0..schedule.written.len())
        .map(|d| match (schedule.written[d], schedule.sequential[d]) {
            (false, _) => None,
            (true, true) => digests[d].finish(),
            (true, false) if schedule.shares[d].is_some() => Some(gathered_digest(plan, destinations, d as u32)),
            (true, false) => Some(digest::digest(destinations.bytes(d))),
        })
        .collect()
}

/// The digest of a share's part of destination `dst` as the receiver holds it: its ops'
/// blocks read back one after another, in plan order (as [`assemble_digest`] packs them).
fn gathered_digest(plan: &Plan, destinations: &dyn DestinationTensors, dst: u32) -> u64 {
    let mut digester = digest::Digester::new();
    let mut block = Vec::new();
    for op in plan.ops.iter().filter(|op| op.dst == dst) {
        block.resize((op.numel() * plan.destinations[dst as usize].dtype.size()) as usize, 0);
        exec::gather(plan, op, destinations.bytes(dst as usize), &mut block).expect("sizes match");
        digester.update(&block);
    }
    digester.finish()
}

#[cfg(test)]
mod tests {
    use weightlift_core::digest::chunk_digests;
    use weightlift_core::{plan, TpRank};

    use super::*;
    use crate::setup::{MappingOptions, ModelSource};
    use crate::tensors::HostTensors;

    /// Digest parts follow the buckets, cover every written destination once, start small
    /// and grow to the cap.
    #[test]
    fn digest_parts_cover_the_written_destinations_once_in_bucket_order_and_grow() {
        let source = ModelSource::synthetic("qwen3-moe-tiny").unwrap();
        let inputs = MappingOptions::default().inputs(&source, TpRank::SINGLE).unwrap();
        let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE).unwrap();
        let bucket_bytes = 64 << 10;
        let skip = [1, 5];
        let schedule = Schedule::new(&plan, &skip, bucket_bytes).unwrap();
        let parts = schedule.digest_parts(&plan, bucket_bytes);
        let flat: Vec<u32> = parts.iter().flatten().copied().collect();
        let mut want: Vec<u32> = (0..plan.destinations.len() as u32).filter(|d| !skip.contains(d)).collect();
        let in_bucket_order: Vec<u32> = schedule.completes.iter().flatten().copied().collect();
        assert_eq!(flat, in_bucket_order, "the order the buckets complete them");
        let mut sorted = flat.clone();
        sorted.sort_unstable();
        want.sort_unstable();
        assert_eq!(sorted, want, "every written destination once");
        let bytes: Vec<u64> =
            parts.iter().map(|p| p.iter().map(|&d| plan.destinations[d as usize].byte_len()).sum()).collect();
        assert!(parts.len() > 2, "{bytes:?}");
        assert!(bytes[0] >= bucket_bytes && bytes[0] < 2 * bucket_bytes + (1 << 20), "{bytes:?}");
        assert!(bytes[1] >= 2 * bucket_bytes, "{bytes:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the model, bucket size, first part and skips: the parts list every written
        /// destination once, in the order the buckets complete them (those of no bytes last),
        /// and each part but the last reached its target (the first part's bytes, doubling up to
        /// the cap) by less than one tensor.
        #[test]
        fn digest_parts_follow_the_buckets_and_grow_to_their_targets(
            model in proptest::sample::select(vec!["qwen3-tiny", "qwen3-moe-tiny", "qwen2-tiny"]),
            tp_size in 1u32..=2,
            bucket_bytes in 4096u64..200_000,
            first_bytes in 1u64..300_000,
            skip_every in 0usize..5,
        ) {
            let source = ModelSource::synthetic(model).unwrap();
            let tp = TpRank { rank: 0, size: tp_size };
            let inputs = MappingOptions::default().inputs(&source, tp).unwrap();
            let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).unwrap();
            let n = plan.destinations.len() as u32;
            let skip: Vec<u32> = match skip_every {
                0 => Vec::new(),
                k => (0..n).filter(|d| *d as usize % (k + 1) == 0).collect(),
            };
            let schedule = Schedule::new(&plan, &skip, bucket_bytes).unwrap();
            let parts = schedule.digest_parts(&plan, first_bytes);
            let flat: Vec<u32> = parts.iter().flatten().copied().collect();
            let in_buckets: Vec<u32> = schedule.completes.iter().flatten().copied().collect();
            proptest::prop_assert_eq!(&flat[..in_buckets.len()], &in_buckets[..]);
            let mut sorted = flat.clone();
            sorted.sort_unstable();
            let written: Vec<u32> = (0..n).filter(|d| !skip.contains(d)).collect();
            proptest::prop_assert_eq!(sorted, written);
            let bytes = |d: u32| plan.destinations[d as usize].byte_len();
            let largest = flat.iter().map(|&d| bytes(d)).max().unwrap_or(0);
            let mut target = first_bytes;
            for (i, part) in parts.iter().enumerate() {
                let sum: u64 = part.iter().map(|&d| bytes(d)).sum();
                if i + 1 < parts.len() {
                    proptest::prop_assert!(sum >= target && sum < target + largest.max(1), "part {i}: {sum} for {target}");
                }
                target = (target * 2).min(DIGEST_PART_MAX_BYTES.max(first_bytes));
            }
        }
    }

    /// A bucket staged from the checkpoint's files holds what staging it from the checkpoint's
    /// memory copies, byte for byte, with the same digests of what was packed.
    #[test]
    fn buckets_staged_whole_equal_buckets_staged_for_copies() {
        let source = ModelSource::synthetic("qwen3-moe-tiny").unwrap();
        let inputs = MappingOptions::default().inputs(&source, TpRank::SINGLE).unwrap();
        let tensors = HostTensors::synthetic(source.config().unwrap(), 9);
        let dir = std::env::temp_dir().join(format!("wl-stage-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list: Vec<_> = tensors.manifest().iter().zip(tensors.data().iter().map(Vec::as_slice)).collect();
        crate::safetensors_dir::write_file(&dir.join("model.safetensors"), &list).unwrap();
        let checkpoint = crate::tensors::CheckpointTensors::open(&dir).unwrap();
        assert!(checkpoint.on_disk(0, ReadMode::Direct).is_some() && checkpoint.resident_fraction().is_some());
        // The file's own order of tensors, which need not be the trainer's.
        let on_disk = weightlift_core::SourceSet::single(checkpoint.manifest().clone());
        let plan = plan(&on_disk, &inputs.destination, &inputs.rules, TpRank::SINGLE).unwrap();
        // Odd bucket sizes: runs start and end at every alignment of the file's blocks.
        for bucket_bytes in [5000, 70_001, 1 << 20] {
            let schedule = Schedule::new(&plan, &[], bucket_bytes).unwrap();
            let mut from_memory = schedule.digests(&plan);
            let mut staged =
                [StageReads::Files(ReadMode::Direct), StageReads::Files(ReadMode::Buffered), StageReads::Memory]
                    .map(|reads| (reads, schedule.digests(&plan)));
            let mut spans_scratch = AlignedBuffer::new(bucket_bytes as usize + (1 << 20));
            let mut scratch = vec![0u8; bucket_bytes as usize];
            let mut whole_scratch = vec![0u8; bucket_bytes as usize];
            let mut buffers = Vec::new();
            for k in 0..schedule.buckets.len() {
                let mut want = vec![0u8; schedule.buckets[k].bytes as usize];
                for (at, bytes) in stage_for_copies(&plan, &schedule, k, &checkpoint, &mut scratch, &mut from_memory, 2)
                {
                    want[at..at + bytes.len()].copy_from_slice(bytes);
                }
                for mode in [ReadMode::Direct, ReadMode::Buffered] {
                    spans_scratch.as_mut_slice().fill(0xa5);
                    let copies =
                        stage_file_spans(&schedule, k, &checkpoint, spans_scratch.as_mut_slice(), mode, 3, 8192)
                            .unwrap()
                            .expect("every piece of this plan is a file's bytes as they are");
                    let mut got = vec![0u8; want.len()];
                    for (at, range) in copies {
                        got[at..at + range.len()].copy_from_slice(&spans_scratch.as_slice()[range]);
                    }
                    assert!(
                        got == want,
                        "bucket {k} of {bucket_bytes}-byte buckets differs read as the files lay it out, {mode}"
                    );
                }
                // A scratch too small for the spans is declined, not overrun.
                let small = &mut spans_scratch.as_mut_slice()[..schedule.buckets[k].bytes as usize / 2];
                assert!(stage_file_spans(&schedule, k, &checkpoint, small, ReadMode::Buffered, 1, 8192)
                    .unwrap()
                    .is_none());
                for (reads, digests) in &mut staged {
                    whole_scratch.fill(0xa5);
                    let got = stage_whole(
                        &plan,
                        &schedule,
                        k,
                        &checkpoint,
                        &mut whole_scratch,
                        digests,
                        3,
                        *reads,
                        &mut buffers,
                    )
                    .unwrap();
                    assert!(got == want.as_slice(), "bucket {k} of {bucket_bytes}-byte buckets differs, {reads:?}");
                }
            }
            let finished = |d: &[ChunkDigests]| d.iter().map(ChunkDigests::finish).collect::<Vec<_>>();
            for (reads, digests) in &staged {
                assert_eq!(finished(digests), finished(&from_memory), "{reads:?}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A long run is cut into parts for the threads, which together cover it exactly, in
    /// order, each naming the source range its bytes come from.
    #[test]
    fn long_runs_are_cut_for_the_threads() {
        let mut buffer = vec![0u8; (9 << 20) + 100];
        let (first, second) = buffer.split_at_mut(100);
        let work = vec![((3u32, 7..107), first), ((5u32, 4096..4096 + (9 << 20)), second)];
        let parts = cut_runs(work, (9 << 20) / 4);
        // The short run stays whole; the long one becomes 4 parts of 9/4 MiB rounded up to 4 KiB
        // (the last shorter).
        assert_eq!(parts.len(), 1 + 4);
        assert_eq!((parts[0].0 .0, parts[0].0 .1.clone(), parts[0].1.len()), (3, 7..107, 100));
        let mut at = 4096;
        for ((src, range), dst) in &parts[1..] {
            assert_eq!((*src, range.start, range.len()), (5, at, dst.len()));
            assert!(dst.len() <= ((9 << 20) / 4usize).next_multiple_of(4096));
            at = range.end;
        }
        assert_eq!(at, 4096 + (9 << 20));
        // Never shorter than a MiB, however many threads.
        let mut small = vec![0u8; 3 << 20];
        assert_eq!(cut_runs(vec![((0u32, 0..3 << 20), &mut small[..])], 1000).len(), 3);
    }

    /// Digesting verbatim pieces from where the bytes landed (whole chunks from the packed
    /// bucket, edges from the source) gives the digests of digesting them from the source.
    #[test]
    fn landed_pieces_digest_like_the_sources() {
        for (model, tp, bucket_bytes) in
            [("qwen3-tiny", 2, 8 << 10), ("qwen3-moe-tiny", 1, 5000), ("qwen2-tiny", 1, 1 << 20)]
        {
            let source = ModelSource::synthetic(model).unwrap();
            let tp = TpRank::new(tp - 1, tp).unwrap();
            let inputs = MappingOptions::default().inputs(&source, tp).unwrap();
            let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).unwrap();
            let schedule = Schedule::new(&plan, &[], bucket_bytes).unwrap();
            let tensors = HostTensors::synthetic(source.config().unwrap(), 3);
            let mut want: Vec<(u32, PieceDigests)> = digest_verbatim(&schedule, &tensors, 3);
            let mut got = Vec::new();
            let mut scratch = vec![0u8; bucket_bytes as usize];
            for k in 0..schedule.buckets.len() {
                let mut payload = vec![0u8; schedule.buckets[k].bytes as usize];
                let mut ignored = schedule.digests(&plan);
                for (at, bytes) in stage_for_copies(&plan, &schedule, k, &tensors, &mut scratch, &mut ignored, 2) {
                    payload[at..at + bytes.len()].copy_from_slice(bytes);
                }
                for p in landed_pieces(&schedule, k) {
                    let fragments = p.fragments.iter().map(|r| payload[r.clone()].to_vec()).collect();
                    let piece =
                        PieceDigests::from_chunks(&p.layout, chunk_digests(&payload[p.whole_at.clone()]), fragments);
                    got.push((p.dst, piece.expect("the layout's own counts")));
                }
            }
            assert!(!want.is_empty(), "{model}: no verbatim pieces to compare");
            let key = |(d, p): &(u32, PieceDigests)| (*d, format!("{p:?}"));
            want.sort_by_key(key);
            got.sort_by_key(key);
            assert_eq!(got, want, "{model}");
        }
    }

    /// Every sender of a sharded trainer packs its share, the receiver unpacks each into the
    /// same tensors: each share's digests agree on both sides (pieces cut along dim 0, some
    /// rows, and along dim 1, strided in the destination), and the tensors end up as one
    /// sender of the whole tensors leaves them.
    #[test]
    fn shares_of_a_sharded_trainer_digest_alike_on_both_sides_and_land_whole() {
        let source = ModelSource::synthetic("qwen3-moe-tiny").unwrap();
        let whole = HostTensors::synthetic(source.config().unwrap(), 7);
        for (cut, world, tp) in [("fsdp", 3, TpRank { rank: 1, size: 2 }), ("columns", 2, TpRank::SINGLE)] {
            let inputs = MappingOptions::default().inputs(&source, tp).unwrap();
            let reference = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).unwrap();
            let mut expected = HostTensors::filled(inputs.destination.clone(), 0);
            let full = Schedule::new(&reference, &[], 1 << 16).unwrap();
            let mut digests = full.digests(&reference);
            for k in 0..full.buckets.len() {
                let mut payload = vec![0; full.buckets[k].bytes as usize];
                pack(&reference, &full, k, &whole, &mut payload, &mut digests, 2);
                unpack(&reference, &full, k, &payload, &mut expected, &mut digests, 2);
            }
            let shards: Vec<(HostTensors, Vec<Option<weightlift_core::Placement>>)> = (0..world)
                .map(|r| match cut {
                    "fsdp" => whole.fsdp_shard(r, world),
                    _ => {
                        // Columns of 2-d tensors, rows of the others.
                        let boxes = whole.manifest().iter().map(|spec| {
                            let dim = usize::from(spec.shape.len() == 2);
                            let mut shape = spec.shape.clone();
                            let mut offset = vec![0; shape.len()];
                            let n = shape[dim].div_ceil(u64::from(world));
                            offset[dim] = (n * u64::from(r)).min(shape[dim]);
                            shape[dim] = (offset[dim] + n).min(spec.shape[dim]) - offset[dim];
                            (offset, shape)
                        });
                        whole.cut(&boxes.collect::<Vec<_>>())
                    }
                })
                .collect();
            let (manifests, placements): (Vec<_>, Vec<_>) =
                shards.iter().map(|(t, p)| (t.manifest().clone(), p.clone())).unzip();
            let set = weightlift_core::SourceSet::placed(manifests, placements).unwrap();
            let sharded = plan(&set, &inputs.destination, &inputs.rules, tp).unwrap();
            let mut got = HostTensors::filled(inputs.destination.clone(), 0);
            let mut partial_seen = false;
            for (r, (tensors, _)) in shards.iter().enumerate() {
                let share = sharded.share_of(r as u32);
                let schedule = Schedule::new(&share, &[], 1 << 16).unwrap();
                partial_seen |= !schedule.partial().is_empty();
                let (mut sent, mut ours) = (schedule.digests(&share), schedule.digests(&share));
                for k in 0..schedule.buckets.len() {
                    let mut payload = vec![0; schedule.buckets[k].bytes as usize];
                    pack(&share, &schedule, k, tensors, &mut payload, &mut sent, 2);
                    unpack(&share, &schedule, k, &payload, &mut got, &mut ours, 2);
                }
                let theirs = sender_digests(&share, &schedule, tensors, &sent);
                let ours = receiver_digests(&share, &schedule, &got, &ours);
                assert!(!theirs.is_empty(), "{cut}: rank {r} writes something");
                for (d, value) in theirs {
                    assert_eq!(
                        ours[d as usize],
                        Some(value),
                        "{cut}: rank {r}, {}",
                        share.destinations[d as usize].name
                    );
                }
            }
            assert!(partial_seen, "{cut}: some destination is written by several ranks");
            assert_eq!(got.data(), expected.data(), "{cut}");
        }
    }
}
