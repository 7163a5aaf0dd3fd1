"""Optimizers for moeforge: V4 Muon (hybrid Newton-Schulz) + AdamW, LR schedules, routing-bias updates."""

from optim.balance import RoutingBiasUpdater, routing_bias_buffers
from optim.build import build_optimizer
from optim.combined import CombinedOptimizer
from optim.config import OptimConfig
from optim.muon import Muon
from optim.newton_schulz import hybrid_schedule, newton_schulz
from optim.rules import ADAMW_RULES, V4_RULES, Rule, assign_parameters
from optim.schedule import LRSchedule, build_schedule

__all__ = [
    "ADAMW_RULES",
    "V4_RULES",
    "CombinedOptimizer",
    "LRSchedule",
    "Muon",
    "OptimConfig",
    "Rule",
    "RoutingBiasUpdater",
    "assign_parameters",
    "build_optimizer",
    "build_schedule",
    "hybrid_schedule",
    "newton_schulz",
    "routing_bias_buffers",
]
