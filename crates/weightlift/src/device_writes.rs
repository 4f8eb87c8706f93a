//! The sender's side of device slots (see [`crate::staged`]): a sender on the receiver's host
//! with host tensors copies each bucket into one of the receiver's device slots with its own
//! copy engines, straight from where its tensors are (page-locked once). No byte goes through
//! the ring, where the ring costs a packing pass, its writes, and the receiver's copy on top.
//! What it sends is digested by this process on the GPU, from the slot the copies filled,
//! before the receiver is told it is there: the host memory is read once, by the copy engines
//! (or, with [`crate::SenderOptions::host_digests`], digested from the sources on the CPU too,
//! a second read of host memory beside the copies). Memory that is not page-locked is staged
//! through two page-locked scratch buffers, one bucket filled while the last is copied out:
//! checkpoints read from their files (around the page cache where it is cold and the file
//! system allows, O_DIRECT; through it where warm), other host memory copied in.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use weightlift_core::digest::{ChunkDigests, PieceDigests};
use weightlift_core::{Plan, Version};
use weightlift_cuda::{
    ordinal_with_uuid, AlignedBuffer, ChunkDigester, CudaError, Gpu, ImportedAllocation, PinnedRanges, ReadError,
    ReadMode,
};

use crate::cuda_ipc::unhex;
use crate::protocol::{Conn, DeviceSlots, Message};
use crate::tensors::SourceTensors;
use crate::transport::{wait_for_free_slot, TransferError};
use crate::update::{
    all_cores, landed_pieces, stage_file_spans, stage_for_copies, stage_whole, LandedPiece, Schedule, StageReads,
    StagedCopies,
};

const PAGE: usize = 4096;

/// The GPUs this process opened to copy into device slots, one per ordinal: opening one
/// compiles weightlift's kernels, which a sender of many connections does once.
type OpenGpus = Mutex<Vec<(usize, Arc<Gpu>)>>;

fn shared_gpu(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
    static GPUS: OnceLock<OpenGpus> = OnceLock::new();
    let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, gpu)) = gpus.iter().find(|(o, _)| *o == ordinal) {
        return Ok(gpu.clone());
    }
    let gpu = Arc::new(Gpu::open(ordinal)?);
    gpus.push((ordinal, gpu.clone()));
    Ok(gpu)
}

/// Host memory of whole pages, page-locked: what the copy engines read packed pieces from.
struct Scratch {
    memory: Vec<u8>,
    start: usize,
    len: usize,
    _pinned: Option<PinnedRanges>,
}

impl Scratch {
    fn new(gpu: &Gpu, len: usize) -> Scratch {
        let memory = vec![0u8; len + 2 * PAGE];
        let start = (memory.as_ptr() as usize).next_multiple_of(PAGE) - memory.as_ptr() as usize;
        let len = len.next_multiple_of(PAGE).min(memory.len() - start);
        let mut scratch = Scratch { memory, start, len, _pinned: None };
        // Only a hint: copies from pageable memory are slower, not wrong.
        scratch._pinned = gpu.pin_ranges(&[scratch.as_slice()]).ok();
        scratch
    }

    fn as_slice(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.memory[self.start..self.start + self.len]
    }
}

/// This process's mapping of a receiver's device slots, and what it copies from.
pub struct SlotWriter {
    gpu: Arc<Gpu>,
    slots: Vec<ImportedAllocation>,
    slot_bytes: u64,
    pub(crate) free: VecDeque<u32>,
    /// Two, so that one bucket is staged while the last one is copied out of the other.
    scratch: [Scratch; 2],
    /// The last sources' memory, page-locked (kept while they stay where they are), and their
    /// [`SourceTensors::mapping_id`].
    sources: Option<(PinnedRanges, Option<u64>)>,
    /// Where the current update's time goes.
    pub(crate) phases: SlotPhases,
    /// Digests what lands in the slots.
    digester: ChunkDigester,
    /// The chunk digests of the last bucket sent, to fold while the next one is copied.
    pending: Option<Landed>,
    /// How this update's buckets reach the slots.
    feed: Feed,
    /// The ranges of the last sources not page-locked here, and whether their owner had
    /// page-locked them all (asked of the driver once per set of ranges, not every update).
    owner_locked: Option<(Vec<(usize, usize)>, bool)>,
    /// The bucket of this update already staged in its scratch (while the last was copied),
    /// and what to copy of it.
    staged_ahead: Option<(usize, StagedCopies)>,
    /// The packing threads' aligned buffers for reads from disk, kept from bucket to bucket.
    read_buffers: Vec<Option<AlignedBuffer>>,
}

/// Bytes a scratch holds beyond a slot's: a bucket read as its files lay it out takes a little
/// more than its payload (each span rounded out to whole blocks).
const SPAN_SLACK: usize = 1 << 20;

/// Direct reads go in pieces of this many bytes on at most [`DIRECT_READ_THREADS`] threads:
/// few large requests, as the sequential read the cold rows are a ratio of does.
const DIRECT_READ_BYTES: usize = 16 << 20;
const DIRECT_READ_THREADS: usize = 4;
/// Reads through the page cache go in pieces of this many bytes, on a thread per core (up to
/// [`BUFFERED_READ_THREADS`], and no fewer than the packing threads): each is a copy out of
/// the page cache, bound by the core that runs it at a fraction of what memory allows.
const BUFFERED_READ_BYTES: usize = 4 << 20;
const BUFFERED_READ_THREADS: usize = 16;

fn buffered_read_threads(threads: usize) -> usize {
    all_cores().min(BUFFERED_READ_THREADS).max(threads)
}

/// Stages bucket `k` in `scratch`: as its files lay it out where it can be
/// ([`stage_file_spans`]), else whole in payload order ([`stage_whole`]).
#[allow(clippy::too_many_arguments)]
fn stage(
    plan: &Plan,
    schedule: &Schedule,
    k: usize,
    sources: &dyn SourceTensors,
    scratch: &mut Scratch,
    digests: &mut [ChunkDigests],
    threads: usize,
    reads: StageReads,
    read_buffers: &mut Vec<Option<AlignedBuffer>>,
) -> Result<StagedCopies, ReadError> {
    if let StageReads::Files(mode) = reads {
        let (read_threads, read_bytes) = match mode {
            ReadMode::Direct => (threads.min(DIRECT_READ_THREADS), DIRECT_READ_BYTES),
            ReadMode::Buffered => (buffered_read_threads(threads), BUFFERED_READ_BYTES),
        };
        let spans = stage_file_spans(schedule, k, sources, scratch.as_mut_slice(), mode, read_threads, read_bytes)?;
        if let Some(copies) = spans {
            return Ok(copies);
        }
    }
    let whole = stage_whole(plan, schedule, k, sources, scratch.as_mut_slice(), digests, threads, reads, read_buffers)?;
    Ok(vec![(0, 0..whole.len())])
}

/// How one update's buckets reach the slots, chosen at its first bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feed {
    /// The copy engines read the sources where they are (page-locked), and the scratch holds
    /// only what needs packing.
    InPlace,
    /// Each bucket is staged whole in a page-locked scratch by the packing threads (from the
    /// sources' memory or their files), the next one while this one is copied: for sources
    /// that are not page-locked, whose pageable copies the driver runs at a fraction of the
    /// pinned rate, and for checkpoints mostly out of the page cache.
    Staged(StageReads),
}

/// Sources on disk with less than this share of their bytes in the page cache are read from
/// their files (O_DIRECT where the file system takes it) rather than faulted in page by page
/// through their maps (and page-locked whole before the first copy).
const COLD_BELOW: f64 = 0.5;

/// A bucket's verbatim pieces, with the chunk digests of what landed in its slot and the bytes
/// of each piece's edges.
struct Landed {
    k: usize,
    pieces: Vec<LandedPiece>,
    chunks: Vec<u64>,
    /// Per piece, its fragments' bytes, as the copies read them (taken before the host bytes are
    /// staged over; from the sources themselves, a cold checkpoint's edges would each be a read
    /// from the disk).
    fragments: Vec<Vec<Vec<u8>>>,
}

/// The bytes of `k`'s pieces' fragments, from the host bytes its copies read (`copies`: payload
/// offset, bytes).
fn fragment_bytes(
    k: usize,
    pieces: &[LandedPiece],
    copies: &[(usize, &[u8])],
) -> Result<Vec<Vec<Vec<u8>>>, TransferError> {
    let mut order: Vec<usize> = (0..copies.len()).collect();
    order.sort_by_key(|&i| copies[i].0);
    let at = |range: &std::ops::Range<usize>| -> Option<Vec<u8>> {
        let i = order.partition_point(|&i| copies[i].0 <= range.start).checked_sub(1)?;
        let (start, bytes) = copies[order[i]];
        bytes.get(range.start - start..range.end - start).map(<[u8]>::to_vec)
    };
    pieces
        .iter()
        .map(|p| {
            p.fragments.iter().map(&at).collect::<Option<Vec<_>>>().ok_or_else(|| {
                TransferError::Unexpected(format!("bucket {k}: a piece's edge is not among the bytes copied"))
            })
        })
        .collect()
}

impl Landed {
    /// Completes each piece's digests with its edges into `digests`.
    fn fold(self, digests: &mut [ChunkDigests]) -> Result<(), TransferError> {
        let mut rest = &self.chunks[..];
        for (p, fragments) in self.pieces.into_iter().zip(self.fragments) {
            let n = (p.layout.chunks() as usize).min(rest.len());
            let (mine, tail) = rest.split_at(n);
            rest = tail;
            let piece = PieceDigests::from_chunks(&p.layout, mine.to_vec(), fragments).ok_or_else(|| {
                TransferError::Unexpected(format!("bucket {}: a piece's chunk digests do not fit its layout", self.k))
            })?;
            digests[p.dst as usize].add(piece);
        }
        Ok(())
    }
}

/// One bucket for [`SlotWriter::write_bucket`]: bucket `k` of `schedule`, from `sources`, on
/// `threads` packing threads. What is copied from the sources as it is, is digested (with
/// `landed`) on the GPU from the slot, where it landed; otherwise by
/// [`crate::update::digest_verbatim`] beside, from the sources. `flip` (a fault test) corrupts
/// one byte of the slot after it was digested; `pin` page-locks the sources first (see
/// [`crate::SenderOptions::pin_sources`]).
pub(crate) struct BucketWrite<'a> {
    pub plan: &'a Plan,
    pub schedule: &'a Schedule,
    pub k: usize,
    pub sources: &'a dyn SourceTensors,
    pub threads: usize,
    pub flip: bool,
    pub pin: bool,
    pub landed: bool,
}

/// Seconds one update spent, on this process's side, in each step of writing device slots.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotPhases {
    /// Page-locking the sources (the first update, or one whose tensors moved).
    pub pin: f64,
    /// Waiting for the receiver to hand a slot back.
    pub slot_wait: f64,
    /// Packing what cannot be copied as it is (casts, strided blocks), and reading sources
    /// from disk when they are.
    pub pack: f64,
    /// Queueing the copies and waiting for them.
    pub copy: f64,
    /// Digesting what the copies landed, on the GPU; or the sources on the CPU, beside the
    /// copies (the whole update, on threads of its own).
    pub digest: f64,
}

impl SlotWriter {
    /// Maps the slots a receiver offered (`fds`, one per slot) on its GPU, found by UUID.
    pub fn map(info: &DeviceSlots, fds: &[OwnedFd]) -> Result<SlotWriter, CudaError> {
        let uuid = unhex::<16>(&info.device)
            .ok_or_else(|| CudaError::Invalid(format!("malformed GPU UUID `{}`", info.device)))?;
        SlotWriter::map_on(shared_gpu(ordinal_with_uuid(&uuid)?)?, info, fds)
    }

    /// Maps the slots on `gpu`, already open in this process (a receiver writing its own
    /// slots from a local source).
    pub(crate) fn map_on(gpu: Arc<Gpu>, info: &DeviceSlots, fds: &[OwnedFd]) -> Result<SlotWriter, CudaError> {
        if fds.len() != info.count as usize {
            return Err(CudaError::Invalid(format!("{} descriptors for {} device slots", fds.len(), info.count)));
        }
        let slots = fds
            .iter()
            .map(|fd| gpu.import_shareable(fd.as_fd(), info.mapped_bytes as usize))
            .collect::<Result<Vec<_>, _>>()?;
        if slots.iter().any(|s| (s.len() as u64) < info.slot_bytes) {
            return Err(CudaError::Invalid(format!("device slots smaller than {} bytes", info.slot_bytes)));
        }
        let scratch = [0, 1].map(|_| Scratch::new(&gpu, info.slot_bytes as usize + SPAN_SLACK));
        Ok(SlotWriter {
            gpu,
            slots,
            slot_bytes: info.slot_bytes,
            free: (0..info.count).collect(),
            scratch,
            sources: None,
            phases: SlotPhases::default(),
            digester: ChunkDigester::default(),
            pending: None,
            feed: Feed::InPlace,
            owner_locked: None,
            staged_ahead: None,
            read_buffers: Vec::new(),
        })
    }

    /// A slot the receiver is done with, waiting for one to come back when none is.
    pub(crate) fn free_slot(&mut self, conn: &mut Conn, timeout: Duration) -> Result<u32, TransferError> {
        while self.free.is_empty() {
            let slot = wait_for_free_slot(conn, timeout)?;
            self.free.push_back(slot);
        }
        Ok(self.free.pop_front().expect("a free slot"))
    }

    /// Fills `bytes` of the scratch with `fill` and copies them into `slot`.
    pub(crate) fn fill_slot(
        &mut self,
        slot: u32,
        bytes: u64,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), TransferError> {
        if bytes > self.slot_bytes {
            return Err(TransferError::Memory(format!(
                "a bucket of {bytes} bytes exceeds the {}-byte slots",
                self.slot_bytes
            )));
        }
        fill(&mut self.scratch[0].as_mut_slice()[..bytes as usize]);
        let copies = [(0, &self.scratch[0].as_slice()[..bytes as usize])];
        self.gpu.copy_ranges_from_host(&self.slots[slot as usize], &copies, || ()).map_err(gpu_error)
    }

    /// Page-locks the sources' memory, unless the last sources were these at the same places.
    fn pin_sources(&mut self, sources: &dyn SourceTensors) {
        let ranges: Vec<&[u8]> = (0..sources.manifest().len()).map(|i| sources.bytes(i)).collect();
        let id = sources.mapping_id();
        // A new map at the old addresses is other memory: its pages are locked anew.
        if self.sources.as_ref().is_some_and(|(p, last)| p.covers_same(&ranges) && *last == id) {
            return;
        }
        // The old registration goes first: the new one may cover the same pages.
        self.sources = None;
        self.sources = match self.gpu.pin_ranges(&ranges) {
            Ok(pinned) => Some((pinned, id)),
            Err(e) => {
                tracing::debug!("sources stay pageable: {e}");
                None
            }
        };
    }

    /// How this update's buckets reach the slots: cold checkpoints read direct from their
    /// files; memory page-locked (here with `pin`, or by its owner, as torch's pinned tensors
    /// are) copied in place; anything else staged, from the files where there are files
    /// (reads through the page cache cost no page faults, where a fresh map of it would).
    fn choose_feed(&mut self, sources: &dyn SourceTensors, pin: bool) -> Feed {
        let in_files = !sources.manifest().is_empty() && sources.on_disk(0, ReadMode::Buffered).is_some();
        if in_files && sources.resident_fraction().is_some_and(|f| f < COLD_BELOW) {
            return Feed::Staged(StageReads::Files(ReadMode::Direct));
        }
        let staged = Feed::Staged(if in_files { StageReads::Files(ReadMode::Buffered) } else { StageReads::Memory });
        let locked = if pin {
            self.pin_sources(sources);
            self.sources.as_ref().is_some_and(|(pinned, _)| pinned.unpinned_bytes == 0)
        } else {
            !in_files && self.locked_by_owner(sources)
        };
        if locked {
            Feed::InPlace
        } else {
            staged
        }
    }

    /// Whether every source is page-locked already, asked of the driver once per set of
    /// source ranges (a stale answer costs speed, never bytes: the copy engines read pageable
    /// memory correctly).
    fn locked_by_owner(&mut self, sources: &dyn SourceTensors) -> bool {
        let bytes: Vec<&[u8]> = (0..sources.manifest().len()).map(|i| sources.bytes(i)).collect();
        let ranges: Vec<(usize, usize)> = bytes.iter().map(|b| (b.as_ptr() as usize, b.len())).collect();
        if let Some((last, locked)) = &self.owner_locked {
            if *last == ranges {
                return *locked;
            }
        }
        let locked = self.gpu.unlocked_bytes(&bytes).is_ok_and(|n| n == 0);
        self.owner_locked = Some((ranges, locked));
        locked
    }

    /// Drops the page-lock of the last sources (theirs to unmap next).
    pub(crate) fn release_sources(&mut self) {
        self.sources = None;
    }

    /// Sends `bucket` through a free slot (see [`SlotWriter::write_bucket`]) and tells the
    /// receiver once it is there.
    pub(crate) fn send_bucket(
        &mut self,
        conn: &mut Conn,
        bucket: &BucketWrite<'_>,
        digests: &mut [ChunkDigests],
        timeout: Duration,
    ) -> Result<(), TransferError> {
        let waited = Instant::now();
        let slot = self.free_slot(conn, timeout)?;
        let wait = waited.elapsed().as_secs_f64();
        self.write_bucket(slot, bucket, digests)?;
        self.phases.slot_wait += wait;
        let (index, bytes) = (bucket.k as u32, bucket.schedule.buckets[bucket.k].bytes);
        conn.send(&Message::BucketReady { index, slot, bytes, digests: Vec::new() })?;
        Ok(())
    }

    /// Writes `bucket` into `slot`: packs what needs packing into a scratch (digesting it
    /// into `digests`), or stages the bucket whole there (see [`Feed`]), and has the copy
    /// engines move it into the slot; returns once it is there, with the next bucket staged
    /// when buckets are staged whole.
    pub(crate) fn write_bucket(
        &mut self,
        slot: u32,
        bucket: &BucketWrite<'_>,
        digests: &mut [ChunkDigests],
    ) -> Result<(), TransferError> {
        let &BucketWrite { plan, schedule, k, sources, threads, flip, pin, landed } = bucket;
        let mut t = Instant::now();
        let mut lap = |phase: &mut f64| {
            *phase += t.elapsed().as_secs_f64();
            t = Instant::now();
        };
        if k == 0 {
            self.phases = SlotPhases::default();
            // What a failed update left.
            self.pending = None;
            self.staged_ahead = None;
            self.feed = self.choose_feed(sources, pin);
            lap(&mut self.phases.pin);
        }
        let bytes = schedule.buckets[k].bytes;
        if bytes > self.slot_bytes {
            return Err(TransferError::Memory(format!(
                "bucket {k} of {bytes} bytes exceeds the {}-byte slots",
                self.slot_bytes
            )));
        }
        let SlotWriter { gpu, slots, scratch, digester, pending, phases, feed, staged_ahead, read_buffers, .. } = self;
        let dst = slots
            .get(slot as usize)
            .ok_or_else(|| TransferError::Unexpected(format!("no device slot {slot} for bucket {k}")))?;
        let [even, odd] = scratch;
        let (this, other) = if k % 2 == 0 { (even, odd) } else { (odd, even) };
        let (copies, ahead) = match *feed {
            Feed::InPlace => {
                (stage_for_copies(plan, schedule, k, sources, this.as_mut_slice(), digests, threads), None)
            }
            Feed::Staged(reads) => {
                let staged = match staged_ahead.take() {
                    Some((ahead, staged)) if ahead == k => staged,
                    _ => stage(plan, schedule, k, sources, this, digests, threads, reads, read_buffers)?,
                };
                let this: &Scratch = this;
                let copies = staged.into_iter().map(|(at, range)| (at, &this.as_slice()[range])).collect();
                let ahead = (k + 1 < schedule.buckets.len()).then_some((other, reads));
                (copies, ahead)
            }
        };
        lap(&mut phases.pack);
        let middle = bytes as usize / 2;
        let flipped =
            copies.iter().find(|(at, b)| (*at..*at + b.len()).contains(&middle)).map(|(at, b)| [b[middle - at] ^ 0x40]);
        // Runs while the copies do: the next bucket is staged into the other scratch.
        let mut pack_ahead = 0.0;
        let stage_next = |digests: &mut [ChunkDigests]| {
            let Some((next, reads)) = ahead else { return Ok(()) };
            let started = Instant::now();
            let staged = stage(plan, schedule, k + 1, sources, next, digests, threads, reads, read_buffers);
            pack_ahead = started.elapsed().as_secs_f64();
            staged.map(|staged| *staged_ahead = Some((k + 1, staged)))
        };
        let staged = if landed {
            let pieces = landed_pieces(schedule, k);
            let fragments = fragment_bytes(k, &pieces, &copies)?;
            let base = dst.device_ptr();
            let regions: Vec<(u64, u64)> =
                pieces.iter().map(|p| (base + p.whole_at.start as u64, p.whole_at.len() as u64)).collect();
            // The last bucket's digests are folded while this one's copies run.
            let (chunks, (folded, staged)) = gpu
                .copy_from_host_then_digest(dst, &copies, digester, &regions, || {
                    let started = Instant::now();
                    let folded = pending.take().map_or(Ok(()), |last| last.fold(digests));
                    phases.digest += started.elapsed().as_secs_f64();
                    (folded, stage_next(digests))
                })
                .map_err(gpu_error)?;
            folded?;
            *pending = Some(Landed { k, pieces, chunks, fragments });
            staged
        } else {
            gpu.copy_ranges_from_host(dst, &copies, || stage_next(digests)).map_err(gpu_error)?
        };
        lap(&mut phases.copy);
        phases.pack += pack_ahead;
        staged?;
        if let (true, Some(byte)) = (flip, &flipped) {
            let corrupt = [(middle, &byte[..])];
            gpu.copy_ranges_from_host(dst, &corrupt, || ()).map_err(gpu_error)?;
        }
        Ok(())
    }

    /// Folds the digests of the last bucket sent into `digests` (after the last bucket of an
    /// update, with `landed`).
    pub(crate) fn finish_digests(&mut self, digests: &mut [ChunkDigests]) -> Result<(), TransferError> {
        self.pending.take().map_or(Ok(()), |last| last.fold(digests))
    }

    /// Device memory this process holds to digest what lands in the slots (the slots are the
    /// receiver's).
    pub fn device_bytes(&self) -> u64 {
        self.digester.device_bytes()
    }

    /// Logs where the last update's time went, as `what` (whose update it was).
    pub(crate) fn log_phases(&self, version: Version, what: &str) {
        let p = self.phases;
        tracing::info!(
            %version,
            pin_s = p.pin,
            slot_wait_s = p.slot_wait,
            pack_s = p.pack,
            copy_s = p.copy,
            digest_s = p.digest,
            unpinned_bytes = self.unpinned_source_bytes(),
            feed = ?self.feed,
            "{what}"
        );
    }

    /// Whether the last update read its sources from their files (see [`COLD_BELOW`]).
    pub fn read_from_disk(&self) -> bool {
        self.feed == Feed::Staged(StageReads::Files(ReadMode::Direct))
    }

    /// Bytes of the sources the driver would not page-lock (copied at the pageable rate).
    pub fn unpinned_source_bytes(&self) -> u64 {
        self.sources.as_ref().map_or(0, |(p, _)| p.unpinned_bytes)
    }
}

fn gpu_error(e: CudaError) -> TransferError {
    TransferError::Memory(format!("copying to the receiver's device slot: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weightlift_core::digest::PieceLayout;

    /// Each piece's edges are the payload bytes the copies read at their place, whichever copy
    /// holds them and in whatever order the copies come; an edge outside every copy is an error.
    #[test]
    fn edges_are_taken_from_the_bytes_copied() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Two copies, out of payload order: [9000, 20000) then [0, 9000).
        let copies = [(9000, &payload[9000..]), (0, &payload[..9000])];
        let piece = |fragments: &[(usize, usize)]| LandedPiece {
            dst: 0,
            layout: PieceLayout::new(20_000, 0, 20_000),
            whole_at: 0..0,
            fragments: fragments.iter().map(|&(a, b)| a..b).collect(),
        };
        let pieces = [piece(&[(100, 4096)]), piece(&[(8990, 9000), (9000, 9100)]), piece(&[(19_990, 20_000)])];
        let got = fragment_bytes(3, &pieces, &copies).unwrap();
        for (p, bytes) in pieces.iter().zip(&got) {
            let want: Vec<Vec<u8>> = p.fragments.iter().map(|r| payload[r.clone()].to_vec()).collect();
            assert_eq!(bytes, &want);
        }
        // Straddling two copies, or past the end: not among the bytes copied.
        for outside in [(8990, 9010), (19_990, 20_010)] {
            let err = fragment_bytes(3, &[piece(&[outside])], &copies).unwrap_err();
            assert!(err.to_string().contains("bucket 3"), "{outside:?}: {err}");
        }
    }
}
