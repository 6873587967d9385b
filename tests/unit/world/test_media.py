"""Videos and frames through the storage layer: written by a world under a local, file:// or
S3 root, read back by another process; the critic's frame count; capped decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from worldagent_ray import storage
from worldagent_ray.config import SandboxConfig
from worldagent_ray.schemas import Plan
from worldagent_ray.world import media
from worldagent_ray.world.reference import ImageLoadError
from worldagent_ray.world.sandbox import SandboxWorld, build_task, reference_plan

CFG = SandboxConfig(image_size=32, frames_per_step=2)


_READER = """
import json, sys
import numpy as np
from worldagent_ray.world import media
r = json.loads(sys.argv[1])
out = {"mp4": list(media.read_video(r["video_uri"]).shape), "gif": list(media.read_video(r["gif_uri"]).shape),
       "frames": [media.decode_image(media.read_bytes(u)).tolist() for u in r["frame_uris"]]}
sys.stdout.write(json.dumps(out))
"""


def test_sandbox_rollouts_are_read_back_by_another_process(storage_root):
    """A world replica writes; a critic in another process (another node) reads the same URIs."""
    world = SandboxWorld(CFG, critic_frames=3)
    task = build_task("put_on_plate", {"item": "cup", "item_loc": "counter"})
    plan = Plan.from_actions(["put the cup on the table"])  # the cup moves in every frame (a GIF merges repeats)
    frames, _ = world.simulate(task, plan, seed=4)
    [r] = world.render(task, [plan], storage.join(storage_root, "videos", task.id), seeds=[4])
    assert r.error is None and r.num_frames == len(frames) == 3
    for uri in (r.video_uri, r.gif_uri, *r.frame_uris):
        assert uri.startswith(storage.normalize(storage_root)) and storage.exists(uri)
    out = subprocess.run([sys.executable, "-c", _READER, r.model_dump_json()], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["mp4"][:3] == [3, 32, 32] and got["gif"][:3] == [3, 32, 32]
    # PNG frames are lossless: exactly the simulated frames at the sampled indices
    assert len(got["frames"]) == 3
    for k, i in enumerate(media.sample_indices(len(frames), 3)):
        assert np.array_equal(np.asarray(got["frames"][k], dtype=np.uint8), frames[i])


@pytest.mark.parametrize("critic_frames, expected", [(1, 1), (2, 2), (5, 5), (64, 7)])
def test_the_world_writes_the_frames_the_critic_asks_for(tmp_path, critic_frames, expected):
    world = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=2, write_mp4=False, write_gif=False),
                         critic_frames=critic_frames)
    task = build_task("omelette", {"item_loc": "counter"})
    plan = Plan(steps=reference_plan(task).steps[:3])
    [r] = world.render(task, [plan], str(tmp_path))
    assert r.num_frames == 7 and len(r.frame_uris) == expected  # 1 + 2 per step; never more than the video
    assert r.video_uri is None and r.gif_uri is None
    idx = [int(u.rsplit(".f", 1)[1][:4]) for u in r.frame_uris]
    assert idx == media.sample_indices(7, critic_frames) and idx[-1] == 6  # the last frame always


def test_critic_frames_default_follows_the_critic_config_and_rejects_nonsense():
    from worldagent_ray.config import CriticConfig, WorldConfig
    from worldagent_ray.world import build_world

    assert SandboxWorld(CFG).critic_frames == CriticConfig().num_frames
    assert build_world(WorldConfig(sandbox=CFG), critic_frames=7).critic_frames == 7
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="critic_frames"):
            SandboxWorld(CFG, critic_frames=bad)


def test_writing_to_an_unreachable_root_is_a_rollout_error(monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    task = build_task("turn_on_stove", {})
    [r] = SandboxWorld(CFG).render(task, [reference_plan(task)], "s3://bucket/run/videos")
    assert r.error and "AWS_ACCESS_KEY_ID" in r.error and "s3://bucket/run/videos/" in r.error


def test_decode_image_checks_pixels_before_decoding():
    png = media.encode_png(np.zeros((40, 50, 3), np.uint8))
    assert media.decode_image(png).shape == (40, 50, 3)
    with pytest.raises(ImageLoadError, match="40 = 2000 pixels, more than max_pixels=1999"):
        media.decode_image(png, max_pixels=1999)
    with pytest.raises(ImageLoadError, match="not a readable image"):
        media.decode_image(b"GIF89a-but-not-really")


def test_float_frames_are_scaled_and_nan_safe(tmp_path):
    frames = np.full((2, 16, 16, 3), 0.5, np.float32)
    frames[0, 0, 0] = np.nan
    out = media.write_video_artifacts(frames, str(tmp_path), "v", mp4=False, gif=False, sample_frames=2)
    f0 = media.decode_image(media.read_bytes(out["frame_uris"][0]))
    assert f0[0, 0].tolist() == [0, 0, 0] and f0[1, 1].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="shape"):
        media.write_video_artifacts(np.zeros((16, 16, 3)), str(tmp_path), "bad")
