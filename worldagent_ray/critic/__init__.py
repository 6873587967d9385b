"""The Critic agent's pure core: verifiable scorer, text and VLM judges, the frozen learned
reward model, grounded captions, total parsers of judge output, and their combination."""

from .captions import caption_faithfulness, ground_caption
from .combine import Critic, failed_verdict, reward_of
from .parsing import JudgeParseError, parse_caption, parse_judgement
from .reward_model import Calibration, HFRewardModel, RewardModel, RewardModelScorer
from .text_judge import TextJudge
from .verifiable import VerifiableScorer
from .vlm_judge import VLMJudge

__all__ = ["Calibration", "Critic", "HFRewardModel", "JudgeParseError", "RewardModel", "RewardModelScorer",
           "TextJudge", "VLMJudge", "VerifiableScorer", "caption_faithfulness", "failed_verdict",
           "ground_caption", "parse_caption", "parse_judgement", "reward_of"]
