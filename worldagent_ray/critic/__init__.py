"""The Critic agent's pure core: verifiable scorer, text judge, VLM judge, and their combination."""

from .combine import Critic, failed_verdict, reward_of
from .text_judge import TextJudge
from .verifiable import VerifiableScorer
from .vlm_judge import VLMJudge

__all__ = ["Critic", "TextJudge", "VLMJudge", "VerifiableScorer", "failed_verdict", "reward_of"]
