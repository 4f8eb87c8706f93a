"""What one rank of a sharded trainer pushes: `Sender(rank=, world=)` calls `local_pieces` once
per push (bindings/python/src/sender.rs).

A DTensor (as FSDP2's `fully_shard` leaves parameters) is read as its local shard, placed in
its whole tensor by its own metadata: the global shape, the device mesh and the placements give
the local shard's offset (`compute_local_shape_and_global_offset`, the function DTensor uses
itself), with no collective. Anything else, and a DTensor replicated over its whole mesh, is
whole on every rank: rank 0 alone sends it, as the planner refuses overlapping pieces (two
ranks writing one byte would leave it to whichever came last, unverifiable).

Only Shard(dim) and Replicate placements are read (on a mesh of any number of dims; a piece
replicated along some mesh dims is sent by the ranks at coordinate 0 along those). Partial
(a pending reduction, the bytes are not the tensor's) and strided shards (FSDP2 over TP: the
local shard is not one box of the whole) are PlanErrors naming the tensor.
"""

import sys
from collections.abc import Mapping

from weightlift._weightlift import PlanError


# (mesh, placements, whole shape) -> (local shape, offset) on this rank.
_boxes: dict = {}


def _dtensor_class():
    # A DTensor exists only where torch.distributed.tensor was imported: never import torch here.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def local_pieces(named_tensors, rank: int):
    """(pairs, placements, shapes) of `named_tensors` as rank `rank` holds them: the (name,
    tensor) pairs this rank sends, for each its placement (None for a whole tensor, else
    (offset, whole shape)), and (name, whole shape) of every tensor given, sent here or not."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    dtensor = _dtensor_class()
    pairs, placements, shapes = [], [], []
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise PlanError("expected (name, tensor) pairs, like a dict or `model.named_parameters()`") from None
        if not isinstance(name, str):
            raise PlanError("tensor names must be strings")
        if dtensor is not None and isinstance(tensor, dtensor):
            shapes.append((name, tuple(int(n) for n in tensor.shape)))
            piece = _piece(name, tensor, rank)
            if piece is not None:
                local, placement = piece
                pairs.append((name, local))
                placements.append(placement)
        else:
            shape = getattr(tensor, "shape", None)
            if shape is not None:
                shapes.append((name, tuple(int(n) for n in shape)))
            if rank == 0:  # what is not a tensor fails its import there, by name
                pairs.append((name, tensor))
                placements.append(None)
    return pairs, placements, shapes


def _piece(name, tensor, rank: int):
    """This rank's (local tensor, placement) of DTensor `tensor`, or None if it sends none."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    for p in placements:
        if p.is_partial():
            raise PlanError(
                f"`{name}` is a DTensor with a Partial placement ({p}): a pending reduction, not the "
                "tensor's values; reduce it first (`redistribute` to Shard or Replicate)"
            )
        if not (isinstance(p, Replicate) or type(p) is Shard):
            raise PlanError(f"`{name}` is a DTensor with placement {p}, which weightlift does not read "
                            "(Shard(dim) and Replicate are)")
    if all(isinstance(p, Replicate) for p in placements):
        # Whole on every rank of its mesh: rank 0 sends it.
        return (_local(tensor), None) if rank == 0 else None
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None  # this rank is not on the tensor's mesh: it holds none of it
    if any(coordinate[d] != 0 for d, p in enumerate(placements) if isinstance(p, Replicate)):
        return None  # a replica of a piece that a rank at coordinate 0 sends
    whole = tuple(int(n) for n in tensor.shape)
    key = (mesh, placements, whole)
    box = _boxes.get(key)
    if box is None:
        # Torch's own arithmetic (torch.chunk's: uneven and empty shards as FSDP2 makes them),
        # once per shape and layout: it builds index tensors as long as the shard.
        local_shape, offset = compute_local_shape_and_global_offset(whole, mesh, placements)
        box = (tuple(int(n) for n in local_shape), tuple(int(o) for o in offset) or (0,) * len(whole))
        if len(_boxes) >= 65536:
            _boxes.clear()
        _boxes[key] = box
    local_shape, offset = box
    local = _local(tensor)
    if tuple(local.shape) != tuple(local_shape):
        raise PlanError(
            f"`{name}`: the DTensor's local shard has shape {tuple(local.shape)} where its placements "
            f"{placements} on a mesh of shape {tuple(mesh.shape)} make it {tuple(local_shape)}"
        )
    return local, (offset, whole)


def _local(tensor):
    """The DTensor's local tensor itself, contiguous: the same object every push, so that a
    later push of the same parameters is recognised without importing them again
    (`to_local()` of a parameter makes a fresh view each call)."""
    local = getattr(tensor, "_local_tensor", None)
    if local is None:
        import torch

        with torch.no_grad():
            local = tensor.to_local()
    return local if local.is_contiguous() else local.contiguous()
