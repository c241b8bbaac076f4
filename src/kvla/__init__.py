"""kvla: exact KV reuse for Vision-Language-Action policies over unmodified transformers models.

Subpackages: `kvla.engine` (partial prefill, KV buffer, episode state, transformers compat),
`kvla.methods` (one reuse method per file), `kvla.model` (the VLA-shaped model and the reference
VLA), `kvla.measure` (FLOPs, latency, statistics), `kvla.testbed` (simulator, demonstrations,
training, closed-loop evaluation); `kvla.policy` joins a model, a method and the engine.
"""

from kvla.engine import (EpisodeState, LayoutError, PartialPrefillEngine, PlanError, PrefillResult, ReusePlan,
                         TokenLayout)

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
