"""Multi-turn rollouts: the sampling engine, episode records and warm-up demonstrations."""

from .demos import demonstration
from .engine import PromptFormatter, RolloutEngine, extract_answer, find_call, token_logprobs
from .episode import Batch, CallRecord, Episode, collate

__all__ = [
    "Batch",
    "CallRecord",
    "Episode",
    "PromptFormatter",
    "RolloutEngine",
    "collate",
    "demonstration",
    "extract_answer",
    "find_call",
    "token_logprobs",
]
