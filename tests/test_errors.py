"""Bad input gets a clear error naming the problem."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from conftest import make_lm
from kvla import EpisodeState, LayoutError, PartialPrefillEngine, PlanError, ReusePlan, TokenLayout
from kvla.engine.compat import UnsupportedModelError
from kvla.model.vla import ImageError, VLAModel
from kvla.policy import CachedVLAPolicy

LAYOUT = TokenLayout.single_prompt(num_visual=8, num_text=3)


@pytest.fixture
def engine():
    return PartialPrefillEngine(make_lm("llama"))


def test_layout_that_does_not_match_the_sequence(engine):
    with pytest.raises(LayoutError, match="describes 12 tokens but the sequence has 15"):
        engine.prefill(torch.randn(1, 15, 64), LAYOUT, ReusePlan.full(1, LAYOUT, 3), EpisodeState())
    with pytest.raises(LayoutError, match="overlap"):
        TokenLayout(seq_len=10, visual_spans=((1, 6),), text_span=(5, 10))
    with pytest.raises(LayoutError, match="outside a sequence"):
        TokenLayout(seq_len=10, visual_spans=((1, 6),), text_span=(6, 12))


def test_image_size_not_a_multiple_of_the_patch_size():
    model = VLAModel.from_preset("tiny")
    odd = torch.zeros(1, 1, 30, 30, 3, dtype=torch.uint8)
    with pytest.raises(ImageError, match="not a multiple of the patch size 8"):
        model.image_patches(odd)
    with pytest.raises(ImageError, match="image_size 30 is not a multiple of patch_size 8"):
        VLAModel.from_preset("tiny", image_size=30)
    with pytest.raises(ImageError, match="must be uint8"):
        model.policy_images(torch.zeros(1, 32, 32, 3))


def test_dtype_or_device_mismatch_between_cache_and_model():
    lm = make_lm("llama")
    engine, state = PartialPrefillEngine(lm), EpisodeState()
    embeds = torch.randn(1, LAYOUT.seq_len, 64)
    engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    lm.to(torch.bfloat16)
    with pytest.raises(TypeError, match="episode cache holds torch.float32 .* model is torch.bfloat16"):
        engine.prefill(embeds.bfloat16(), LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    with pytest.raises(TypeError, match="input embeddings are torch.float32"):
        engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3), EpisodeState())


def test_plan_indices_out_of_range(engine):
    state = EpisodeState()
    embeds = torch.randn(1, LAYOUT.seq_len, 64)
    engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    with pytest.raises(PlanError, match=r"must lie in \[0, 3\]"):
        engine.prefill(embeds, LAYOUT, ReusePlan(visual_depth=torch.full((1, 8), 4)), state)
    with pytest.raises(PlanError, match="expected"):
        engine.prefill(embeds, LAYOUT, ReusePlan(visual_depth=torch.zeros(1, 9, dtype=torch.long)), state)
    with pytest.raises(PlanError, match="relevance layer 7"):
        engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3, relevance_layers=(7,)), state)


def test_pruning_plan_cannot_collect_entropy(engine):
    plan = ReusePlan.full(1, LAYOUT, 3, prune_after_layer=0, prune_ratio=0.5, collect_entropy=True)
    with pytest.raises(PlanError, match="cannot collect entropy"):
        engine.prefill(torch.randn(1, LAYOUT.seq_len, 64), LAYOUT, plan, EpisodeState())


def test_unsupported_model_family():
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=300)
    with pytest.raises(UnsupportedModelError, match="unsupported model family 'gemma2'"):
        PartialPrefillEngine(Gemma2ForCausalLM(config))


def test_step_after_reset_without_a_full_first_frame(engine):
    state = EpisodeState()
    embeds = torch.randn(1, LAYOUT.seq_len, 64)
    engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    state.reset()
    with pytest.raises(PlanError, match="after reset\\(\\) the first step must be a full frame"):
        engine.prefill(embeds, LAYOUT, ReusePlan(visual_depth=torch.zeros(1, 8, dtype=torch.long)), state)


def test_batch_change_without_reset(engine):
    state = EpisodeState()
    engine.prefill(torch.randn(1, LAYOUT.seq_len, 64), LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    with pytest.raises(PlanError, match="call reset"):
        engine.prefill(torch.randn(2, LAYOUT.seq_len, 64), LAYOUT, ReusePlan.full(2, LAYOUT, 3), state)


def test_policy_observation_and_camera_errors():
    model = VLAModel.from_preset("tiny")
    policy = CachedVLAPolicy(model, "full")
    with pytest.raises(KeyError, match="text_ids"):
        policy.select_action({"images": torch.zeros(1, 32, 32, 3, dtype=torch.uint8)})
    with pytest.raises(ImageError, match="expects 1 camera"):
        policy.step(torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8), torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="text_ids must be"):
        policy.step(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), torch.zeros(1, 5, dtype=torch.long))


def test_pruning_plan_that_reuses_is_checked_against_the_cache(engine):
    embeds = torch.randn(1, LAYOUT.seq_len, 64)
    reuse_and_prune = ReusePlan(visual_depth=torch.tensor([[0, 0, 3, 3, 3, 3, 3, 3]]), prune_after_layer=0,
                                prune_ratio=0.5)
    with pytest.raises(PlanError, match="after reset\\(\\) the first step must be a full frame"):
        engine.prefill(embeds, LAYOUT, reuse_and_prune, EpisodeState())
    # tokens pruned at the previous step have no K/V above the pruning layer
    state = EpisodeState()
    first = engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3, prune_after_layer=0, prune_ratio=0.5), state)
    assert state.kv_complete.tolist() == (~first.pruned).tolist()
    depth = torch.where(first.pruned, 0, 3)
    with pytest.raises(PlanError, match="incomplete"):
        engine.prefill(embeds, LAYOUT, ReusePlan(visual_depth=depth, prune_after_layer=0, prune_ratio=0.5), state)


def test_pruning_plan_that_reuses_reports_its_reuse(engine):
    state = EpisodeState()
    embeds = torch.randn(1, LAYOUT.seq_len, 64)
    engine.prefill(embeds, LAYOUT, ReusePlan.full(1, LAYOUT, 3), state)
    depth = torch.tensor([[0, 0, 0, 0, 3, 3, 3, 3]])
    result = engine.prefill(embeds, LAYOUT, ReusePlan(visual_depth=depth, prune_after_layer=0, prune_ratio=0.75), state)
    assert int(result.pruned.sum()) == 6
    # a token reused from layer 0 stays reused when it is also pruned; a recomputed one is dropped after layer 0
    assert result.visual_depth.tolist() == torch.where(result.pruned, depth.clamp(max=1), depth).tolist()
    assert result.visual_depth[0, :4].tolist() == [0, 0, 0, 0]
    # a dropped token keeps its cached K/V above the pruning layer, like a token reused from there on:
    # still complete, and as old as before
    assert state.kv_complete.all()
    assert state.source_step.tolist() == (result.visual_depth == 3).long().tolist()
