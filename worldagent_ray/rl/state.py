"""Learner state helpers (no Ray): RNG states as tensors (so that checkpoints load with
``torch.load(weights_only=True)``) and peft's adapter names."""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["peft_module_names", "rng_state", "seed_everything", "set_rng_state"]


def peft_module_names(adapters: Mapping[str, Tensor], adapter: str = "default") -> dict[str, Tensor]:
    """peft's saved adapter names (``...lora_A.weight``) as module names (``...lora_A.default.weight``)."""
    out = {}
    for k, v in adapters.items():
        for part in (".lora_A.", ".lora_B."):
            if part in k and f"{part}{adapter}." not in k:
                k = k.replace(part, f"{part}{adapter}.")
                break
        out[k] = v
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": _py_state_to_tensor(random.getstate())}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_tensor(state["python"]))


def _py_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d: Mapping[str, Any]) -> tuple:
    return (int(d["version"]), tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
