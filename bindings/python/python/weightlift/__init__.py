"""weightlift: move freshly trained weights from RL trainers into inference engines.

Zero-copy (DLPack) with numpy arrays and torch tensors, one call into Rust per update,
every update planned (trainer names and layouts onto the engine's), verified by digest where
the bytes live, and versioned.

Trainer side::

    sender = weightlift.Sender("unix:/tmp/engine.sock", preset="qwen3")
    report = sender.push(model.named_parameters(), version=step)

Engine side (parameters written in place)::

    receiver = weightlift.Receiver(engine.named_parameters(), preset="qwen3",
                                   tp_rank=rank, tp_size=world, listen="unix:/tmp/engine.sock")

Engines that load weights through their own ``load_weights`` use a ``StagingReceiver``, which
streams each update through a ring of a few buckets, yielding ``(name, tensor)`` pairs in the
trainer's names as each bucket is verified, and commits once the engine loaded them all.

``weightlift.memory.Pool`` holds an engine's GPU memory by tag (weights, KV cache), to release
while the trainer trains and take back in stages at the same addresses;
``weightlift.compat.torch_memory_saver`` offers it under torch_memory_saver's calls.

``receiver.serve_http()`` starts the engine agent's HTTP API in the engine process;
``weightlift.Client(url)`` calls it (update_weights, weights_checker, version, metrics, ...).
"""

from weightlift._weightlift import (
    CudaError,
    MemoryPoolError,
    PlanError,
    Receiver,
    Sender,
    TransferError,
    VerificationError,
    VersionError,
    WeightliftError,
    WeightsChecker,
    __version__,
    cuda_available,
    digest,
    synthetic_manifest,
)
from weightlift import memory
from weightlift.fp8 import quantize_fp8
from weightlift.client import AgentError, Client
from weightlift.staging import StagingGroup, StagingReceiver

__all__ = [
    "AgentError",
    "Client",
    "CudaError",
    "MemoryPoolError",
    "PlanError",
    "Receiver",
    "Sender",
    "StagingGroup",
    "StagingReceiver",
    "TransferError",
    "VerificationError",
    "VersionError",
    "WeightliftError",
    "WeightsChecker",
    "__version__",
    "cuda_available",
    "digest",
    "memory",
    "quantize_fp8",
    "synthetic_manifest",
]
