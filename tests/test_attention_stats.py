"""Attention statistics recomputed for a few rows must equal the model's own eager attention maps."""

import pytest
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

    maps = _eager_attentions(lm, embeds)
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


def _eager_attentions(lm, embeds):
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm(inputs_embeds=embeds, output_attentions=True).attentions
    finally:
        lm.set_attn_implementation(previous)


@pytest.mark.parametrize("parallel", [False, True], ids=["autoregressive", "parallel"])
def test_fastv_drops_the_tokens_the_last_prompt_position_attends_least(family, parallel):
    lm = make_lm(family, num_layers=4)
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4, parallel_actions=parallel)
    embeds = torch.randn(2, layout.seq_len, 64)
    plan = ReusePlan.full(2, layout, 4, prune_after_layer=1, prune_ratio=0.5)
    result = PartialPrefillEngine(lm).prefill(embeds, layout, plan, EpisodeState())

    # FastV's ranking: the attention the last prompt position pays at layer K, mean over heads
    received = _eager_attentions(lm, embeds)[1][:, :, -1, layout.visual_positions].mean(1)
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected.scatter_(1, received.topk(6, dim=1, largest=False).indices, True)
    assert torch.equal(result.pruned, expected)


def test_fastv_ranking_is_by_attention_not_by_position():
    """Inputs built so that the early visual tokens are the least attended: they are the ones dropped."""
    lm = make_lm("llama", num_layers=3)
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4)
    visual = layout.visual_positions
    torch.manual_seed(1)
    embeds = torch.randn(1, layout.seq_len, 64)
    # In layer 0 a key depends only on its own token and position, and RMSNorm and the bias-free
    # projections are odd: negating a visual embedding negates its attention logit. Give each early
    # token the sign with the lower attention and each late token the sign with the higher one.
    flipped = embeds.clone()
    flipped[:, visual] = -flipped[:, visual]
    plus = _eager_attentions(lm, embeds)[0][0, :, -1, visual].mean(0)
    minus = _eager_attentions(lm, flipped)[0][0, :, -1, visual].mean(0)
    early = torch.arange(12) < 6
    take_minus = torch.where(early, minus < plus, minus > plus)
    embeds[:, visual[take_minus]] = -embeds[:, visual[take_minus]]

    plan = ReusePlan.full(1, layout, 3, prune_after_layer=0, prune_ratio=0.5)
    result = PartialPrefillEngine(lm).prefill(embeds, layout, plan, EpisodeState())
    assert result.pruned[0].tolist() == early.tolist()


@pytest.mark.parametrize("batch", [1, 2])
def test_entropy_of_a_partial_plan_is_taken_over_the_rows_computed_in_every_layer(family, batch):
    lm = make_lm(family, num_layers=4)
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4)
    embeds = torch.randn(batch, layout.seq_len, 64)
    engine, state = PartialPrefillEngine(lm), EpisodeState()
    engine.prefill(embeds, layout, ReusePlan.full(batch, layout, 4), state)
    # same frame again, so reused K/V equals fresh K/V and the eager maps are the reference
    depth = torch.tensor([[0, 1, 2, 3, 4, 4, 0, 4, 3, 4, 1, 4], [4, 4, 0, 0, 2, 4, 4, 1, 4, 3, 4, 4]])[:batch]
    result = engine.prefill(embeds, layout, ReusePlan(visual_depth=depth, collect_entropy=True), state)

    maps = _eager_attentions(lm, embeds)
    for sample in range(batch):
        full_depth = torch.full((layout.seq_len,), 4)
        full_depth[layout.visual_positions] = depth[sample]
        rows = full_depth == 4  # computed in every layer
        for layer, probs in enumerate(maps):
            chosen = probs[sample][:, rows]  # [heads, rows, keys]
            expected = -(chosen * chosen.clamp_min(1e-30).log()).sum(-1).mean()
            assert abs(result.layer_entropy[sample, layer] - expected) < 1e-5


def test_statistics_are_computed_only_for_the_rows_they_need():
    lm = make_lm("llama", num_layers=4)
    layout = TokenLayout.single_prompt(num_visual=12, num_text=4)
    engine, state = PartialPrefillEngine(lm), EpisodeState()
    embeds = torch.randn(1, layout.seq_len, 64)
    first = engine.prefill(embeds, layout, ReusePlan.full(1, layout, 4, relevance_layers=(2,), collect_entropy=True),
                           state)
    assert first.statistic_rows == [layout.seq_len] * 4
    depth = torch.tensor([[0] * 6 + [4] * 6])
    partial = engine.prefill(embeds, layout, ReusePlan(visual_depth=depth, relevance_layers=(2,)), state)
    assert partial.statistic_rows == [0, 0, 4, 0]  # the text rows, in the relevance layer only
    entropy = engine.prefill(embeds, layout, ReusePlan(visual_depth=depth, collect_entropy=True), state)
    assert entropy.statistic_rows == [layout.seq_len - 6] * 4
    fastv = engine.prefill(embeds, layout, ReusePlan.full(1, layout, 4, prune_after_layer=1, prune_ratio=0.5),
                           EpisodeState())
    assert fastv.statistic_rows == [0, 1, 0, 0]  # the last prompt position
