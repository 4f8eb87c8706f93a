"""Tagged GPU memory for colocated RL: release an engine's memory while the trainer trains, and
take it back in stages at the same virtual addresses (captured CUDA graphs stay valid).

::

    pool = weightlift.memory.Pool("cuda:0")
    with pool.region("weights", cpu_backup=True):
        model = build_model().cuda()
    with pool.region("kv_cache"):
        kv_cache = torch.empty(...)

    pool.pause("kv_cache")     # memory back to the device, addresses kept
    pool.pause("weights")      # backed up to pinned host memory first
    ...                        # the trainer trains
    pool.resume("weights")     # all or nothing: MemoryPoolError (needed, free) if it does not fit
    pool.resume("kv_cache")

Memory comes from CUDA virtual memory management in large chunks (256 MiB by default), one
set of chunks per tag, and a resume maps each run of adjacent chunks from one physical
allocation (the driver's pause and resume costs are per handle as well as per byte); torch allocates through a ``CUDAPluggableAllocator`` into one
``torch.cuda.MemPool`` per tag, so cached blocks never mix tags. Pinned staging for backups is
allocated once per tag and reused every cycle (``release_staging`` gives it back). Errors are
raised, never abort the process.

Do not touch a tag's tensors (nor allocate in its region) while it is paused.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, Optional, Union

from weightlift import _weightlift
from weightlift._weightlift import MemoryPoolError

__all__ = ["MemoryPoolError", "Pool", "multi_stage_awake"]

_allocator_lock = threading.Lock()
_allocator = None


def _torch_allocator():
    """The process's one CUDAPluggableAllocator over weightlift's C functions."""
    global _allocator
    with _allocator_lock:
        if _allocator is None:
            import torch

            _allocator = torch.cuda.memory.CUDAPluggableAllocator(
                _weightlift.__file__, "weightlift_torch_malloc", "weightlift_torch_free"
            )
        return _allocator


# torch asserts, and aborts the process, when a MemPool is destroyed while any thread routes
# allocations into a pool (`use_mem_pool`, a graph capture). The garbage collector may run at
# any allocation, so a Pool dropped earlier can be freed in the middle of another's region:
# its MemPools are kept here instead, and released when the last region ends.
_routing_lock = threading.RLock()
_routing = 0
_retired: list = []


class _MemPools(dict):
    """A Pool's MemPools by tag; when the Pool goes while a region is open, they are retired
    rather than destroyed."""

    def __del__(self) -> None:
        with _routing_lock:
            if _routing:
                _retired.extend(self.values())


@contextlib.contextmanager
def _routing_region() -> Iterator[None]:
    global _routing
    with _routing_lock:
        _routing += 1
    try:
        yield
    finally:
        with _routing_lock:
            _routing -= 1
            released = list(_retired) if _routing == 0 else []
            if released:
                _retired.clear()
        del released  # destroyed here, with no region open


def _device_index(device) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"a memory pool lives on a CUDA device, not {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


class Pool:
    """Tagged memory on one GPU. Several pools may exist in one process."""

    def __init__(self, device: Union[int, str, None] = None, chunk_bytes: int = 256 << 20):
        self.device_index = _device_index(device)
        self._native = _weightlift.MemoryPool(self.device_index, chunk_bytes)
        self._mem_pools: Dict[str, object] = _MemPools()

    @property
    def device(self):
        import torch

        return torch.device("cuda", self.device_index)

    def _mem_pool(self, tag: str):
        import torch

        mem_pool = self._mem_pools.get(tag)
        if mem_pool is None:
            # A MemPool binds the device current at its creation.
            with torch.cuda.device(self.device_index):
                mem_pool = torch.cuda.MemPool(allocator=_torch_allocator().allocator())
            self._mem_pools[tag] = mem_pool
        return mem_pool

    def configure(self, tag: str, *, cpu_backup: bool = False, keep_physical: bool = False) -> None:
        """How ``tag`` is paused: ``cpu_backup`` copies its bytes to pinned host memory and back;
        ``keep_physical`` only unmaps (resume maps the very same pages; frees nothing)."""
        self._native.configure(tag, cpu_backup=cpu_backup, keep_physical=keep_physical)

    @contextlib.contextmanager
    def _routed(self, tag: str, cpu_backup: bool, keep_physical: bool):
        """Configures ``tag`` and routes this thread's allocations through the allocator to it;
        yields the tag's MemPool. An allocation that fails carries the pool's reason."""
        import torch

        self.configure(tag, cpu_backup=cpu_backup, keep_physical=keep_physical)
        mem_pool = self._mem_pool(tag)
        self._native.enter(tag)
        try:
            with _routing_region():
                yield mem_pool
        except torch.OutOfMemoryError as error:
            reason = _weightlift.last_allocator_error()
            if reason:
                error.add_note(f"weightlift memory pool, tag `{tag}`: {reason}")
            raise
        finally:
            self._native.leave()

    @contextlib.contextmanager
    def region(self, tag: str, *, cpu_backup: bool = False, keep_physical: bool = False) -> Iterator[None]:
        """Tensors allocated on this pool's device inside the ``with`` block go to ``tag``.

        With ``cpu_backup``, the tag's pinned backup staging is allocated when the block ends
        (~0.4 s per GiB, once), so no pause pays for it."""
        import torch

        with self._routed(tag, cpu_backup, keep_physical) as mem_pool:
            with torch.cuda.use_mem_pool(mem_pool, device=self.device):
                yield
        self._native.prepare_staging(tag)  # nothing for a tag without a backup

    @contextlib.contextmanager
    def cuda_graph(self, graph, tag: str, *, cpu_backup: bool = False, stream=None,
                   capture_error_mode: str = "global") -> Iterator[None]:
        """``torch.cuda.graph(graph)`` with the graph's private memory in ``tag`` (pausable)."""
        import torch

        with self._routed(tag, cpu_backup, False) as mem_pool:
            with torch.cuda.graph(graph, pool=mem_pool.id, stream=stream, capture_error_mode=capture_error_mode):
                yield

    def _tags(self, tag: Optional[str]):
        return self._native.tags() if tag is None else [tag]

    def pause(self, tag: Optional[str] = None) -> None:
        """Releases ``tag``'s memory (every tag when None), after backing it up if configured.
        Waits for the work queued on the device first."""
        for name in self._tags(tag):
            self._native.pause(name)

    def resume(self, tag: Optional[str] = None) -> None:
        """Maps ``tag``'s memory again (every tag when None) and restores its backup; a tag that
        does not fit raises MemoryPoolError (``needed``, ``free``) and stays paused."""
        for name in self._tags(tag):
            self._native.resume(name)

    def is_paused(self, tag: str) -> bool:
        stats = self._native.stats()
        if tag not in stats:
            raise MemoryPoolError(f"unknown memory tag `{tag}`")
        return stats[tag]["paused"]

    def release_staging(self, tag: str) -> int:
        """Frees the pinned host memory kept for ``tag``'s backups; the bytes freed."""
        return self._native.release_staging(tag)

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per tag: paused, chunks, physical_allocations, reserved/mapped/paused/allocated/backed_up/staging
        bytes."""
        return self._native.stats()

    def add_hook(self, hook: Callable[[str, str], None]) -> None:
        """``hook(tag, event)``: event "pausing" before a tag's memory goes, "resumed" after it
        is back (drop NCCL buffer registrations and the like)."""
        self._native.add_hook(hook)


def multi_stage_awake(pool: Pool, *, weights: str = "weights", kv_cache: str = "kv_cache",
                      update: Optional[Callable[[], object]] = None,
                      free_trainer: Optional[Callable[[], object]] = None):
    """The colocated RL wake-up, in the order that needs the least memory at once:

    1. resume ``weights`` (the trainer's copy is still on the GPU);
    2. ``update()``: push the new weights into them (``Sender.push``);
    3. ``free_trainer()``: drop the trainer's copy and its cached memory;
    4. resume ``kv_cache``, into the memory the trainer gave back.

    Weights paused without a backup come back as garbage: the update rewrites every
    parameter it knows (a Receiver forgets those tensors' digests on pause), but buffers it does
    not carry (rotary tables, say) must be in a tag with ``cpu_backup=True``.

    Returns what ``update()`` returned. If a stage fails, the later ones are not run and the
    error is raised (a resume that does not fit leaves its tag paused).
    """
    pool.resume(weights)
    result = update() if update is not None else None
    if free_trainer is not None:
        free_trainer()
    pool.resume(kv_cache)
    return result
