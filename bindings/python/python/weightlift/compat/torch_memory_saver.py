"""The calls SGLang and its kin make on ``torch_memory_saver``, served by weightlift's pools.

Switch an engine by changing one import::

    # from torch_memory_saver import torch_memory_saver
    from weightlift.compat.torch_memory_saver import torch_memory_saver

    with torch_memory_saver.region(tag="weights", enable_cpu_backup=True):
        model = build_model()
    torch_memory_saver.pause("weights")
    torch_memory_saver.resume("weights")

One ``weightlift.memory.Pool`` per device, made on first use. Unlike torch_memory_saver,
errors are raised (a resume that does not fit raises MemoryPoolError with ``needed`` and
``free``, and the tag stays paused), pinned backup memory is allocated once and reused, and
nothing is preloaded: ``hook_mode`` is accepted for compatibility and allocation always goes
through torch's pluggable allocator.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

from weightlift.memory import MemoryPoolError, Pool

__all__ = ["TorchMemorySaver", "configure_subprocess", "torch_memory_saver"]

_TAG_DEFAULT = "default"


class TorchMemorySaver:
    def __init__(self) -> None:
        self._pools: Dict[int, Pool] = {}
        self._memory_margin_bytes = 0

    def _pool(self, device: Optional[int] = None) -> Pool:
        import torch

        index = torch.cuda.current_device() if device is None else device
        pool = self._pools.get(index)
        if pool is None:
            pool = self._pools[index] = Pool(index)
        return pool

    @contextlib.contextmanager
    def region(self, tag: str = _TAG_DEFAULT, enable_cpu_backup: bool = False,
               enable_disk_backup: bool = False, cpu_backup_backend: Optional[str] = None) -> Iterator[None]:
        if enable_disk_backup:
            raise NotImplementedError("weightlift backs paused memory up to pinned host memory, not to disk")
        if cpu_backup_backend not in (None, "pinned"):
            raise NotImplementedError(f"cpu_backup_backend={cpu_backup_backend!r}: weightlift backs up to pinned memory")
        with self._pool().region(tag, cpu_backup=enable_cpu_backup):
            yield

    @contextlib.contextmanager
    def cuda_graph(self, cuda_graph, pool=None, stream=None, capture_error_mode: str = "global",
                   tag: str = _TAG_DEFAULT, enable_cpu_backup: bool = False,
                   cpu_backup_backend: Optional[str] = None) -> Iterator[None]:
        """``torch.cuda.graph`` whose private memory is in ``tag`` (so it pauses with it)."""
        if pool is not None:
            raise NotImplementedError("the graph's memory pool is the tag's: pass tag=, not pool=")
        with self._pool().cuda_graph(cuda_graph, tag, cpu_backup=enable_cpu_backup, stream=stream,
                                     capture_error_mode=capture_error_mode):
            yield

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Allocations inside go to torch's own allocator, outside every tag."""
        import torch

        pool = torch.cuda.MemPool()
        with torch.cuda.use_mem_pool(pool):
            yield
        del pool

    def _each(self, tag: Optional[str]):
        for pool in self._pools.values():
            if tag is None:
                yield pool, None
            elif tag in pool.stats():
                yield pool, tag

    def pause(self, tag: Optional[str] = None) -> None:
        """Releases ``tag``'s memory (every tag when None) on every device that has it."""
        for pool, name in self._each(tag):
            pool.pause(name)

    def resume(self, tag: Optional[str] = None) -> None:
        """Maps ``tag``'s memory again (every tag when None); all or nothing per tag."""
        import torch

        for pool, name in self._each(tag):
            if self._memory_margin_bytes:
                stats = pool.stats()
                needed = sum(s["paused_bytes"] for t, s in stats.items() if name is None or t == name)
                free, _ = torch.cuda.mem_get_info(pool.device_index)
                if needed and free - needed < self._memory_margin_bytes:
                    error = MemoryPoolError(
                        f"resuming `{name or 'every tag'}` needs {needed} bytes and would leave "
                        f"{free - needed} of {free} free, under the margin of {self._memory_margin_bytes}"
                    )
                    error.needed, error.free = needed, free
                    raise error
            pool.resume(name)

    @property
    def enabled(self) -> bool:
        return True

    @property
    def hook_mode(self):
        raise AttributeError("hook_mode can only be set")

    @hook_mode.setter
    def hook_mode(self, value: str) -> None:
        if value not in ("preload", "torch"):
            raise ValueError(f"unknown hook_mode {value!r}")

    @property
    def memory_margin_bytes(self) -> int:
        return self._memory_margin_bytes

    @memory_margin_bytes.setter
    def memory_margin_bytes(self, value: int) -> None:
        self._memory_margin_bytes = int(value)

    def get_cpu_backup(self, x, zero_copy: bool = False):
        raise NotImplementedError("weightlift keeps backups in its own pinned staging; read the tensor after resume")


@contextlib.contextmanager
def configure_subprocess() -> Iterator[None]:
    """Nothing to preload: weightlift allocates through torch's pluggable allocator."""
    yield


torch_memory_saver = TorchMemorySaver()
