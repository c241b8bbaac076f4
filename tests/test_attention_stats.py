"""Attention statistics recomputed for a few rows must equal the model's own eager attention maps."""

import torch

from conftest import make_lm
from kvla import EpisodeState, PartialPrefillEngine, ReusePlan, TokenLayout


def test_relevance_and_entropy_match_eager_attention(family):
    lm = make_lm(family, num_layers=3)
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4)
    embeds = torch.randn(2, layout.seq_len, 64)
    engine, state = PartialPrefillEngine(lm), EpisodeState()
    plan = ReusePlan.full(2, layout, 3, relevance_layers=(0, 2), collect_entropy=True)
    result = engine.prefill(embeds, layout, plan, state)

    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = lm(inputs_embeds=embeds, output_attentions=True).attentions
    finally:
        lm.set_attn_implementation("sdpa")
    text, visual = slice(*layout.text_span), slice(1, 13)
    expected = torch.stack([maps[l][:, :, text, visual].mean(dim=(1, 2)) for l in (0, 2)]).mean(0)
    assert (result.relevance - expected).abs().max() < 1e-6
    entropy = torch.stack([-(m * m.clamp_min(1e-30).log()).sum(-1).mean(dim=(1, 2)) for m in maps], dim=1)
    assert (result.layer_entropy - entropy).abs().max() < 1e-5
    assert state.relevance is result.relevance and state.layer_entropy is result.layer_entropy


def test_no_statistics_unless_asked():
    lm = make_lm("llama")
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4)
    result = PartialPrefillEngine(lm).prefill(torch.randn(1, layout.seq_len, 64), layout,
                                              ReusePlan.full(1, layout, 3), EpisodeState())
    assert result.relevance is None and result.layer_entropy is None
