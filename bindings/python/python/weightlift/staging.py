"""Streaming mode: updates for engines that load weights through their own ``load_weights``.

Each update lands in a ring of ``depth`` buffers of about one bucket each (plus one buffer
for tensors larger than a bucket, which are handed over whole), never in a copy of the
model; each tensor is handed to the engine as ``(name, tensor)`` as soon as its bucket is in
and its digest verified. The sender waits for the engine to take a bucket before it reuses
that bucket's buffer, and the version commits once the engine has taken every tensor::

    staging = wl.StagingReceiver(meta_model.named_parameters(), device="cuda:0", listen=...)
    for version, weights in staging.updates():
        engine.load_weights(weights)

Yielded tensors are views into the ring: each stays valid until the iterator moves past the
last tensor of its bucket. Treat one as valid until the next item, as vLLM's and SGLang's
loaders do (they copy each weight into the engine's parameter at once); ``copy=True`` yields
copies instead. A failure mid-stream (the sender went away, a digest mismatch) raises from
the iterator, naming the tensors handed over so far; an engine whose loader raises, or that
stops iterating early, fails the update. Either way the receiver stays on its last version.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional, Tuple

from weightlift._weightlift import PlanError, Receiver, VersionError, stream_layout

# weightlift dtype name -> (torch dtype attribute, numpy dtype name or None)
_DTYPES = {
    "F32": ("float32", "float32"),
    "BF16": ("bfloat16", None),
    "F16": ("float16", "float16"),
    "F8_E4M3": ("float8_e4m3fn", None),
    "F8_E5M2": ("float8_e5m2", None),
    "I64": ("int64", "int64"),
    "I32": ("int32", "int32"),
    "U8": ("uint8", "uint8"),
    "BOOL": ("bool", "bool"),
}


def _dtype_name(name: str, dtype: Any) -> str:
    """weightlift's name for a torch/numpy dtype or a dtype string."""
    if isinstance(dtype, str):
        text = dtype.upper()
        if text in _DTYPES:
            return text
    text = str(dtype).rsplit(".", 1)[-1]  # torch.bfloat16 -> bfloat16; numpy float32 -> float32
    for wl, (torch_name, numpy_name) in _DTYPES.items():
        if text in (torch_name, numpy_name):
            return wl
    raise PlanError(f"`{name}` has dtype {dtype!r}, which weightlift does not move ({', '.join(_DTYPES)})")


def _specs(specs: Any) -> list[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, dtype name) of a dict or iterable of (name, tensor-like) pairs (anything
    with .shape and .dtype: meta-device tensors of a model built on `torch.device("meta")`,
    numpy arrays) or of (name, shape, dtype) triples such as `synthetic_manifest()` gives."""
    items = specs.items() if hasattr(specs, "items") else specs
    out = []
    for item in items:
        if len(item) == 3:
            name, shape, dtype = item
        elif len(item) == 2:
            name, like = item
            if not (hasattr(like, "shape") and hasattr(like, "dtype")):
                raise PlanError(f"`{name}`: expected a tensor-like with .shape and .dtype, got {type(like).__name__}")
            shape, dtype = like.shape, like.dtype
        else:
            raise PlanError("expected (name, tensor) pairs or (name, shape, dtype) triples")
        out.append((str(name), tuple(int(d) for d in shape), _dtype_name(str(name), dtype)))
    if not out:
        raise PlanError("no tensors were described")
    return out


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class _Ring:
    """The ring's buffers (uint8 tensors or arrays) and a view per tensor, made once."""

    def __init__(self, specs, layout: dict, device: str) -> None:
        torch = _torch()
        if torch is None and device != "cpu":
            raise PlanError(f"buffers on {device} need torch, which is not installed")
        self.torch = torch
        if torch is not None:
            self.buffers = [torch.empty(n, dtype=torch.uint8, device=device) for n in layout["buffer_sizes"]]
            self.device = self.buffers[0].device if self.buffers else torch.device(device)
        else:
            import numpy

            self.buffers = [numpy.empty(n, dtype=numpy.uint8) for n in layout["buffer_sizes"]]
            self.device = None
        self.views = [self._view(spec, place) for spec, place in zip(specs, layout["places"])]

    def _view(self, spec, place) -> Any:
        name, shape, dtype = spec
        torch_name, numpy_name = _DTYPES[dtype]
        torch = self.torch
        size = 1
        for d in shape:
            size *= d
        nbytes = size * _itemsize(dtype)
        if torch is not None:
            if place is None:
                return torch.empty(shape, dtype=getattr(torch, torch_name), device=self.device)
            buffer, offset = place
            return self.buffers[buffer].narrow(0, offset, nbytes).view(getattr(torch, torch_name)).view(shape)
        if numpy_name is None:
            raise PlanError(f"`{name}`: {dtype} buffers need torch (numpy has no such dtype)")
        import numpy

        if place is None:
            return numpy.empty(shape, dtype=numpy_name)
        buffer, offset = place
        return self.buffers[buffer][offset : offset + nbytes].view(numpy_name).reshape(shape)


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}[dtype]


class Weights:
    """The ``(name, tensor)`` pairs of one streamed version, in bucket order, each once its
    bucket is verified; iterate it once (``load_weights(weights)``). ``stats`` counts what
    the iteration cost: buckets, tensors, calls into weightlift, and the seconds spent waiting
    in them (for the next bucket to arrive) and synchronizing the engine's stream. Where the
    receiver's time went, step by step, is in the update's report (``stream_timing``)."""

    def __init__(self, staging: "StagingReceiver", version: int, timeout: Optional[float]) -> None:
        self.version = version
        self.stats = {"buckets": 0, "tensors": 0, "calls": 0, "wait_s": 0.0, "sync_s": 0.0}
        self._staging = staging
        self._timeout = timeout
        self._done = False
        # The group this update belongs to (main model and draft): the last of its members
        # to be loaded waits for the version to commit on all of them.
        self._group: Optional[_Update] = None
        self._iterator = self._iterate()

    def __iter__(self) -> "Weights":
        return self

    def __next__(self) -> Tuple[str, Any]:
        return next(self._iterator)

    def __len__(self) -> int:
        return len(self._staging._items)

    def _iterate(self) -> Iterator[Tuple[str, Any]]:
        staging = self._staging
        receiver, items, buckets, stats = staging.receiver, staging._items, staging._buckets, self.stats
        version, timeout, copy = self.version, self._timeout, staging._copy
        sync = staging._sync
        clock = time.perf_counter
        try:
            while True:
                if sync is not None:
                    # The engine's copies out of the bucket about to be given back must be done.
                    t = clock()
                    sync()
                    stats["sync_s"] += clock() - t
                t = clock()
                k = receiver.next_bucket(version, timeout)
                stats["wait_s"] += clock() - t
                stats["calls"] += 1
                if k is None:
                    self._done = True
                    group = self._group
                    if group is None:
                        receiver.stream_settled(version, timeout)
                    else:
                        group._finished(self)
                    return
                stats["buckets"] += 1
                tensors = buckets[k]
                stats["tensors"] += len(tensors)
                if copy:
                    for d in tensors:
                        name, view = items[d]
                        yield name, view.clone() if hasattr(view, "clone") else view.copy()
                else:
                    for d in tensors:
                        yield items[d]
        finally:
            if not self._done:
                receiver.abandon_stream(version, "the engine stopped loading before the last tensor")

    def close(self, reason: Optional[str] = None) -> None:
        """Gives up on this version if it was not iterated to the end (it fails, naming
        `reason`); a no-op once every tensor was taken."""
        if not self._done:
            self._staging.receiver.abandon_stream(self.version, reason or "the engine closed the update unfinished")
        self._iterator.close()

    def __del__(self) -> None:
        # Nothing can take the rest any more: fail the update now rather than at the timeout.
        try:
            self.close("the engine dropped the update unfinished")
        except Exception:
            pass


class StagingReceiver:
    """StagingReceiver(specs, *, device="cpu", depth=2, bucket_mib=64, copy=False, listen=None,
                       initial_version=0, timeout=30.0, token=None, insecure=False, module=None)

    Receives updates of the tensors described by `specs` (named and shaped as the trainer
    sends them) and streams each to the engine's loader: :meth:`updates` yields
    ``(version, weights)`` per update, `weights` the ``(name, tensor)`` pairs (torch tensors
    on `device`, or numpy arrays on the CPU without torch). Holds ``depth`` buffers of about
    ``bucket_mib`` MiB, plus one the size of the largest tensor above that (`memory_bytes`).

    `specs`: a dict or iterable of (name, tensor-like) pairs (a meta-device model's
    ``named_parameters()``), or (name, shape, dtype) triples. `timeout`: how long the receiver
    waits for the sender, and for the engine to take a bucket, before failing the update.
    `module` ("main" or "mtp"): the part of a checkpoint with an MTP module this receiver
    streams, for updates from disk (a sender names it per receiver: ``Sender(...,
    modules=[...])``); a main model and its draft load one version together through a
    :class:`StagingGroup`.
    """

    def __init__(
        self,
        specs: Any,
        *,
        device: str = "cpu",
        depth: int = 2,
        bucket_mib: float = 64,
        copy: bool = False,
        listen: Optional[str] = None,
        initial_version: int = 0,
        timeout: float = 30.0,
        token: Optional[str] = None,
        insecure: bool = False,
        module: Optional[str] = None,
    ) -> None:
        specs = _specs(specs)
        bucket_bytes = int(bucket_mib * (1 << 20))
        layout = stream_layout(specs, depth, bucket_bytes)
        self._ring = _Ring(specs, layout, device)
        self._items = [(spec[0], view) for spec, view in zip(specs, self._ring.views)]
        self._buckets = layout["buckets"]
        self._copy = copy
        self.memory_bytes = layout["bytes"]
        buffers = [(f"ring.{i}", b) for i, b in enumerate(self._ring.buffers)]
        self.receiver = Receiver(
            buffers,
            listen=listen,
            initial_version=initial_version,
            timeout=timeout,
            token=token,
            insecure=insecure,
            stream=(specs, depth, bucket_bytes),
            module=module,
        )
        torch = self._ring.torch
        on_gpu = torch is not None and self._ring.device.type == "cuda"
        self._sync = (lambda: torch.cuda.current_stream(self._ring.device).synchronize()) if on_gpu else None
        self._handed_out = initial_version

    @property
    def version(self) -> int:
        """The committed version."""
        return self.receiver.version

    @property
    def endpoint(self) -> Optional[str]:
        """Where this receiver listens, or None."""
        return self.receiver.endpoint

    @property
    def dirty(self) -> list:
        """Tensors handed to the engine by the last update, if it failed (the engine may hold
        either version of them)."""
        return self.receiver.dirty

    def next_update(self, timeout: Optional[float] = None) -> Optional[Tuple[int, Weights]]:
        """The next update as it starts streaming (one begun before included): (version,
        weights), or None once `timeout` seconds passed (None: wait forever). Iterate
        `weights` to the end, or `close()` it to give up on the update."""
        version = self.receiver.next_stream_update(self._handed_out, timeout)
        if version is None:
            return None
        self._handed_out = version
        return version, Weights(self, version, timeout)

    def updates(self, timeout: Optional[float] = None) -> Iterator[Tuple[int, Weights]]:
        """Yields (version, weights) for each update as it starts streaming, as
        :meth:`next_update`, until a wait times out. `weights` belongs to its turn of the loop:
        leaving the turn (the next update, `break`, an exception raised by the loader) with
        tensors not taken gives the update up at once, and it fails."""
        return _each_update(self.next_update, timeout, lambda weights: (weights,))


def _each_update(next_update, timeout, members) -> Iterator:
    """Yields each update `next_update(timeout)` gives until it gives None; leaving a turn
    closes the update's `Weights` (`members(weights)`), failing it if not all were taken."""
    while True:
        update = next_update(timeout)
        if update is None:
            return
        try:
            yield update
        finally:
            for weights in members(update[1]):
                weights.close("the engine moved on without loading every tensor")


class _Update:
    """One version streaming to every member of a group: the members' iterators, and the
    wait for the version to settle on all of them once the last is loaded."""

    def __init__(self, weights: list) -> None:
        self.weights = weights
        for w in weights:
            w._group = self

    def _finished(self, last: Weights) -> None:
        if not all(w._done for w in self.weights):
            return
        # Every member's tensors are taken: the sender decides once all voted; each member
        # settles on that decision. The first failure raises, naming its receiver's tensors.
        for w in self.weights:
            w._staging.receiver.stream_settled(w.version, w._timeout)

    def close(self, reason: str) -> None:
        for w in self.weights:
            w.close(reason)


class StagingGroup:
    """StagingGroup(*members)

    Streaming receivers that take one version together: a main model and its draft or MTP
    module (each its own :class:`StagingReceiver`, the trainer's ``Sender([main.receiver,
    draft.receiver], modules=["main", "mtp"])`` pushing both). The version commits on every
    member or on none: if one member's update fails (a digest mismatch, its loader raised),
    every member stays on its last version, dirty with what its engine was handed::

        group = wl.StagingGroup(main, draft)
        for version, (main_weights, draft_weights) in group.updates():
            model.load_weights(main_weights)
            drafter.load_weights(draft_weights)

    Load the members in any order (one after another, or on threads): each iterator ends once
    its tensors are all taken and verified, and the last to end waits for the commit on all
    of them, raising if it failed anywhere.
    """

    def __init__(self, *members: StagingReceiver) -> None:
        if not members:
            raise PlanError("a StagingGroup needs at least one StagingReceiver")
        self.members = members

    @property
    def version(self) -> int:
        """The version every member committed (the lowest, should one lag)."""
        return min(m.version for m in self.members)

    def next_update(self, timeout: Optional[float] = None) -> Optional[Tuple[int, Tuple[Weights, ...]]]:
        """The next version as it starts streaming to every member: (version, one `Weights`
        per member, in the members' order), or None once `timeout` passed."""
        updates = []
        for member in self.members:
            update = member.next_update(timeout)
            if update is None:
                for _, weights in updates:
                    weights.close("another receiver of the group had no update")
                return None
            updates.append(update)
        versions = [v for v, _ in updates]
        weights = [w for _, w in updates]
        if len(set(versions)) != 1:
            group = _Update(weights)
            group.close(f"the group's receivers are streaming different versions: {versions}")
            raise VersionError(f"the group's receivers are streaming different versions: {versions}")
        _Update(weights)
        return versions[0], tuple(weights)

    def updates(self, timeout: Optional[float] = None) -> Iterator[Tuple[int, Tuple[Weights, ...]]]:
        """Yields (version, weights per member) for each version, as
        :meth:`StagingReceiver.updates` does for one receiver."""
        return _each_update(self.next_update, timeout, lambda weights: weights)
