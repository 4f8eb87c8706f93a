"""Type stubs of weightlift's native module (bindings/python/src)."""

from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

# A dict of tensors, or any iterable of (name, tensor) pairs such as `model.named_parameters()`;
# tensors are numpy arrays or torch tensors (CPU or CUDA), contiguous.
NamedTensors = Union[Mapping[str, Any], Iterable[Tuple[str, Any]]]

__version__: str

class WeightliftError(Exception):
    """Base of every error weightlift raises."""

class PlanError(WeightliftError):
    """The tensors cannot be mapped: unknown or missing names, shapes, dtypes, rules, layouts.

    When planning found the problems, `problems` lists every one of them as a dict: `kind`
    (`unmapped`, `missing_source`, `no_destination`, `not_written`, `duplicate`, `shape_mismatch`,
    `dtype_mismatch`, `part_shape`, `unequal_parts`, `bad_parts`, `layout`, `bad_pieces`,
    `coverage`), `tensors` (the names it is about) and `message`.
    """

    problems: list[dict[str, Any]]

class TransferError(WeightliftError):
    """An update broke off: connection, transport, a receiver that went away or stalled."""

class VerificationError(WeightliftError):
    """Bytes arrived but their digests differ from the sender's (or a checker's snapshot).

    Raised by `Sender.push` with a `report` attribute (the push's report)."""

    report: dict[str, Any]

class VersionError(WeightliftError):
    """The receiver refused the version (not newer than its committed one, or one in flight)."""

class CudaError(WeightliftError):
    """The CUDA driver failed or is absent; names the call."""

class MemoryPoolError(WeightliftError):
    """Tagged memory refused: a resume that does not fit (``needed``, ``free``), a paused tag."""
    needed: int
    free: int

class Sender:
    """Pushes a trainer's tensors to one receiver per engine rank.

    `to`: an endpoint ("unix:/path", "tcp://host:port"), a `Receiver` of this process, or a list
    of them (one per tensor-parallel rank, in rank order). `preset`: identity, llama, qwen3,
    qwen3-moe. CPU tensors travel through shared memory (TCP for remote endpoints), CUDA
    tensors over CUDA IPC: legacy IPC handles for torch's default allocator, one file
    descriptor per 20 MiB mapping under `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`
    (read faster by the engine). `sender_digests`: the sender also digests what it meant to write
    (a second read of the model) for the receiver to compare with; without it an update over
    CUDA IPC commits on the receivers' digests alone and is reported `verified: False`. With
    several receivers a version commits on all of them or on none (two-phase); a failure raises
    naming every rank and what it did. `token` (default: $WEIGHTLIFT_TOKEN): the receivers'.
    CPU tensors into a GPU receiver on this host: `device_writes` (default) copies each bucket
    into the receiver's device slots from this process, digested on the GPU where it landed
    (`host_digests=True` digests the CPU tensors instead, a second read of them); False sends
    through the shared-memory ring. `pin_sources` page-locks the tensors for those copies (kept
    while they stay put; off by default, as torch's own copies of memory reaching past a
    registered range then fail). The report's `device_writes` says, per receiver, which ran.

    Sharded trainers: with `rank` and `world` (or `group`, a torch.distributed process group
    whose rank() and size() give them) this process is one rank of a trainer of `world`
    processes, each with a Sender to the same endpoints (not in-process Receivers), each
    calling `push(model.named_parameters(), version)` for every version, in the same order.
    A DTensor (FSDP2's `fully_shard` parameters) is sent as its local shard, placed in its whole
    tensor by its own metadata (global shape, mesh, placements: no collective); uneven and
    empty shards as FSDP2 makes them. A plain tensor, and a DTensor replicated over its mesh, is
    whole on every rank and sent by rank 0 only (the planner refuses overlapping pieces).
    Placements other than Shard(dim) and Replicate (Partial, strided shards) are PlanErrors
    naming the tensor. Each engine rank waits (its `timeout`) for every trainer rank, plans over
    all their pieces, and commits a version only when every rank's share verified; a rank that
    fails takes the version down on all of them. Receivers in host memory only, so far. A sharded
    push's report has `shard` (`rank`, `world`, `bytes`: this rank's share); its `bytes` and
    `ranks` are the receivers', for all the trainer's ranks together.
    """

    def __init__(
        self,
        to: Union[str, "Receiver", Sequence[Union[str, "Receiver"]]],
        *,
        preset: str = "identity",
        head_dim: Optional[int] = None,
        expert_parallel: bool = False,
        transport: Optional[str] = None,
        sender_digests: bool = True,
        timeout: float = 60.0,
        token: Optional[str] = None,
        device_writes: bool = True,
        pin_sources: bool = False,
        host_digests: bool = False,
        modules: Optional[Union[str, Sequence[str]]] = None,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        group: Any = None,
    ) -> None: ...
    def push(self, named_tensors: NamedTensors, version: int) -> dict[str, Any]:
        """Pushes every tensor as `version` to every receiver; returns the report (version,
        bytes, seconds, gbps, verified, committed, stages, ranks, receivers). One call into Rust,
        GIL released."""
    @property
    def last_report(self) -> Optional[dict[str, Any]]: ...
    def close(self) -> None: ...

class Receiver:
    """Takes updates into the engine's own tensors (`params`), in place. `token` (default:
    $WEIGHTLIFT_TOKEN): senders must prove they hold it; listening on an address other hosts
    can reach needs one unless `insecure`."""

    def __init__(
        self,
        params: NamedTensors,
        *,
        preset: Optional[str] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        listen: Optional[str] = None,
        initial_version: int = 0,
        head_dim: Optional[int] = None,
        expert_parallel: bool = False,
        timeout: float = 30.0,
        token: Optional[str] = None,
        insecure: bool = False,
        stream: Optional[Tuple[list[Tuple[str, Tuple[int, ...], str]], int, int]] = None,
        module: Optional[str] = None,
    ) -> None: ...
    def next_stream_update(self, after: int, timeout: Optional[float] = None) -> Optional[int]: ...
    def next_bucket(self, version: int, timeout: Optional[float] = None) -> Optional[int]: ...
    def stream_settled(self, version: int, timeout: Optional[float] = None) -> None: ...
    def abandon_stream(self, version: int, reason: str) -> None: ...
    @property
    def version(self) -> int:
        """The committed version."""
    @property
    def dirty(self) -> list[str]:
        """Tensors that may not hold the committed version's bytes (after a failed update)."""
    @property
    def last_report(self) -> Optional[dict[str, Any]]: ...
    @property
    def endpoint(self) -> Optional[str]: ...
    def wait_for_version(self, after: int, timeout: Optional[float] = None) -> int: ...
    def digests(self) -> list[Tuple[str, int]]: ...
    def poison(self, value: int = 255) -> None: ...
    def serve_http(self, host: str = "127.0.0.1", port: int = 0, *, token: Optional[str] = None,
                   memory: Any = None) -> str:
        """Starts the HTTP API on a background thread; returns its URL."""
    def stop_http(self) -> None: ...

class WeightsChecker:
    """Digests of a set of tensors where they live: snapshot / compare / reset / checksum."""

    def __init__(self, params: NamedTensors) -> None: ...
    def checksum(self) -> list[Tuple[str, int]]: ...
    def snapshot(self) -> None: ...
    def changed(self) -> list[str]: ...
    def compare(self) -> None:
        """Raises VerificationError naming the tensors that changed since the snapshot."""
    def reset(self, value: int = 255) -> None: ...

def digest(tensor: Any) -> int:
    """xxh64 over the xxh64 of each 4 KiB chunk of the tensor's bytes, computed where it lives."""

def synthetic_manifest(name: str) -> list[Tuple[str, list[int], str]]:
    """(name, shape, dtype) of each tensor of a synthetic model shape (qwen3-8b, ...)."""

def cuda_available() -> bool: ...
def _quantize_fp8(data: bytes, shape: list[int], block: Tuple[int, int]) -> Tuple[bytes, bytes]:
    """e4m3 bytes and f32 scales of f32 `data` in blocks (see weightlift.quantize_fp8)."""
def stream_layout(specs: list[Tuple[str, Tuple[int, ...], str]], depth: int, bucket_bytes: int) -> dict[str, Any]:
    """Where a streaming receiver keeps each tensor: buffer_sizes, places, buckets, bytes."""

class MemoryPool:
    """Tagged memory on one GPU (the native half of ``weightlift.memory.Pool``)."""

    device: int
    def __init__(self, device: int, chunk_bytes: int = ...) -> None: ...
    def configure(self, tag: str, *, cpu_backup: bool = False, keep_physical: bool = False) -> None: ...
    def enter(self, tag: str) -> None: ...
    @staticmethod
    def leave() -> None: ...
    def alloc(self, tag: str, nbytes: int) -> int: ...
    def free(self, address: int) -> None: ...
    def pause(self, tag: str) -> None: ...
    def resume(self, tag: str) -> None: ...
    def prepare_staging(self, tag: str) -> int: ...
    def release_staging(self, tag: str) -> int: ...
    def driver_times(self) -> list[Tuple[str, int, float]]: ...
    def tags(self) -> list[str]: ...
    def tag_of(self, address: int) -> Optional[Tuple[str, bool]]: ...
    def stats(self) -> dict[str, dict[str, int]]: ...
    def add_hook(self, hook: Any) -> None: ...

def last_allocator_error() -> Optional[str]:
    """Why the last allocation through the torch allocator failed (cleared by reading)."""
