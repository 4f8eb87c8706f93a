"""Iterator mode: updates land in buffers weightlift allocates, in the trainer's names and
layout, and are handed to an engine's own ``load_weights`` as ``(name, tensor)`` pairs.

This costs one staging copy of the model (the buffers), which is the price of an engine that
insists on loading weights itself; engines that let weightlift write their parameters in
place use :class:`weightlift.Receiver` and need none.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Tuple

from weightlift._weightlift import PlanError, Receiver

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


def _allocate(name: str, shape: Tuple[int, ...], dtype: str, device: str) -> Any:
    torch_name, numpy_name = _DTYPES[dtype]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        return torch.zeros(shape, dtype=getattr(torch, torch_name), device=device)
    if device != "cpu":
        raise PlanError(f"`{name}`: buffers on {device} need torch, which is not installed")
    if numpy_name is None:
        raise PlanError(f"`{name}`: {dtype} buffers need torch (numpy has no such dtype)")
    import numpy

    return numpy.zeros(shape, dtype=numpy_name)


class StagingReceiver:
    """StagingReceiver(specs, *, device="cpu", listen=None, initial_version=0, timeout=30.0)

    Receives updates into buffers it allocates (torch tensors on `device`, or numpy arrays on
    the CPU without torch), one per trainer tensor described by `specs`, named and shaped as
    the trainer sends them (the identity preset). After an update, :meth:`weights` yields the
    ``(name, tensor)`` pairs an engine's ``load_weights`` takes; :meth:`updates` waits for
    each new version in turn.

    `specs`: a dict or iterable of (name, tensor-like) pairs (a meta-device model's
    ``named_parameters()``), or (name, shape, dtype) triples.
    """

    def __init__(
        self,
        specs: Any,
        *,
        device: str = "cpu",
        listen: Optional[str] = None,
        initial_version: int = 0,
        timeout: float = 30.0,
    ) -> None:
        self._buffers = [(name, _allocate(name, shape, dtype, device)) for name, shape, dtype in _specs(specs)]
        self.receiver = Receiver(
            self._buffers, preset="identity", listen=listen, initial_version=initial_version, timeout=timeout
        )
        self._handed_out = initial_version

    @property
    def version(self) -> int:
        """The committed version."""
        return self.receiver.version

    @property
    def endpoint(self) -> Optional[str]:
        """Where this receiver listens, or None."""
        return self.receiver.endpoint

    def weights(self) -> Iterator[Tuple[str, Any]]:
        """Every buffer as a (name, tensor) pair, as of the committed version. After a failed
        update (the receiver is dirty) it raises PlanError naming the tensors, so an engine
        never loads half an update. The buffers are written by the next update: load them
        before the trainer pushes again (the RL loop's usual order)."""
        dirty = self.receiver.dirty
        if dirty:
            shown = ", ".join(f"`{n}`" for n in dirty[:8])
            raise PlanError(f"the last update failed; {len(dirty)} tensor(s) may hold neither version: {shown}")
        return iter(list(self._buffers))

    def updates(self, timeout: Optional[float] = None) -> Iterator[Tuple[int, Iterable[Tuple[str, Any]]]]:
        """Yields (version, weights) for each version committed since the last one handed out
        (a version committed before the loop started included), waiting up to `timeout`
        seconds for each (None: forever); stops when a wait times out."""
        while True:
            version = self.receiver.wait_for_version(self._handed_out, timeout)
            if version <= self._handed_out:
                return
            self._handed_out = version
            yield version, self.weights()
