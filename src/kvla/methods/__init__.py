"""Reuse methods, one per file. `parse_method('vla_cache:top_k=180')` builds one from text."""

from kvla.methods.base import METHODS, PlanContext, ReuseMethod, method_label, parse_method
from kvla.methods.fastv import FastV
from kvla.methods.full import Full
from kvla.methods.history_base import HistoryContext, HistoryMethod
from kvla.methods.history_full import HistoryFull
from kvla.methods.history_window import HistoryWindow
from kvla.methods.kv_efficient import KVEfficient
from kvla.methods.lac import LearnedCaching
from kvla.methods.no_history import NoHistory
from kvla.methods.periodic import PeriodicRefresh
from kvla.methods.static import StaticReuse
from kvla.methods.vla_cache import OFFICIAL_CODE_SPEC, VLACache, code_reuse_ratios, paper_reuse_ratios

__all__ = [
    "METHODS", "OFFICIAL_CODE_SPEC", "FastV", "Full", "HistoryContext", "HistoryFull", "HistoryMethod",
    "HistoryWindow", "KVEfficient", "LearnedCaching", "NoHistory", "PeriodicRefresh", "PlanContext", "ReuseMethod", "StaticReuse", "VLACache",
    "code_reuse_ratios", "method_label", "paper_reuse_ratios", "parse_method",
]
