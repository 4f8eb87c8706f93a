"""Tagged GPU memory: weightlift.memory.Pool, torch's pluggable allocator over it, the
torch_memory_saver facade, and the multi-stage awake of colocated RL.

The allocator's C functions and the error paths run everywhere; the rest needs a GPU and
torch (scripts/gpu-tests.sh runs them on a GPU machine).
"""

import ctypes
import gc

import pytest

import weightlift as wl
from weightlift import _weightlift
from conftest import HAS_TORCH, HAS_TRANSFORMERS, requires_cuda

if HAS_TORCH:
    import torch

MiB = 1 << 20


def c_allocator():
    lib = ctypes.CDLL(_weightlift.__file__)
    malloc, free = lib.weightlift_torch_malloc, lib.weightlift_torch_free
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    return malloc, free


def test_the_allocator_symbols_refuse_outside_a_region_with_a_reason():
    malloc, free = c_allocator()
    assert malloc(1 << 20, 0, None) is None
    assert "outside `Pool.region`" in _weightlift.last_allocator_error()
    assert _weightlift.last_allocator_error() is None, "read once"
    free(0xDEAD000, 4096, 0, None)
    assert "which no pool holds" in _weightlift.last_allocator_error()


@pytest.mark.skipif(wl.cuda_available(), reason="checks the message where no CUDA driver exists")
def test_a_pool_without_cuda_says_so():
    with pytest.raises(wl.CudaError, match="no CUDA driver found"):
        _weightlift.MemoryPool(0)


def test_the_facade_has_torch_memory_saver_calls():
    from weightlift.compat import torch_memory_saver as tms

    saver = tms.torch_memory_saver
    assert isinstance(saver, tms.TorchMemorySaver) and saver.enabled
    saver.hook_mode = "torch"
    saver.memory_margin_bytes = 1 << 30
    assert saver.memory_margin_bytes == 1 << 30
    saver.memory_margin_bytes = 0
    with pytest.raises(ValueError):
        saver.hook_mode = "ld_preload_everything"
    with tms.configure_subprocess():
        pass
    for name in ("region", "cuda_graph", "disable", "pause", "resume", "get_cpu_backup"):
        assert callable(getattr(saver, name)), name


# ---- on a GPU ---------------------------------------------------------------------------


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(0)[0]


def test_a_pool_dropped_while_a_region_is_open_keeps_its_mem_pools_until_the_region_ends():
    """torch aborts the process when a MemPool is destroyed while allocations are routed into
    a pool; the garbage collector can free a dropped Pool inside another's region. Its MemPools
    wait for the last region to end (stand-ins here; the GPU test below uses torch's)."""
    from weightlift import memory

    class Watched:
        destroyed = 0

        def __del__(self):
            Watched.destroyed += 1

    with memory._routing_region():
        pools = memory._MemPools(weights=Watched(), kv_cache=Watched())
        del pools  # (the collector frees a Pool in a cycle the same way, at any allocation)
        assert Watched.destroyed == 0 and len(memory._retired) == 2, "destroyed inside a region"
        with memory._routing_region():
            pass
        assert Watched.destroyed == 0, "released while the outer region is open"
    assert Watched.destroyed == 2 and not memory._retired
    memory._MemPools(weights=Watched())  # outside a region: destroyed at once
    assert Watched.destroyed == 3


@requires_cuda
def test_a_pool_collected_inside_another_pools_region_does_not_abort_the_process():
    old = wl.memory.Pool(0)
    with old.region("weights"):
        kept = torch.ones(MiB, device="cuda:0")
    cycle = [old, kept]
    cycle.append(cycle)
    del old, kept, cycle
    new = wl.memory.Pool(0)
    with new.region("weights"):
        gc.collect()  # frees the old Pool here: torch would abort destroying its MemPool now
        x = torch.full((MiB,), 3.0, device="cuda:0")
    assert float(x.sum()) == 3.0 * MiB


@requires_cuda
def test_tensors_made_in_a_region_live_in_its_tag_and_come_back_bit_for_bit():
    pool = wl.memory.Pool("cuda:0", chunk_bytes=64 * MiB)
    with pool.region("weights", cpu_backup=True):
        tensors = [torch.randn(n, device="cuda:0") for n in (1000, 3 * MiB, 40 * MiB)]
    with pool.region("kv_cache"):
        kv = torch.full((64 * MiB,), 7, dtype=torch.uint8, device="cuda:0")
    for t in tensors:
        assert pool._native.tag_of(t.data_ptr()) == ("weights", False)
    assert pool._native.tag_of(kv.data_ptr()) == ("kv_cache", False)
    want = [t.clone() for t in tensors]
    kv_want = kv.clone()
    assert torch.equal(kv, kv_want)  # warms up what comparing allocates
    addresses = [t.data_ptr() for t in tensors]
    stats = pool.stats()["weights"]
    before = free_bytes()
    pool.pause("weights")
    assert pool.is_paused("weights") and not pool.is_paused("kv_cache")
    assert free_bytes() >= before + stats["mapped_bytes"], "the tag's memory really is released"
    assert pool.stats()["weights"]["backed_up_bytes"] >= sum(t.nbytes for t in tensors)
    assert torch.equal(kv, kv_want), "another tag goes on"
    pool.resume("weights")
    assert free_bytes() == before, "the same memory is taken back, no more"
    assert [t.data_ptr() for t in tensors] == addresses
    for t, w in zip(tensors, want):
        assert torch.equal(t, w)


@requires_cuda
def test_a_cuda_graph_captured_before_pause_replays_after_resume():
    pool = wl.memory.Pool(0, chunk_bytes=32 * MiB)
    with pool.region("weights", cpu_backup=True):
        w = torch.randn(1024, 1024, device="cuda:0")
    x = torch.randn(256, 1024, device="cuda:0")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the capture
            y = torch.relu(x @ w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.relu(x @ w)
    graph.replay()
    want = y.clone()
    y.zero_()
    for _ in range(3):
        pool.pause("weights")
        pool.resume("weights")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want), "the graph reads the restored weights at their old address"


@requires_cuda
def test_graph_memory_in_a_tag_pauses_and_replays():
    pool = wl.memory.Pool(0, chunk_bytes=32 * MiB)
    w = torch.randn(512, 512, device="cuda:0")
    x = torch.randn(128, 512, device="cuda:0")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.relu(x @ w)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pool.cuda_graph(graph, "cuda_graph", cpu_backup=True):
        y = torch.relu(x @ w)
    assert pool._native.tag_of(y.data_ptr()) == ("cuda_graph", False), "the graph's output lives in the tag"
    graph.replay()
    want = y.clone()
    pool.pause("cuda_graph")
    pool.resume("cuda_graph")
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


@requires_cuda
def test_a_resume_that_cannot_fit_fails_cleanly_and_succeeds_once_memory_is_freed():
    pool = wl.memory.Pool(0)
    with pool.region("kv_cache"):
        kv = torch.empty(2 << 30, dtype=torch.uint8, device="cuda:0")
    pool.pause("kv_cache")
    squatter = torch.empty(free_bytes() - (1 << 30), dtype=torch.uint8, device="cuda:0")
    with pytest.raises(wl.MemoryPoolError, match="kv_cache") as caught:
        pool.resume("kv_cache")
    assert caught.value.needed == 2 << 30 and caught.value.free < caught.value.needed
    assert pool.is_paused("kv_cache")
    del squatter
    torch.cuda.empty_cache()
    pool.resume("kv_cache")
    kv.fill_(3)
    assert int(kv[-1]) == 3


@requires_cuda
def test_hooks_hear_pauses_and_resumes():
    pool = wl.memory.Pool(0, chunk_bytes=32 * MiB)
    heard = []
    pool.add_hook(lambda tag, event: heard.append((tag, event)))
    with pool.region("nccl", keep_physical=True):
        buf = torch.ones(MiB, device="cuda:0")
    pool.pause("nccl")
    pool.resume("nccl")
    assert heard == [("nccl", "pausing"), ("nccl", "resumed")]
    assert torch.equal(buf, torch.ones_like(buf)), "the same pages came back"
    assert pool.stats()["nccl"]["staging_bytes"] == 0


@requires_cuda
def test_ten_cycles_leak_neither_device_nor_host_memory():
    pool = wl.memory.Pool(0)
    with pool.region("weights", cpu_backup=True):
        w = torch.randn(256 * MiB // 4, device="cuda:0")
    assert pool.stats()["weights"]["staging_bytes"] == w.nbytes, "staged when the region ended"
    device_before, rss_before = free_bytes(), rss()
    for _ in range(10):
        pool.pause("weights")
        pool.resume("weights")
    assert free_bytes() == device_before
    assert rss() - rss_before < 16 * MiB, f"host memory grew by {(rss() - rss_before) / MiB:.1f} MiB"
    assert pool.release_staging("weights") == pool.stats()["weights"]["allocated_bytes"]
    del w


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@requires_cuda
def test_an_update_into_paused_weights_is_refused_and_later_taken():
    pool = wl.memory.Pool(0, chunk_bytes=32 * MiB)
    with pool.region("weights"):
        engine = {"a": torch.zeros(1000, device="cuda:0"), "b": torch.zeros(MiB, device="cuda:0")}
    receiver = wl.Receiver(engine)
    trainer = {"a": torch.randn(1000, device="cuda:0"), "b": torch.randn(MiB, device="cuda:0")}
    sender = wl.Sender(receiver)
    assert sender.push(trainer, version=1)["verified"]
    pool.pause("weights")
    assert sorted(receiver.dirty) == ["a", "b"], "paused without a backup: the bytes are gone"
    with pytest.raises(wl.VersionError, match="paused"):
        sender.push(trainer, version=2)
    with pytest.raises(wl.CudaError, match="paused"):
        receiver.digests()
    pool.resume("weights")
    # Unchanged trainer tensors are still rewritten: the engine's copy was lost.
    report = sender.push(trainer, version=2)
    assert report["verified"] and receiver.version == 2 and receiver.dirty == []
    assert torch.equal(engine["a"], trainer["a"]) and torch.equal(engine["b"], trainer["b"])
    # Pool memory can be overwritten in place like any other (located, not shared).
    receiver.poison(0)
    assert not engine["b"].any() and sorted(receiver.dirty) == ["a", "b"]
    # A trainer whose tensors are in the pool cannot share them with another process: refused
    # by name (the pool's memory is not exportable).
    with pool.region("weights"):
        pooled = {"a": torch.randn(1000, device="cuda:0"), "b": torch.randn(MiB, device="cuda:0")}
    with pytest.raises(wl.WeightliftError, match="`[ab]`: .* neither through a legacy IPC handle nor as a file descriptor"):
        wl.Sender(wl.Receiver({k: torch.zeros_like(v) for k, v in pooled.items()})).push(pooled, version=1)


@requires_cuda
def test_the_facade_pauses_and_resumes_like_torch_memory_saver():
    from weightlift.compat.torch_memory_saver import torch_memory_saver

    with torch_memory_saver.region(tag="weights_facade", enable_cpu_backup=True):
        w = torch.randn(8 * MiB, device="cuda:0")
    with torch_memory_saver.region(tag="kv_facade"):
        kv = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda:0")
    want = w.clone()
    before = free_bytes()
    torch_memory_saver.pause("kv_facade")
    torch_memory_saver.pause("weights_facade")
    assert free_bytes() >= before + 512 * MiB + w.nbytes
    torch_memory_saver.resume("weights_facade")
    torch_memory_saver.resume("kv_facade")
    assert torch.equal(w, want)
    kv.fill_(1)
    with torch_memory_saver.disable():
        outside = torch.empty(MiB, device="cuda:0")
    assert outside.data_ptr() not in (None, 0)


@requires_cuda
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_multi_stage_awake_runs_where_weights_and_kv_cache_together_would_not_fit():
    """Colocated RL on one GPU: an engine (a transformers Qwen3 with its weights in tag
    `weights` and a KV cache in tag `kv_cache`, together ~0.9 of the GPU's free memory) is paused;
    a trainer takes half the GPU and trains; the engine wakes in stages (weights, update, free
    the trainer, KV cache) and its logits equal the trainer's. Waking both tags while the
    trainer holds its memory does not fit, and is refused cleanly."""
    import transformers

    from weightlift.memory import multi_stage_awake

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=False,
    )
    free_at_start = free_bytes()
    pool = wl.memory.Pool(0)
    # Backed up: the engine's buffers (rotary tables) are not part of the update.
    with pool.region("weights", cpu_backup=True):
        engine = transformers.Qwen3ForCausalLM(cfg).to(device="cuda:0", dtype=torch.bfloat16).eval()
    receiver = wl.Receiver(engine.named_parameters())
    engine_fraction = 0.9
    kv_bytes = int(engine_fraction * free_at_start) - pool.stats()["weights"]["mapped_bytes"]
    with pool.region("kv_cache"):
        kv_cache = torch.empty(kv_bytes, dtype=torch.uint8, device="cuda:0")
    pool.pause("kv_cache")
    pool.pause("weights")
    engine_gib = (pool.stats()["weights"]["reserved_bytes"] + pool.stats()["kv_cache"]["reserved_bytes"]) / (1 << 30)

    # The trainer: its model, optimizer, activations, and half the GPU of other state.
    trainer = transformers.Qwen3ForCausalLM(cfg).to("cuda:0")
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    trainer_state = torch.empty(free_bytes() // 2, dtype=torch.uint8, device="cuda:0")
    batch = torch.randint(0, 512, (2, 24), device="cuda:0")
    loss = torch.nn.functional.cross_entropy(trainer(input_ids=batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    reference = transformers.Qwen3ForCausalLM(cfg).to(device="cuda:0", dtype=torch.bfloat16).eval()
    reference.load_state_dict({k: v.detach().to(torch.bfloat16) for k, v in trainer.state_dict().items()})
    with torch.no_grad():
        want = reference(input_ids=batch).logits.cpu()
    del reference

    # Both at once does not fit while the trainer holds its memory.
    with pytest.raises(wl.MemoryPoolError) as caught:
        pool.resume()
    assert caught.value.needed > caught.value.free
    assert pool.is_paused("kv_cache")
    if not pool.is_paused("weights"):
        pool.pause("weights")  # `resume()` takes tags in name order: kv_cache failed first

    sender = wl.Sender(receiver)

    def free_trainer():
        nonlocal trainer, optimizer, trainer_state
        del trainer, optimizer, trainer_state
        torch.cuda.empty_cache()

    figures = {"free_at_start_gib": free_at_start / (1 << 30), "engine_gib": engine_gib}
    figures["trainer_gib"] = (free_at_start - free_bytes()) / (1 << 30)
    report = multi_stage_awake(
        pool, update=lambda: sender.push(trainer.named_parameters(), version=1), free_trainer=free_trainer
    )
    assert report["verified"] and receiver.version == 1 and receiver.dirty == []
    kv_cache.fill_(0)
    with torch.no_grad():
        got = engine(input_ids=batch).logits.cpu()
    assert torch.equal(got, want), "the engine's logits equal the trainer's"
    print("multi-stage awake:", {k: round(v, 1) for k, v in figures.items()})
