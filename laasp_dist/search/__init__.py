"""Loss-aware candidate search: the scoring subset, scorers, exact/adaptive rounds, local and Ray executors."""

from typing import Any

from .executors import Executor, LocalExecutor, RankExecutor, Task
from .loop import check_search_inputs, max_reduction, prune_to_target, read_history, write_history
from .round import (EVALUATORS, Evaluator, RoundResult, get_evaluator, reduce_losses, search_round,
                    select_winner)
from .scoring import SCORERS, ScoreOptions, score_fast, score_reference
from .subset import SearchSubset, Shard, build_subset, read_subset, write_subset


def __getattr__(name: str) -> Any:
    """`RayExecutor` is imported on first use: importing Ray costs a second."""
    if name == "RayExecutor":
        from .ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EVALUATORS", "Evaluator", "Executor", "LocalExecutor", "RankExecutor", "RayExecutor", "RoundResult",
    "SCORERS", "ScoreOptions", "SearchSubset", "Shard", "Task", "build_subset", "check_search_inputs",
    "get_evaluator", "max_reduction", "prune_to_target", "read_history", "read_subset", "reduce_losses",
    "score_fast", "score_reference", "search_round", "select_winner", "write_history", "write_subset",
]
