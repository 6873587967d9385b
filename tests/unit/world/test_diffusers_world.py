"""The diffusers world on tiny random-weight Wan pipelines (real diffusers code path, CPU)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image

from worldagent_ray.config import DiffusersConfig, WorldConfig
from worldagent_ray.schemas import Plan, Task
from worldagent_ray.world import build_world, media
from worldagent_ray.world.diffusers_world import DiffusersWorld, RenderRequest, default_seed, plan_to_prompt
from worldagent_ray.world.tiny_wan import (
    BUILTIN_VIDEO_MODELS,
    build_tiny_wan_pipeline,
    ensure_tiny_wan,
    resolve_video_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHAPE = (9, 64, 64, 3)


@pytest.fixture(scope="module")
def wan_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDAGENT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def t2v(wan_cache):
    return DiffusersWorld(DiffusersConfig(model="tiny-wan-t2v"))


@pytest.fixture(scope="module")
def ti2v(wan_cache):
    return DiffusersWorld(DiffusersConfig(model="tiny-wan-ti2v"))


def _task(tid="kitchen:1", **kw):
    return Task(id=tid, goal="Make a cup of tea", phase=2, **kw)


def _plan(*actions):
    return Plan.from_actions(list(actions))


def _image(path, seed=0, size=64, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return str(path)


def _frames(rollout):
    return np.stack([media.decode_image(media.read_bytes(u)) for u in rollout.frame_uris])


# --------------------------------------------------------------------------- tiny pipelines


def test_tiny_pipelines_build_offline_and_reload_bit_identical(tmp_path):
    import torch
    from diffusers import (DiffusionPipeline, SkyReelsV2DiffusionForcingPipeline, WanImageToVideoPipeline,
                           WanPipeline)

    expected = {"t2v": WanPipeline, "ti2v": WanPipeline, "i2v": WanImageToVideoPipeline,
                "skyreels_df": SkyReelsV2DiffusionForcingPipeline}
    assert set(BUILTIN_VIDEO_MODELS.values()) == set(expected)
    for name, kind in BUILTIN_VIDEO_MODELS.items():
        folder = ensure_tiny_wan(name, root=tmp_path)
        assert (folder / "model_index.json").exists()
        assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
        pipe = DiffusionPipeline.from_pretrained(str(folder))
        assert isinstance(pipe, expected[kind])
        fresh = build_tiny_wan_pipeline(kind)
        for a, b in zip(fresh.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
            assert torch.equal(a, b)
    assert DiffusionPipeline.load_config(str(tmp_path / "tiny-wan-ti2v"))["expand_timesteps"] is True
    i2v_index = DiffusionPipeline.load_config(str(tmp_path / "tiny-wan-i2v"))
    assert i2v_index["boundary_ratio"] == 0.875 and i2v_index["image_encoder"] == [None, None]
    # a second call reuses the folder instead of rebuilding it
    before = (tmp_path / "tiny-wan-t2v" / "model_index.json").stat().st_mtime_ns
    ensure_tiny_wan("tiny-wan-t2v", root=tmp_path)
    assert (tmp_path / "tiny-wan-t2v" / "model_index.json").stat().st_mtime_ns == before


def test_concurrent_builds_share_one_folder(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(ensure_tiny_wan("tiny-wan-t2v", root=tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_resolve_video_model_passes_non_builtins_through(wan_cache):
    assert resolve_video_model("Wan-AI/Wan2.2-TI2V-5B-Diffusers") == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert resolve_video_model("/models/wan") == "/models/wan"
    assert resolve_video_model("tiny-wan-t2v") == str(wan_cache / "tiny-wan-t2v")
    with pytest.raises(ValueError, match="tiny video model 'tiny-wan-x'"):
        ensure_tiny_wan("tiny-wan-x")


# --------------------------------------------------------------------------- prompts


def test_prompt_joins_steps_in_temporal_order():
    plan = _plan("Fill the kettle.", "Boil water", "Pour water into the cup;")
    cfg = DiffusersConfig(prompt_template="Goal: {goal} | {steps}", step_joiner=" -> ")
    prompt = plan_to_prompt(_task(), plan, cfg.prompt_template, cfg.step_joiner)
    assert prompt == "Goal: Make a cup of tea | Fill the kettle -> Boil water -> Pour water into the cup"


def test_bad_prompt_template_is_rejected_naming_the_field(wan_cache):
    with pytest.raises(ValueError, match="prompt_template.*unknown"):
        DiffusersWorld(DiffusersConfig(prompt_template="Do {unknown}"))


# --------------------------------------------------------------------------- rendering


def test_t2v_render_writes_artifacts_of_the_right_shape(t2v, tmp_path):
    task = _task()
    rollouts = t2v.render(task, [_plan("Fill the kettle", "Boil water")], str(tmp_path))
    (r,) = rollouts
    assert r.error is None and r.ground_truth is None and r.world == "diffusers"
    assert r.seed == default_seed(task.id, 0) and r.num_frames == SHAPE[0]
    assert os.path.exists(r.video_uri) and os.path.exists(r.gif_uri)
    import imageio.v3 as iio

    video = iio.imread(media.read_bytes(r.video_uri), extension=".mp4")
    gif = iio.imread(media.read_bytes(r.gif_uri), extension=".gif")
    assert gif.shape[:3] == SHAPE[:3]
    assert video.shape == SHAPE
    assert len(r.frame_uris) == 4 and _frames(r).shape == (4, 64, 64, 3)
    assert t2v.admissible_actions(task) is None


def test_same_seed_same_video_different_seed_different(t2v, tmp_path):
    plan = _plan("Open the fridge", "Take out the milk")
    a, b, c = t2v.render(_task(), [plan, plan, plan], str(tmp_path), seeds=[7, 7, 8])
    assert np.array_equal(_frames(a), _frames(b))
    assert not np.array_equal(_frames(a), _frames(c))
    # a fresh call with the same seed reproduces the video
    (again,) = t2v.render(_task("kitchen:2"), [plan], str(tmp_path / "again"), seeds=[7])
    assert np.array_equal(_frames(a), _frames(again))


def test_prompt_conditions_the_video(t2v, tmp_path):
    a, b = t2v.render(_task(), [_plan("Open the fridge"), _plan("Wash the pan")], str(tmp_path), seeds=[3, 3])
    assert not np.array_equal(_frames(a), _frames(b))


def test_bad_plans_become_rollout_errors(t2v, tmp_path):
    plans = [None, Plan(), "do it", _plan("Boil water"), {"steps": [{"step": 1, "action": "Stir"}]}]
    rollouts = t2v.render(_task(), plans, str(tmp_path))
    assert [r.plan_index for r in rollouts] == [0, 1, 2, 3, 4]
    assert "no plan" in rollouts[0].error
    assert "no steps" in rollouts[1].error
    assert "plans[2] is not a Plan" in rollouts[2].error
    assert rollouts[3].error is None and rollouts[4].error is None and rollouts[4].num_frames == 9
    (r,) = t2v.render(_task(), [_plan("x")], str(tmp_path), seeds=[1, 2])
    assert "seeds has 2 entries but there are 1 plans" in r.error


def test_plans_of_several_requests_share_one_pipeline_call(t2v, tmp_path):
    calls = []
    real = t2v._pipes["t2v"]

    class Counting:  # instrumentation only: counts calls, delegates to the real pipeline
        def __call__(self, **kw):
            calls.append(len(kw["prompt"]))
            return real(**kw)

    t2v._pipes["t2v"] = Counting()
    try:
        out = t2v.render_batch(
            [
                RenderRequest(_task("a"), [_plan("Boil water"), None], str(tmp_path)),
                RenderRequest(_task("b"), [_plan("Stir"), _plan("Pour")], str(tmp_path)),
            ]
        )
    finally:
        t2v._pipes["t2v"] = real
    assert calls == [3]
    assert [[r.task_id for r in rs] for rs in out] == [["a", "a"], ["b", "b"]]
    assert out[0][1].error and all(r.error is None for r in (out[0][0], *out[1]))


def test_writes_to_an_fsspec_uri(t2v):
    (r,) = t2v.render(_task(), [_plan("Boil water")], "memory://wa-test/videos")
    assert r.error is None and r.video_uri.startswith("memory://wa-test/videos/")
    assert media.decode_image(media.read_bytes(r.frame_uris[0])).shape == (64, 64, 3)


# --------------------------------------------------------------------------- image conditioning


def test_i2v_renders_from_a_reference_image(wan_cache, tmp_path):
    world = DiffusersWorld(DiffusersConfig(model="tiny-wan-i2v"))
    assert world.supports_image and not world.supports_text
    plan = _plan("Pick up the cup")
    ref_a, ref_b = _image(tmp_path / "a.png", seed=1), _image(tmp_path / "b.jpg", seed=2)
    (a,) = world.render(_task(), [plan], str(tmp_path / "a"), reference_image=ref_a, seeds=[5])
    (b,) = world.render(_task(reference_image=ref_b), [plan], str(tmp_path / "b"), seeds=[5])
    assert a.error is None and b.error is None and _frames(a).shape == (4, 64, 64, 3)
    assert not np.array_equal(_frames(a), _frames(b))  # the image conditions the video
    (again,) = world.render(_task(), [plan], str(tmp_path / "c"), reference_image=ref_a, seeds=[5])
    assert np.array_equal(_frames(a), _frames(again))
    (no_img,) = world.render(_task(), [plan], str(tmp_path / "d"))
    assert "image-to-video only" in no_img.error


def test_ti2v_uses_the_image_when_given_and_text_otherwise(ti2v, tmp_path):
    assert ti2v.supports_image and ti2v.supports_text
    plan = _plan("Pick up the cup")
    ref = _image(tmp_path / "ref.png", seed=3)
    (text_only,) = ti2v.render(_task(), [plan], str(tmp_path / "t"), seeds=[5])
    (with_img,) = ti2v.render(_task(), [plan], str(tmp_path / "i"), reference_image=ref, seeds=[5])
    assert "i2v" in ti2v._pipes and text_only.error is None and with_img.error is None
    assert not np.array_equal(_frames(text_only), _frames(with_img))


def test_bad_reference_images_are_rollout_errors_and_the_world_keeps_serving(wan_cache, tmp_path):
    world = DiffusersWorld(DiffusersConfig(model="tiny-wan-ti2v", max_reference_pixels=64 * 64))
    big = _image(tmp_path / "big.png", size=80)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(open(_image(tmp_path / "ok.png"), "rb").read()[:120])
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    cases = {big: "more than max_pixels", str(corrupt): "corrupt", str(text): "not a readable image",
             str(tmp_path / "missing.png"): "does not exist"}
    for uri, expected in cases.items():
        rollouts = world.render(_task(), [_plan("Boil water"), _plan("Stir")], str(tmp_path), reference_image=uri)
        assert len(rollouts) == 2
        for r in rollouts:
            assert r.error.startswith("reference_image:") and expected in r.error, r.error
            assert r.video_uri is None
    (ok,) = world.render(_task(), [_plan("Boil water")], str(tmp_path), reference_image=_image(tmp_path / "g.png"))
    assert ok.error is None and ok.num_frames == 9


def test_build_world_makes_a_diffusers_world(wan_cache):
    world = build_world(WorldConfig(backend="diffusers", diffusers=DiffusersConfig(model="tiny-wan-t2v")))
    assert isinstance(world, DiffusersWorld) and world.info()["checkpoint_class"] == "WanPipeline"


# --------------------------------------------------------------------------- the run root on S3


def test_ti2v_conditions_on_a_reference_scene_on_s3_and_writes_there(ti2v, s3_env):
    """The cluster path: the task's starting scene (a PNG under an S3 run root) conditions
    image-to-video, and the video and the critic's frames land under the same root."""
    from worldagent_ray import storage
    from worldagent_ray.config import SandboxConfig
    from worldagent_ray.world.reference import ReferenceScenes

    cfg = WorldConfig(backend="diffusers", sandbox=SandboxConfig(image_size=32),
                      diffusers=DiffusersConfig(model="tiny-wan-ti2v"))
    world = ti2v
    task = ReferenceScenes(cfg).attach(_task(), f"{s3_env}/run/references")
    assert task.reference_image.startswith(f"{s3_env}/run/references/")
    plan = _plan("Pick up the cup")
    (with_img,) = world.render(task, [plan], f"{s3_env}/run/videos/a", seeds=[5])
    (text_only,) = world.render(_task(), [plan], f"{s3_env}/run/videos/b", seeds=[5])
    assert with_img.error is None and text_only.error is None
    assert len(with_img.frame_uris) == ti2v.critic_frames == 4 and with_img.num_frames == 9
    for uri in (with_img.video_uri, with_img.gif_uri, *with_img.frame_uris):
        assert uri.startswith(f"{s3_env}/run/videos/a/") and storage.exists(uri)
    assert media.read_video(with_img.video_uri).shape[:3] == (9, 64, 64)
    assert not np.array_equal(_frames(with_img), _frames(text_only))  # the scene conditioned the video
