//! Tagged GPU memory for Python: `MemoryPool` (the native half of `weightlift.memory.Pool`)
//! and the two C functions torch's `CUDAPluggableAllocator` calls.
//!
//! torch calls its allocator with a size, a device and a stream, nothing more, so the pool and
//! tag an allocation goes to are set per thread by `Pool.region` (torch routes allocations to
//! a MemPool per thread too), and a free finds its pool in the registry of this process's
//! pools. Neither function panics or touches the GIL: torch may call them holding it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use weightlift::{MemoryPool as SharedPool, PoolHolding};
use weightlift_core::pool::{PoolError, TagOptions, Transition};
use weightlift_cuda::CudaError as DriverError;

use crate::errors::{cuda_error, MemoryPoolError};
use crate::gpu;

/// Every pool made in this process: a free from torch is routed by address.
fn registry() -> MutexGuard<'static, Vec<Arc<SharedPool>>> {
    static POOLS: Mutex<Vec<Arc<SharedPool>>> = Mutex::new(Vec::new());
    POOLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pools holding any of `tensors` (name, address), with the tensors each holds by tag.
pub(crate) fn pools_holding<'a>(tensors: impl Iterator<Item = (&'a str, u64)>) -> Vec<PoolHolding> {
    let pools = registry().clone();
    let mut found: Vec<PoolHolding> = Vec::new();
    for (name, address) in tensors {
        let Some((pool, tag)) = pools.iter().find_map(|p| p.tag_containing(address).map(|(tag, _)| (p, tag))) else {
            continue;
        };
        let holding = match found.iter().position(|h| Arc::ptr_eq(&h.pool, pool)) {
            Some(i) => &mut found[i],
            None => {
                found.push(PoolHolding { pool: pool.clone(), tags: BTreeMap::new() });
                found.last_mut().expect("just pushed")
            }
        };
        holding.tags.entry(tag).or_default().push(name.to_string());
    }
    found
}

thread_local! {
    /// Where this thread's torch allocations go, innermost `Pool.region` last.
    static CURRENT: RefCell<Vec<(Arc<SharedPool>, String)>> = const { RefCell::new(Vec::new()) };
}

/// Why the last allocation on this process failed (torch reports only "out of memory").
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

fn set_last_error(message: String) {
    *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
}

fn allocate(size: isize, device: c_int) -> Result<u64, String> {
    let (pool, tag) = CURRENT
        .with(|current| current.borrow().last().cloned())
        .ok_or("weightlift's allocator was called outside `Pool.region`: no tag to allocate in")?;
    if device < 0 || device as usize != pool.ordinal() {
        return Err(format!("an allocation for cuda:{device} reached the pool of cuda:{}", pool.ordinal()));
    }
    let bytes = u64::try_from(size).map_err(|_| format!("torch asked for {size} bytes"))?;
    pool.alloc(&tag, bytes).map_err(|e| e.to_string())
}

/// `void* weightlift_torch_malloc(ssize_t size, int device, cudaStream_t stream)`: torch's
/// pluggable-allocator malloc. Null on failure (torch raises OutOfMemoryError); the reason is
/// kept for `last_allocator_error()`.
#[unsafe(no_mangle)]
pub extern "C" fn weightlift_torch_malloc(size: isize, device: c_int, _stream: *mut c_void) -> *mut c_void {
    let result =
        std::panic::catch_unwind(|| allocate(size, device)).unwrap_or_else(|_| Err("the allocator panicked".into()));
    match result {
        Ok(address) => address as *mut c_void,
        Err(message) => {
            set_last_error(message);
            std::ptr::null_mut()
        }
    }
}

/// `void weightlift_torch_free(void* ptr, ssize_t size, int device, cudaStream_t stream)`:
/// torch's pluggable-allocator free. A pointer no pool knows is reported, not freed.
#[unsafe(no_mangle)]
pub extern "C" fn weightlift_torch_free(ptr: *mut c_void, _size: isize, _device: c_int, _stream: *mut c_void) {
    let address = ptr as u64;
    let freed = std::panic::catch_unwind(|| {
        let pools = registry().clone();
        match pools.iter().find(|p| p.owns(address)) {
            Some(pool) => pool.free(address).map_err(|e| e.to_string()),
            None => Err(format!("weightlift's allocator was asked to free {address:#x}, which no pool holds")),
        }
    })
    .unwrap_or_else(|_| Err("the allocator panicked".into()));
    if let Err(message) = freed {
        eprintln!("weightlift: {message}");
        set_last_error(message);
    }
}

/// last_allocator_error() -> str | None: why the last allocation through the torch allocator
/// failed, if one did (cleared by reading).
#[pyfunction]
pub(crate) fn last_allocator_error() -> Option<String> {
    LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()).take()
}

pub(crate) fn pool_error(error: PoolError<DriverError>) -> PyErr {
    let message = error.to_string();
    let err = MemoryPoolError::new_err(message);
    if let PoolError::NotEnoughMemory { needed, free, .. } = error {
        Python::attach(|py| {
            let value = err.value(py);
            let _ = value.setattr("needed", needed);
            let _ = value.setattr("free", free);
        });
    }
    err
}

/// MemoryPool(device, chunk_bytes): tagged memory on one GPU (the native half of
/// `weightlift.memory.Pool`, which adds torch's MemPools and regions).
#[pyclass(module = "weightlift._weightlift", frozen)]
pub(crate) struct MemoryPool {
    inner: Arc<SharedPool>,
}

impl MemoryPool {
    pub(crate) fn shared(&self) -> &Arc<SharedPool> {
        &self.inner
    }
}

#[pymethods]
impl MemoryPool {
    #[new]
    #[pyo3(signature = (device, chunk_bytes = weightlift_core::pool::DEFAULT_CHUNK_BYTES))]
    fn new(py: Python<'_>, device: usize, chunk_bytes: u64) -> PyResult<Self> {
        let inner = py
            .detach(|| -> Result<_, DriverError> {
                let gpu = gpu(device)?;
                Ok(Arc::new(SharedPool::new(&gpu, chunk_bytes)?))
            })
            .map_err(cuda_error)?;
        registry().push(inner.clone());
        Ok(MemoryPool { inner })
    }

    #[getter]
    fn device(&self) -> usize {
        self.inner.ordinal()
    }

    /// configure(tag, *, cpu_backup=False, keep_physical=False): how `tag` is paused, from its
    /// next pause on (creates the tag).
    #[pyo3(signature = (tag, *, cpu_backup = false, keep_physical = false))]
    fn configure(&self, tag: &str, cpu_backup: bool, keep_physical: bool) {
        self.inner.configure(tag, TagOptions { cpu_backup, keep_physical });
    }

    /// enter(tag): routes this thread's torch allocations to `tag` of this pool until the
    /// matching `leave()` (regions nest).
    fn enter(&self, tag: &str) {
        CURRENT.with(|current| current.borrow_mut().push((self.inner.clone(), tag.to_string())));
    }

    /// leave(): ends the innermost `enter` of this thread.
    #[staticmethod]
    fn leave() {
        CURRENT.with(|current| current.borrow_mut().pop());
    }

    /// alloc(tag, nbytes) -> int: a device address (for tests and tools; torch allocates
    /// through `region`). Free it with `free`.
    fn alloc(&self, py: Python<'_>, tag: &str, nbytes: u64) -> PyResult<u64> {
        py.detach(|| self.inner.alloc(tag, nbytes)).map_err(pool_error)
    }

    fn free(&self, py: Python<'_>, address: u64) -> PyResult<()> {
        py.detach(|| self.inner.free(address)).map_err(pool_error)
    }

    /// pause(tag): backs the tag up (if configured) and releases its memory; addresses stay.
    fn pause(&self, py: Python<'_>, tag: &str) -> PyResult<()> {
        py.detach(|| self.inner.pause(tag)).map_err(pool_error)
    }

    /// resume(tag): maps memory again at the same addresses and restores the backup, all or
    /// nothing; MemoryPoolError (with `needed` and `free`) when it does not fit.
    fn resume(&self, py: Python<'_>, tag: &str) -> PyResult<()> {
        py.detach(|| self.inner.resume(tag)).map_err(pool_error)
    }

    /// prepare_staging(tag) -> int: allocates `tag`'s pinned backup staging now (sized to its
    /// allocations), so its first pause copies at full speed; the staging's size.
    fn prepare_staging(&self, py: Python<'_>, tag: &str) -> PyResult<u64> {
        py.detach(|| self.inner.prepare_staging(tag)).map_err(pool_error)
    }

    /// release_staging(tag) -> int: frees the pinned host staging kept for `tag`.
    fn release_staging(&self, py: Python<'_>, tag: &str) -> PyResult<u64> {
        py.detach(|| self.inner.release_staging(tag)).map_err(pool_error)
    }

    /// driver_times() -> list[(call, calls, seconds)]: totals per CUDA driver call since the
    /// pool was made (where pauses and resumes spend their time).
    fn driver_times(&self) -> Vec<(&'static str, u64, f64)> {
        self.inner.driver_times()
    }

    fn tags(&self) -> Vec<String> {
        self.inner.tags()
    }

    /// tag_of(address) -> (tag, paused) | None: the tag of the allocation holding `address`.
    fn tag_of(&self, address: u64) -> Option<(String, bool)> {
        self.inner.tag_containing(address)
    }

    /// stats() -> dict[str, dict]: each tag's state and sizes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for s in self.inner.stats() {
            let tag = PyDict::new(py);
            tag.set_item("paused", s.paused)?;
            tag.set_item("chunks", s.chunks)?;
            tag.set_item("physical_allocations", s.physical_allocations)?;
            tag.set_item("reserved_bytes", s.reserved_bytes)?;
            tag.set_item("mapped_bytes", s.mapped_bytes)?;
            tag.set_item("paused_bytes", s.paused_bytes)?;
            tag.set_item("allocated_bytes", s.allocated_bytes)?;
            tag.set_item("backed_up_bytes", s.backed_up_bytes)?;
            tag.set_item("staging_bytes", s.staging_bytes)?;
            out.set_item(s.tag, tag)?;
        }
        Ok(out)
    }

    /// add_hook(fn): `fn(tag, event)` is called with event "pausing" before a tag's memory
    /// goes and "resumed" after it is back (to drop state tied to the physical pages, such as
    /// NCCL buffer registrations). An exception in a hook is printed, not raised.
    fn add_hook(&self, hook: Py<PyAny>) {
        self.inner.add_hook(Arc::new(move |tag: &str, transition: Transition| {
            let event = match transition {
                Transition::Pausing => "pausing",
                Transition::Resumed => "resumed",
            };
            Python::attach(|py| {
                if let Err(e) = hook.call1(py, (tag, event)) {
                    e.print(py);
                }
            });
        }));
    }
}
