"""Reinforcement learning: GRPO maths (:mod:`.grpo`) and the rollout group buffer (:mod:`.buffer`).

Pure modules: nothing here imports Ray. The Ray shells live in :mod:`worldagent_ray.runtime`.
"""
