"""Every call that depends on the installed transformers version lives here.

kvla drives the model's own decoder-layer modules from its own layer loop, and passes them a
`Cache` built from kvla's own cache layers. Both are public extension points of transformers 5.x;
the few internals they rely on (module attribute names, the rotary helper, the Cache constructor)
are checked up front so that a transformers release that changes them fails loudly here instead of
silently computing something else.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DynamicLayer

MIN_TRANSFORMERS = Version("5.0.0")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma")

# What kvla reads from a causal LM; checked before anything runs.
_REQUIRED_MODEL_ATTRS = ("model", "lm_head")
_REQUIRED_BACKBONE_ATTRS = ("layers", "norm", "rotary_emb", "embed_tokens")
_REQUIRED_LAYER_ATTRS = ("self_attn", "input_layernorm", "mlp")
_REQUIRED_ATTENTION_ATTRS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


class UnsupportedModelError(ValueError):
    """The model is not a decoder kvla knows how to drive."""


def transformers_version() -> Version:
    return Version(transformers.__version__)


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a Hugging Face causal LM that kvla's layer loop drives."""

    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    rotary_embedding: torch.nn.Module
    embed_tokens: torch.nn.Module
    lm_head: torch.nn.Module
    apply_rotary: Callable
    num_heads: int
    num_kv_heads: int
    head_dim: int


def decoder_parts(causal_lm: torch.nn.Module) -> DecoderParts:
    """Check the model is a supported family and return the parts kvla drives.

    Raises UnsupportedModelError naming what is missing or unsupported.
    """
    if transformers_version() < MIN_TRANSFORMERS:
        raise UnsupportedModelError(
            f"kvla needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}"
        )
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r}: kvla supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedModelError(
            f"{model_type} model has non-full attention layers {sorted(set(layer_types))}: "
            "kvla supports full causal attention only (disable sliding windows)"
        )
    for attr in _REQUIRED_MODEL_ATTRS:
        if not hasattr(causal_lm, attr):
            raise UnsupportedModelError(f"{type(causal_lm).__name__} has no attribute {attr!r}")
    backbone = causal_lm.model
    for attr in _REQUIRED_BACKBONE_ATTRS:
        if not hasattr(backbone, attr):
            raise UnsupportedModelError(f"{type(backbone).__name__} has no attribute {attr!r}")
    first = backbone.layers[0]
    for attr in _REQUIRED_LAYER_ATTRS:
        if not hasattr(first, attr):
            raise UnsupportedModelError(f"{type(first).__name__} has no attribute {attr!r}")
    for attr in _REQUIRED_ATTENTION_ATTRS:
        if not hasattr(first.self_attn, attr):
            raise UnsupportedModelError(f"{type(first.self_attn).__name__} has no attribute {attr!r}")
    # The rotary helper sits in the family's modeling module; it is the same function the
    # attention module applies, so statistics computed with it match the real forward.
    modeling_module = sys.modules[type(first.self_attn).__module__]
    apply_rotary = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if apply_rotary is None:
        raise UnsupportedModelError(f"{modeling_module.__name__} has no apply_rotary_pos_emb")
    head_dim = first.self_attn.head_dim
    return DecoderParts(
        layers=backbone.layers,
        final_norm=backbone.norm,
        rotary_embedding=backbone.rotary_emb,
        embed_tokens=backbone.embed_tokens,
        lm_head=causal_lm.lm_head,
        apply_rotary=apply_rotary,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
    )


def make_cache(layers: list[DynamicLayer]) -> Cache:
    """A transformers Cache whose per-layer storage is kvla's own layers."""
    return Cache(layers=layers)


@functools.cache
def cache_argument_name(layer_class: type) -> str:
    """The keyword a decoder layer takes its Cache by: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    parameters = inspect.signature(layer_class.forward).parameters  # follows the deprecation wrapper
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{layer_class.__name__}.forward takes neither `cache` nor `past_key_values` "
        f"(transformers {transformers.__version__}); kvla cannot hand it its KV cache"
    )


def call_decoder_layer(layer, hidden_states, attention_mask, position_ids, cache, position_embeddings):
    """One decoder layer of the model, exactly as the model's own forward calls it."""
    return layer(
        hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        position_embeddings=position_embeddings,
        **{cache_argument_name(type(layer)): cache},
    )


def set_attention_implementation(causal_lm: torch.nn.Module, name: str) -> None:
    """Switch sdpa/eager on a loaded model (eager is only used for FLOP counting)."""
    causal_lm.set_attn_implementation(name)
