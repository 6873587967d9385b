"""Reference images: capped loading (bytes, pixels before decode, remote deadline) from local
paths, S3 and HTTP; and every task's starting scene rendered as its reference image."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from worldagent_ray import storage
from worldagent_ray.config import DiffusersConfig, SandboxConfig, WorldConfig
from worldagent_ray.schemas import Plan, Task
from worldagent_ray.world import media
from worldagent_ray.world.reference import (ReferenceImageError, ReferenceScenes, load_reference_image,
                                            open_image)
from worldagent_ray.world.sandbox import SandboxWorld, build_task, reference_plan

SANDBOX = SandboxConfig(image_size=32, frames_per_step=1, write_mp4=False, write_gif=False)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int) -> bytes:
    """A VALID grayscale PNG of side x side black pixels; a few tens of KB that decode to side**2 bytes."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_a_pixel_bomb_is_refused_from_its_header_before_decoding(tmp_path):
    bomb = png_bomb(8000)  # 64 Mpx: 64 MB once decoded
    assert len(bomb) < 200_000
    small = png_bomb(64)
    assert np.asarray(open_image(small, max_pixels=64 * 64)).shape == (64, 64, 3)  # the format is valid
    uri = storage.write_bytes(str(tmp_path / "bomb.png"), bomb)
    tracemalloc.start()
    try:
        with pytest.raises(ReferenceImageError, match="8000x8000 = 64000000 pixels, more than max_pixels=16777216"):
            load_reference_image(uri, max_pixels=4096 * 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # the 64 MB of pixels were never allocated


def test_bombs_and_oversized_files_on_s3_are_refused(s3_env):
    uri = storage.write_bytes(f"{s3_env}/refs/bomb.png", png_bomb(6000))
    with pytest.raises(ReferenceImageError, match="36000000 pixels") as e:
        load_reference_image(uri, max_pixels=4096 * 4096)
    assert uri in str(e.value)
    with pytest.raises(ReferenceImageError, match="more than the 1000-byte limit"):
        open_image(uri, max_pixels=10**9, max_bytes=1000, error=ReferenceImageError)
    with pytest.raises(ReferenceImageError, match="does not exist"):
        load_reference_image(f"{s3_env}/refs/missing.png", max_pixels=10**6)


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_a_stalled_remote_reference_image_times_out(stalled_endpoint, monkeypatch, scheme):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    if scheme == "s3":
        for k, v in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_ENDPOINT_URL": stalled_endpoint}.items():
            monkeypatch.setenv(k, v)
        uri = "s3://bucket/refs/start.png"
    else:
        uri = f"{stalled_endpoint}/refs/start.png"
    t0 = time.monotonic()
    with pytest.raises(ReferenceImageError, match="could not be read in time") as e:
        load_reference_image(uri, max_pixels=10**6, timeout_s=0.3)
    assert uri in str(e.value)
    assert time.monotonic() - t0 < 30  # 3 attempts of 0.3 s; bounded even on a busy machine
    world = SandboxWorld(SANDBOX)
    task = build_task("turn_on_stove", {})
    monkeypatch.setattr("worldagent_ray.world.reference.REMOTE_TIMEOUT_S", 0.3)  # the world's deadline
    [r] = world.render(task, [reference_plan(task)], "memory://wa-ref/videos", reference_image=uri)
    assert r.error and "reference image rejected" in r.error and "in time" in r.error


# --------------------------------------------------------------------------- reference scenes


def _status_rows(size: int) -> int:
    sb = SandboxWorld(SANDBOX).rules.render["status_bar"]
    return max(2, int(sb["height"] * size))


def test_every_task_gets_its_starting_scene_on_s3(s3_env):
    scenes = ReferenceScenes(WorldConfig(sandbox=SANDBOX))
    task = build_task("omelette", {"item_loc": "counter"})
    out = scenes.attach(task, f"{s3_env}/run/references")
    assert out.reference_image == f"{s3_env}/run/references/{task.id.replace(':', '_')}.start.png"
    assert out.model_copy(update={"reference_image": None}) == task
    img = np.asarray(load_reference_image(out.reference_image, max_pixels=32 * 32))
    # the scene is the world's first frame (seed 0) without the status bar
    frames, _ = SandboxWorld(SANDBOX).simulate(task, Plan(steps=[]), seed=0)
    keep = 32 - _status_rows(32)
    assert img.shape == (32, 32, 3) and np.array_equal(img[:keep], frames[0][:keep])
    # deterministic: attaching again writes the same bytes to the same place
    first = storage.read_bytes(out.reference_image)
    again = scenes.attach(task, f"{s3_env}/run/references")
    assert again == out and storage.read_bytes(again.reference_image) == first
    # the world renders with it (validated through the storage layer)
    [r] = SandboxWorld(SANDBOX).render(out, [reference_plan(out)], f"{s3_env}/run/videos")
    assert r.error is None and r.ground_truth.goal_achieved


def test_scenes_differ_by_task_and_free_text_gets_the_default_scene(tmp_path):
    scenes = ReferenceScenes(WorldConfig(sandbox=SANDBOX))
    a = scenes.attach(build_task("turn_on_stove", {}), str(tmp_path))
    b = scenes.attach(build_task("omelette", {"item_loc": "counter"}), str(tmp_path))
    free = scenes.attach(Task(id="llm-7", goal="Juggle three oranges", phase=1, source="llm"), str(tmp_path))
    imgs = [np.asarray(load_reference_image(t.reference_image, 32 * 32)) for t in (a, b, free)]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


def test_diffusers_worlds_get_a_letterboxed_scene_of_the_video_shape(tmp_path):
    cfg = WorldConfig(backend="diffusers", sandbox=SANDBOX, diffusers=DiffusersConfig(height=32, width=64))
    task = build_task("turn_on_stove", {})
    img = np.asarray(load_reference_image(ReferenceScenes(cfg).attach(task, str(tmp_path)).reference_image,
                                          32 * 64))
    square = np.asarray(load_reference_image(ReferenceScenes(WorldConfig(sandbox=SANDBOX)).attach(
        task, str(tmp_path / "sq")).reference_image, 32 * 32))
    assert img.shape == (32, 64, 3)
    assert np.array_equal(img[:, 16:48], square)  # the scene, centred
    assert (img[:, :16] == img[0, 0]).all() and (img[:, 48:] == img[0, 0]).all()  # background bands


def test_attach_leaves_tasks_alone_when_off_or_already_set(tmp_path):
    task = build_task("turn_on_stove", {})
    off = ReferenceScenes(WorldConfig(sandbox=SANDBOX, reference_scene=False))
    assert off.attach(task, str(tmp_path)) is task
    given = task.model_copy(update={"reference_image": "s3://elsewhere/img.png"})
    assert ReferenceScenes(WorldConfig(sandbox=SANDBOX)).attach(given, str(tmp_path)) is given
    assert list(tmp_path.iterdir()) == []


def test_reference_images_flow_into_a_vlm_action_prompt(tmp_path):
    """The Action agent attaches the task's reference image for a VLM policy."""
    from worldagent_ray.agents.action import build_messages
    from worldagent_ray.config import ActionConfig
    from worldagent_ray.schemas import ActionRequest

    task = ReferenceScenes(WorldConfig(sandbox=SANDBOX)).attach(build_task("turn_on_stove", {}), str(tmp_path))
    msgs = build_messages(ActionConfig(), ActionRequest(task=task), attach_image=True)
    images = [p["image"] for p in msgs[-1]["content"] if p["type"] == "image"]
    assert images == [task.reference_image]
    assert media.decode_image(storage.read_bytes(images[0])).shape == (32, 32, 3)


def test_build_world_prepares_tasks_with_their_scene_when_on(tmp_path):
    from worldagent_ray.world import build_world

    task = build_task("turn_on_stove", {})
    on = build_world(WorldConfig(sandbox=SANDBOX)).prepare_task(task, str(tmp_path / "ref"))
    assert on.reference_image == str(tmp_path / "ref" / f"{task.id.replace(':', '_')}.start.png")
    assert load_reference_image(on.reference_image, 32 * 32).size == (32, 32)
    off = build_world(WorldConfig(sandbox=SANDBOX, reference_scene=False))
    assert off.prepare_task(task, str(tmp_path / "off")) is task and not (tmp_path / "off").exists()

