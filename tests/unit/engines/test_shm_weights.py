"""The shared-memory hand-off of a state dict to the vLLM worker process, and the wire format
of weight payloads: exact round trips, dtype casts, a reusable file, and cleanup."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import torch

from worldagent_ray.engines.shm_weights import SHM_PREFIX, SharedWeights, read_shared_weights, remove_orphans
from worldagent_ray.rl.weight_sync import pack_state_dict, unpack_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "ids": torch.arange(11), "scale": torch.tensor(0.25)}


def test_round_trip_with_cast_and_reuse(tmp_path):
    shm = SharedWeights(str(tmp_path))
    try:
        entries, size = shm.write(_state(), dtype=torch.bfloat16)
        got = dict(read_shared_weights(shm.path, entries, size))
        want = _state()
        assert set(got) == set(want)
        for k, v in want.items():
            expect = v.to(torch.bfloat16) if v.is_floating_point() else v
            assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), k
        assert all(off % 64 == 0 for _, _, _, off, _ in entries)
        capacity = shm.capacity
        entries2, _ = shm.write({"w": torch.ones(7, 5)})  # smaller: the same file is reused
        assert shm.capacity == capacity and torch.equal(dict(read_shared_weights(shm.path, entries2, size))["w"],
                                                        torch.ones(7, 5))
        shm.write({"big": torch.zeros(1000, 100)})  # larger: grown
        assert shm.capacity >= 1000 * 100 * 4 and os.path.getsize(shm.path) == shm.capacity
    finally:
        shm.close()
    assert not os.path.exists(shm.path)
    shm.close()  # twice is fine


def test_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{SHM_PREFIX}{int(dead.stdout)}-0123abcd.bin"
    mine = tmp_path / f"{SHM_PREFIX}{os.getpid()}-0123abcd.bin"
    other = tmp_path / "unrelated.bin"
    for f in (orphan, mine, other):
        f.write_bytes(b"x")
    assert remove_orphans(str(tmp_path)) == [str(orphan)]
    assert mine.exists() and other.exists()


def test_wire_format_round_trips_through_pickle5():
    want = _state()
    payload = pickle.loads(pickle.dumps(pack_state_dict(want), protocol=5))
    got = unpack_state_dict(payload)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
    plain = {"a": torch.ones(2)}
    assert unpack_state_dict(plain) == plain  # a plain dict of tensors passes through
