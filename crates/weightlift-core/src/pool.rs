//! Tagged device memory: the bookkeeping of a pool that maps physical memory in large chunks,
//! sub-allocates from them, and pauses and resumes whole tags at stable virtual addresses.
//!
//! Every allocation carries a tag (`weights`, `kv_cache`, `cuda_graph`, ...) and lives in a
//! chunk of that tag only, so pausing a tag releases whole chunks. [`TaggedPool::pause`]
//! optionally copies the tag's live bytes to pinned host staging (allocated once per tag and
//! reused every cycle), then unmaps its chunks and releases their physical memory; the
//! address ranges stay reserved. [`TaggedPool::resume`] maps new physical memory at the same
//! addresses and restores the backup, all or nothing: it checks the free memory first, and a
//! step that fails undoes the steps before it, leaving the tag paused.
//!
//! A chunk gets physical memory of its own when it is made. A resume instead makes one
//! physical allocation per run of adjacent chunks ([`Backing`]), because the driver charges
//! per handle as well as per byte: on an H200 with driver 580, ~0.2 ms per handle to release
//! and ~0.5 ms per handle to grant access, so a 32 GiB tag in 128 handles pauses in 34 ms and
//! in 16 handles in 14 ms. The price: a chunk emptied while it shares its physical memory
//! stays mapped (and reusable by the tag) until its neighbours are empty too or the tag
//! pauses.
//!
//! The device is a [`Backend`]: CUDA's virtual memory management in `weightlift-cuda`, and an
//! in-memory fake in the tests here. Nothing here touches a GPU.

use std::collections::BTreeMap;
use std::fmt;

/// What the pool needs from a device: address ranges, physical memory, mappings, pinned host
/// staging and copies. Every method that returns an error leaves nothing half done.
pub trait Backend {
    type Error: std::error::Error + Send + Sync + 'static;
    /// A physical allocation.
    type Physical;
    /// Pinned host memory.
    type Staging;
    /// A point in the queued copies ([`Backend::mark`]).
    type Mark;

    /// The size physical allocations and mappings are made in (2 MiB on H100/H200).
    fn granularity(&self) -> u64;
    /// Reserves `bytes` of virtual address space (a multiple of the granularity).
    fn reserve(&mut self, bytes: u64) -> Result<u64, Self::Error>;
    fn free_range(&mut self, va: u64, bytes: u64);
    /// Creates `bytes` of physical memory (a multiple of the granularity).
    fn create(&mut self, bytes: u64) -> Result<Self::Physical, Self::Error>;
    fn release(&mut self, physical: Self::Physical);
    /// Maps `physical` at `va` (not yet accessible: see [`Backend::grant`]).
    fn map(&mut self, va: u64, bytes: u64, physical: &Self::Physical) -> Result<(), Self::Error>;
    /// Makes `[va, va + bytes)`, one or more adjacent mappings of one reservation, readable
    /// and writable by the device. One call per run of mappings: each call costs ~0.5-1 ms
    /// on an H200 whatever its length.
    fn grant(&mut self, va: u64, bytes: u64) -> Result<(), Self::Error>;
    /// Unmaps a range; the pool calls it only once no work uses the range (after
    /// [`Backend::wait`] or [`Backend::wait_for`]).
    fn unmap(&mut self, va: u64, bytes: u64);
    /// Device memory free now.
    fn free_bytes(&mut self) -> Result<u64, Self::Error>;
    /// Pinned host memory of `bytes`.
    fn staging(&mut self, bytes: u64) -> Result<Self::Staging, Self::Error>;
    /// Queues a copy of `bytes` at device address `from` to `staging[at..]`.
    fn to_host(&mut self, from: u64, staging: &mut Self::Staging, at: u64, bytes: u64) -> Result<(), Self::Error>;
    /// Queues a copy of `staging[at..at + bytes]` to device address `to`.
    fn to_device(&mut self, staging: &Self::Staging, at: u64, to: u64, bytes: u64) -> Result<(), Self::Error>;
    /// Marks the point reached by the copies queued so far.
    fn mark(&mut self) -> Result<Self::Mark, Self::Error>;
    /// Waits for the copies queued before `mark`.
    fn wait_for(&mut self, mark: &Self::Mark) -> Result<(), Self::Error>;
    /// Waits for all work on the device: the pool's copies and whatever other users of the
    /// memory (an engine's kernels) have queued.
    fn wait(&mut self) -> Result<(), Self::Error>;
}

/// Allocations are aligned to this (what CUDA's own allocators give, and what torch expects).
pub const ALIGNMENT: u64 = 512;

/// Default bytes mapped per chunk: large enough that per-handle costs (~100 us to create,
/// map and set access) stay off the hot path, small enough not to strand much memory.
pub const DEFAULT_CHUNK_BYTES: u64 = 256 << 20;

/// Address space a tag reserves at a time for its chunks (more when one allocation needs
/// it): chunks placed side by side are granted access in one call on resume. Addresses cost
/// nothing until mapped; 256 GiB covers the memory of any GPU today.
pub const ADDRESS_WINDOW_BYTES: u64 = 256 << 30;

/// How a tag's memory is handled when paused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagOptions {
    /// Copy the live bytes to pinned host memory on pause and back on resume.
    pub cpu_backup: bool,
    /// Keep the physical memory on pause (only unmap it), so that resume maps the very same
    /// pages: for state tied to them, such as NCCL buffer registrations. Frees nothing.
    pub keep_physical: bool,
}

impl TagOptions {
    /// Whether a pause copies the tag's bytes to the host (keeping the pages needs no copy).
    pub fn backs_up(&self) -> bool {
        self.cpu_backup && !self.keep_physical
    }

    /// Whether the tag's bytes survive a pause (backed up, or on pages kept).
    pub fn keeps_bytes(&self) -> bool {
        self.cpu_backup || self.keep_physical
    }
}

/// A tag's state and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagStats {
    pub tag: String,
    pub options: TagOptions,
    pub paused: bool,
    pub chunks: usize,
    /// Physical allocations behind the chunks (one per run of adjacent chunks after a
    /// resume); 0 while paused, unless the tag keeps its physical memory.
    pub physical_allocations: usize,
    /// Address space the tag's chunks hold, mapped or not.
    pub reserved_bytes: u64,
    /// Physical memory mapped now (0 while paused).
    pub mapped_bytes: u64,
    /// Physical memory the tag gave back while paused (0 while active, and with keep_physical).
    pub paused_bytes: u64,
    /// Bytes of live allocations.
    pub allocated_bytes: u64,
    /// Bytes held in host memory for the tag (its last backup, while paused).
    pub backed_up_bytes: u64,
    /// Pinned host staging kept for the tag across cycles.
    pub staging_bytes: u64,
}

/// A transition a hook is told of: before a tag's memory goes, after it is back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Pausing,
    Resumed,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError<E: std::error::Error + 'static> {
    #[error("unknown memory tag `{0}`")]
    UnknownTag(String),
    #[error("no allocation of this pool starts at {0:#x}")]
    UnknownAddress(u64),
    #[error("memory tag `{0}` is paused: resume it before allocating in it")]
    Paused(String),
    #[error("not enough device memory for tag `{tag}`: {needed} bytes needed, {free} free")]
    NotEnoughMemory { tag: String, needed: u64, free: u64 },
    #[error("device call failed for tag `{tag}` ({action}): {source}")]
    Device {
        tag: String,
        action: &'static str,
        #[source]
        source: E,
    },
}

/// A hook told of every pause and resume.
pub type Hook = Box<dyn FnMut(&str, Transition) + Send>;

/// Free (offset, length) ranges of a span, sorted and coalesced; first fit.
#[derive(Debug)]
struct FreeList {
    bytes: u64,
    free: Vec<(u64, u64)>,
}

impl FreeList {
    fn new(bytes: u64) -> FreeList {
        FreeList { bytes, free: vec![(0, bytes)] }
    }

    fn is_empty(&self) -> bool {
        self.free.len() == 1 && self.free[0] == (0, self.bytes)
    }

    /// Takes `bytes` from the first free range that fits; the offset.
    fn take(&mut self, bytes: u64) -> Option<u64> {
        let i = self.free.iter().position(|&(_, len)| len >= bytes)?;
        let (offset, len) = self.free[i];
        if len == bytes {
            self.free.remove(i);
        } else {
            self.free[i] = (offset + bytes, len - bytes);
        }
        Some(offset)
    }

    /// Returns [offset, offset + bytes) to the free list, merged with its neighbours.
    fn give_back(&mut self, offset: u64, bytes: u64) {
        let i = self.free.partition_point(|&(o, _)| o < offset);
        self.free.insert(i, (offset, bytes));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// A range of a tag's address window that allocations are carved from.
struct Chunk {
    va: u64,
    bytes: u64,
    /// The window the chunk lies in (its base address).
    window: u64,
    space: FreeList,
}

/// One physical allocation mapped over one or more adjacent chunks of a window.
struct Backing<P> {
    va: u64,
    bytes: u64,
    window: u64,
    physical: P,
    mapped: bool,
}

impl<P> Backing<P> {
    fn holds(&self, va: u64) -> bool {
        (self.va..self.va + self.bytes).contains(&va)
    }
}

/// A reserved address range a tag places its chunks in, side by side, so that a resume
/// grants access to a run of chunks in one call.
struct Window {
    va: u64,
    space: FreeList,
}

struct Tag<B: Backend> {
    options: TagOptions,
    paused: bool,
    windows: Vec<Window>,
    /// In address order.
    chunks: Vec<Chunk>,
    /// The physical memory behind the chunks, in address order: every chunk while the tag
    /// is active, none while it is paused (unless it keeps its physical memory).
    backings: Vec<Backing<B::Physical>>,
    /// Pinned host memory kept across cycles, and its size.
    staging: Option<(B::Staging, u64)>,
    /// While paused with a backup: (address, offset in staging, bytes) of each live allocation.
    backup: Vec<(u64, u64, u64)>,
}

struct Allocation {
    tag: String,
    chunk_va: u64,
    bytes: u64,
}

/// A pool of tagged device memory over `B`. Not thread-safe by itself: share it behind a lock.
pub struct TaggedPool<B: Backend> {
    backend: B,
    chunk_bytes: u64,
    tags: BTreeMap<String, Tag<B>>,
    /// Live allocations by address.
    allocations: BTreeMap<u64, Allocation>,
    hooks: Vec<Hook>,
}

impl<B: Backend> fmt::Debug for TaggedPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaggedPool").field("stats", &self.stats()).finish()
    }
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl<B: Backend> TaggedPool<B> {
    /// A pool mapping chunks of `chunk_bytes` (rounded up to the granularity).
    pub fn new(backend: B, chunk_bytes: u64) -> TaggedPool<B> {
        let chunk_bytes = round_up(chunk_bytes.max(1), backend.granularity());
        TaggedPool { backend, chunk_bytes, tags: BTreeMap::new(), allocations: BTreeMap::new(), hooks: Vec::new() }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sets how `tag` is paused (creating the tag if new); applies from its next pause.
    pub fn configure(&mut self, tag: &str, options: TagOptions) {
        self.tag_mut(tag).options = options;
    }

    /// Calls `hook` on every pause (before the memory goes) and resume (after it is back).
    pub fn add_hook(&mut self, hook: Hook) {
        self.hooks.push(hook);
    }

    fn tag_mut(&mut self, tag: &str) -> &mut Tag<B> {
        self.tags.entry(tag.to_string()).or_insert_with(|| Tag {
            options: TagOptions::default(),
            paused: false,
            windows: Vec::new(),
            chunks: Vec::new(),
            backings: Vec::new(),
            staging: None,
            backup: Vec::new(),
        })
    }

    /// `bytes` of device memory tagged `tag`; its address.
    pub fn alloc(&mut self, tag: &str, bytes: u64) -> Result<u64, PoolError<B::Error>> {
        let bytes = round_up(bytes.max(1), ALIGNMENT);
        let chunk_bytes = self.chunk_bytes;
        let granularity = self.backend.granularity();
        let state = self.tag_mut(tag);
        if state.paused {
            return Err(PoolError::Paused(tag.to_string()));
        }
        let found = state.chunks.iter_mut().find_map(|c| c.space.take(bytes).map(|offset| (c.va, offset)));
        let (chunk_va, offset) = match found {
            Some(found) => found,
            None => {
                let size = chunk_bytes.max(round_up(bytes, granularity));
                let va = self.new_chunk(tag, size)?;
                let chunk = self.tag_mut(tag).chunks.iter_mut().find(|c| c.va == va).expect("just added");
                (va, chunk.space.take(bytes).expect("a new chunk holds the allocation"))
            }
        };
        let address = chunk_va + offset;
        self.allocations.insert(address, Allocation { tag: tag.to_string(), chunk_va, bytes });
        Ok(address)
    }

    /// Places, creates and maps one chunk of `tag` with physical memory of its own (its
    /// address); undoes what was done if a step fails.
    fn new_chunk(&mut self, tag: &str, size: u64) -> Result<u64, PoolError<B::Error>> {
        let device = |action, source| PoolError::Device { tag: tag.to_string(), action, source };
        let (window, va) = self.place(tag, size).map_err(|e| device("reserving addresses", e))?;
        let physical = match self.backend.create(size) {
            Ok(p) => p,
            Err(e) => {
                self.unplace(tag, window, va, size);
                let free = self.backend.free_bytes().unwrap_or(0);
                return Err(if free < size {
                    PoolError::NotEnoughMemory { tag: tag.to_string(), needed: size, free }
                } else {
                    device("creating physical memory", e)
                });
            }
        };
        let mapped = self.backend.map(va, size, &physical).map_err(|e| device("mapping", e));
        let granted = mapped.and_then(|()| {
            self.backend.grant(va, size).map_err(|e| {
                self.backend.unmap(va, size);
                device("granting access", e)
            })
        });
        if let Err(e) = granted {
            self.backend.release(physical);
            self.unplace(tag, window, va, size);
            return Err(e);
        }
        let state = self.tag_mut(tag);
        let at = state.chunks.partition_point(|c| c.va < va);
        state.chunks.insert(at, Chunk { va, bytes: size, window, space: FreeList::new(size) });
        let at = state.backings.partition_point(|b| b.va < va);
        state.backings.insert(at, Backing { va, bytes: size, window, physical, mapped: true });
        Ok(va)
    }

    /// Addresses for a chunk of `size` in one of `tag`'s windows (a new window if none has
    /// room): (window base, address).
    fn place(&mut self, tag: &str, size: u64) -> Result<(u64, u64), B::Error> {
        let window_bytes = round_up(ADDRESS_WINDOW_BYTES, self.backend.granularity()).max(size);
        let state = self.tags.get_mut(tag).expect("tags exist before their chunks");
        if let Some(found) =
            state.windows.iter_mut().find_map(|w| w.space.take(size).map(|offset| (w.va, w.va + offset)))
        {
            return Ok(found);
        }
        // Where a wide window cannot be had (a small address space), one just for the chunk.
        let (va, window_bytes) = match self.backend.reserve(window_bytes) {
            Ok(va) => (va, window_bytes),
            Err(_) if window_bytes > size => (self.backend.reserve(size)?, size),
            Err(e) => return Err(e),
        };
        let mut window = Window { va, space: FreeList::new(window_bytes) };
        let offset = window.space.take(size).expect("a new window holds the chunk");
        self.tags.get_mut(tag).expect("checked above").windows.push(window);
        Ok((va, va + offset))
    }

    /// Gives a chunk's addresses back to its window; an empty window is unreserved.
    fn unplace(&mut self, tag: &str, window: u64, va: u64, size: u64) {
        let state = self.tags.get_mut(tag).expect("tags exist before their chunks");
        let i = state.windows.iter().position(|w| w.va == window).expect("chunks lie in their tag's windows");
        state.windows[i].space.give_back(va - window, size);
        if state.windows[i].space.is_empty() {
            let w = state.windows.remove(i);
            self.backend.free_range(w.va, w.space.bytes);
        }
    }

    /// Grants access to every mapped backing of `tag`, one call per run of adjacent ones.
    fn grant_runs(&mut self, tag: &str) -> Result<(), B::Error> {
        let state = self.tags.get(tag).expect("checked by the caller");
        let spans = state.backings.iter().filter(|b| b.mapped).map(|b| (b.va, b.bytes, b.window));
        runs(spans).into_iter().try_for_each(|(va, bytes, _)| self.backend.grant(va, bytes))
    }

    /// Frees the allocation at `address`. A chunk left empty is given back whole (its
    /// addresses too) once no other chunk with allocations shares its physical memory; in a
    /// paused tag, that needs no device memory work beyond the unreserve.
    pub fn free(&mut self, address: u64) -> Result<(), PoolError<B::Error>> {
        let allocation = self.allocations.remove(&address).ok_or(PoolError::UnknownAddress(address))?;
        let state = self.tags.get_mut(&allocation.tag).expect("allocations belong to known tags");
        state.backup.retain(|&(a, _, _)| a != address);
        let i = state.chunks.iter().position(|c| c.va == allocation.chunk_va).expect("allocations belong to a chunk");
        state.chunks[i].space.give_back(address - allocation.chunk_va, allocation.bytes);
        if !state.chunks[i].space.is_empty() {
            return Ok(());
        }
        // The chunk goes with the physical memory behind it, which may be shared with
        // neighbours: only when they are all empty.
        let (va, bytes) = match state.backings.iter().position(|b| b.holds(allocation.chunk_va)) {
            None => (state.chunks[i].va, state.chunks[i].bytes),
            Some(b) => {
                let backing = &state.backings[b];
                if state.chunks.iter().any(|c| backing.holds(c.va) && !c.space.is_empty()) {
                    return Ok(());
                }
                let backing = state.backings.remove(b);
                if backing.mapped {
                    // Work queued on the memory must finish before it goes. A failed wait
                    // means a broken context, where nothing runs any more: unmapping is then
                    // safe too.
                    let _ = self.backend.wait();
                    self.backend.unmap(backing.va, backing.bytes);
                }
                self.backend.release(backing.physical);
                (backing.va, backing.bytes)
            }
        };
        self.drop_chunks(&allocation.tag, |c| c.va >= va && c.va < va + bytes);
        Ok(())
    }

    /// Removes `tag`'s chunks that `which` picks and gives their addresses back.
    fn drop_chunks(&mut self, tag: &str, which: impl Fn(&Chunk) -> bool) {
        let state = self.tags.get_mut(tag).expect("checked by the caller");
        let (gone, kept): (Vec<Chunk>, Vec<Chunk>) = std::mem::take(&mut state.chunks).into_iter().partition(which);
        state.chunks = kept;
        for chunk in gone {
            self.unplace(tag, chunk.window, chunk.va, chunk.bytes);
        }
    }

    /// Gives back the physical memory of `tag` (after backing it up, if configured), keeping
    /// its addresses. Pausing a paused tag does nothing.
    pub fn pause(&mut self, tag: &str) -> Result<(), PoolError<B::Error>> {
        let Some(state) = self.tags.get(tag) else { return Err(PoolError::UnknownTag(tag.to_string())) };
        if state.paused {
            return Ok(());
        }
        let options = state.options;
        let device = |action, source| PoolError::Device { tag: tag.to_string(), action, source };
        // Whatever the memory's users queued (an engine's last kernels) must finish first.
        self.backend.wait().map_err(|e| device("waiting for the device", e))?;
        let backing_up = options.backs_up();
        if backing_up {
            // Persistent staging: allocated once (grown when needed), reused every cycle.
            self.ensure_staging(tag, self.allocated_bytes(tag))?;
        }
        // Copies are queued backing by backing, each followed by a mark; one is unmapped as
        // soon as its own copies are done, while the later ones' copies still run.
        let state = self.tags.get_mut(tag).expect("checked above");
        let mut backup = Vec::new();
        let mut marks = Vec::with_capacity(state.backings.len());
        if backing_up {
            let (staging, _) = state.staging.as_mut().expect("allocated above");
            let mut at = 0;
            for backing in &state.backings {
                for (&address, allocation) in self.allocations.range(backing.va..backing.va + backing.bytes) {
                    self.backend
                        .to_host(address, staging, at, allocation.bytes)
                        .map_err(|e| device("copying to host", e))?;
                    backup.push((address, at, allocation.bytes));
                    at += allocation.bytes;
                }
                marks.push(self.backend.mark().map_err(|e| device("copying to host", e))?);
            }
        }
        for hook in &mut self.hooks {
            hook(tag, Transition::Pausing);
        }
        let state = self.tags.get_mut(tag).expect("checked above");
        for i in 0..state.backings.len() {
            if let Some(mark) = marks.get(i) {
                if let Err(e) = self.backend.wait_for(mark) {
                    // A copy failed: map back what was unmapped (its pages are still held),
                    // so the tag stays active with every byte.
                    for backing in &mut state.backings[..i] {
                        if self.backend.map(backing.va, backing.bytes, &backing.physical).is_ok() {
                            backing.mapped = true;
                        }
                    }
                    let _ = self.grant_runs(tag);
                    for hook in &mut self.hooks {
                        hook(tag, Transition::Resumed);
                    }
                    return Err(device("copying to host", e));
                }
            }
            let backing = &mut state.backings[i];
            if backing.mapped {
                self.backend.unmap(backing.va, backing.bytes);
                backing.mapped = false;
            }
        }
        if !options.keep_physical {
            for backing in std::mem::take(&mut state.backings) {
                self.backend.release(backing.physical);
            }
            // Chunks left empty while they shared physical memory go now: a resume makes
            // memory only for chunks in use.
            self.drop_chunks(tag, |c| c.space.is_empty());
        }
        let state = self.tags.get_mut(tag).expect("checked above");
        state.backup = backup;
        state.paused = true;
        Ok(())
    }

    /// Maps memory for `tag` again at the same addresses and restores its backup: one
    /// physical allocation per run of adjacent chunks (or the memory the tag kept). All or
    /// nothing: without enough free device memory, or when a step fails, the tag stays paused
    /// and nothing it held changes. Resuming an active tag does nothing.
    pub fn resume(&mut self, tag: &str) -> Result<(), PoolError<B::Error>> {
        let Some(state) = self.tags.get_mut(tag) else { return Err(PoolError::UnknownTag(tag.to_string())) };
        if !state.paused {
            return Ok(());
        }
        let device = |action, source| PoolError::Device { tag: tag.to_string(), action, source };
        let bare = runs(
            state
                .chunks
                .iter()
                .filter(|c| !state.backings.iter().any(|b| b.holds(c.va)))
                .map(|c| (c.va, c.bytes, c.window)),
        );
        let needed: u64 = bare.iter().map(|&(_, bytes, _)| bytes).sum();
        let free = self.backend.free_bytes().map_err(|e| device("reading free memory", e))?;
        if needed > free {
            return Err(PoolError::NotEnoughMemory { tag: tag.to_string(), needed, free });
        }
        // All physical memory and mappings first, then the backup's copies: mapping while
        // copies run stalls them (measured: restores at 0.62 of the pinned copy rate when
        // interleaved). Any failure undoes this call's mappings and new physical memory.
        let mut created: Vec<u64> = Vec::new();
        let mut outcome = Ok(());
        for (va, bytes, window) in bare {
            match self.backend.create(bytes) {
                Ok(physical) => {
                    let at = state.backings.partition_point(|b| b.va < va);
                    state.backings.insert(at, Backing { va, bytes, window, physical, mapped: false });
                    created.push(va);
                }
                Err(e) => {
                    outcome = Err(device("creating physical memory", e));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            for backing in &mut state.backings {
                if let Err(e) = self.backend.map(backing.va, backing.bytes, &backing.physical) {
                    outcome = Err(device("mapping", e));
                    break;
                }
                backing.mapped = true;
            }
        }
        if outcome.is_ok() {
            outcome = self.grant_runs(tag).map_err(|e| device("granting access", e));
        }
        let state = self.tags.get_mut(tag).expect("checked above");
        if let (Ok(()), Some((staging, _))) = (&outcome, &state.staging) {
            outcome = state
                .backup
                .iter()
                .try_for_each(|&(address, at, bytes)| self.backend.to_device(staging, at, address, bytes))
                .map_err(|e| device("restoring the backup", e));
        }
        // Only a restore needs waiting for: a resume without one returns as soon as the
        // memory is mapped, and the engine's next kernels are ordered after the driver's own
        // work on the new pages.
        if outcome.is_ok() && !state.backup.is_empty() {
            outcome = self.backend.wait().map_err(|e| device("restoring the backup", e));
        }
        if let Err(error) = outcome {
            // Copies queued into the mappings must finish before the mappings go.
            let _ = self.backend.wait();
            for backing in &mut state.backings {
                if backing.mapped {
                    self.backend.unmap(backing.va, backing.bytes);
                    backing.mapped = false;
                }
            }
            let (made, kept) = std::mem::take(&mut state.backings).into_iter().partition(|b| created.contains(&b.va));
            state.backings = kept;
            for backing in made {
                self.backend.release(backing.physical);
            }
            return Err(error);
        }
        state.backup.clear();
        state.paused = false;
        for hook in &mut self.hooks {
            hook(tag, Transition::Resumed);
        }
        Ok(())
    }

    /// Allocates `tag`'s pinned staging now, sized to its live allocations, so that even its
    /// first backed-up pause copies at full speed (pinning host memory costs ~0.4 s per GiB
    /// on first touch). Does nothing for a tag without a backup, or whose staging is large
    /// enough; returns the staging's size.
    pub fn prepare_staging(&mut self, tag: &str) -> Result<u64, PoolError<B::Error>> {
        let state = self.tags.get(tag).ok_or_else(|| PoolError::UnknownTag(tag.to_string()))?;
        if !state.options.backs_up() {
            return Ok(0);
        }
        self.ensure_staging(tag, self.allocated_bytes(tag))
    }

    /// Makes `tag`'s staging at least `needed` bytes (replaced, not grown in place, when too
    /// small: a backup is one contiguous copy target); its size.
    fn ensure_staging(&mut self, tag: &str, needed: u64) -> Result<u64, PoolError<B::Error>> {
        let state = self.tags.get_mut(tag).ok_or_else(|| PoolError::UnknownTag(tag.to_string()))?;
        if let Some((_, size)) = state.staging.as_ref().filter(|&&(_, size)| size >= needed) {
            return Ok(*size);
        }
        if state.paused && !state.backup.is_empty() {
            return Err(PoolError::Paused(tag.to_string()));
        }
        state.staging = None;
        let staging = self.backend.staging(needed).map_err(|source| PoolError::Device {
            tag: tag.to_string(),
            action: "allocating pinned staging",
            source,
        })?;
        self.tags.get_mut(tag).expect("checked above").staging = Some((staging, needed));
        Ok(needed)
    }

    /// Frees the pinned host staging `tag` keeps between cycles (host memory back, at the cost
    /// of allocating it again on the next backed-up pause). Refused while the tag is paused
    /// with its backup in the staging.
    pub fn release_staging(&mut self, tag: &str) -> Result<u64, PoolError<B::Error>> {
        let state = self.tags.get_mut(tag).ok_or_else(|| PoolError::UnknownTag(tag.to_string()))?;
        if state.paused && !state.backup.is_empty() {
            return Err(PoolError::Paused(tag.to_string()));
        }
        Ok(state.staging.take().map_or(0, |(_, size)| size))
    }

    /// The tag an allocation belongs to.
    pub fn tag_of(&self, address: u64) -> Option<&str> {
        self.allocations.get(&address).map(|a| a.tag.as_str())
    }

    /// Bytes of `tag`'s live allocations.
    fn allocated_bytes(&self, tag: &str) -> u64 {
        self.allocations.values().filter(|a| a.tag == tag).map(|a| a.bytes).sum()
    }

    /// How `tag` is paused (None for an unknown tag).
    pub fn options(&self, tag: &str) -> Option<TagOptions> {
        self.tags.get(tag).map(|t| t.options)
    }

    /// The tag of the live allocation holding `address` (its first byte or any other).
    pub fn tag_containing(&self, address: u64) -> Option<&str> {
        let (&start, allocation) = self.allocations.range(..=address).next_back()?;
        (address < start + allocation.bytes).then_some(allocation.tag.as_str())
    }

    /// The tags in name order.
    pub fn tags(&self) -> Vec<String> {
        self.tags.keys().cloned().collect()
    }

    pub fn is_paused(&self, tag: &str) -> Option<bool> {
        self.tags.get(tag).map(|t| t.paused)
    }

    /// Every tag's state and sizes, in name order.
    pub fn stats(&self) -> Vec<TagStats> {
        self.tags
            .iter()
            .map(|(name, t)| {
                let reserved_bytes: u64 = t.chunks.iter().map(|c| c.bytes).sum();
                let backed: u64 = t.backings.iter().map(|b| b.bytes).sum();
                TagStats {
                    tag: name.clone(),
                    options: t.options,
                    paused: t.paused,
                    chunks: t.chunks.len(),
                    physical_allocations: t.backings.len(),
                    reserved_bytes,
                    mapped_bytes: t.backings.iter().filter(|b| b.mapped).map(|b| b.bytes).sum(),
                    paused_bytes: if t.paused { reserved_bytes - backed } else { 0 },
                    allocated_bytes: self.allocated_bytes(name),
                    backed_up_bytes: t.backup.iter().map(|&(_, _, bytes)| bytes).sum(),
                    staging_bytes: t.staging.as_ref().map_or(0, |&(_, size)| size),
                }
            })
            .collect()
    }
}

/// Spans (address, bytes, window) merged into maximal runs of adjacent spans of one window,
/// in address order.
fn runs(spans: impl Iterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (va, bytes, window) in spans {
        match out.last_mut() {
            Some((start, len, w)) if *start + *len == va && *w == window => *len += bytes,
            _ => out.push((va, bytes, window)),
        }
    }
    out
}

/// Unmaps and releases everything the pool holds and gives its addresses back (tensors still
/// pointing into it must be gone by then).
impl<B: Backend> Drop for TaggedPool<B> {
    fn drop(&mut self) {
        let _ = self.backend.wait();
        for (_, mut tag) in std::mem::take(&mut self.tags) {
            for backing in tag.backings.drain(..) {
                if backing.mapped {
                    self.backend.unmap(backing.va, backing.bytes);
                }
                self.backend.release(backing.physical);
            }
            for window in tag.windows.drain(..) {
                self.backend.free_range(window.va, window.space.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests;
