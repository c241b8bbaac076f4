"""Every accelerated path against the plain model's own forward and generate."""

import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from packaging.version import Version
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from conftest import FAMILIES, make_lm
from kvla import EpisodeState, PartialPrefillEngine, ReusePlan, TokenLayout
from kvla.engine.compat import UnsupportedModelError, cache_argument_name, transformers_version

NUM_VISUAL, NUM_TEXT, ACTIONS = 16, 5, 7


def _layout(parallel):
    return TokenLayout.single_prompt(num_visual=NUM_VISUAL, num_text=NUM_TEXT, num_action_tokens=ACTIONS,
                                     parallel_actions=parallel)


def _reference(lm, embeds, layout):
    with torch.no_grad():
        logits = lm(inputs_embeds=embeds).logits
        if layout.parallel:
            return logits[:, layout.action_span[0]:], logits[:, layout.action_span[0]:].argmax(-1)
        tokens = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=ACTIONS, min_new_tokens=ACTIONS, do_sample=False, pad_token_id=0)
    return logits[:, -1:], tokens


def _run(engine, embeds, layout, plan, state):
    result = engine.prefill(embeds, layout, plan, state)
    if layout.parallel:
        return result.logits, result.logits.argmax(-1)
    return result.logits, engine.decode_greedy(result.logits[:, -1], layout, state)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("parallel", [False, True], ids=["autoregressive", "parallel"])
def test_empty_plan_and_full_reuse_match_the_model(family, batch, parallel):
    lm = make_lm(family)
    engine, layout, state = PartialPrefillEngine(lm), _layout(parallel), EpisodeState()
    embeds = torch.randn(batch, layout.seq_len, 64)
    ref_logits, ref_tokens = _reference(lm, embeds, layout)

    logits, tokens = _run(engine, embeds, layout, ReusePlan.full(batch, layout, engine.num_layers), state)
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(tokens, ref_tokens)

    # unchanged frame, every visual token reused in every layer: only text/BOS are computed
    reuse_all = ReusePlan(visual_depth=torch.zeros(batch, NUM_VISUAL, dtype=torch.long))
    result = engine.prefill(embeds, layout, reuse_all, state)
    assert result.computed_tokens == [layout.seq_len - NUM_VISUAL] * engine.num_layers
    logits2, tokens2 = _run(engine, embeds, layout, reuse_all, state)
    assert (logits2 - ref_logits).abs().max() < 1e-4
    assert torch.equal(tokens2, ref_tokens)


class _SwapInOldKV:
    """Independent reference: a full forward whose attention, for the planned tokens and layers,
    uses the K/V of the previous frame instead of the fresh ones. The attention proper is the
    family's own eager function with the mask the model built for the layer (its window, its
    soft-cap), so that nothing of kvla's own masks or maths enters the reference."""

    def __init__(self, old_cache, layer_depth):
        self.old_cache, self.layer_depth = old_cache, layer_depth  # layer_depth [B, S]

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        reused = (self.layer_depth <= layer)[:, None, :, None]  # [B, 1, S, 1]
        old_k, old_v = self.old_cache.layers[layer].keys, self.old_cache.layers[layer].values
        key, value = torch.where(reused, old_k, key), torch.where(reused, old_v, value)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)


class _CaptureKV:
    """Records each layer's full fresh K/V (post-RoPE) in a plain forward; sliding-window caches of
    some families keep only the last window, so the model's own cache cannot serve as the old K/V."""

    def __init__(self):
        self.layers = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from types import SimpleNamespace

        self.layers[module.layer_idx] = SimpleNamespace(keys=key, values=value)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)


def _with_attention(lm, name, function, run):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, eager_mask)  # always a full additive mask
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(name)
    try:
        with torch.no_grad():
            return run()
    finally:
        lm.set_attn_implementation(previous)


def _reference_with_old_kv(lm, previous, current, visual_depth):
    """Last-position logits of a full forward of `current` in which each visual token's K/V comes
    from the forward of `previous` in the layers at and above its depth."""
    batch, seq_len, _ = current.shape
    old = _CaptureKV()
    _with_attention(lm, "kvla_test_capture", old, lambda: lm(inputs_embeds=previous))
    full_depth = torch.full((batch, seq_len), lm.config.num_hidden_layers)
    full_depth[:, 1:1 + NUM_VISUAL] = visual_depth
    return _with_attention(lm, "kvla_test_swap", _SwapInOldKV(old, full_depth),
                           lambda: lm(inputs_embeds=current).logits[:, -1])


@pytest.mark.parametrize("batch", [1, 2])
def test_layer_adaptive_partial_reuse_matches_independent_reference(family, batch):
    lm = make_lm(family, num_layers=4)
    engine, layout, state = PartialPrefillEngine(lm), _layout(False), EpisodeState()
    previous = torch.randn(batch, layout.seq_len, 64)
    current = previous.clone()
    current[:, 1:1 + NUM_VISUAL] += 2.0 * torch.randn(batch, NUM_VISUAL, 64)  # the frame changed
    engine.prefill(previous, layout, ReusePlan.full(batch, layout, 4), state)

    generator = torch.Generator().manual_seed(batch)
    depth = torch.randint(0, 5, (batch, NUM_VISUAL), generator=generator)  # different per sample
    result = engine.prefill(current, layout, ReusePlan(visual_depth=depth), state)

    expected = _reference_with_old_kv(lm, previous, current, depth)
    assert (result.logits[:, -1] - expected).abs().max() < 1e-4
    # and the reuse really changed the answer compared with recomputing everything
    with torch.no_grad():
        plain = lm(inputs_embeds=current).logits[:, -1]
    assert (result.logits[:, -1] - plain).abs().max() > 1e-3


def test_batched_plans_equal_per_sample_runs(family):
    lm = make_lm(family)
    engine, layout = PartialPrefillEngine(lm), _layout(False)
    previous, current = torch.randn(2, layout.seq_len, 64), torch.randn(2, layout.seq_len, 64)
    depth = torch.tensor([[0] * 12 + [3] * 4, [1, 2] * 4 + [3] * 8])
    batched = EpisodeState()
    engine.prefill(previous, layout, ReusePlan.full(2, layout, 3), batched)
    batched_logits = engine.prefill(current, layout, ReusePlan(visual_depth=depth), batched).logits
    batched_tokens = engine.decode_greedy(batched_logits[:, -1], layout, batched)
    for sample in range(2):
        single = EpisodeState()
        engine.prefill(previous[sample:sample + 1], layout, ReusePlan.full(1, layout, 3), single)
        logits = engine.prefill(current[sample:sample + 1], layout, ReusePlan(visual_depth=depth[sample:sample + 1]),
                                single).logits
        tokens = engine.decode_greedy(logits[:, -1], layout, single)
        assert (logits - batched_logits[sample:sample + 1]).abs().max() < 1e-5
        assert torch.equal(tokens, batched_tokens[sample:sample + 1])


def test_bfloat16_full_plan_close_to_model():
    lm = make_lm("llama").to(torch.bfloat16)
    engine, layout, state = PartialPrefillEngine(lm), _layout(False), EpisodeState()
    embeds = torch.randn(1, layout.seq_len, 64, dtype=torch.bfloat16)
    result = engine.prefill(embeds, layout, ReusePlan.full(1, layout, 3), state)
    with torch.no_grad():
        expected = lm(inputs_embeds=embeds).logits[:, -1].float()
    assert result.logits.dtype == torch.float32
    assert (result.logits[:, -1] - expected).abs().max() < 0.05 * expected.abs().max()


_MODELS = {}


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), batch=st.integers(1, 3), data=st.data())
def test_any_plan_matches_the_reference(family, batch, data):
    """Property: for any per-sample depths, the engine equals the swap-in-old-K/V reference."""
    if family not in _MODELS:
        _MODELS[family] = make_lm(family, num_layers=3, seed=1)
    lm = _MODELS[family]
    layout = _layout(False)
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    previous = torch.randn(batch, layout.seq_len, 64, generator=generator)
    current = previous + torch.randn(batch, layout.seq_len, 64, generator=generator)
    depth = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=NUM_VISUAL, max_size=NUM_VISUAL),
                                            min_size=batch, max_size=batch)))
    engine, state = PartialPrefillEngine(lm), EpisodeState()
    engine.prefill(previous, layout, ReusePlan.full(batch, layout, 3), state)
    result = engine.prefill(current, layout, ReusePlan(visual_depth=depth), state)
    assert result.computed_tokens == [int((depth > l).sum(1).max()) + layout.seq_len - NUM_VISUAL for l in range(3)]
    expected = _reference_with_old_kv(lm, previous, current, depth)
    assert (result.logits[:, -1] - expected).abs().max() < 1e-4


def test_prefill_and_decode_raise_no_deprecation_warnings(family):
    """kvla calls the installed transformers the way it currently wants to be called: no
    FutureWarning or DeprecationWarning (transformers 5.24 deprecates `past_key_values` on decoder
    layers with a FutureWarning on every call)."""
    lm = make_lm(family)
    layout = _layout(False)
    embeds = torch.randn(1, layout.seq_len, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, state = PartialPrefillEngine(lm), EpisodeState()
        result = engine.prefill(embeds, layout, ReusePlan.full(1, layout, engine.num_layers), state)
        engine.prefill(embeds, layout, ReusePlan(visual_depth=torch.zeros(1, NUM_VISUAL, dtype=torch.long)), state)
        engine.decode_greedy(result.logits[:, -1], layout, state)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, "\n".join(deprecations)


class _TakesCache(torch.nn.Module):  # transformers >= 5.24
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs): ...


class _TakesPastKeyValues(torch.nn.Module):  # transformers < 5.24
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs): ...


class _TakesBoth(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None, cache=None, **kwargs): ...


class _TakesNeither(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, **kwargs): ...


@pytest.mark.parametrize("layer_class,expected", [
    (_TakesCache, "cache"), (_TakesPastKeyValues, "past_key_values"), (_TakesBoth, "cache"),
])
def test_cache_argument_name_picks_the_keyword_the_layer_takes(layer_class, expected):
    assert cache_argument_name(layer_class) == expected


def test_cache_argument_name_follows_the_deprecation_wrapper():
    """transformers >= 5.24 wraps forward in deprecate_kwarg; the signature seen is the wrapped one."""
    from transformers.utils.deprecation import deprecate_kwarg

    class Layer(torch.nn.Module):
        @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
        def forward(self, hidden_states, cache=None, **kwargs):
            return hidden_states

    assert cache_argument_name(Layer) == "cache"


def test_cache_argument_name_of_the_installed_transformers(family):
    expected = "cache" if transformers_version() >= Version("5.24.0") else "past_key_values"
    assert cache_argument_name(type(make_lm(family, num_layers=1).model.layers[0])) == expected


def test_cache_argument_name_without_either_keyword_is_a_clear_error():
    with pytest.raises(UnsupportedModelError,
                       match=r"_TakesNeither\.forward takes neither `cache` nor `past_key_values`"):
        cache_argument_name(_TakesNeither)
