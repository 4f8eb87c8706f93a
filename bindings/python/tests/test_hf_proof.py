"""The proof on a real Hugging Face model: a transformers Qwen3 (dense, tied or untied
embeddings) and Qwen3-MoE (stacked experts) trains for 3 steps; after every optimizer step
weightlift pushes `model.named_parameters()` into engine-layout tensors (fused qkv_proj and
gate_up_proj, vLLM's w13/w2 expert stacks, tensor-parallel shards at TP 2), and the engine's
logits on a fixed batch must equal the trainer's bit for bit in bf16.

The engine layout is built here from the trainer's state dict, independently of weightlift;
the engine computes its logits with the same transformers code on weights reassembled from
its own (fused, sharded) tensors, so any wrong, missing or stale byte changes them.

Runs wherever torch and transformers are installed: on the CPU here, and on one GPU and
across two GPUs on a GPU machine (scripts/gpu-tests.sh).
"""

import pytest

from conftest import HAS_TRANSFORMERS, cuda_devices

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers (not in CI)")

if HAS_TRANSFORMERS:
    import torch
    import transformers

    import weightlift as wl

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 256, 4, 2, 64, 512
INTERMEDIATE, EXPERTS, MOE_INTERMEDIATE = 512, 8, 128


def config(kind: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
    )
    if kind == "moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=INTERMEDIATE,
            moe_intermediate_size=MOE_INTERMEDIATE,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
            **common,
        )
    return transformers.Qwen3Config(intermediate_size=INTERMEDIATE, tie_word_embeddings=(kind == "tied"), **common)


def model_class(kind: str):
    return transformers.Qwen3MoeForCausalLM if kind == "moe" else transformers.Qwen3ForCausalLM


def shard(t, dim: int, rank: int, size: int):
    return t.chunk(size, dim=dim)[rank]


def engine_layout(sd: dict, kind: str, rank: int, size: int) -> dict:
    """The engine rank's parameters (vLLM's layout) made from a full bf16 state dict."""
    e = {}
    for layer in range(LAYERS):
        a, m = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        # KV_HEADS >= size here: every rank holds whole heads of q, k and v.
        e[f"{a}.qkv_proj.weight"] = torch.cat([shard(sd[f"{a}.{p}_proj.weight"], 0, rank, size) for p in "qkv"])
        e[f"{a}.o_proj.weight"] = shard(sd[f"{a}.o_proj.weight"], 1, rank, size)
        for norm in ("q_norm", "k_norm"):
            e[f"{a}.{norm}.weight"] = sd[f"{a}.{norm}.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            e[f"model.layers.{layer}.{norm}.weight"] = sd[f"model.layers.{layer}.{norm}.weight"]
        if kind == "moe":
            gate_up = sd[f"{m}.experts.gate_up_proj"]  # [E, 2I, H], gate then up
            gate, up = gate_up.chunk(2, dim=1)
            e[f"{m}.experts.w13_weight"] = torch.cat([shard(gate, 1, rank, size), shard(up, 1, rank, size)], dim=1)
            e[f"{m}.experts.w2_weight"] = shard(sd[f"{m}.experts.down_proj"], 2, rank, size)
            e[f"{m}.gate.weight"] = sd[f"{m}.gate.weight"]
        else:
            e[f"{m}.gate_up_proj.weight"] = torch.cat(
                [shard(sd[f"{m}.gate_proj.weight"], 0, rank, size), shard(sd[f"{m}.up_proj.weight"], 0, rank, size)]
            )
            e[f"{m}.down_proj.weight"] = shard(sd[f"{m}.down_proj.weight"], 1, rank, size)
    e["model.embed_tokens.weight"] = shard(sd["model.embed_tokens.weight"], 0, rank, size)
    e["model.norm.weight"] = sd["model.norm.weight"]
    # The engine keeps its own lm_head, tied or not (vocab-parallel).
    e["lm_head.weight"] = shard(sd.get("lm_head.weight", sd["model.embed_tokens.weight"]), 0, rank, size)
    return {k: v.contiguous() for k, v in e.items()}


def reassemble(ranks: list, kind: str, tied: bool) -> dict:
    """The full state dict the engine's ranks hold together (the inverse of engine_layout)."""
    size = len(ranks)
    q_rows, kv_rows = HEADS * HEAD_DIM // size, KV_HEADS * HEAD_DIM // size
    sd = {}
    cat = lambda name, dim: torch.cat([r[name] for r in ranks], dim=dim)
    for layer in range(LAYERS):
        a, m = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        qkv = [r[f"{a}.qkv_proj.weight"] for r in ranks]
        sd[f"{a}.q_proj.weight"] = torch.cat([t[:q_rows] for t in qkv])
        sd[f"{a}.k_proj.weight"] = torch.cat([t[q_rows : q_rows + kv_rows] for t in qkv])
        sd[f"{a}.v_proj.weight"] = torch.cat([t[q_rows + kv_rows :] for t in qkv])
        sd[f"{a}.o_proj.weight"] = cat(f"{a}.o_proj.weight", 1)
        for norm in ("q_norm", "k_norm"):
            sd[f"{a}.{norm}.weight"] = ranks[0][f"{a}.{norm}.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{layer}.{norm}.weight"] = ranks[0][f"model.layers.{layer}.{norm}.weight"]
        if kind == "moe":
            halves = [r[f"{m}.experts.w13_weight"].chunk(2, dim=1) for r in ranks]
            gate = torch.cat([h[0] for h in halves], dim=1)
            up = torch.cat([h[1] for h in halves], dim=1)
            sd[f"{m}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            sd[f"{m}.experts.down_proj"] = cat(f"{m}.experts.w2_weight", 2)
            sd[f"{m}.gate.weight"] = ranks[0][f"{m}.gate.weight"]
        else:
            halves = [r[f"{m}.gate_up_proj.weight"].chunk(2) for r in ranks]
            sd[f"{m}.gate_proj.weight"] = torch.cat([h[0] for h in halves])
            sd[f"{m}.up_proj.weight"] = torch.cat([h[1] for h in halves])
            sd[f"{m}.down_proj.weight"] = cat(f"{m}.down_proj.weight", 1)
    sd["model.embed_tokens.weight"] = cat("model.embed_tokens.weight", 0)
    sd["model.norm.weight"] = ranks[0]["model.norm.weight"]
    sd["lm_head.weight"] = cat("lm_head.weight", 0)
    if tied:
        assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]), "the tied lm_head differs"
    return sd


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


# (model, trainer dtype, TP size): f32 master weights are cast to the engine's bf16 on the way.
CASES = [("untied", "f32", 1), ("tied", "f32", 2), ("untied", "f32", 2), ("moe", "bf16", 1), ("moe", "bf16", 2)]
DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param(
        "cuda:0",
        "cuda:0",
        id="same-gpu",
        marks=pytest.mark.skipif(cuda_devices() < 1, reason="needs a CUDA GPU"),
    ),
    pytest.param(
        "cpu",
        "cuda:0",
        id="host-to-gpu",
        marks=pytest.mark.skipif(cuda_devices() < 1, reason="needs a CUDA GPU"),
    ),
    pytest.param(
        "cuda:0",
        "cuda:1",
        id="cross-gpu",
        marks=pytest.mark.skipif(cuda_devices() < 2, reason="needs two CUDA GPUs (cuda:0 -> cuda:1)"),
    ),
]


@pytest.mark.parametrize("trainer_device,engine_device", DEVICES)
@pytest.mark.parametrize("kind,trainer_dtype,size", CASES, ids=[f"{k}-{d}-tp{s}" for k, d, s in CASES])
def test_engine_logits_equal_the_trainers_after_every_step(kind, trainer_dtype, size, trainer_device, engine_device):
    torch.manual_seed(0)
    trainer_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[trainer_dtype]
    cfg = config(kind)
    cls = model_class(kind)
    trainer = cls(cfg).to(device=trainer_device, dtype=trainer_dtype)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    batch = torch.randint(0, VOCAB, (2, 24), device=trainer_device)

    # The engine: each rank's parameters, in its own layout, allocated before any update.
    engine_ranks = [
        {k: torch.zeros_like(v, device=engine_device) for k, v in engine_layout(
            {k: v.to(torch.bfloat16) for k, v in trainer.state_dict().items()}, kind, r, size).items()}
        for r in range(size)
    ]
    preset = "qwen3-moe" if kind == "moe" else "qwen3"
    receivers = [
        wl.Receiver(engine_ranks[r], preset=preset, tp_rank=r, tp_size=size) for r in range(size)
    ]
    sender = wl.Sender(receivers, preset=preset)
    engine_model = cls(cfg).to(device=engine_device, dtype=torch.bfloat16).eval()
    # Logits are compared on the engine's device: a CPU and a GPU matmul differ in rounding.
    reference = cls(cfg).to(device=engine_device, dtype=torch.bfloat16).eval()

    previous = None
    for step in (1, 2, 3):
        loss = torch.nn.functional.cross_entropy(
            trainer(input_ids=batch).logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        report = sender.push(trainer.named_parameters(), version=step)
        assert report["verified"], report
        assert all(r.version == step and r.dirty == [] for r in receivers)

        # The trainer's weights as the engine should hold them (bf16) and its logits.
        want = {k: v.detach().to(torch.bfloat16) for k, v in trainer.state_dict().items()}
        reference.load_state_dict(want)
        want_logits = logits(reference, batch.to(engine_device))

        got = reassemble(engine_ranks, kind, tied=(kind == "tied"))
        for name, tensor in want.items():
            if name in got:
                assert torch.equal(got[name].to(trainer_device), tensor), f"step {step}: `{name}` differs"
        engine_model.load_state_dict(got, strict=True)
        got_logits = logits(engine_model, batch.to(engine_device))
        assert torch.equal(got_logits, want_logits), f"step {step}: logits differ"
        # Each step really changed the weights, so a stale engine would have been caught.
        if previous is not None:
            assert not torch.equal(previous, want_logits), f"step {step}: the optimizer changed nothing"
        previous = want_logits


ENGINES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda:0", id="gpu", marks=pytest.mark.skipif(cuda_devices() < 1, reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("engine_device", ENGINES)
@pytest.mark.parametrize("kind,trainer_dtype,size", [("tied", "f32", 2), ("moe", "bf16", 2)], ids=["tied-f32-tp2", "moe-bf16-tp2"])
def test_engine_logits_equal_the_trainers_from_a_saved_checkpoint(tmp_path, kind, trainer_dtype, size, engine_device):
    """The trainer saves each step's weights as a safetensors checkpoint (its own names and
    dtype, as `save_pretrained` writes them: a tied lm_head left out); every engine rank loads
    it through its HTTP API (`POST /update_weights {"source": {"disk": DIR}}`) into its fused,
    sharded tensors, and its logits equal the trainer's."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    cfg = config(kind)
    cls = model_class(kind)
    trainer = cls(cfg).to(dtype={"f32": torch.float32, "bf16": torch.bfloat16}[trainer_dtype])
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    batch = torch.randint(0, VOCAB, (2, 24))
    bf16 = {k: v.to(torch.bfloat16) for k, v in trainer.state_dict().items()}
    engine_ranks = [
        {k: torch.zeros_like(v, device=engine_device) for k, v in engine_layout(bf16, kind, r, size).items()}
        for r in range(size)
    ]
    preset = "qwen3-moe" if kind == "moe" else "qwen3"
    receivers = [wl.Receiver(engine_ranks[r], preset=preset, tp_rank=r, tp_size=size) for r in range(size)]
    clients = [wl.Client(r.serve_http()) for r in receivers]
    engine_model = cls(cfg).to(device=engine_device, dtype=torch.bfloat16).eval()
    reference = cls(cfg).to(device=engine_device, dtype=torch.bfloat16).eval()
    for step in (1, 2):
        loss = torch.nn.functional.cross_entropy(
            trainer(input_ids=batch).logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checkpoint = tmp_path / f"step-{step}"
        checkpoint.mkdir()
        save_file({n: p.detach().contiguous() for n, p in trainer.named_parameters()}, str(checkpoint / "model.safetensors"))
        for client in clients:
            report = client.update_weights(step, disk=str(checkpoint))
            assert report["verified"] and report["committed"] == step, report
        reference.load_state_dict({k: v.detach().to(torch.bfloat16) for k, v in trainer.state_dict().items()})
        engine_model.load_state_dict(reassemble(engine_ranks, kind, tied=(kind == "tied")), strict=True)
        batch_here = batch.to(engine_device)
        assert torch.equal(logits(engine_model, batch_here), logits(reference, batch_here)), f"step {step}: logits differ"
    for receiver in receivers:
        receiver.stop_http()
