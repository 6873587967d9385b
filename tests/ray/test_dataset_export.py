"""The video-action export on Ray Data: memory (LanceDB) + run folder -> Parquet + mp4 -> PyTorch."""

from __future__ import annotations

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest

from worldagent_ray.config import CriticConfig, SandboxConfig, dump_config, load_config
from worldagent_ray.schemas import Episode, Plan

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose memory holds real sandbox episodes of all three phases: reference plans
    (successes), wrong plans (failures), a failed episode and one whose world errored."""
    from worldagent_ray.critic import Critic
    from worldagent_ray.memory import EpisodeMemory
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

    root = tmp_path_factory.mktemp("export")
    run = root / "runs" / "run-x"
    run.mkdir(parents=True)
    cfg = load_config("local-cpu", overrides=[f"run.root={root / 'runs'}"], environ={})
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "run.json").write_text(json.dumps({"run_id": "run-x", "artifacts": str(run)}))
    world = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=2, write_gif=False), critic_frames=1)
    critic = Critic(CriticConfig(scorers=["verifiable"]))
    gen = SandboxTaskGenerator(seed=2)
    eps = []
    for phase in (1, 2, 3):
        task = gen.sample(phase=phase, index=phase)
        plans = [reference_plan(task), Plan.from_actions(["turn on the stove", "open the fridge"])]
        rollouts = world.render(task, plans, str(run / "videos"), seeds=[0, 1])
        verdicts = critic.score_batch([(task, p, r) for p, r in zip(plans, rollouts)])
        for i, (p, r, v) in enumerate(zip(plans, rollouts, verdicts)):
            eps.append(Episode.new("run-x", task, i, plan=p, rollout=r, verdict=v, policy_version=phase))
    task = gen.sample(phase=1, index=9)
    eps.append(Episode.new("run-x", task, 0, status="failed", failure_reason="world: timeout"))
    bad = world.render(task, [None], str(run / "videos"))[0]
    eps.append(Episode.new("run-x", task, 1, plan=Plan.from_actions(["open the fridge"]), rollout=bad))
    mem = EpisodeMemory(str(run / "memory"), table=cfg.memory.table)
    mem.upsert(eps)
    mem.close()
    return str(run), {e.id: e for e in eps}


def _mp4(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.asarray(iio.imread(f.read(), extension=".mp4"))


def test_export_round_trips_into_a_pytorch_dataset(ray_local, run_dir, tmp_path):
    from torch.utils.data import DataLoader, Dataset

    from worldagent_ray.datasets.video_action import VideoActionDataset
    from worldagent_ray.runtime.dataset_export import export_video_action

    run, eps = run_dir
    cfg = load_config("local-cpu", overrides=["export.phases=[1,2]", "export.rows_per_file=2",
                                              "export.video_shards=3"], environ={})
    out = str(tmp_path / "ds")
    m = export_video_action(cfg, runs=[run], out=out)
    # phases 1-2 only; the failed episode is filtered in Lance, the one without a video is skipped
    want = {i for i, e in eps.items() if e.task.phase in (1, 2) and e.status == "ok" and e.rollout.video_uri}
    assert m["rows"] == len(want) == 4 and m["episodes_selected"] == 5 and m["skipped"] == 1
    assert json.loads(open(os.path.join(out, "manifest.json")).read())["rows"] == 4
    assert len(os.listdir(os.path.join(out, "rows"))) >= 2  # sharded: 2 rows per file

    ds = VideoActionDataset(out)
    assert isinstance(ds, Dataset) and len(ds) == 4
    for k in range(len(ds)):
        item = ds[k]
        ep = eps[item["episode_id"]]
        assert item["episode_id"] in want and item["goal"] == ep.task.goal
        assert item["actions"] == ep.plan.actions and item["reward"] == pytest.approx(ep.reward)
        assert item["success"] == ep.success and item["policy_version"] == ep.policy_version
        assert item["frame_ranges"].tolist() == [[s.start, s.stop] for s in ep.rollout.step_frames]
        src = _mp4(ep.rollout.video_uri)
        assert item["frames"].shape == (ep.rollout.num_frames, 32, 32, 3)
        assert np.array_equal(item["frames"].numpy(), src[..., :3])
    assert {ds[k]["success"] for k in range(len(ds))} == {True, False}

    steps = VideoActionDataset(out, mode="step")
    assert len(steps) == sum(len(eps[i].rollout.step_frames) for i in want)
    s = steps[0]
    assert s["frames"].shape[0] == 2 and isinstance(s["action"], str) and s["step"] == 1
    batch = next(iter(DataLoader(steps, batch_size=2, collate_fn=list)))
    assert len(batch) == 2

    # re-exporting into the same folder replaces the rows, never duplicates them
    assert export_video_action(cfg, runs=[run], out=out)["rows"] == 4 and len(VideoActionDataset(out)) == 4


def test_filters_and_the_job_entry_point(ray_local, run_dir, tmp_path, capsys):
    import importlib.util

    run, eps = run_dir
    spec = importlib.util.spec_from_file_location("export_job", "jobs/export_dataset.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = str(tmp_path / "wins")
    assert job.main(["--run", run, "--out", out, "--success", "--min-reward", "0.9"]) == 0
    assert "RESULT rows=3 selected=3" in capsys.readouterr().out
    from worldagent_ray.datasets.video_action import VideoActionDataset

    got = VideoActionDataset(out)
    assert len(got) == 3 and all(got[k]["success"] for k in range(3))
    assert job.main(["--run", str(tmp_path / "nope")]) == 2  # a missing run folder: a clear error
    assert "not a run folder" in capsys.readouterr().err
    assert job.main(["--run", run, "--phase", "4"]) == 2
    assert "phases must be a non-empty list of 1, 2, 3, got [4]" in capsys.readouterr().err
