"""What every reuse method shares: the planning context, the interface, and the registry."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvla.engine.layout import TokenLayout
from kvla.engine.plan import ReusePlan
from kvla.engine.state import EpisodeState


@dataclass
class PlanContext:
    """What a method may look at to plan one step."""

    patches: torch.Tensor  # [B, V, patch_dim] float32 pixels of the policy's input image
    state: EpisodeState
    layout: TokenLayout
    num_layers: int
    visual_embeddings: torch.Tensor | None = None  # [B, V, hidden] decoder inputs of the visual tokens

    @property
    def batch_size(self) -> int:
        return self.patches.shape[0]

    def full_plan(self, **kwargs) -> ReusePlan:
        return ReusePlan.full(self.batch_size, self.layout, self.num_layers, **kwargs)

    def patch_similarity(self, rule: str = "cosine", levels: float = 2.0) -> torch.Tensor:
        """Similarity [B, V] of each patch with the frame its cached K/V came from, by a change rule
        of methods/change.py (cosine: the paper's; photometric: also sees brightness, contrast, colour)."""
        from kvla.methods.change import patch_similarity

        return patch_similarity(self.patches, self._source_patches(), rule, levels)

    def photometric_unchanged(self, levels: float = 2.0) -> torch.Tensor:
        """[B, V] bool: each patch's channel means and contrasts within `levels` grey levels of the
        frame its cached K/V came from (methods/change.py)."""
        from kvla.methods.change import photometric_unchanged

        return photometric_unchanged(self.patches, self._source_patches(), levels)

    def _source_patches(self) -> torch.Tensor:
        """The pixel patches each visual token's cached K/V was computed from."""
        source = self.state.source_patches
        if source is None:
            raise RuntimeError("no source frame recorded; the first step of an episode must be full")
        return source

    def embedding_similarity(self) -> torch.Tensor:
        """Cosine similarity [B, V] of each visual token's decoder input with the one its cached K/V came from."""
        source = self.state.source_embeddings
        if source is None or self.visual_embeddings is None:
            raise RuntimeError("embedding similarity needs the visual embeddings of this step and of the source step")
        current = self.visual_embeddings.float()
        return torch.nn.functional.cosine_similarity(current, source.to(current.device), dim=-1, eps=1e-8)

    def reusable_candidates(self, max_age: int) -> torch.Tensor:
        """Tokens whose cached K/V exists in every layer and is younger than max_age steps."""
        state = self.state
        fresh_enough = state.token_age() < max_age if max_age > 0 else torch.ones_like(state.kv_complete)
        return state.kv_complete & fresh_enough.to(state.kv_complete.device)


class ReuseMethod:
    """A method decides, per step, which visual tokens to recompute in which layers.

    Subclasses are dataclasses whose fields are the method's hyperparameters (paper defaults)
    and implement plan(). They hold no per-episode state: that lives in EpisodeState.
    """

    name: ClassVar[str] = ""

    def plan(self, ctx: PlanContext) -> ReusePlan:  # pragma: no cover - interface
        raise NotImplementedError


METHODS: dict[str, type[ReuseMethod]] = {}


def register(cls: type[ReuseMethod]) -> type[ReuseMethod]:
    METHODS[cls.name] = cls
    return cls


def _coerce(value: str, hint, field_name: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    try:
        if origin is tuple:
            item = args[0] if args else str
            return tuple(item(v) for v in value.split("/") if v != "")
        if hint is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if hint in (int, float, str):
            return hint(value)
    except ValueError:
        raise ValueError(f"setting {field_name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    raise ValueError(f"setting {field_name} has a type that cannot be set from text")


def parse_method(spec: str) -> ReuseMethod:
    """'vla_cache:top_k=180:tau=0.99' -> VLACache(top_k=180, tau=0.99). Tuple values use '/'."""
    name, *settings = spec.strip().split(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    kwargs = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"setting {setting!r} of method {name} must look like key=value")
        if key not in fields:
            raise ValueError(f"method {name} has no setting {key!r}; it has {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], key)
    return cls(**kwargs)


def method_label(method: ReuseMethod) -> str:
    """Name plus the settings that differ from the defaults, in parse_method's syntax."""
    parts = [method.name]
    for field in dataclasses.fields(method):
        value = getattr(method, field.name)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if value != default:
            text = "/".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts.append(f"{field.name}={text}")
    return ":".join(parts)
