"""kvla: exact KV reuse for Vision-Language-Action policies over unmodified transformers models."""

from kvla.engine import PartialPrefillEngine, PrefillResult
from kvla.layout import LayoutError, TokenLayout
from kvla.plan import PlanError, ReusePlan
from kvla.state import EpisodeState

__version__ = "0.1.0"

__all__ = [
    "EpisodeState",
    "LayoutError",
    "PartialPrefillEngine",
    "PlanError",
    "PrefillResult",
    "ReusePlan",
    "TokenLayout",
]
