"""Datasets that move between training phases (pure: no Ray; the Ray Data shells are in
``runtime/``): Action SFT examples and DPO pairs (``action_sft``), Critic SFT examples and
preference pairs from ground truth (``critic``), and video-action pairs for robot policies
(``video_action``)."""
