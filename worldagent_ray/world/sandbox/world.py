"""``SandboxWorld``: the embedded default world model (deterministic, CPU only, verifiable).

Each plan is parsed step by step against the kitchen rules, executed on a symbolic state
(preconditions checked, effects applied), rendered to frames, written as mp4 / GIF / PNG,
and returned as a :class:`~worldagent_ray.schemas.Rollout` whose ``ground_truth`` records
every step's outcome, the final state, the goal predicates and the step orders the critic
uses for temporal consistency.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ...config import SandboxConfig
from ...schemas import GroundTruth, Plan, Rollout, StepFrames, StepOutcome, StepStatus, Task
from .. import media
from ..base import WorldModel
from ..reference import validate_reference_image
from .parser import StepParser
from .render import KitchenRenderer
from .rules import Condition, Rules, load_rules
from .state import KitchenState
from .tasks import PORTABLES, SandboxTaskGenerator

if TYPE_CHECKING:
    from ..reference import ReferenceScenes

_PREP_IN = "in"


class SandboxWorld(WorldModel):
    """The symbolic kitchen world (``name = "sandbox"``).

    Args:
        cfg (`SandboxConfig`): image size, frames per step, fps, step limit, outputs.
        rules (`Rules`, *optional*): kitchen rules (default: the packaged YAML).
        critic_frames (`int`, *optional*): PNG frames written per rollout for the critic;
            pass ``agents.critic.num_frames`` (the default is that field's default).
        scenes (`ReferenceScenes`, *optional*): gives proposed tasks their starting scene as
            reference image in :meth:`prepare_task` (``build_world`` passes one when
            ``world.reference_scene`` is on).
    """

    name = "sandbox"

    def __init__(self, cfg: SandboxConfig | None = None, rules: Rules | None = None,
                 critic_frames: int | None = None, scenes: "ReferenceScenes | None" = None):
        self.cfg = cfg or SandboxConfig()
        self.critic_frames = media.critic_frames_or_default(critic_frames)
        self.scenes = scenes
        self.rules = rules or load_rules()
        self.parser = StepParser(self.rules)
        self._tasks = SandboxTaskGenerator(0, self.rules)

    # ------------------------------------------------------------------ scene

    def scene_spec(self, task: Task) -> dict[str, Any]:
        """The task's sandbox world_spec; a free-text task is matched to a family if it
        clearly is one, else it gets every object on the counter and no goal predicates."""
        spec = task.world_spec
        if isinstance(spec, dict) and spec.get("world") == "sandbox":
            return spec
        matched = self._tasks.match_goal(task.goal)
        if matched is not None:
            return dict(matched.world_spec or {})
        return {"world": "sandbox", "family": None, "placement": {o: "counter" for o in PORTABLES},
                "goal_predicates": [], "reference": []}

    def initial_state(self, task: Task) -> KitchenState:
        return KitchenState.from_spec(self.rules, self.scene_spec(task).get("placement", {}))

    def prepare_task(self, task: Task, out_dir: str) -> Task:
        """A proposed task, ready to dispatch: with its starting scene as ``reference_image``
        (a PNG under ``out_dir``) when this world has ``scenes``; else unchanged."""
        return self.scenes.attach(task, out_dir) if self.scenes is not None else task

    def reference_image(self, task: Task, out_uri: str, size: tuple[int, int] | None = None) -> str:
        """Render the task's starting scene (no status bar) and write it as a PNG to
        ``out_uri`` (a path or URI, through the storage layer); return its location.

        Args:
            size: ``(height, width)``; default ``image_size`` square (the sandbox's frames).
                A non-square size letterboxes the square scene.

        Same task, same pixels: the image depends only on the task's scene (seed 0).
        Raises ``ValueError`` for a scene the rules reject and
        :class:`~worldagent_ray.storage.StorageError` when the write fails.
        """
        state = self.initial_state(task)
        h, w = size if size is not None else (self.cfg.image_size, self.cfg.image_size)
        img = KitchenRenderer(self.rules, min(h, w), 0).scene(state, h, w)
        return media.write_bytes(out_uri, media.encode_png(img))

    def admissible_actions(self, task: Task) -> list[str]:
        """Canonical action strings for the objects in the task's scene (tens, not thousands)."""
        try:
            state = self.initial_state(task)
        except ValueError:
            return []
        names = list(state.objects)
        out: list[str] = []
        for verb in self.rules.verbs.values():
            for obj in names:
                if not self._fits(verb.name, "obj", obj, state):
                    continue
                if "{dest}" in verb.canonical:
                    for dest in names:
                        if dest != obj and self._fits(verb.name, "dest", dest, state):
                            prep = _PREP_IN if "container" in state.flags(dest) else "on"
                            out.append(verb.canonical.format(obj=obj, dest=dest, prep=prep))
                else:
                    out.append(verb.canonical.format(obj=obj))
        return sorted(set(out))

    def _fits(self, verb: str, role: str, name: str, state: KitchenState) -> bool:
        """Whether ``name`` may fill ``role`` in a listed action: the verb's ``admissible``
        flags when the rules give them, else the ``kind`` preconditions on that role."""
        v = self.rules.verbs[verb]
        flags = state.flags(name)
        adm = v.admissible
        if role in adm:
            if role != "obj" and set(adm.get("exclude", [])) & flags:
                return False
            return bool(set(adm[role]) & flags)
        need = {c.args[1] for case in v.cases for c in case.when + case.pre
                if c.check == "kind" and c.args and c.args[0] == role and not c.negate}
        return not need or bool(need & flags)

    # ------------------------------------------------------------------ simulation

    def simulate(self, task: Task, plan: Plan, seed: int = 0) -> tuple[np.ndarray, GroundTruth]:
        """Run ``plan`` on the task's scene; return ``(frames (T,S,S,3) uint8, ground truth)``."""
        spec = self.scene_spec(task)
        state = KitchenState.from_spec(self.rules, spec.get("placement", {}))
        renderer = KitchenRenderer(self.rules, self.cfg.image_size, seed)
        steps = list(plan.steps)
        n_run = min(len(steps), self.cfg.max_steps)
        outcomes: list[StepOutcome] = []
        states = [state.copy()]
        ctx: str | None = None
        for i, s in enumerate(steps):
            if i >= n_run:
                outcomes.append(StepOutcome(index=i, text=s.action, status=StepStatus.SKIPPED,
                                            reason=f"beyond the world's step limit max_steps={self.cfg.max_steps}",
                                            category="limit"))
                continue
            outcome, ctx = self._execute(state, i, s.action, ctx)
            outcomes.append(outcome)
            states.append(state.copy())
        cells = [o.status.value for o in outcomes[:n_run]]
        frames = [renderer.frame(states[0], cells=["pending"] * n_run, current=None)]
        for i in range(n_run):
            shown = cells[: i + 1] + ["pending"] * (n_run - i - 1)
            frames.extend(renderer.transition(states[i], states[i + 1], self.cfg.frames_per_step, shown, i))
        goals = {g["name"]: state.check(Condition(g["check"], tuple(g["args"])), {}).ok
                 for g in spec.get("goal_predicates", [])}
        relevant, expected = self._step_orders(spec, outcomes)
        gt = GroundTruth(
            steps=outcomes,
            final_state=state.snapshot(),
            goal_predicates=goals,
            state_description=self._describe(state, goals),
            relevant_step_order=relevant,
            expected_step_order=expected,
        )
        return np.stack(frames), gt

    def _execute(self, state: KitchenState, i: int, text: str, ctx: str | None) -> tuple[StepOutcome, str | None]:
        parsed = self.parser.parse(text, context_obj=ctx)
        if parsed.verb is None or parsed.reason is not None:
            category = "object" if parsed.unknown and parsed.verb else "parse"
            return StepOutcome(index=i, text=text, status=StepStatus.NOT_UNDERSTOOD, verb=parsed.verb,
                               reason=parsed.reason, category=category), ctx
        absent = [o for o in parsed.roles.values() if o not in state.objects]
        if absent:
            return StepOutcome(index=i, text=text, status=StepStatus.NOT_UNDERSTOOD, verb=parsed.verb,
                               args=parsed.args, reason=f"there is no {absent[0]} in this scene",
                               category="object"), ctx
        result = state.step(self.rules.verbs[parsed.verb], parsed.roles)
        status = StepStatus.EXECUTED if result.ok else StepStatus.PRECONDITION_FAILED
        return StepOutcome(index=i, text=text, status=status, verb=parsed.verb, args=parsed.args,
                           reason=result.reason, category=None if result.ok else result.category  # type: ignore[arg-type]
                           ), parsed.roles.get("obj", ctx)

    def _step_orders(self, spec: dict[str, Any], outcomes: list[StepOutcome]) -> tuple[list[int], list[int]]:
        """Relevant steps: understood steps (executed or failed on a precondition) whose
        (verb, args) equal a not-yet-matched reference step. ``relevant`` lists their
        indices in plan order; ``expected`` the same indices stably sorted by the stage of
        the reference step each matched."""
        refs: list[tuple[tuple[str, tuple[str, ...]], int]] = []
        for r in spec.get("reference", []):
            p = self.parser.parse(r["action"])
            if p.verb and p.reason is None:
                refs.append(((p.verb, tuple(p.args)), int(r["stage"])))
        used = [False] * len(refs)
        relevant: list[tuple[int, int]] = []
        for o in outcomes:
            if o.status not in (StepStatus.EXECUTED, StepStatus.PRECONDITION_FAILED):
                continue
            key = (o.verb, tuple(o.args))
            for j, (rk, stage) in enumerate(refs):
                if not used[j] and rk == key:
                    used[j] = True
                    relevant.append((o.index, stage))
                    break
        expected = [i for i, _ in sorted(relevant, key=lambda t: t[1])]
        return [i for i, _ in relevant], expected

    def _describe(self, state: KitchenState, goals: dict[str, bool]) -> str:
        text = state.describe()
        if goals:
            done = [k for k, v in goals.items() if v]
            todo = [k for k, v in goals.items() if not v]
            text += f" Goal conditions met: {', '.join(done) or 'none'}."
            if todo:
                text += f" Not met: {', '.join(todo)}."
        return text

    # ------------------------------------------------------------------ WorldModel

    def render_plans(self, task: Task, plans: Sequence[Plan | None], out_dir: str, ref: str | None,
                     seeds: Sequence[int] | None) -> list[Rollout]:
        """Render each plan (see :meth:`WorldModel.render`); plan ``k``'s seed defaults to ``k``.
        Never raises for bad input: a missing plan, a bad reference image or a failure while
        rendering gives a Rollout with ``error`` set."""
        ref_error = None
        if ref is not None:
            msg = validate_reference_image(ref, self.cfg.max_reference_pixels)
            ref_error = f"reference image rejected: {msg}" if msg else None
        out = []
        for k, plan in enumerate(plans):
            seed = int(seeds[k]) if seeds is not None and k < len(seeds) else k
            out.append(self._render_one(task, plan, k, seed, out_dir, ref_error))
        return out

    def _render_one(self, task: Task, plan: Any, k: int, seed: int, out_dir: str, ref_error: str | None) -> Rollout:
        t0 = time.perf_counter()
        base = dict(task_id=task.id, plan_index=k, world=self.name, seed=seed)
        if ref_error:
            return Rollout(**base, error=ref_error)
        if plan is None:
            return Rollout(**base, error="no plan: the action agent produced no plan for this sample")
        if not isinstance(plan, Plan):
            return Rollout(**base, error=f"plan must be a Plan, got {type(plan).__name__}")
        try:
            frames, gt = self.simulate(task, plan, seed)
            digest = hashlib.sha256(plan.as_text().encode()).hexdigest()[:8]
            stem = f"{task.id.replace(':', '_')}.p{k}.s{seed}.{digest}"
            arts = media.write_video_artifacts(
                frames, out_dir, stem, fps=self.cfg.fps, mp4=self.cfg.write_mp4,
                gif=self.cfg.write_gif, sample_frames=self.critic_frames,
            )
        except Exception as e:  # the worker keeps serving; the rollout says what went wrong
            return Rollout(**base, error=f"sandbox failed to render: {type(e).__name__}: {e}",
                           latency_s=time.perf_counter() - t0)
        return Rollout(
            **base,
            video_uri=arts["video_uri"],  # type: ignore[arg-type]
            gif_uri=arts["gif_uri"],  # type: ignore[arg-type]
            frame_uris=list(arts["frame_uris"]),  # type: ignore[arg-type]
            num_frames=int(len(frames)),
            ground_truth=gt,
            latency_s=time.perf_counter() - t0,
            step_frames=self.step_frames(plan),
        )

    def step_frames(self, plan: Plan) -> list[StepFrames]:
        """Frames of each rendered step: frame 0 is the start state, then ``frames_per_step`` per
        step within ``max_steps`` (skipped steps have none)."""
        k = self.cfg.frames_per_step
        return [StepFrames(step=s.step, action=s.action, start=1 + i * k, stop=1 + (i + 1) * k)
                for i, s in enumerate(plan.steps[: self.cfg.max_steps])]
