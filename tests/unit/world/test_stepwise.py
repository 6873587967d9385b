"""Step-wise rendering with tiny random SkyReels-V2 and Wan pipelines, and a CausVid-format LoRA."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worldagent_ray.config import StepwiseConfig, WorldConfig
from worldagent_ray.schemas import Plan, Task
from worldagent_ray.world import build_world, media
from worldagent_ray.world.stepwise import StepwiseWorld, prefix_frames, step_seed
from worldagent_ray.world.tiny_wan import ensure_tiny_causvid_lora

TASK = Task(id="sw:1", goal="Make a cup of tea", phase=2)
PLAN = Plan.from_actions(["Fill the kettle", "Boil the water", "Pour it into the cup"])
SMALL = dict(height=32, width=32, num_inference_steps=2)


def _png(uri: str) -> np.ndarray:
    return media.decode_image(media.read_bytes(uri))


def _video(uri: str) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(media.read_bytes(uri), extension=".mp4")


def _refs(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(a)
    Image.new("RGB", (32, 32), (250, 250, 250)).save(b)
    return str(a), str(b)


@pytest.fixture(scope="module")
def skyreels():
    # critic_frames=64: every frame is also written as a (lossless) PNG, in frame_uris
    return StepwiseWorld(StepwiseConfig(method="skyreels_df", clip_frames=9, overlap_history=5, **SMALL),
                         critic_frames=64)


def test_prefix_frames_follow_the_causal_vae():
    assert [prefix_frames(h, 1) for h in (1, 5, 9, 17)] == [1, 5, 9, 17]
    assert prefix_frames(9, 2) == 5 and prefix_frames(5, 4) == 0  # prefix latents cut to whole causal blocks


def test_skyreels_df_extends_the_video_step_by_step(skyreels, tmp_path):
    (r,) = skyreels.render(TASK, [PLAN], str(tmp_path), seeds=[7])
    assert r.error is None and r.world == "stepwise" and r.ground_truth is None
    # step 1 keeps its whole clip; each later step adds clip_frames - overlap_history new frames
    assert [(s.step, s.action, s.start, s.stop) for s in r.step_frames] == [
        (1, "Fill the kettle", 0, 9), (2, "Boil the water", 9, 13), (3, "Pour it into the cup", 13, 17)]
    assert r.num_frames == 17 == len(_video(r.video_uri)) and skyreels.new_frames_per_step() == 4
    for s in r.step_frames:  # the step's PNG is its last frame
        assert _png(s.frame_uri).shape == (32, 32, 3)


def test_later_steps_are_conditioned_on_earlier_frames_and_never_rewrite_them(skyreels, tmp_path):
    two = Plan.from_actions(PLAN.actions[:2])
    (a,) = skyreels.render(TASK, [two], str(tmp_path / "a"), seeds=[3])
    frames = lambda r: np.stack([_png(u) for u in r.frame_uris])  # noqa: E731
    fa = frames(a)
    assert len(fa) == a.num_frames == 13
    s1, s2 = (slice(s.start, s.stop) for s in a.step_frames)
    # step 2 is exactly one video-to-video extension of step 1's frames ...
    prompt2 = skyreels.cfg.prompt_template.format(goal=TASK.goal.rstrip("."), step=2, action=two.actions[1])
    again = skyreels.extend(prompt2, list(fa[s1]), seed=step_seed(3, 2))
    assert np.array_equal(np.stack(again), fa[s2])
    # ... and another history, same text and noise, gives other frames: the history conditions it
    noise = np.random.default_rng(0).integers(0, 255, fa[s1].shape, dtype=np.uint8)
    assert not np.array_equal(np.stack(skyreels.extend(prompt2, list(noise), seed=step_seed(3, 2))), fa[s2])
    # a different step 2 leaves step 1's frames exactly as they were (the video is only extended)
    other = Plan.from_actions([PLAN.actions[0], "Open the fridge"])
    (c,) = skyreels.render(TASK, [other], str(tmp_path / "c"), seeds=[3])
    assert np.array_equal(fa[s1], frames(c)[s1]) and not np.array_equal(fa[s2], frames(c)[s2])
    assert c.step_frames[1].action == "Open the fridge"


def test_a_reference_image_starts_the_first_step(skyreels, tmp_path):
    ref_a, ref_b = _refs(tmp_path)
    one = Plan.from_actions(PLAN.actions[:1])
    (a,) = skyreels.render(TASK, [one], str(tmp_path / "a"), reference_image=ref_a, seeds=[3])
    (b,) = skyreels.render(TASK, [one], str(tmp_path / "b"), reference_image=ref_b, seeds=[3])
    assert a.error is None and b.error is None and a.num_frames == 9
    assert not np.array_equal(_png(a.frame_uris[-1]), _png(b.frame_uris[-1]))


def test_bad_plans_and_images_fail_their_rollout_only(skyreels, tmp_path):
    one = Plan.from_actions(PLAN.actions[:1])
    out = skyreels.render(TASK, [None, Plan(), "boil water", one.model_dump()], str(tmp_path), seeds=[1, 2, 3, 4])
    assert "no plan" in out[0].error and "no steps" in out[1].error and "not a Plan" in out[2].error
    assert out[3].error is None and len(out[3].step_frames) == 1  # a dict plan from the wire works
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    (r,) = skyreels.render(TASK, [one], str(tmp_path), reference_image=str(bad))
    assert r.error.startswith("reference_image:")


def test_wan_i2v_chain_with_a_causvid_lora(tmp_path):
    cfg = dict(method="wan_i2v_chain", model="tiny-wan-ti2v", clip_frames=5, **SMALL)
    plain = StepwiseWorld(StepwiseConfig(**cfg))
    (r,) = plain.render(TASK, [PLAN], str(tmp_path / "plain"), seeds=[5])
    assert r.error is None and [(s.start, s.stop) for s in r.step_frames] == [(0, 5), (5, 9), (9, 13)]
    assert plain.new_frames_per_step() == 4 and r.num_frames == 13

    # the LoRA is in CausVid's original key format; diffusers converts it on load
    from safetensors.torch import load_file

    keys = list(load_file(str(ensure_tiny_causvid_lora())))
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".diff_b") for k in keys)
    off = build_world(WorldConfig(backend="stepwise", stepwise=StepwiseConfig(**cfg, lora="tiny-causvid-lora",
                                                                              lora_scale=0.0)))
    on = StepwiseWorld(StepwiseConfig(**cfg, lora="tiny-causvid-lora", lora_scale=1.0))
    lora_layers = [n for n, _ in on._pipes["first"].transformer.named_modules() if n.endswith("lora_A")]
    assert len(lora_layers) == 2 * 10 + 2  # attn1/attn2 q,k,v,o and ffn per block; time_proj; proj_out
    one = Plan.from_actions(PLAN.actions[:1])
    (r_off,) = off.render(TASK, [one], str(tmp_path / "off"), seeds=[5])
    (r_on,) = on.render(TASK, [one], str(tmp_path / "on"), seeds=[5])
    first = lambda x: _png(x.step_frames[0].frame_uri)  # noqa: E731
    assert np.array_equal(first(r_off), first(r))  # scale 0: the base model
    assert not np.array_equal(first(r_on), first(r))


def test_configuration_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="text-to-video-only"):
        StepwiseWorld(StepwiseConfig(method="wan_i2v_chain", model="tiny-wan-t2v", **SMALL))
    with pytest.raises(ValueError, match="SkyReels-V2 diffusion-forcing checkpoint"):
        StepwiseWorld(StepwiseConfig(method="skyreels_df", model="tiny-wan-t2v", **SMALL))
    with pytest.raises(ValueError, match="overlap_history"):
        StepwiseConfig(clip_frames=9, overlap_history=9)
    with pytest.raises(ValueError, match="clip_frames must be 4k"):
        StepwiseConfig(clip_frames=8)
    with pytest.raises(ValueError, match="prompt_template"):
        StepwiseWorld(StepwiseConfig(prompt_template="{nope}", **SMALL))
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="world.stepwise.lora"):
        StepwiseWorld(StepwiseConfig(method="wan_i2v_chain", model="tiny-wan-ti2v", lora=str(bad), **SMALL))
