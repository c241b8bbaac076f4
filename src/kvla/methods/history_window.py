"""`history_window`: only the last W frames stay in the cache (a sliding window), at full resolution."""

from __future__ import annotations

from dataclasses import dataclass

from kvla.methods.base import register
from kvla.methods.history_base import HistoryContext, HistoryMethod, keep_recent_frames
from kvla.model.history import HistoryLayout


@register
@dataclass
class HistoryWindow(HistoryMethod):
    name = "history_window"
    frames: int = 8  # W: past frames kept

    def __post_init__(self):
        if self.frames < 0:
            raise ValueError(f"history_window needs frames >= 0, got {self.frames}")

    def budget_entries(self, layout: HistoryLayout) -> int:
        return self.frames * layout.frame_len

    def after_step(self, ctx: HistoryContext) -> dict:
        keep_recent_frames(ctx.state, self.frames)
        return {}
