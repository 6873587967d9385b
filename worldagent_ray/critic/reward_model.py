"""The frozen learned reward model: a sequence-classification head on the judge's backbone.

``jobs/train_critic.py --stage rm`` trains it with TRL's ``RewardTrainer`` on preference pairs
(two episodes of one task, the better by ground truth) and writes, next to the weights,
``critic_calibration.json``: the logit ``center`` and ``scale`` that map a raw score to a
reward in [0, 1] (``sigmoid((logit - center) / scale)``, 0.5 at the logit that best separated
successes from failures on the training episodes).

The model reads the judge's conversation (:func:`~worldagent_ray.critic.text_judge.verdict_messages`
with :func:`~worldagent_ray.critic.text_judge.observation_text`): the same text the critic SFT
data uses. It is frozen: :class:`HFRewardModel` has no weight-loading method, runs in eval mode
without gradients, and its ``weights_version`` is always 0.

Pure core: no Ray (the Serve shell is ``runtime/reward_model_deployment.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from ..config import CriticConfig
from ..schemas import GroundTruth, Plan, Rollout, Task
from .text_judge import observation_text, verdict_messages

CALIBRATION_FILE = "critic_calibration.json"

Conversation = list[dict[str, Any]]


@dataclass(frozen=True)
class Calibration:
    """Maps a raw reward-model logit to a reward in [0, 1]."""

    center: float = 0.0
    scale: float = 1.0

    def reward(self, logit: float) -> float:
        z = (float(logit) - self.center) / max(self.scale, 1e-6)
        z = max(-60.0, min(60.0, z))
        return 1.0 / (1.0 + math.exp(-z))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Calibration":
        """The calibration saved in ``folder``; the identity-like default when there is none."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        center, scale = float(data.get("center", 0.0)), float(data.get("scale", 1.0))
        if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{path}: center must be finite and scale > 0, got {data}")
        return cls(center, scale)


def fit_calibration(logits: Sequence[float], successes: Sequence[bool]) -> Calibration:
    """``center``: the midpoint between adjacent sorted logits that classifies ``successes``
    best (ties: the one nearest the middle); ``scale``: the logits' standard deviation."""
    if len(logits) != len(successes) or not logits:
        raise ValueError(f"need as many logits as labels (> 0), got {len(logits)} and {len(successes)}")
    pairs = sorted(zip((float(x) for x in logits), (bool(s) for s in successes)))
    xs = [x for x, _ in pairs]
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n) or 1.0
    # threshold between xs[k-1] and xs[k]: predict success for indices >= k
    pos_total = sum(s for _, s in pairs)
    best_k, best_correct = 0, pos_total  # k=0: everything predicted successful
    neg_below = pos_below = 0
    for k in range(1, n + 1):
        s = pairs[k - 1][1]
        neg_below += not s
        pos_below += s
        correct = neg_below + (pos_total - pos_below)
        if correct > best_correct or (correct == best_correct and abs(k - n / 2) < abs(best_k - n / 2)):
            best_k, best_correct = k, correct
    if best_k == 0:
        center = xs[0] - std
    elif best_k == n:
        center = xs[-1] + std
    else:
        center = (xs[best_k - 1] + xs[best_k]) / 2
    return Calibration(center=center, scale=std)


def reward_model_input(task: Task, plan: Plan | None, gt: GroundTruth) -> Conversation:
    """The conversation the reward model scores for one episode."""
    return verdict_messages(task, plan, observation_text(gt))


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores judge conversations with calibrated rewards in [0, 1]."""

    @property
    def weights_version(self) -> int: ...

    def score(self, conversations: Sequence[Conversation]) -> list[float]: ...


class HFRewardModel:
    """A transformers sequence-classification reward model, frozen, on one device.

    Args:
        model (`str`): a folder (with its tokenizer and, optionally, ``critic_calibration.json``)
            or a hub id.
        max_length (`int`): tokens per input at most; longer inputs keep their end.
        batch_size (`int`): conversations per forward pass.
        device (`str`): torch device.
    """

    def __init__(self, model: str, max_length: int = 1024, batch_size: int = 8, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import resolve_model

        path = resolve_model(model)
        self.name = model
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        if getattr(self.model.config, "num_labels", None) != 1:
            raise ValueError(f"reward model {model!r} must have num_labels=1, has {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.calibration = Calibration.load(path) if Path(path).is_dir() else Calibration()
        self.max_length = int(max_length)
        self.batch_size = max(1, int(batch_size))
        self.device = device

    @property
    def weights_version(self) -> int:
        return 0  # frozen: never loads new weights

    def logits(self, conversations: Sequence[Conversation]) -> list[float]:
        """Raw scores of each conversation (chat template, no generation prompt)."""
        import torch

        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False) for c in conversations]
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length, add_special_tokens=False)
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return [self.calibration.reward(x) for x in self.logits(conversations)]


class RewardModelScorer:
    """The ``reward_model`` scorer of the Critic: one calibrated reward per rollout.

    It reads the rollout's observation text, so it needs a world with a scene description
    (the sandbox); other rollouts get ``None`` and a note. Never raises.
    """

    name = "reward_model"

    def __init__(self, model: RewardModel | None, cfg: CriticConfig):
        self.model = model
        self.cfg = cfg

    def score_batch(self, items: Sequence[tuple[Task, Plan | None, Rollout]]) -> list[tuple[float | None, list[str]]]:
        out: list[tuple[float | None, list[str]]] = [(None, []) for _ in items]
        if self.model is None:
            return [(None, ["reward_model: no model"]) for _ in items]
        todo = []
        for k, (task, plan, r) in enumerate(items):
            if r.ground_truth is None:
                out[k] = (None, ["reward_model: the rollout has no scene description to score"])
            else:
                todo.append((k, reward_model_input(task, plan, r.ground_truth)))
        if not todo:
            return out
        try:
            rewards = list(self.model.score([c for _, c in todo]))
            if len(rewards) != len(todo):
                raise ValueError(f"returned {len(rewards)} rewards for {len(todo)} inputs")
        except Exception as e:  # a failing model must not lose the verdicts
            for k, _ in todo:
                out[k] = (None, [f"reward_model: failed ({type(e).__name__}: {str(e)[:200]})"])
            return out
        for (k, _), r in zip(todo, rewards):
            ok = isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and 0.0 <= r <= 1.0
            out[k] = (float(r), []) if ok else (None, [f"reward_model: reward {r!r} is not a number in [0, 1]"])
        return out
