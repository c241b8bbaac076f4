"""Decoder families: what each family's spec changes is needed (a spec with the feature switched off
gives wrong statistics or logits), and what kvla cannot drive is refused by name.

The exactness of every family against its own forward, generate and eager attention maps is in
test_exactness.py and test_attention_stats.py, which run over conftest.FAMILIES."""

import dataclasses

import pytest
import torch

from conftest import make_lm
from kvla import EpisodeState, PartialPrefillEngine, ReusePlan, TokenLayout
from kvla.engine.compat import UnsupportedModelError, transformers_version
from kvla.engine.history import HistoryEngine, HistoryError

LAYOUT = TokenLayout.single_prompt(num_visual=16, num_text=5)


def _stats_and_logits(engine, embeds):
    plan = ReusePlan.full(embeds.shape[0], LAYOUT, engine.num_layers, collect_entropy=True,
                          relevance_layers=tuple(range(engine.num_layers)))
    result = engine.prefill(embeds, LAYOUT, plan, EpisodeState())
    return result.layer_entropy, result.logits


def _disabled(engine, **changes):
    """The engine with its family's spec or per-layer facts changed (a mutant)."""
    parts = engine.parts
    family = dataclasses.replace(parts.family, **{k: v for k, v in changes.items() if hasattr(parts.family, k)})
    facts = {k: v for k, v in changes.items() if not hasattr(parts.family, k)}
    engine.parts = dataclasses.replace(parts, family=family, **facts)
    return engine


@pytest.mark.parametrize("family,feature", [
    ("qwen3", {"qk_norm": False}),
    ("gemma3", {"qk_norm": False}),
    ("gemma2", {"attn_softcap": None}),
    ("gemma2", {"final_softcap": None}),
    ("mistral", {"layer_windows": (None, None, None)}),
    ("phi3", {"layer_windows": (None, None, None)}),
    ("gemma3", {"layer_rope_keys": ("full_attention",) * 3}),
], ids=["qwen3-qk-norm", "gemma3-qk-norm", "gemma2-attention-softcap", "gemma2-final-softcap", "mistral-window",
        "phi3-window", "gemma3-rope-per-layer-type"])
def test_each_declared_feature_is_needed(family, feature):
    """Switching one declared feature off changes the statistics or the logits: the family tests
    that pass with the spec would fail without it."""
    torch.manual_seed(0)
    embeds = torch.randn(2, LAYOUT.seq_len, 64)
    entropy, logits = _stats_and_logits(PartialPrefillEngine(make_lm(family)), embeds)
    mutant_entropy, mutant_logits = _stats_and_logits(_disabled(PartialPrefillEngine(make_lm(family)), **feature), embeds)
    changed = max((entropy - mutant_entropy).abs().max().item(), (logits - mutant_logits).abs().max().item())
    assert changed > 1e-3


def test_gemma2_under_sdpa_is_refused_since_sdpa_drops_the_soft_cap():
    lm = make_lm("gemma2")
    try:
        lm.set_attn_implementation("sdpa")
    except ValueError:  # transformers >= 5.24 refuses it itself
        assert transformers_version().release >= (5, 24)
        lm.config._attn_implementation = "sdpa"  # as a model loaded by an older transformers would be
    with pytest.raises(UnsupportedModelError, match=r"soft-caps its attention logits.*set_attn_implementation\('eager'\)"):
        PartialPrefillEngine(lm)


def test_flash_attention_is_refused_since_it_ignores_the_mask():
    lm = make_lm("llama")
    lm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="'flash_attention_2' ignores the explicit mask"):
        PartialPrefillEngine(lm)


def test_gemma3_bidirectional_attention_is_refused():
    lm = make_lm("gemma3")
    lm.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="Gemma 3 bidirectional attention"):
        PartialPrefillEngine(lm)


def test_an_unknown_layer_type_is_refused_by_name():
    lm = make_lm("qwen2")
    lm.config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer types \['chunked_attention'\]"):
        PartialPrefillEngine(lm)


def test_a_rope_that_depends_on_the_sequence_length_is_refused():
    lm = make_lm("llama")
    lm.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match=r"rope type \['dynamic'\]"):
        PartialPrefillEngine(lm)


def test_sliding_windows_are_read_per_layer():
    assert PartialPrefillEngine(make_lm("mistral")).parts.layer_windows == (6, 6, 6)
    assert PartialPrefillEngine(make_lm("gemma2")).parts.layer_windows == (6, None, 6)
    gemma3 = PartialPrefillEngine(make_lm("gemma3")).parts
    assert gemma3.layer_windows == (6, None, 6)
    assert gemma3.layer_rope_keys == ("sliding_attention", "full_attention", "sliding_attention")
    assert PartialPrefillEngine(make_lm("llama")).parts.layer_windows == (None, None, None)


def test_a_history_the_sliding_window_would_cut_is_refused():
    engine = HistoryEngine(make_lm("mistral"))
    cache = engine.new_cache()
    embeds = torch.randn(1, 8, 64)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    with pytest.raises(HistoryError, match="sliding window of 6 positions"):
        engine.forward(embeds, torch.arange(8)[None], mask, cache)
    # within the window it runs, and equals the model's own forward
    hidden = engine.forward(embeds[:, :6], torch.arange(6)[None], mask[..., :6, :6], engine.new_cache())
    with torch.no_grad():
        expected = engine.causal_lm(inputs_embeds=embeds[:, :6]).logits
    assert (engine.logits(hidden) - expected).abs().max() < 1e-4


def test_multimodal_rope_needs_the_layout_s_position_components():
    from kvla import LayoutError
    from test_hosts import _vla

    qwen = _vla("qwen2-vl")
    engine = PartialPrefillEngine(qwen.language_model)
    plain = TokenLayout.single_prompt(num_visual=16, num_text=5)
    with pytest.raises(LayoutError, match="multimodal RoPE: the layout must give each slot's 3 position components"):
        engine.prefill(torch.randn(1, plain.seq_len, 64), plain, ReusePlan.full(1, plain, engine.num_layers),
                       EpisodeState())
    llama = PartialPrefillEngine(make_lm("llama"))
    embeds = torch.randn(1, qwen.layout.seq_len, 64)
    with pytest.raises(LayoutError, match="3-component RoPE positions but llama uses 1-D positions"):
        llama.prefill(embeds, qwen.layout, ReusePlan.full(1, qwen.layout, llama.num_layers), EpisodeState())
