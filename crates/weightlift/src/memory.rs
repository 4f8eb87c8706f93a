//! An engine's tagged GPU memory, shared between the threads that use it: the allocator an
//! engine's framework calls (torch's pluggable allocator, through the Python package), the
//! code that pauses and resumes tags, and the HTTP agent ([`MemoryControl`]).
//!
//! Hooks registered here run outside the pool's lock, so a hook may take other locks (the
//! Python interpreter's) while allocations go on elsewhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use weightlift_core::pool::{PoolError, TagOptions, TagStats, Transition};
use weightlift_core::Manifest;
use weightlift_cuda::{CudaError, Gpu, GpuPool};

use crate::agent::{MemoryControl, MemoryError};
use crate::cuda_ipc::DeviceTensors;
use crate::gpu::layout;
use crate::tensors::SourceTensors;
use crate::Receiver;

/// A hook told of every pause (before the memory goes) and resume (after it is back).
pub type MemoryHook = Arc<dyn Fn(&str, Transition) + Send + Sync>;

/// Tagged memory on one GPU, usable from any thread.
pub struct MemoryPool {
    ordinal: usize,
    pool: Mutex<GpuPool>,
    hooks: Mutex<Vec<MemoryHook>>,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPool").field("ordinal", &self.ordinal).field("pool", &*self.lock()).finish()
    }
}

pub type MemoryResult<T> = Result<T, PoolError<CudaError>>;

impl MemoryPool {
    /// A pool on `gpu` mapping chunks of `chunk_bytes` (rounded up to the granularity).
    pub fn new(gpu: &Gpu, chunk_bytes: u64) -> Result<MemoryPool, CudaError> {
        Ok(MemoryPool {
            ordinal: gpu.ordinal(),
            pool: Mutex::new(gpu.tagged_pool(chunk_bytes)?),
            hooks: Mutex::default(),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The pool's lock. A panic elsewhere never leaves the books half written (every pool
    /// method finishes or undoes its work before returning), so a poisoned lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, GpuPool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn alloc(&self, tag: &str, bytes: u64) -> MemoryResult<u64> {
        self.lock().alloc(tag, bytes)
    }

    pub fn free(&self, address: u64) -> MemoryResult<()> {
        self.lock().free(address)
    }

    pub fn configure(&self, tag: &str, options: TagOptions) {
        self.lock().configure(tag, options)
    }

    pub fn add_hook(&self, hook: MemoryHook) {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    fn tell(&self, tag: &str, transition: Transition) {
        let hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            hook(tag, transition);
        }
    }

    /// Pauses `tag` (see [`weightlift_core::pool::TaggedPool::pause`]); hooks hear of it first.
    pub fn pause(&self, tag: &str) -> MemoryResult<()> {
        match self.lock().is_paused(tag) {
            None => return Err(PoolError::UnknownTag(tag.to_string())),
            Some(true) => return Ok(()),
            Some(false) => {}
        }
        self.tell(tag, Transition::Pausing);
        let paused = self.lock().pause(tag);
        if paused.is_err() {
            self.tell(tag, Transition::Resumed);
        }
        paused
    }

    /// Resumes `tag`, all or nothing; hooks hear of it once the memory is back.
    pub fn resume(&self, tag: &str) -> MemoryResult<()> {
        let was_paused = self.lock().is_paused(tag).ok_or_else(|| PoolError::UnknownTag(tag.to_string()))?;
        self.lock().resume(tag)?;
        if was_paused {
            self.tell(tag, Transition::Resumed);
        }
        Ok(())
    }

    /// Allocates `tag`'s pinned staging ahead of its first backed-up pause; its size.
    pub fn prepare_staging(&self, tag: &str) -> MemoryResult<u64> {
        self.lock().prepare_staging(tag)
    }

    /// Frees the pinned staging `tag` keeps between backed-up pauses; the bytes freed.
    pub fn release_staging(&self, tag: &str) -> MemoryResult<u64> {
        self.lock().release_staging(tag)
    }

    /// (driver call, calls, seconds) since the pool was made: where pauses and resumes go.
    pub fn driver_times(&self) -> Vec<(&'static str, u64, f64)> {
        self.lock().backend().driver_times().into_iter().map(|(call, n, t)| (call, n, t.as_secs_f64())).collect()
    }

    pub fn tags(&self) -> Vec<String> {
        self.lock().tags()
    }

    pub fn stats(&self) -> Vec<TagStats> {
        self.lock().stats()
    }

    /// Whether `tag` is paused now (false for an unknown tag).
    pub fn is_paused(&self, tag: &str) -> bool {
        self.lock().is_paused(tag) == Some(true)
    }

    /// How `tag` is paused (None for an unknown tag).
    pub fn options(&self, tag: &str) -> Option<TagOptions> {
        self.lock().options(tag)
    }

    /// Whether an allocation of this pool holds `address`.
    pub fn owns(&self, address: u64) -> bool {
        self.lock().tag_containing(address).is_some()
    }

    /// The tag of the allocation holding `address`, and whether it is paused.
    pub fn tag_containing(&self, address: u64) -> Option<(String, bool)> {
        let pool = self.lock();
        let tag = pool.tag_containing(address)?;
        Some((tag.to_string(), pool.is_paused(tag) == Some(true)))
    }

    /// `tags`, or every tag when empty.
    fn named_or_all(&self, tags: &[String]) -> Result<Vec<String>, MemoryError> {
        if tags.is_empty() {
            return Ok(self.tags());
        }
        let known = self.tags();
        match tags.iter().find(|t| !known.contains(t)) {
            Some(unknown) => Err(MemoryError::UnknownTag(unknown.clone())),
            None => Ok(tags.to_vec()),
        }
    }

    fn paused_bytes(&self, tags: &[String]) -> Vec<(String, u64)> {
        self.stats().into_iter().filter(|s| tags.contains(&s.tag)).map(|s| (s.tag, s.paused_bytes)).collect()
    }
}

fn refused(error: PoolError<CudaError>) -> MemoryError {
    match error {
        PoolError::UnknownTag(tag) => MemoryError::UnknownTag(tag),
        other => MemoryError::Refused(other.to_string()),
    }
}

/// The agent's release and resume: tag by tag, in order; a tag that fails stops the call with
/// its error, and the tags before it stay as they now are (each one all or nothing).
impl MemoryControl for MemoryPool {
    fn release(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError> {
        let tags = self.named_or_all(tags)?;
        for tag in &tags {
            self.pause(tag).map_err(refused)?;
        }
        Ok(self.paused_bytes(&tags))
    }

    fn resume(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError> {
        let tags = self.named_or_all(tags)?;
        for tag in &tags {
            MemoryPool::resume(self, tag).map_err(refused)?;
        }
        Ok(self.paused_bytes(&tags))
    }

    fn paused(&self) -> Vec<(String, u64)> {
        self.stats().into_iter().map(|s| (s.tag, s.paused_bytes)).collect()
    }

    fn is_paused(&self, tag: &str) -> bool {
        MemoryPool::is_paused(self, tag)
    }
}

/// A pool holding some of a receiver's tensors: the names of those tensors, by tag.
pub struct PoolHolding {
    pub pool: Arc<MemoryPool>,
    pub tags: BTreeMap<String, Vec<String>>,
}

/// For a receiver's tensors in tagged memory: updates, digests and overwrites are refused
/// while a tag holding them is paused (touching released memory would fault the GPU), and a
/// tag paused without a backup loses its bytes, so its tensors are forgotten (marked dirty,
/// rewritten by the next update).
pub fn guard_receiver(receiver: &Receiver, holders: Vec<PoolHolding>) {
    if holders.is_empty() {
        return;
    }
    for holding in &holders {
        let weak = receiver.downgrade();
        let tags = holding.tags.clone();
        let pool = Arc::downgrade(&holding.pool);
        holding.pool.add_hook(Arc::new(move |tag: &str, transition: Transition| {
            let (Some(names), Some(receiver), Some(pool)) = (tags.get(tag), weak.upgrade(), pool.upgrade()) else {
                return;
            };
            if transition == Transition::Pausing && !pool.options(tag).unwrap_or_default().keeps_bytes() {
                receiver.forget(names);
            }
        }));
    }
    receiver.set_write_gate(Arc::new(move || {
        for holding in &holders {
            if let Some(tag) = holding.tags.keys().find(|tag| holding.pool.is_paused(tag)) {
                return Err(format!(
                    "the engine's tensors are in memory tag `{tag}` of cuda:{}, which is paused: resume it first",
                    holding.pool.ordinal()
                ));
            }
        }
        Ok(())
    }));
}

/// The tensors of a manifest in one allocation of a pool's tag (an engine's weights that can
/// be released and resumed); the allocation goes back to the pool when they are dropped.
pub struct PooledTensors {
    pool: Arc<MemoryPool>,
    manifest: Manifest,
    address: u64,
    offsets: Vec<u64>,
}

impl PooledTensors {
    pub fn alloc(pool: &Arc<MemoryPool>, tag: &str, manifest: &Manifest) -> MemoryResult<PooledTensors> {
        let (offsets, bytes) = layout(manifest);
        let address = pool.alloc(tag, bytes.max(1))?;
        Ok(PooledTensors { pool: pool.clone(), manifest: manifest.clone(), address, offsets })
    }

    /// Copies host tensors (same manifest) into place on `gpu`, the pool's GPU.
    pub fn upload(&self, gpu: &Gpu, host: &dyn SourceTensors) -> Result<(), CudaError> {
        if host.manifest() != &self.manifest {
            return Err(CudaError::Invalid("host tensors have a different manifest".into()));
        }
        for (i, &offset) in self.offsets.iter().enumerate() {
            gpu.upload_region(self.address + offset, host.bytes(i))?;
        }
        Ok(())
    }

    /// The tensors by tag, for [`guard_receiver`].
    pub fn holding(&self, tag: &str) -> PoolHolding {
        let names = self.manifest.iter().map(|s| s.name.clone()).collect();
        PoolHolding { pool: self.pool.clone(), tags: BTreeMap::from([(tag.to_string(), names)]) }
    }
}

impl DeviceTensors for PooledTensors {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn device_ptrs(&self) -> Vec<u64> {
        self.offsets.iter().map(|o| self.address + o).collect()
    }
}

impl Drop for PooledTensors {
    fn drop(&mut self) {
        if let Err(e) = self.pool.free(self.address) {
            tracing::warn!("freeing pooled tensors at {:#x}: {e}", self.address);
        }
    }
}
