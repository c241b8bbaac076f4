"""The engine: a partial prefill over an unmodified transformers decoder, and the state it keeps.

It names no reuse method: a method hands it a `ReusePlan` (how deep each visual token is
recomputed, which attention statistics to collect, optionally how many visual tokens to prune
after a layer, ranked by the attention the last prompt position pays them), the engine carries
it out at the tokens' original positions and records what the next step's plan may need in the
episode's `EpisodeState`. Every transformers-version-dependent call lives in `compat`.
"""

from kvla.engine.layout import LayoutError, TokenLayout
from kvla.engine.plan import PlanError, ReusePlan
from kvla.engine.state import EpisodeState
from kvla.engine.prefill import PartialPrefillEngine, PrefillResult

__all__ = ["EpisodeState", "LayoutError", "PartialPrefillEngine", "PlanError", "PrefillResult", "ReusePlan",
           "TokenLayout"]
