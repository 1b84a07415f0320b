"""Planning: the global prefix tree over a whole job, and the run plan built on it."""

from .prefix_tree import PrefixTree
from .schedule import Plan, PlanStats, PrefixGroup, plan_schedule

__all__ = ["Plan", "PlanStats", "PrefixGroup", "PrefixTree", "plan_schedule"]
