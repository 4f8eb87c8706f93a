"""The Hugging Face proof with an FP8 engine: a transformers Qwen3 (f32 master weights) and
Qwen3-MoE (bf16, stacked experts) train for 3 steps; after every optimizer step weightlift
pushes `model.named_parameters()` into an engine whose linear weights are e4m3
(`torch.float8_e4m3fn`) with a float32 block scale tensor `<weight>_scale_inv` beside each
(vLLM / DeepSeek-V3 block FP8; the other parameters bf16), fused and sharded at TP 1 and 2.

What weightlift wrote must equal, byte for byte, the torch reference quantizer applied to the
trainer's weights in the engine's layout (built here, independently of weightlift); and the
logits of a model whose weights are dequantized from what weightlift wrote (e4m3 -> f32 times
its block's scale) must equal those of the reference's dequantized weights, bit for bit, after
every step. Also through the HTTP agent from a saved checkpoint (the local / disk path).
"""

import pytest

from conftest import HAS_TRANSFORMERS

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers (not in CI)")

if HAS_TRANSFORMERS:
    import torch

    import weightlift as wl
    from test_fp8 import torch_reference
    from test_hf_proof import VOCAB, config, engine_layout, logits, model_class, reassemble


def quantized(name: str) -> bool:
    """The engine's linear weights, as FP8 checkpoints quantize them: not the embeddings, the
    LM head, the norms or the MoE router."""
    return name.endswith(("proj.weight", "w13_weight", "w2_weight"))


def fp8_engine(layout: dict, block) -> dict:
    """An FP8 engine rank's tensors, zero-filled: each quantized weight in e4m3 with its
    scales (one per block) beside it, the rest bf16."""
    engine = {}
    for name, t in layout.items():
        if quantized(name):
            *lead, rows, cols = t.shape
            grid = (*lead, -(-rows // block[0]), -(-cols // block[1]))
            engine[name] = torch.zeros(t.shape, dtype=torch.float8_e4m3fn)
            engine[f"{name}_scale_inv"] = torch.zeros(grid, dtype=torch.float32)
        else:
            engine[name] = torch.zeros(t.shape, dtype=torch.bfloat16)
    return engine


def reference_engine(layout: dict, block) -> dict:
    """The engine rank's tensors made by the torch reference quantizer from the trainer's
    weights in the engine's layout (their own dtype): e4m3 bytes (uint8) and scales."""
    engine = {}
    for name, t in layout.items():
        if quantized(name):
            q, scale = torch_reference(t.float(), block)
            engine[name] = torch.from_numpy(q)
            engine[f"{name}_scale_inv"] = torch.from_numpy(scale)
        else:
            engine[name] = t.to(torch.bfloat16)
    return engine


def dequantized(engine: dict, block) -> dict:
    """The bf16 weights an engine computes with: each e4m3 weight times its block's scale."""
    out = {}
    for name, t in engine.items():
        if name.endswith("_scale_inv"):
            continue
        if quantized(name):
            values = (t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 else t).float()
            scale = engine[f"{name}_scale_inv"]
            rows, cols = values.shape[-2:]
            expanded = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
            out[name] = (values * expanded[..., :rows, :cols]).to(torch.bfloat16)
        else:
            out[name] = t
    return out


def assert_same_bytes(got: dict, want: dict, step: int):
    for name, w in want.items():
        g = got[name]
        g = g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g
        if g.dtype == torch.float32:
            g, w = g.view(torch.int32), w.view(torch.int32)
        assert torch.equal(g, w), f"step {step}: `{name}` differs from the reference quantizer's"


def train_step(trainer, optimizer, batch):
    loss = torch.nn.functional.cross_entropy(
        trainer(input_ids=batch).logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


# (model, trainer dtype, TP size, block): at TP 2 a rank holds 64 rows of k, so 64 x 64 blocks.
CASES = [
    ("untied", "f32", 1, (128, 128)),
    ("untied", "f32", 2, (64, 64)),
    ("moe", "bf16", 1, (128, 128)),
    ("moe", "bf16", 2, (64, 64)),
]


@pytest.mark.parametrize("kind,trainer_dtype,size,block", CASES, ids=[f"{k}-{d}-tp{s}" for k, d, s, _ in CASES])
def test_fp8_engine_logits_equal_the_reference_quantizers_after_every_step(kind, trainer_dtype, size, block):
    torch.manual_seed(0)
    cfg = config(kind)
    cls = model_class(kind)
    trainer = cls(cfg).to(dtype={"f32": torch.float32, "bf16": torch.bfloat16}[trainer_dtype])
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    batch = torch.randint(0, VOCAB, (2, 24))

    layout = lambda r: engine_layout(dict(trainer.state_dict()), kind, r, size)  # noqa: E731
    engine_ranks = [fp8_engine(layout(r), block) for r in range(size)]
    preset = "qwen3-moe" if kind == "moe" else "qwen3"
    receivers = [wl.Receiver(engine_ranks[r], preset=preset, tp_rank=r, tp_size=size) for r in range(size)]
    sender = wl.Sender(receivers, preset=preset)
    engine_model = cls(cfg).to(dtype=torch.bfloat16).eval()
    reference_model = cls(cfg).to(dtype=torch.bfloat16).eval()

    previous = None
    for step in (1, 2, 3):
        train_step(trainer, optimizer, batch)
        report = sender.push(trainer.named_parameters(), version=step)
        assert report["verified"], report
        assert all(r.version == step and r.dirty == [] for r in receivers)

        want = [reference_engine(layout(r), block) for r in range(size)]
        for r in range(size):
            assert_same_bytes(engine_ranks[r], want[r], step)
        engine_model.load_state_dict(reassemble([dequantized(e, block) for e in engine_ranks], kind, False))
        reference_model.load_state_dict(reassemble([dequantized(e, block) for e in want], kind, False))
        got_logits, want_logits = logits(engine_model, batch), logits(reference_model, batch)
        assert torch.equal(got_logits, want_logits), f"step {step}: logits differ"
        # Each step changed the weights, so a stale engine (or stale scales) would be caught.
        if previous is not None:
            assert not torch.equal(previous, want_logits), f"step {step}: the optimizer changed nothing"
        previous = want_logits


def test_fp8_engine_takes_a_saved_bf16_checkpoint_through_its_http_api(tmp_path):
    """The trainer saves each step as safetensors; every FP8 engine rank loads it through its
    HTTP API (`POST /update_weights {"source": {"disk": DIR}}`), quantizing as it writes."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    kind, size, block = "moe", 2, (64, 64)
    cfg = config(kind)
    cls = model_class(kind)
    trainer = cls(cfg).to(dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    batch = torch.randint(0, VOCAB, (2, 24))
    layout = lambda r: engine_layout(dict(trainer.state_dict()), kind, r, size)  # noqa: E731
    engine_ranks = [fp8_engine(layout(r), block) for r in range(size)]
    receivers = [wl.Receiver(engine_ranks[r], preset="qwen3-moe", tp_rank=r, tp_size=size) for r in range(size)]
    clients = [wl.Client(r.serve_http()) for r in receivers]
    engine_model = cls(cfg).to(dtype=torch.bfloat16).eval()
    reference_model = cls(cfg).to(dtype=torch.bfloat16).eval()
    try:
        for step in (1, 2):
            train_step(trainer, optimizer, batch)
            checkpoint = tmp_path / f"step-{step}"
            checkpoint.mkdir()
            save_file({n: p.detach().contiguous() for n, p in trainer.named_parameters()}, str(checkpoint / "model.safetensors"))
            for client in clients:
                report = client.update_weights(step, disk=str(checkpoint))
                assert report["verified"] and report["committed"] == step, report
            want = [reference_engine(layout(r), block) for r in range(size)]
            for r in range(size):
                assert_same_bytes(engine_ranks[r], want[r], step)
            engine_model.load_state_dict(reassemble([dequantized(e, block) for e in engine_ranks], kind, False))
            reference_model.load_state_dict(reassemble([dequantized(e, block) for e in want], kind, False))
            assert torch.equal(logits(engine_model, batch), logits(reference_model, batch)), f"step {step}"
    finally:
        for receiver in receivers:
            receiver.stop_http()


def test_an_fp8_engine_whose_scales_a_tp_slice_splits_is_refused_by_name():
    """At TP 2 a rank holds 64 rows of k: 128-row blocks would straddle k and v in qkv_proj."""
    cfg = config("untied")
    trainer = model_class("untied")(cfg)
    engine = fp8_engine(engine_layout(dict(trainer.state_dict()), "untied", 1, 2), (128, 128))
    receiver = wl.Receiver(engine, preset="qwen3", tp_rank=1, tp_size=2)
    with pytest.raises(wl.PlanError, match=r"qkv_proj\.weight.*split its 128 x 128 blocks") as refused:
        wl.Sender([receiver], preset="qwen3").push(trainer.named_parameters(), version=1)
    assert "k_proj" in str(refused.value)
    assert receiver.version == 0 and receiver.dirty == []


def test_a_streaming_receiver_refuses_an_fp8_engine_by_name():
    """The streaming receiver (engines that load through `load_weights`) does not quantize
    yet: a sender into FP8 specs is refused naming the weight, before any byte moves."""
    specs = [
        ("layers.0.proj.weight", (128, 64), "F8_E4M3"),
        ("layers.0.proj.weight_scale_inv", (1, 1), "F32"),
        ("norm.weight", (64,), "BF16"),
    ]
    staging = wl.StagingReceiver(specs, bucket_mib=1)
    trainer = {"layers.0.proj.weight": torch.ones(128, 64), "norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    with pytest.raises(wl.PlanError, match=r"`layers\.0\.proj\.weight` is FP8.*streaming receiver"):
        wl.Sender(staging.receiver).push(trainer.items(), version=1)
    assert staging.version == 0
