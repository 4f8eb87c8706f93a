"""examples/streaming_engine.py runs: a trainer streams 3 optimizer steps through a
StagingReceiver into a vLLM-shaped engine (fused qkv_proj and gate_up_proj, its own
load_weights), and after every step the engine's logits equal the trainer's bit for bit."""

import importlib.util
from pathlib import Path

import pytest

from conftest import HAS_TRANSFORMERS

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers (not in CI)")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "streaming_engine.py"


def load_example():
    spec = importlib.util.spec_from_file_location("streaming_engine", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype,tied", [("bf16", False), ("f32", True)], ids=["bf16-untied", "f32-tied"])
def test_the_engine_serves_the_trainers_logits_after_every_streamed_step(dtype, tied):
    # 256 KiB buckets: each update streams through many of them (tensors above that go whole).
    results = load_example().run(steps=3, device="cpu", dtype=dtype, bucket_mib=0.25, tied=tied)
    assert [r["version"] for r in results] == [1, 2, 3]
    for r in results:
        assert r["committed"] == r["version"], r
        assert r["logits_equal"] and r["max_abs_diff"] == 0, r
        assert r["logits_changed"], r  # so a stale engine would have failed
        assert r["buckets"] >= 10, r
