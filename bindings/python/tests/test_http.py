"""The engine agent's HTTP API from Python: `Receiver.serve_http` and `weightlift.Client`."""

import json
import struct

import numpy as np
import pytest

import weightlift as wl


def write_safetensors(path, tensors: dict) -> None:
    """A safetensors file (8-byte header length, JSON header, data), written by hand so the
    test needs no safetensors package."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[array.dtype.name],
                        "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def engine(preset="identity", **arrays):
    params = {name: np.zeros_like(a) for name, a in arrays.items()}
    receiver = wl.Receiver(params, preset=preset)
    return receiver, params


def test_serve_http_and_the_client_cover_the_api(tmp_path):
    weights = {"w": np.arange(3000, dtype=np.float32), "b": np.ones(7, np.float32)}
    receiver, params = engine(**weights)
    url = receiver.serve_http()
    client = wl.Client(url)
    assert client.health() == {"status": "ok"}
    assert client.version() == {"version": 0, "dirty": False, "dirty_tensors": [], "in_flight": None}
    assert "/update_weights" in client.openapi()["paths"]
    write_safetensors(tmp_path / "model.safetensors", weights)
    report = client.update_weights(3, disk=str(tmp_path))
    assert report["verified"] and report["committed"] == 3
    np.testing.assert_array_equal(params["w"], weights["w"])
    with pytest.raises(wl.AgentError) as stale:
        client.update_weights(3, disk=str(tmp_path))
    assert (stale.value.status, stale.value.code) == (409, "stale_version")
    checksums = client.weights_checker("checksum")["checksums"]
    assert checksums == {n: f"{wl.digest(a):016x}" for n, a in weights.items()}
    client.weights_checker("snapshot")
    client.weights_checker("reset")
    compared = client.weights_checker("compare")
    assert compared["success"] is False and sorted(compared["mismatched"]) == ["b", "w"]
    assert client.version()["dirty"] is True
    with pytest.raises(wl.AgentError) as unimplemented:
        client.release_memory_occupation(["weights"])
    assert unimplemented.value.status == 501
    assert 'weightlift_updates_total{outcome="committed"} 1' in client.metrics()
    with pytest.raises(wl.AgentError) as missing:
        client.update_weights(4, disk=str(tmp_path / "nowhere"))
    assert missing.value.code == "not_found"
    receiver.stop_http()


def test_a_token_is_required_when_set():
    receiver, _ = engine(w=np.zeros(4, np.float32))
    url = receiver.serve_http(token="t0ken")
    with pytest.raises(wl.AgentError) as denied:
        wl.Client(url).version()
    assert (denied.value.status, denied.value.code) == (401, "unauthorized")
    assert wl.Client(url, token="t0ken").version()["version"] == 0
    with pytest.raises(wl.TransferError, match="already serving"):
        receiver.serve_http()
