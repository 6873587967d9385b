"""Reinforcement learning, pure: GRPO maths (:mod:`.grpo`), the DPO term (:mod:`.dpo`), the
rollout group buffer's bookkeeping (:mod:`.buffer`), GRPO groups from samples (:mod:`.groups`),
the learner core (:mod:`.learner`), in-process phase-2 training (:mod:`.phase2`) and the
engine-side weight subscriber (:mod:`.weight_sync`).

Nothing here imports Ray; the Ray shells (buffer actor, Ray Train loop, weight publisher) live in
:mod:`worldagent_ray.runtime`.
"""
