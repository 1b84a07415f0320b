"""Planning: the global prefix tree over a whole job, and the run plan built on it."""

from .prefix_tree import PrefixTree
from .schedule import Plan, PlannedGroup, PlanStats, plan_schedule

__all__ = ["Plan", "PlanStats", "PlannedGroup", "PrefixTree", "plan_schedule"]
