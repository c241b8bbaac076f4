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


@dataclass(frozen=True)
class FamilySpec:
    """Where one decoder family's attention maths differs from Llama's: the only places kvla does
    the model's maths itself (the layer mask, RoPE per layer, the query that attention statistics
    recompute, the head). Everything else runs in the model's own layer modules.

    query: "q_proj", or "fused_qkv" (the query is the first heads*head_dim rows of `qkv_proj`).
    qk_norm: the layer applies `q_norm` / `k_norm` over head_dim before RoPE.
    attn_softcap_attr: the config attribute of a soft-cap the layer applies to the attention logits
        (tanh(s / cap) * cap, before the mask). Only eager attention applies it.
    final_softcap_attr: the config attribute of a soft-cap applied to the output logits.
    windows: which layers attend through a sliding window: none; those whose `layer_types` entry is
        "sliding_attention"; or all layers when `config.sliding_window` is set.
    rope: "shared" (one rotary embedding for every layer), "per_layer_type" (one per layer type,
        e.g. Gemma 3's local and global layers with different base frequencies) or "mrope"
        (multimodal RoPE: positions [3, B, n], given per slot by the layout).
    refuse: (config attribute, value, feature named in the error) of configurations kvla does not drive.
    """

    query: str = "q_proj"
    qk_norm: bool = False
    attn_softcap_attr: str | None = None
    final_softcap_attr: str | None = None
    windows: str = "none"
    rope: str = "shared"
    refuse: tuple[tuple[str, object, str], ...] = ()

    @property
    def required_attention_attrs(self) -> tuple[str, ...]:
        projections = ("qkv_proj",) if self.query == "fused_qkv" else ("q_proj", "k_proj", "v_proj")
        norms = ("q_norm", "k_norm") if self.qk_norm else ()
        return projections + norms + ("o_proj", "head_dim", "scaling", "layer_idx")


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(),
    "qwen2": FamilySpec(windows="layer_types"),
    "gemma": FamilySpec(),
    "mistral": FamilySpec(windows="all_layers"),
    "qwen3": FamilySpec(qk_norm=True, windows="layer_types"),
    "phi3": FamilySpec(query="fused_qkv", windows="all_layers"),
    "gemma2": FamilySpec(attn_softcap_attr="attn_logit_softcapping", final_softcap_attr="final_logit_softcapping",
                         windows="layer_types"),
    # Gemma 3 stores attn_logit_softcapping but its layers never apply it, so neither does kvla
    # Qwen2-VL / Qwen2.5-VL language models: Qwen2's layers, RoPE over 3 position components
    "qwen2_vl_text": FamilySpec(windows="layer_types", rope="mrope"),
    "qwen2_5_vl_text": FamilySpec(windows="layer_types", rope="mrope"),
    "gemma3_text": FamilySpec(qk_norm=True, final_softcap_attr="final_logit_softcapping", windows="layer_types",
                              rope="per_layer_type",
                              refuse=(("use_bidirectional_attention", True, "Gemma 3 bidirectional attention"),)),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Attention implementations that honour kvla's explicit additive mask (flash kernels ignore it).
SUPPORTED_ATTENTION = ("eager", "sdpa")
# Rope types whose frequencies do not depend on the sequence length seen so far.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
_LAYER_TYPES = ("full_attention", "sliding_attention")

# What kvla reads from a causal LM; checked before anything runs.
_REQUIRED_MODEL_ATTRS = ("model", "lm_head")
_REQUIRED_BACKBONE_ATTRS = ("layers", "norm", "rotary_emb", "embed_tokens")
_REQUIRED_LAYER_ATTRS = ("self_attn", "input_layernorm", "mlp")


class UnsupportedModelError(ValueError):
    """The model is not a decoder kvla knows how to drive."""


def transformers_version() -> Version:
    return Version(transformers.__version__)


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a Hugging Face causal LM that kvla's layer loop drives, and the per-layer facts
    of its family (declared in FAMILIES, derived once from the config)."""

    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    rotary_embedding: torch.nn.Module
    embed_tokens: torch.nn.Module
    lm_head: torch.nn.Module
    apply_rotary: Callable
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    family: FamilySpec = FamilySpec()
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window (keys within W positions) or None
    layer_rope_keys: tuple[str | None, ...] = ()  # per layer: which rotary embedding it uses
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the layers (None: full attention)."""
        return tuple(dict.fromkeys(self.layer_windows))


def _layer_windows(config, spec: FamilySpec, num_layers: int, model_type: str) -> tuple[int | None, ...]:
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"{model_type} model has attention layer types {unknown}: kvla supports "
                                    f"{', '.join(_LAYER_TYPES)}")
    window = getattr(config, "sliding_window", None)
    if spec.windows == "all_layers":
        if layer_types and any(kind != "full_attention" for kind in layer_types):
            raise UnsupportedModelError(f"{model_type} declares its window by config.sliding_window on every layer; "
                                        "per-layer layer_types are not supported for it")
        return (window,) * num_layers
    if spec.windows == "layer_types":
        if len(layer_types) not in (0, num_layers):
            raise UnsupportedModelError(f"{model_type} config has {len(layer_types)} layer_types for {num_layers} layers")
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types or ["full_attention"] * num_layers)
        if any(kind == "sliding_attention" for kind in layer_types) and not window:
            raise UnsupportedModelError(f"{model_type} has sliding_attention layers but no config.sliding_window")
        return windows
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedModelError(f"{model_type} model has sliding-window layers, which kvla does not drive for "
                                    "this family: disable sliding windows")
    return (None,) * num_layers


def _check_config(config, spec: FamilySpec, model_type: str) -> None:
    for attr, value, feature in spec.refuse:
        if getattr(config, attr, None) == value:
            raise UnsupportedModelError(f"{feature} ({attr}={value!r}) is not supported by kvla")
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {implementation!r} ignores the explicit mask kvla passes; call "
            f"model.set_attn_implementation('sdpa') (or 'eager') first")
    cap = getattr(config, spec.attn_softcap_attr, None) if spec.attn_softcap_attr else None
    if cap is not None and implementation != "eager":
        raise UnsupportedModelError(
            f"{model_type} soft-caps its attention logits ({spec.attn_softcap_attr}={cap}), which only eager "
            f"attention applies ({implementation} drops it on some transformers versions): call "
            "model.set_attn_implementation('eager') first")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "rope_type" not in rope and rope:  # per layer type (Gemma 3)
        rope_types = {entry.get("rope_type", "default") for entry in rope.values() if isinstance(entry, dict)}
    else:
        rope_types = {rope.get("rope_type", "default")} if isinstance(rope, dict) else {"default"}
    unsupported = sorted(rope_types - set(SUPPORTED_ROPE_TYPES))
    if unsupported:
        raise UnsupportedModelError(f"rope type {unsupported} depends on the sequence length seen so far; kvla "
                                    f"supports {', '.join(SUPPORTED_ROPE_TYPES)}")


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
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r}: kvla supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    spec = FAMILIES[model_type]
    _check_config(config, spec, model_type)
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
    for attr in spec.required_attention_attrs:
        if not hasattr(first.self_attn, attr):
            raise UnsupportedModelError(f"{type(first.self_attn).__name__} has no attribute {attr!r}")
    # The rotary helper sits in the family's modeling module; it is the same function the
    # attention module applies, so statistics computed with it match the real forward.
    modeling_module = sys.modules[type(first.self_attn).__module__]
    apply_rotary = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if apply_rotary is None:
        raise UnsupportedModelError(f"{modeling_module.__name__} has no apply_rotary_pos_emb")
    num_layers = len(backbone.layers)
    if spec.rope == "per_layer_type":
        if "layer_type" not in inspect.signature(backbone.rotary_emb.forward).parameters:
            raise UnsupportedModelError(f"{type(backbone.rotary_emb).__name__} takes no layer_type (transformers "
                                        f"{transformers.__version__}); kvla cannot pick each layer's RoPE")
        rope_keys = tuple(config.layer_types)
    else:
        rope_keys = (None,) * num_layers
    softcap = getattr(config, spec.attn_softcap_attr, None) if spec.attn_softcap_attr else None
    final_softcap = getattr(config, spec.final_softcap_attr, None) if spec.final_softcap_attr else None
    return DecoderParts(
        layers=backbone.layers,
        final_norm=backbone.norm,
        rotary_embedding=backbone.rotary_emb,
        embed_tokens=backbone.embed_tokens,
        lm_head=causal_lm.lm_head,
        apply_rotary=apply_rotary,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=first.self_attn.head_dim,
        model_type=model_type,
        family=spec,
        layer_windows=_layer_windows(config, spec, num_layers, model_type),
        layer_rope_keys=rope_keys,
        attn_softcap=softcap,
        final_softcap=final_softcap,
    )


def rotary_embeddings(parts: DecoderParts, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """{rope key: (cos, sin)} for the rows at `position_ids`, one entry per distinct key of the layers."""
    if parts.family.rope == "per_layer_type":
        return {key: parts.rotary_embedding(hidden, position_ids, key) for key in dict.fromkeys(parts.layer_rope_keys)}
    return {None: parts.rotary_embedding(hidden, position_ids=position_ids)}


def check_rope_layout(parts: DecoderParts, layout) -> None:
    """Multimodal RoPE needs each slot's 3 position components from the layout, and only it takes them."""
    from kvla.engine.layout import LayoutError

    if parts.family.rope == "mrope" and layout.rope_positions is None:
        raise LayoutError(f"{parts.model_type} uses multimodal RoPE: the layout must give each slot's 3 position "
                          "components (rope_positions), as the Qwen2-VL host adapter does")
    if parts.family.rope != "mrope" and layout.rope_positions is not None:
        raise LayoutError(f"the layout gives 3-component RoPE positions but {parts.model_type} uses 1-D positions")


def query_states(parts: DecoderParts, attn: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """The layer's queries [B, heads, rows, head_dim] before RoPE, as its own forward computes them."""
    batch, rows, _ = normed.shape
    if parts.family.query == "fused_qkv":
        query = torch.nn.functional.linear(normed, attn.qkv_proj.weight[: parts.num_heads * parts.head_dim])
    else:
        query = attn.q_proj(normed)
    query = query.view(batch, rows, -1, parts.head_dim)
    if parts.family.qk_norm:
        query = attn.q_norm(query)
    return query.transpose(1, 2)


def attention_logits(parts: DecoderParts, scores: torch.Tensor) -> torch.Tensor:
    """Scaled scores -> the logits the layer adds its mask to (the soft-cap where the layer applies one)."""
    if parts.attn_softcap is not None:
        scores = torch.tanh(scores / parts.attn_softcap) * parts.attn_softcap
    return scores


def output_logits(parts: DecoderParts, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, head and the family's final soft-cap, as the causal LM's forward applies them."""
    return head_logits(parts, parts.final_norm(hidden))


def head_logits(parts: DecoderParts, normed: torch.Tensor) -> torch.Tensor:
    """The head and the family's final soft-cap on final-norm hidden states."""
    logits = parts.lm_head(normed)
    if parts.final_softcap is not None:
        logits = torch.tanh(logits / parts.final_softcap) * parts.final_softcap
    return logits


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


# ---------------------------------------------------------------- VLM hosts
class CausalLMView(torch.nn.Module):
    """A VLM host's language decoder and head seen as a causal LM (`model`, `lm_head`, `config`),
    the shape kvla's engines drive; the modules are the host's own, nothing is copied."""

    def __init__(self, decoder: torch.nn.Module, lm_head: torch.nn.Module, config):
        super().__init__()
        self.model, self.lm_head, self.config = decoder, lm_head, config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


def host_language_model(host: torch.nn.Module) -> CausalLMView:
    """The decoder a transformers VLM runs its prompt through (`get_decoder()`), with its head."""
    decoder = host.get_decoder() if hasattr(host, "get_decoder") else None
    if decoder is None or not hasattr(host, "lm_head"):
        raise UnsupportedModelError(f"{type(host).__name__} exposes no get_decoder() and lm_head")
    return CausalLMView(decoder, host.lm_head, host.config.get_text_config())


def host_image_features(host: torch.nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """The host's own image features, [images, tokens, hidden]. `get_image_features` returns an
    output whose pooler_output is a list of [tokens, hidden] per image (LLaVA; Idefics3 from 5.24),
    a tensor [images, tokens, hidden] (PaliGemma; Idefics3 on 5.17), or a bare tensor or list."""
    outputs = host.model.get_image_features(pixel_values, **kwargs)
    pooled = getattr(outputs, "pooler_output", outputs)
    if isinstance(pooled, (list, tuple)):
        pooled = torch.stack(list(pooled))
    if pooled.dim() != 3:
        raise UnsupportedModelError(f"{type(host).__name__}.get_image_features gave features of shape "
                                    f"{tuple(pooled.shape)}; kvla expects [images, tokens, hidden]")
    return pooled


def llava_feature_arguments(config) -> dict:
    """LLaVA's vision feature layer and selection, passed explicitly: transformers 5.17 does not fill
    them from the config when get_image_features is called directly."""
    return {"vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy}


def multimodal_rope_positions(host: torch.nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor,
                              image_grid_thw: torch.Tensor) -> torch.Tensor:
    """A Qwen2-VL host's own 3-component RoPE positions [3, B, S] of a prompt (`get_rope_index`;
    both 5.17 and 5.24 take the image token mask as mm_token_type_ids)."""
    positions, _ = host.model.get_rope_index(input_ids, mm_token_type_ids=image_mask.int(), image_grid_thw=image_grid_thw)
    return positions
