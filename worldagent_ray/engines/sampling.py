"""Per-row sampling for the transformers engine, so rows of different calls share one batch.

``transformers``' ``generate`` samples a whole batch from one random stream with one set of
sampling parameters. The micro-batcher puts rows of different calls (different seeds,
temperatures, top-k/top-p) into one batch, so sampling is done here instead, as a logits
processor: each row is warped with *its own* parameters (temperature, then top-k, then
top-p, with transformers' own warpers, so the distribution is exactly the one ``generate``
would sample from), sampled with *its own* ``torch.Generator`` (a seeded call is reproducible
whatever it is batched with), and the log-probability of the chosen token under that
processed distribution is recorded (``processed_logprobs`` semantics; greedy rows: the raw
``log_softmax``). The processor returns 0 for the chosen token and ``-inf`` elsewhere, so
``generate`` run greedily (``do_sample=False``) emits exactly the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["RowSpec", "RowSampler", "row_seed"]


@dataclass
class RowSpec:
    """How one row samples: greedy when ``temperature == 0``; ``generator`` None uses torch's
    global random stream."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None = None

    @property
    def key(self) -> tuple[float, int, float]:
        return (self.temperature, max(self.top_k, 0), self.top_p)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A deterministic 63-bit seed for sample ``sample_index`` of prompt ``prompt_index`` of a
    call seeded with ``seed`` (distinct samples get distinct streams)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class RowSampler(LogitsProcessor):
    """Samples every row with its own :class:`RowSpec`; ``logprobs[t][r]`` is the recorded
    log-probability of row ``r``'s token at step ``t``."""

    def __init__(self, specs: list[RowSpec]):
        self.specs = specs
        groups: dict[tuple[float, int, float], list[int]] = {}
        for r, s in enumerate(specs):
            groups.setdefault(s.key, []).append(r)
        self._groups = [(key, torch.tensor(rows, dtype=torch.long)) for key, rows in groups.items()]
        self.logprobs: list[torch.Tensor] = []

    @staticmethod
    def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k > 0:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        return scores

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        logps = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
        for (temperature, top_k, top_p), rows in self._groups:
            rows = rows.to(scores.device)
            s = scores.index_select(0, rows)
            if temperature == 0.0:
                logp = torch.log_softmax(s, dim=-1)
                tok = logp.argmax(dim=-1)
            else:
                logp = torch.log_softmax(self._warp(s, temperature, top_k, top_p), dim=-1)
                probs = logp.exp()
                tok = torch.empty(len(rows), dtype=torch.long, device=scores.device)
                for i, r in enumerate(rows.tolist()):
                    g = self.specs[r].generator
                    tok[i] = torch.multinomial(probs[i], 1, generator=g)[0]
            tokens[rows] = tok
            logps[rows] = logp.gather(1, tok[:, None])[:, 0]
        self.logprobs.append(logps.cpu())
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out
