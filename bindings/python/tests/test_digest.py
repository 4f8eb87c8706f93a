"""weightlift.digest and WeightsChecker on numpy arrays (CPU), against a Python reference."""

import numpy as np
import pytest

import weightlift as wl
from conftest import reference_digest, xxh64


def test_the_reference_xxh64_matches_published_vectors():
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"abc") == 0x44BC2CF5AD770999


@pytest.mark.parametrize("nbytes", [0, 1, 7, 31, 32, 33, 4095, 4096, 4097, 8192 + 13, 3 * 4096])
def test_digest_is_the_chunked_xxh64_of_the_bytes(nbytes):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    assert wl.digest(data) == reference_digest(data.tobytes())


def test_digest_depends_on_bytes_not_on_dtype_or_shape():
    a = np.arange(2048, dtype=np.float32)
    assert wl.digest(a) == wl.digest(a.reshape(32, 64)) == wl.digest(a.view(np.uint8))
    b = a.copy()
    b[1000] += 1
    assert wl.digest(b) != wl.digest(a)


def test_arrays_that_cannot_be_shared_without_a_copy_are_refused_by_name():
    strided = np.arange(64, dtype=np.float32).reshape(8, 8)[:, ::2]
    with pytest.raises(wl.PlanError, match="not contiguous"):
        wl.digest(strided)
    with pytest.raises(wl.PlanError, match=r"`w`.*does not move"):
        wl.WeightsChecker({"w": np.zeros(4, dtype=np.complex64)})


def test_checker_snapshot_compare_names_exactly_the_changed_tensors():
    params = {f"layer.{i}.weight": np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) for i in range(5)}
    checker = wl.WeightsChecker(params)
    with pytest.raises(wl.WeightliftError, match="snapshot"):
        checker.compare()
    checker.snapshot()
    checker.compare()  # nothing changed
    params["layer.3.weight"][7, 7] = 42.0
    params["layer.1.weight"][0, 0] = -1.0
    assert checker.changed() == ["layer.1.weight", "layer.3.weight"]
    with pytest.raises(wl.VerificationError, match=r"2 tensor\(s\).*`layer.1.weight`, `layer.3.weight`"):
        checker.compare()
    assert dict(checker.checksum()) == {n: wl.digest(a) for n, a in params.items()}


def test_checker_reset_overwrites_every_byte_in_place():
    params = {"a": np.ones(1000, dtype=np.float32), "b": np.arange(10, dtype=np.int64)}
    checker = wl.WeightsChecker(params)
    checker.reset(0)
    assert not params["a"].any() and not params["b"].any()
    checker.reset(255)
    assert (params["b"].view(np.uint8) == 255).all()


def test_checker_refuses_two_names_for_one_memory():
    base = np.zeros(100, dtype=np.float32)
    with pytest.raises(wl.PlanError, match="share memory"):
        wl.WeightsChecker({"x": base[:60], "y": base[50:]})
