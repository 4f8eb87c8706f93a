"""A main model and its MTP draft in one version: two streaming receivers in a `StagingGroup`,
pushed to by one `Sender(..., modules=["main", "mtp"])` from a checkpoint that carries both
(Qwen3-Next naming: `mtp.fc`, `mtp.layers.0.*`, ...). The version commits on both or on
neither. Runs in CI (numpy)."""


import numpy as np
import pytest

import weightlift as wl
from conftest import push_in_thread, requires_cuda

BUCKET_MIB = 16384 / (1 << 20)  # 16 KiB buckets: each module takes several


def checkpoint(seed: int) -> dict:
    """The trainer's tensors of a small Qwen3 with a one-layer MTP module, in f32."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in wl.synthetic_manifest("qwen3-tiny-mtp")}


def is_draft(name: str) -> bool:
    return name.startswith("mtp.") or name in ("model.embed_tokens.weight", "lm_head.weight")


def receivers(modules=None):
    """The main model's and the draft's receivers, their group, and the trainer's sender
    (which takes each receiver's module, or `modules`)."""
    full = checkpoint(0)
    main_specs = {n: t for n, t in full.items() if not n.startswith("mtp.")}
    main = wl.StagingReceiver(main_specs, bucket_mib=BUCKET_MIB, module="main")
    draft = wl.StagingReceiver({n: t for n, t in full.items() if is_draft(n)}, bucket_mib=BUCKET_MIB, module="mtp")
    sender = wl.Sender([main.receiver, draft.receiver], modules=modules)
    return main, draft, wl.StagingGroup(main, draft), sender


def load_into(loaded, fail_after=None):
    """A loader copying each tensor (vLLM's Qwen3NextMTP renames `mtp.` to `model.` itself:
    the receiver hands the checkpoint's names); raises after `fail_after` tensors if asked."""

    def load_weights(weights):
        for i, (name, tensor) in enumerate(weights):
            if fail_after is not None and i == fail_after:
                raise KeyError(name)
            loaded[name] = np.array(tensor.numpy() if hasattr(tensor, "numpy") else tensor)

    return load_weights


@pytest.mark.parametrize("modules", [None, ["main", "mtp"]])
def test_a_main_model_and_its_mtp_draft_commit_one_version_together(modules):
    main, draft, group, sender = receivers(modules)
    for version in (1, 2):
        tensors = checkpoint(version)
        thread, box = push_in_thread(sender, tensors, version)
        got, (main_weights, draft_weights) = group.next_update(timeout=10)
        assert got == version
        main_loaded, draft_loaded = {}, {}
        # Either order: the last to be loaded waits for the commit on both.
        loads = [(load_into(main_loaded), main_weights), (load_into(draft_loaded), draft_weights)]
        for load, weights in loads if version == 1 else reversed(loads):
            load(weights)
        # The last loop to end waited for the version to commit on both.
        assert main.version == draft.version == group.version == version
        thread.join()
        report = box["report"]
        assert report["committed"] and len(report["ranks"]) == 2, report
        assert sorted(main_loaded) == sorted(n for n in tensors if not n.startswith("mtp."))
        assert sorted(draft_loaded) == sorted(n for n in tensors if is_draft(n))
        for loaded in (main_loaded, draft_loaded):
            for name, got_tensor in loaded.items():
                np.testing.assert_array_equal(got_tensor, tensors[name], err_msg=name)


def test_a_draft_whose_loader_raises_leaves_both_models_on_their_version():
    main, draft, group, sender = receivers()
    thread, box = push_in_thread(sender, checkpoint(1), 1)
    for _, (main_weights, draft_weights) in group.updates(timeout=10):
        load_into({})(main_weights)
        with pytest.raises(KeyError):
            load_into({}, fail_after=3)(draft_weights)
        break
    thread.join()
    # The main model verified every tensor and voted; the draft's failure called it off.
    error = str(box["error"])
    assert "receiver 1" in error and "called off" in error and "receiver 2" in error, error
    assert "KeyError" in error or "stopped loading" in error, error
    assert main.version == draft.version == 0
    assert sorted(main.dirty) == sorted(n for n in checkpoint(0) if not n.startswith("mtp."))
    assert 0 < len(draft.dirty) < len([n for n in checkpoint(0) if is_draft(n)])
    # The next version reaches both.
    thread, box = push_in_thread(sender, checkpoint(2), 2)
    for _, (main_weights, draft_weights) in group.updates(timeout=10):
        load_into({})(main_weights)
        load_into({})(draft_weights)
        break
    thread.join()
    assert box["report"]["committed"], box["report"]
    assert main.version == draft.version == 2 and not main.dirty and not draft.dirty


def test_modules_are_one_per_receiver_and_named():
    main = wl.StagingReceiver({"model.norm.weight": np.zeros(4, np.float32)})
    with pytest.raises(wl.PlanError, match="one per receiver"):
        wl.Sender([main.receiver], modules=["main", "mtp"])
    with pytest.raises(wl.PlanError, match="drafter"):
        wl.Sender([main.receiver], modules="drafter")
    with pytest.raises(wl.PlanError, match="drafter"):
        wl.StagingReceiver({"x": np.zeros(4, np.float32)}, module="drafter")
    full = checkpoint(0)
    main_specs = {n: t for n, t in full.items() if not n.startswith("mtp.")}
    # The whole checkpoint into the main model alone: the MTP module has nowhere to go.
    with pytest.raises(wl.PlanError, match="mtp.fc.weight"):
        wl.Sender(wl.StagingReceiver(main_specs).receiver).push(full, version=1)
    # A sender whose module differs from the receiver's is refused, naming the layout.
    main = wl.StagingReceiver(main_specs, module="main")
    with pytest.raises(wl.PlanError, match="identity layout"):
        wl.Sender(main.receiver, modules="whole").push(full, version=1)


def test_a_separate_draft_model_sent_under_its_prefix_commits_with_the_main_model():
    rng = np.random.default_rng(5)
    draft_model = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in wl.synthetic_manifest("qwen3-tiny")}
    main_model = {n: t for n, t in checkpoint(0).items() if not n.startswith("mtp.")}
    main = wl.StagingReceiver(main_model, bucket_mib=BUCKET_MIB, module="main")
    draft = wl.StagingReceiver(draft_model, bucket_mib=BUCKET_MIB, module="draft")
    group = wl.StagingGroup(main, draft)
    sender = wl.Sender([main.receiver, draft.receiver])
    # The trainer holds both models; the draft's tensors go under `draft.`.
    trainer = {**main_model, **{f"draft.{n}": t * 2 for n, t in draft_model.items()}}
    thread, box = push_in_thread(sender, trainer, 1)
    _, (main_weights, draft_weights) = group.next_update(timeout=10)
    main_loaded, draft_loaded = {}, {}
    load_into(main_loaded)(main_weights)
    load_into(draft_loaded)(draft_weights)
    thread.join()
    assert box["report"]["committed"], box
    assert main.version == draft.version == 1
    assert sorted(draft_loaded) == sorted(draft_model)
    for name, want in draft_model.items():
        np.testing.assert_array_equal(draft_loaded[name], want * 2, err_msg=name)
    assert sorted(main_loaded) == sorted(main_model)


def engine_layout(ckpt: dict, source: str, target: str) -> dict:
    """What a vLLM-style engine holds of the layers under `source` (q/k/v and gate/up fused),
    named under `target`."""
    out = {}
    layers = sorted({n.split(".")[2] for n in ckpt if n.startswith(source + ".layers.")})
    for layer in layers:
        p, q = f"{source}.layers.{layer}", f"{target}.layers.{layer}"
        attn = [ckpt[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]
        out[f"{q}.self_attn.qkv_proj.weight"] = np.concatenate(attn)
        mlp = [ckpt[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up")]
        out[f"{q}.mlp.gate_up_proj.weight"] = np.concatenate(mlp)
        for rest in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.down_proj.weight"):
            out[f"{q}.{rest}"] = ckpt[f"{p}.{rest}"]
    return out


def test_in_place_receivers_hold_the_main_model_and_qwen3_next_mtp_layouts():
    ckpt = checkpoint(3)
    shared = {n: ckpt[n] for n in ("model.embed_tokens.weight", "lm_head.weight")}
    main_want = {**engine_layout(ckpt, "model", "model"), **shared, "model.norm.weight": ckpt["model.norm.weight"]}
    # vLLM's Qwen3NextMTP: the module under `model.`, the main model's embedding and head.
    draft_want = {**engine_layout(ckpt, "mtp", "model"), **shared}
    for name in ("fc", "norm", "pre_fc_norm_hidden", "pre_fc_norm_embedding"):
        draft_want[f"model.{name}.weight"] = ckpt[f"mtp.{name}.weight"]
    main_params = {n: np.zeros_like(t) for n, t in main_want.items()}
    draft_params = {n: np.zeros_like(t) for n, t in draft_want.items()}
    main = wl.Receiver(main_params, preset="qwen3", module="main")
    draft = wl.Receiver(draft_params, preset="qwen3", module="mtp")
    report = wl.Sender([main, draft], preset="qwen3").push(ckpt, version=1)
    assert report["committed"] and report["verified"], report
    assert main.version == draft.version == 1
    for params, want in ((main_params, main_want), (draft_params, draft_want)):
        for name, tensor in want.items():
            np.testing.assert_array_equal(params[name], tensor, err_msg=name)


@requires_cuda
def test_on_a_gpu_a_colocated_trainer_updates_the_main_model_and_its_draft_over_cuda_ipc():
    import torch

    gen = torch.Generator(device="cuda").manual_seed(1)
    specs = wl.synthetic_manifest("qwen3-moe-tiny-mtp")
    trainer = {n: torch.randn(s, generator=gen, device="cuda").to(torch.bfloat16) for n, s, _ in specs}
    main = wl.StagingReceiver({n: t for n, t in trainer.items() if not n.startswith("mtp.")}, device="cuda",
                              bucket_mib=0.0625, module="main")
    draft = wl.StagingReceiver({n: t for n, t in trainer.items() if is_draft(n)}, device="cuda",
                               bucket_mib=0.0625, module="mtp")
    group = wl.StagingGroup(main, draft)
    sender = wl.Sender([main.receiver, draft.receiver])
    for version in (1, 2):
        for t in trainer.values():
            t.mul_(-1)
        thread, box = push_in_thread(sender, trainer, version)
        _, (main_weights, draft_weights) = group.next_update(timeout=30)
        main_loaded = {n: t.clone() for n, t in main_weights}
        draft_loaded = {n: t.clone() for n, t in draft_weights}
        thread.join()
        assert box["report"]["committed"] and box["report"]["verified"], box
        assert main.version == draft.version == version
        for loaded in (main_loaded, draft_loaded):
            for name, got in loaded.items():
                assert torch.equal(got, trainer[name]), name
        assert len(main_loaded) + len(draft_loaded) == len(trainer) + 2  # embedding and head in both
