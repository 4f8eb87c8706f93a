"""A vLLM/SGLang-shaped engine taking RL weight updates through weightlift's streaming receiver.

What an engine adds to take updates (the rest of this file is a stand-in engine, a trainer
and the check that the engine serves exactly the trainer's weights)::

    import weightlift as wl

    staging = wl.StagingReceiver(
        meta_model.named_parameters(),  # the trainer's names, shapes, dtypes; no memory
        device=device,                  # the ring sits beside the engine's weights
        depth=2,                        # two buffers of about a bucket each,
        bucket_mib=bucket_mib,          # never a second copy of the model
    )                                   # (listen="unix:/path" takes a trainer elsewhere)
    for version, weights in staging.updates(timeout=30):
        engine.load_weights(weights)    # (name, view) pairs in the trainer's names
        # Iterated to the end, the update is in: staging.version == version.

Here the trainer is a thread of this process (`wl.Sender(staging.receiver)`); its push
returns once the engine loaded every tensor. Each step the trainer takes one optimizer step,
pushes, and waits for the engine's "rollout" (its logits on fixed prompts), which must equal
its own bit for bit: same dtype, same transformers code, same device, and weights that the
engine holds only in its fused layout, so a wrong, missing or stale byte changes them.

    python examples/streaming_engine.py [--device cuda:0] [--dtype f32] [--tied]
"""

from __future__ import annotations

import argparse
import queue
import threading
import time

import torch
import transformers

import weightlift as wl

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, INTERMEDIATE = 4, 256, 4, 2, 64, 512, 512
TIMEOUT_S = 30.0
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def qwen3_config(tied: bool) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )


class FusedQwen3Engine:
    """Holds a Qwen3's weights as vLLM does: q/k/v fused into `qkv_proj`, gate/up into
    `gate_up_proj`, one tensor per parameter in `params`, allocated once at startup."""

    # vLLM's stacked_params_mapping: (fused parameter, Hugging Face shard, shard id).
    STACKED_PARAMS = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config: transformers.Qwen3Config, device: str, dtype: torch.dtype) -> None:
        c = config
        q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        inter = c.intermediate_size
        # Each shard's rows in its fused parameter.
        self.rows = {
            "q": slice(0, q_rows),
            "k": slice(q_rows, q_rows + kv_rows),
            "v": slice(q_rows + kv_rows, q_rows + 2 * kv_rows),
            0: slice(0, inter),
            1: slice(inter, 2 * inter),
        }
        self.tied = c.tie_word_embeddings
        shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        for i in range(c.num_hidden_layers):
            layer = f"model.layers.{i}"
            shapes |= {
                f"{layer}.input_layernorm.weight": (c.hidden_size,),
                f"{layer}.self_attn.qkv_proj.weight": (q_rows + 2 * kv_rows, c.hidden_size),
                f"{layer}.self_attn.o_proj.weight": (c.hidden_size, q_rows),
                f"{layer}.self_attn.q_norm.weight": (c.head_dim,),
                f"{layer}.self_attn.k_norm.weight": (c.head_dim,),
                f"{layer}.post_attention_layernorm.weight": (c.hidden_size,),
                f"{layer}.mlp.gate_up_proj.weight": (2 * inter, c.hidden_size),
                f"{layer}.mlp.down_proj.weight": (c.hidden_size, inter),
            }
        if not self.tied:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        self.params = {name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in shapes.items()}
        if self.tied:
            self.params["lm_head.weight"] = self.params["model.embed_tokens.weight"]
        # The forward pass: transformers' Qwen3 code whose parameters are views into `params`
        # (a real engine runs one matmul on qkv_proj; views keep the arithmetic identical to
        # the trainer's, so its logits can be compared bit for bit).
        self.model = transformers.Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
        self.model.load_state_dict(self._hf_views(), strict=True, assign=True)
        self.model.requires_grad_(False)

    def _hf_views(self) -> dict[str, torch.Tensor]:
        """The engine's tensors under Hugging Face names: row slices of the fused ones."""
        views = {}
        for name, param in self.params.items():
            stacked = [(fused, shard, i) for fused, shard, i in self.STACKED_PARAMS if f".{fused}." in name]
            if not stacked:
                views[name] = param
            for fused, shard, shard_id in stacked:
                views[name.replace(fused, shard)] = param[self.rows[shard_id]]
        return views

    def load_weights(self, weights) -> set[str]:
        """Copies each (Hugging Face name, tensor) into its parameter, or into its rows of a
        fused one, as it comes: a streamed tensor is valid only until the next one."""
        loaded = set()
        for name, tensor in weights:
            if self.tied and name == "lm_head.weight":
                continue  # as vLLM: a tied head is embed_tokens, loaded under that name
            for fused, shard, shard_id in self.STACKED_PARAMS:
                if f".{shard}." in name:
                    self.params[name.replace(shard, fused)][self.rows[shard_id]].copy_(tensor)
                    break
            else:
                self.params[name].copy_(tensor)
            loaded.add(name)
        return loaded

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def train_step(model, optimizer, batch: torch.Tensor) -> None:
    logits = model(input_ids=batch).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def run(
    steps: int = 3, device: str = "cpu", dtype: str = "bf16", bucket_mib: float = 1.0, tied: bool = False
) -> list[dict]:
    """Trains `steps` steps, streaming each into the engine; one dict per step: version, the
    engine's committed version, logits_equal, max_abs_diff, logits_changed (from the step
    before, so a stale engine would have shown), buckets, and push_s (the whole update)."""
    torch.manual_seed(0)
    config, torch_dtype = qwen3_config(tied), DTYPES[dtype]
    trainer = transformers.Qwen3ForCausalLM(config).to(device=device, dtype=torch_dtype)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    batch = torch.randint(0, VOCAB, (4, 32), device=device)
    prompts = torch.randint(0, VOCAB, (2, 16), device=device)

    engine = FusedQwen3Engine(config, device, torch_dtype)
    # The engine knows the trainer's parameters from the model config alone, as a meta model.
    with torch.device("meta"):
        meta_model = transformers.Qwen3ForCausalLM(config).to(torch_dtype)
    staging = wl.StagingReceiver(meta_model.named_parameters(), device=device, depth=2, bucket_mib=bucket_mib)
    sender = wl.Sender(staging.receiver)

    rollouts: queue.Queue = queue.Queue()
    results: list[dict] = []
    failure: list[BaseException] = []

    def trainer_loop() -> None:
        # As in synchronous RL, each step waits for the engine's rollout on the weights just
        # pushed; here the rollout is the engine's logits, checked against the trainer's own.
        try:
            previous = None
            for step in range(1, steps + 1):
                train_step(trainer, optimizer, batch)
                started = time.perf_counter()
                sender.push(trainer.named_parameters(), version=step)
                push_s = time.perf_counter() - started
                rollout = rollouts.get(timeout=TIMEOUT_S)
                with torch.no_grad():
                    want = trainer(input_ids=prompts).logits
                got = rollout.pop("logits")
                results.append(
                    dict(
                        version=step,
                        **rollout,
                        logits_equal=torch.equal(got, want),
                        max_abs_diff=(got.float() - want.float()).abs().max().item(),
                        logits_changed=previous is None or not torch.equal(previous, want),
                        push_s=push_s,
                    )
                )
                previous = want
        except BaseException as e:
            failure.append(e)

    trainer_thread = threading.Thread(target=trainer_loop, name="trainer")
    trainer_thread.start()
    # The engine's update loop (the docstring's lines), rolling out after each update.
    for version, weights in staging.updates(timeout=TIMEOUT_S):
        engine.load_weights(weights)
        rollouts.put(dict(committed=staging.version, buckets=weights.stats["buckets"], logits=engine.logits(prompts)))
        if version == steps:
            break
    trainer_thread.join()
    if failure:
        raise failure[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="the trainer's and the engine's device (cpu, cuda:0)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket-mib", type=float, default=1.0)
    parser.add_argument("--tied", action="store_true", help="tie lm_head to embed_tokens")
    args = parser.parse_args()
    results = run(args.steps, args.device, args.dtype, args.bucket_mib, args.tied)
    for r in results:
        print(
            f"version {r['version']}: max |logit diff| {r['max_abs_diff']:g}, "
            f"{r['push_s']:.3f} s ({r['buckets']} buckets)"
        )
        assert r["committed"] == r["version"], r
        assert r["logits_equal"], f"version {r['version']}: the engine's logits differ from the trainer's"
        assert r["logits_changed"], f"version {r['version']}: the optimizer step changed no logit"
    assert len(results) == args.steps, results
    print(f"{args.steps} updates streamed; the engine's logits equal the trainer's bit for bit")


if __name__ == "__main__":
    main()
