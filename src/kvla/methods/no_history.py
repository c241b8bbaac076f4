"""`no_history`: no past frame stays in the cache; each step sees the instruction and its own frame."""

from __future__ import annotations

from dataclasses import dataclass

from kvla.methods.base import register
from kvla.methods.history_base import HistoryContext, HistoryMethod, keep_recent_frames
from kvla.model.history import HistoryLayout


@register
@dataclass
class NoHistory(HistoryMethod):
    name = "no_history"

    def budget_entries(self, layout: HistoryLayout) -> int:
        return 0

    def after_step(self, ctx: HistoryContext) -> dict:
        keep_recent_frames(ctx.state, 0)
        return {}
