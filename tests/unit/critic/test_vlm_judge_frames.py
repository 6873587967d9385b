"""The VLM judge reads the frames and the reference image through the storage layer (here a
real S3 server) and hands a real vision-language engine (tiny random Qwen2-VL) the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from worldagent_ray import storage
from worldagent_ray.config import CriticConfig, SandboxConfig, WorldConfig
from worldagent_ray.critic import VLMJudge
from worldagent_ray.schemas import Scores
from worldagent_ray.world import media
from worldagent_ray.world.reference import ReferenceScenes
from worldagent_ray.world.sandbox import SandboxWorld, build_task, reference_plan

from tests.factories import running_engine

SANDBOX = SandboxConfig(image_size=32, frames_per_step=2, write_mp4=False, write_gif=False)


@pytest.fixture(scope="module")
def vl_engine():
    with running_engine(backend="transformers", model="tiny-random-qwen2-vl", dtype="float32", max_model_len=1024,
                        max_json_retries=0) as engine:
        yield engine


class Recording:
    """Delegates every call to the real engine and keeps the prompts it was given."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    @property
    def model_name(self):
        return self.engine.model_name

    def generate(self, prompts, params, json_schema=None):
        self.prompts.extend(prompts)
        return self.engine.generate(prompts, params, json_schema=json_schema)


def _images(conv):
    return [np.asarray(p["image"]) for p in conv[1]["content"] if p["type"] == "image"]


def _items(root, critic_frames, n_tasks=2):
    scenes = ReferenceScenes(WorldConfig(sandbox=SANDBOX))
    world = SandboxWorld(SANDBOX, critic_frames=critic_frames)
    items = []
    for family in ("turn_on_stove", "omelette")[:n_tasks]:
        task = scenes.attach(build_task(family, {"item_loc": "counter"} if family == "omelette" else {}),
                             f"{root}/references")
        plan = reference_plan(task)
        [r] = world.render(task, [plan], f"{root}/videos/{task.id}")
        assert r.error is None and all(u.startswith("s3://") for u in r.frame_uris)
        items.append((task, plan, r))
    return items


def test_the_judge_scores_frames_read_from_s3(s3_env, vl_engine):
    items = _items(s3_env, critic_frames=3)
    spy = Recording(vl_engine)
    results = VLMJudge(spy, CriticConfig(scorers=["vlm_judge"], num_frames=3, max_tokens=16)).judge_batch(items)
    assert len(spy.prompts) == 2
    for (task, _, r), conv, (scores, _, notes) in zip(items, spy.prompts, results):
        assert isinstance(scores, Scores)  # judged: parsed scores, or zeros with a note for malformed output
        assert all("could not read" not in n and "of the" not in n for n in notes)
        images = _images(conv)
        ref = media.decode_image(storage.read_bytes(task.reference_image))
        frames = [media.decode_image(storage.read_bytes(u)) for u in r.frame_uris]
        assert len(r.frame_uris) == 3 and len(images) == 4  # the starting scene, then 3 frames
        assert np.array_equal(images[0], ref)
        assert all(np.array_equal(a, b) for a, b in zip(images[1:], frames))


def test_unreadable_frames_leave_that_rollout_unscored_and_the_rest_judged(s3_env, vl_engine):
    items = _items(s3_env, critic_frames=2)
    storage.delete(items[0][2].frame_uris[1])
    spy = Recording(vl_engine)
    (s0, _, n0), (s1, _, _) = VLMJudge(spy, CriticConfig(scorers=["vlm_judge"], num_frames=2, max_tokens=16)
                                       ).judge_batch(items)
    assert s0 is None and "could not read the frames" in n0[0] and items[0][2].frame_uris[1] in n0[0]
    assert isinstance(s1, Scores) and len(spy.prompts) == 1


def test_a_shortfall_of_frames_is_noted_not_silent(s3_env, vl_engine):
    items = _items(s3_env, critic_frames=2, n_tasks=1)
    spy = Recording(vl_engine)
    [(scores, _, notes)] = VLMJudge(spy, CriticConfig(scorers=["vlm_judge"], num_frames=4, max_tokens=16)
                                    ).judge_batch(items)
    assert isinstance(scores, Scores) and len(_images(spy.prompts[0])) == 1 + 2
    assert any("judged 2 of the 4 frames asked" in n for n in notes)
