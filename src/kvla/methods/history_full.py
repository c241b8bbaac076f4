"""`history_full`: every past frame stays in the cache at full resolution (the exact baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from kvla.methods.base import register
from kvla.methods.history_base import HistoryContext, HistoryMethod


@register
@dataclass
class HistoryFull(HistoryMethod):
    name = "history_full"

    def after_step(self, ctx: HistoryContext) -> dict:
        return {}
