"""Analytic FLOP and KV-memory counts from the model config and the executed plan.

Convention: a multiply-accumulate (MAC) is one multiply plus one add; FLOPs = 2 x MACs, as
torch.utils.flop_counter counts them. Only matrix products are counted (projections, attention
scores and weighted sums, MLP, head, patch embedding); norms, RoPE, softmax and residual adds
are left out (under 1 % for these shapes). Attention is counted against every key slot a row is
given (the explicit mask does not make a dense kernel skip work), i.e. the full cache. Attention
statistics (relevance, entropy, FastV's rank) recompute, for the query rows they need, the query
projection and the scores against the full cache; those are counted in the layer they are taken in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvla.engine.layout import TokenLayout
from kvla.model.vla import VLAConfig


@dataclass(frozen=True)
class DecoderShape:
    """The decoder numbers the counts read, from a transformers text config (any family kvla drives;
    head_dim as the config gives it, e.g. Gemma's 256 at hidden 2048 with 8 heads)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(hidden_size=config.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   vocab_size=config.vocab_size)


def attention_macs(cfg: VLAConfig, rows: int, key_slots: int) -> int:
    """MACs of one layer's attention proper (QK^T and AV) for `rows` queries over `key_slots` keys."""
    head_dim = cfg.head_dim
    return 2 * rows * cfg.num_heads * head_dim * key_slots


def decoder_layer_macs(cfg: VLAConfig, rows: int, key_slots: int) -> int:
    """MACs of one decoder layer computing `rows` tokens that attend over `key_slots` keys."""
    head_dim = cfg.head_dim
    q_width, kv_width = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
    projections = rows * cfg.hidden_size * (2 * q_width + 2 * kv_width)  # q, o and k, v
    mlp = 3 * rows * cfg.hidden_size * cfg.intermediate_size
    return projections + attention_macs(cfg, rows, key_slots) + mlp


def statistic_macs(cfg: VLAConfig, rows: int, key_slots: int) -> int:
    """MACs of recomputing attention probabilities of `rows` query rows of one layer: q and QK^T."""
    head_dim = cfg.head_dim
    return rows * cfg.hidden_size * cfg.num_heads * head_dim + rows * cfg.num_heads * head_dim * key_slots


def vision_macs(cfg: VLAConfig) -> int:
    """Patch ViT and projector MACs for all cameras of one sample (a host VLA carries its vision
    tower's count, measured once with torch's FLOP counter)."""
    if getattr(cfg, "vision_macs_per_sample", None) is not None:
        return cfg.vision_macs_per_sample
    tokens, dim = cfg.patches_per_image, cfg.vision_dim
    patch_embed = tokens * 3 * cfg.patch_size**2 * dim
    block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * cfg.vision_mlp
    projector = tokens * (dim * cfg.hidden_size + cfg.hidden_size**2)
    return cfg.num_cameras * (patch_embed + cfg.vision_layers * block + projector)


def head_macs(cfg: VLAConfig, rows: int) -> int:
    return rows * cfg.hidden_size * cfg.vocab_size


def prefill_macs(cfg: VLAConfig, tokens_per_layer: list[int], key_slots: int) -> list[int]:
    """Per decoder layer MACs of a (partial) prefill."""
    return [decoder_layer_macs(cfg, rows, key_slots) for rows in tokens_per_layer]


def cache_slots(layout: TokenLayout) -> int:
    """Key slots of kvla's KV buffer: the prompt, one discard slot, the decoded action tokens."""
    return layout.seq_len + 1 + (0 if layout.parallel else layout.num_action_tokens)


def kv_bytes(cfg: VLAConfig, slots: int, batch: int, bytes_per_element: int) -> int:
    head_dim = cfg.head_dim
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * head_dim * slots * bytes_per_element


@dataclass
class StepFlops:
    """FLOPs of one control step for the whole batch, by part."""

    vision: int
    prefill_per_layer: list[int]  # decoder layer plus the statistics taken in it
    prefill_tokens_per_layer: list[int]
    action_decoding: int
    head: int
    statistics_per_layer: list[int] = field(default_factory=list)  # the statistics' part of prefill_per_layer
    # the prefill's attention proper (QK^T and AV), inside prefill_per_layer: as executed (every row against
    # every key slot, whatever the mask), and what a mask-aware kernel would need (the keys each row may see;
    # about half the prompt under a causal mask, all of it under a bidirectional one); 0 when not given
    prefill_attention_dense: int = 0
    prefill_attention_visible: int = 0

    @property
    def prefill(self) -> int:
        return sum(self.prefill_per_layer)

    @property
    def statistics(self) -> int:
        return sum(self.statistics_per_layer)

    @property
    def total(self) -> int:
        return self.vision + self.prefill + self.action_decoding + self.head

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill": self.prefill, "statistics": self.statistics, "total": self.total}


def step_flops(cfg: VLAConfig, layout: TokenLayout, computed_tokens: list[int], batch: int,
               statistic_rows: list[int] | None = None, visible_keys: list[int] | None = None) -> StepFlops:
    """FLOPs of a step whose prefill computed `computed_tokens[l]` rows (per sample) in layer l and
    recomputed attention statistics for `statistic_rows[l]` query rows (StepOutput.statistic_rows;
    None: no statistics); `visible_keys` (StepOutput.visible_keys, batch-summed) gives the
    mask-aware attention count."""
    slots = cache_slots(layout)
    statistic_rows = statistic_rows if statistic_rows is not None else [0] * len(computed_tokens)
    if len(statistic_rows) != len(computed_tokens):
        raise ValueError(f"statistic_rows has {len(statistic_rows)} layers, computed_tokens {len(computed_tokens)}")
    statistics = [2 * batch * statistic_macs(cfg, rows, slots) for rows in statistic_rows]
    prefill = [2 * batch * m + extra for m, extra in zip(prefill_macs(cfg, computed_tokens, slots), statistics)]
    outputs = len(layout.output_positions)
    decode_tokens = 0 if layout.parallel else layout.num_action_tokens - 1
    decoding = 2 * batch * decode_tokens * cfg.num_layers * decoder_layer_macs(cfg, 1, slots)
    head = 2 * batch * head_macs(cfg, outputs + decode_tokens)
    dense = sum(2 * batch * attention_macs(cfg, rows, slots) for rows in computed_tokens)
    visible = 2 * 2 * cfg.num_heads * cfg.head_dim * sum(visible_keys) if visible_keys is not None else 0
    return StepFlops(vision=2 * batch * vision_macs(cfg), prefill_per_layer=prefill,
                     prefill_tokens_per_layer=list(computed_tokens), action_decoding=decoding, head=head,
                     statistics_per_layer=statistics, prefill_attention_dense=dense, prefill_attention_visible=visible)


def plain_prefill_macs(cfg: VLAConfig, prompt_tokens: int) -> int:
    """Decoder-layer MACs of a plain prefill of `prompt_tokens` tokens (no head), the papers' count."""
    return cfg.num_layers * decoder_layer_macs(cfg, prompt_tokens, prompt_tokens)


def history_step_flops(cfg: VLAConfig, block_rows: int, attended_entries: int, batch: int = 1) -> StepFlops:
    """FLOPs of a history VLA's step: `block_rows` new rows (the frame and its query) attending over
    `attended_entries` cached history entries and, densely, their own block."""
    slots = attended_entries + block_rows
    prefill = [2 * batch * decoder_layer_macs(cfg, block_rows, slots)] * cfg.num_layers
    return StepFlops(vision=2 * batch * vision_macs(cfg), prefill_per_layer=prefill,
                     prefill_tokens_per_layer=[block_rows] * cfg.num_layers, action_decoding=0,
                     head=2 * batch * head_macs(cfg, cfg.num_action_tokens))


def history_attention_flops(cfg: VLAConfig, block_rows: int, attended_entries: int, batch: int = 1) -> int:
    """The attention part of history_step_flops: what the history's length costs a step."""
    return 2 * batch * cfg.num_layers * attention_macs(cfg, block_rows, attended_entries + block_rows)
