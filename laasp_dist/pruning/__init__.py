"""Pruning core: groups on a dependency graph, criteria, FLOPs, step sizing, the slim-model format."""

from .criteria import Criterion, get_criterion, list_criteria, register_criterion
from .flops import CostReport, count_cost
from .groups import ChannelGroup
from .network import Arch, Candidate, PrunableNetwork, PruneRecord
from .spec import load_slim_model, network_from_spec, network_spec, read_spec, replay, save_slim_model

__all__ = [
    "Arch", "Candidate", "ChannelGroup", "CostReport", "Criterion", "PrunableNetwork", "PruneRecord",
    "count_cost", "get_criterion", "list_criteria", "load_slim_model", "network_from_spec", "network_spec",
    "read_spec", "register_criterion", "replay", "save_slim_model",
]
