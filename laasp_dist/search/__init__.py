"""Loss-aware candidate search: the scoring subset, scorers, exact/adaptive rounds, local and Ray executors."""

from .executors import Executor, LocalExecutor, Task
from .loop import check_search_inputs, max_reduction, prune_to_target, read_history, write_history
from .round import (EVALUATORS, Evaluator, RoundResult, get_evaluator, reduce_losses, search_round,
                    select_winner)
from .scoring import SCORERS, ScoreOptions, score_fast, score_reference
from .subset import SearchSubset, Shard, build_subset, read_subset, write_subset


def RayExecutor(*args, **kwargs):  # noqa: N802  (lazy: importing Ray costs a second)
    """`laasp_dist.search.ray_executor.RayExecutor` (imported on first use)."""
    from .ray_executor import RayExecutor as cls

    return cls(*args, **kwargs)


__all__ = [
    "EVALUATORS", "Evaluator", "Executor", "LocalExecutor", "RayExecutor", "RoundResult", "SCORERS",
    "ScoreOptions", "SearchSubset", "Shard", "Task", "build_subset", "check_search_inputs", "get_evaluator",
    "max_reduction", "prune_to_target", "read_history", "read_subset", "reduce_losses", "score_fast",
    "score_reference", "search_round", "select_winner", "write_history", "write_subset",
]
