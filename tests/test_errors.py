"""Bad input gets a clear error naming the problem."""

import re

import pytest
import torch
from transformers import OlmoConfig, OlmoForCausalLM

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
    config = OlmoConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300)
    with pytest.raises(UnsupportedModelError, match="unsupported model family 'olmo'"):
        PartialPrefillEngine(OlmoForCausalLM(config))


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


def _proprio_model():
    return VLAModel.from_preset("tiny", seed=0, proprio_dim=4)


def _good_inputs(model, batch=2):
    config = model.config
    images = torch.zeros(batch, config.num_cameras, config.image_size, config.image_size, 3, dtype=torch.uint8)
    return images, torch.ones(batch, config.num_text_tokens, dtype=torch.long), torch.zeros(batch, config.proprio_dim)


BAD_INPUTS = {
    # name: (field, message fragment, how the good inputs are spoilt)
    "images as a list": ("images", "must be a torch.Tensor", lambda i, t, p: (i.tolist(), t, p)),
    "float images": ("images", "must be uint8", lambda i, t, p: (i.float(), t, p)),
    "an empty batch": ("images", "the batch is empty", lambda i, t, p: (i[:0], t[:0], p[:0])),
    "a zero-sized image": ("images", "zero-sized image", lambda i, t, p: (i[:, :, :0], t, p)),
    "text ids as numpy": ("text_ids", "must be a torch.Tensor", lambda i, t, p: (i, t.numpy(), p)),
    "float text ids": ("text_ids", "integer tensor", lambda i, t, p: (i, t.float(), p)),
    "uint8 text ids": ("text_ids", "(int64 or int32), got torch.uint8", lambda i, t, p: (i, t.to(torch.uint8), p)),
    "text ids of the wrong length": ("text_ids", "text_ids must be", lambda i, t, p: (i, t[:, :-1], p)),
    "a text id past the vocabulary": ("text_ids", "outside the vocabulary [0, 512)",
                                      lambda i, t, p: (i, t.index_fill(1, torch.tensor([2]), 512), p)),
    "a negative text id": ("text_ids", "id -1 is outside", lambda i, t, p: (i, t.index_fill(1, torch.tensor([0]), -1), p)),
    "text ids of another batch": ("text_ids", "batch=2", lambda i, t, p: (i, t[:1], p)),
    "no proprio": ("proprio", "needs proprio", lambda i, t, p: (i, t, None)),
    "integer proprio": ("proprio", "floating-point", lambda i, t, p: (i, t, p.long())),
    "NaN proprio": ("proprio", "holds nan at [1, 2]",
                    lambda i, t, p: (i, t, p.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))))),
    "infinite proprio": ("proprio", "holds inf at [0, 0]",
                         lambda i, t, p: (i, t, p.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))))),
    "proprio of the wrong width": ("proprio", "must be [batch=2, 4]", lambda i, t, p: (i, t, p[:, :3])),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_step_refuses_bad_input_naming_the_field_and_leaves_the_episode_untouched(case):
    from kvla.model.inputs import InputError

    field, fragment, spoil = BAD_INPUTS[case]
    model = _proprio_model()
    policy = CachedVLAPolicy(model, "vla_cache")
    good = _good_inputs(model)
    policy.step(*good)
    before = policy.state.step
    with pytest.raises(InputError, match=re.escape(fragment)) as error:
        policy.step(*spoil(*good))
    assert error.value.field == field
    assert policy.state.step == before  # nothing of the bad step reached the episode
    policy.step(*good)  # and the episode goes on
    assert policy.state.step == before + 1


def test_a_model_without_proprio_refuses_proprio():
    from kvla.model.inputs import InputError

    model = VLAModel.from_preset("tiny")
    images = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(InputError, match="takes no proprio"):
        CachedVLAPolicy(model, "full").step(images, torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(TypeError, match="observation must be a dict"):
        CachedVLAPolicy(model, "full").select_action([images])
