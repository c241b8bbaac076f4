"""Analytic FLOP counts against torch's FlopCounterMode on the real forward."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from kvla import EpisodeState, PartialPrefillEngine, ReusePlan
from kvla.cli import app
from kvla.measure.flops import decoder_layer_macs, head_macs, plain_prefill_macs, step_flops, vision_macs
from kvla.model.vla import VLAModel, preset_config


def _counted(fn) -> int:
    # FlopCounterMode counts nothing for the fused CPU sdpa kernels; the math backend is counted
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def eager_tiny():
    # a wider tiny model, so that projections dominate as in real presets
    model = VLAModel.from_preset("tiny", hidden_size=128, intermediate_size=256, num_layers=4)
    model.language_model.set_attn_implementation("eager")  # FlopCounterMode counts nothing for sdpa on CPU
    return model


def test_plain_model_forward_matches_analytic_count(eager_tiny):
    cfg, layout = eager_tiny.config, eager_tiny.layout
    embeds = torch.randn(1, layout.seq_len, cfg.hidden_size)
    counted = _counted(lambda: eager_tiny.language_model(inputs_embeds=embeds, logits_to_keep=1))
    analytic = 2 * (plain_prefill_macs(cfg, layout.seq_len) + head_macs(cfg, 1))
    assert abs(counted - analytic) / counted < 0.01


_DEPTH = torch.tensor([[0, 1, 2, 3] * 4])
_PLANS = {
    "full": lambda layout: ReusePlan.full(1, layout, 4),
    "partial": lambda layout: ReusePlan(visual_depth=_DEPTH),
    # the statistics a vla_cache step asks for: entropy and relevance on the first frame, relevance later
    "full+entropy+relevance": lambda layout: ReusePlan.full(1, layout, 4, relevance_layers=(2,), collect_entropy=True),
    "partial+relevance": lambda layout: ReusePlan(visual_depth=_DEPTH, relevance_layers=(2,)),
    "partial+entropy": lambda layout: ReusePlan(visual_depth=_DEPTH, relevance_layers=(1, 3), collect_entropy=True),
    "fastv": lambda layout: ReusePlan.full(1, layout, 4, prune_after_layer=1, prune_ratio=0.5),
}


@pytest.mark.parametrize("plan_name", list(_PLANS))
def test_engine_step_matches_analytic_count(eager_tiny, plan_name):
    model, cfg, layout = eager_tiny, eager_tiny.config, eager_tiny.layout
    engine, state = PartialPrefillEngine(model.language_model), EpisodeState()
    frames = torch.randint(0, 255, (1, 32, 32, 3), dtype=torch.uint8)
    text = torch.randint(3, 200, (1, cfg.num_text_tokens))
    embeds = model.prompt_embeddings(model.encode_images(model.policy_images(frames)), text)
    engine.prefill(embeds, layout, ReusePlan.full(1, layout, 4), state)
    plan = _PLANS[plan_name](layout)

    def step():
        result = engine.prefill(embeds, layout, plan, state)
        engine.decode_greedy(result.logits[:, -1], layout, state)
        step.result = result

    counted = _counted(step)
    result = step.result
    analytic = step_flops(cfg, layout, result.computed_tokens, batch=1, statistic_rows=result.statistic_rows)
    if plan_name.startswith("partial"):
        assert result.computed_tokens == [layout.seq_len - 4, layout.seq_len - 8, layout.seq_len - 12,
                                          layout.seq_len - 16]
    if plan_name != "full" and plan_name != "partial":
        assert analytic.statistics > 0
    total = analytic.prefill + analytic.action_decoding + analytic.head
    assert abs(counted - total) / counted < 0.01


def test_vision_count_matches(eager_tiny):
    frames = torch.randint(0, 255, (1, 32, 32, 3), dtype=torch.uint8)
    images = eager_tiny.policy_images(frames)
    counted = _counted(lambda: eager_tiny.encode_images(images))
    assert abs(counted - 2 * vision_macs(eager_tiny.config)) / counted < 0.01


def test_openvla_7b_prefill_matches_papers_figure():
    macs = plain_prefill_macs(preset_config("openvla-7b"), 285)
    assert abs(macs - 1.864e12) / 1.864e12 < 0.02
    # a wrong convention (FLOPs instead of MACs) would be 2x off
    assert decoder_layer_macs(preset_config("openvla-7b"), 285, 285) * 32 == macs


def test_cli_bench_flops_writes_json(tmp_path):
    out = tmp_path / "flops.json"
    result = CliRunner().invoke(app, ["bench", "flops", "--preset", "openvla-7b", "--prompt-tokens", "285",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["prefill_flops"] == 2 * record["prefill_macs"]
    assert abs(record["prefill_macs"] - 1.864e12) / 1.864e12 < 0.02


@pytest.mark.parametrize("family,extra", [("qwen3", {"head_dim": 32}), ("gemma3", {"head_dim": 32}), ("phi3", {}),
                                          ("gemma2", {"head_dim": 32})])
def test_decoder_families_plain_forward_matches_analytic_count(family, extra):
    """head_dim other than hidden / heads, a fused qkv projection, per-layer windows: the count reads
    the config's numbers and the executed products are those (norms, soft-caps uncounted)."""
    import transformers

    from conftest import FAMILIES
    from kvla.measure.flops import DecoderShape

    config_name, model_name, family_extra = FAMILIES[family]
    config = getattr(transformers, config_name)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                **{**family_extra, **extra})
    lm = getattr(transformers, model_name)(config).eval()
    lm.set_attn_implementation("eager")
    shape = DecoderShape.of(lm.config)
    assert shape.head_dim == extra.get("head_dim", 16)
    embeds = torch.randn(1, 20, 64)
    counted = _counted(lambda: lm(inputs_embeds=embeds, logits_to_keep=1))
    analytic = 2 * (plain_prefill_macs(shape, 20) + head_macs(shape, 1))
    assert abs(counted - analytic) / counted < 0.01


@pytest.mark.parametrize("name", ["smolvlm:tiny", "paligemma:tiny"])
def test_a_host_step_matches_analytic_count(name):
    """A host VLA's step (the host's decoder through kvla, with a reuse plan) against the counter."""
    from kvla.hosts.presets import host_preset

    vla = host_preset(name, num_text_tokens=5)
    vla.host.set_attn_implementation("eager")
    cfg, layout = vla.config, vla.layout
    engine, state = PartialPrefillEngine(vla.language_model), EpisodeState()
    frames = torch.randint(0, 255, (1, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    embeds = vla.prompt_embeddings(vla.encode_images(vla.policy_images(frames)), torch.randint(10, 200, (1, 5)))
    engine.prefill(embeds, layout, ReusePlan.full(1, layout, cfg.num_layers), state)
    plan = ReusePlan(visual_depth=torch.tensor([[0, 1, 2, 2] * 4]), relevance_layers=(1,))

    def step():
        result = engine.prefill(embeds, layout, plan, state)
        engine.decode_greedy(result.logits[:, -1], layout, state)
        step.result = result

    counted = _counted(step)
    analytic = step_flops(cfg, layout, step.result.computed_tokens, batch=1, statistic_rows=step.result.statistic_rows)
    assert abs(counted - (analytic.prefill + analytic.action_decoding + analytic.head)) / counted < 0.01
    assert analytic.vision == 2 * cfg.vision_macs_per_sample > 0


@pytest.mark.parametrize("mode", ["causal", "prefix_lm", "bidirectional"])
def test_visible_keys_count_what_the_mask_of_the_mode_lets_through(mode):
    """Against a count written out here: a full prefill of a prompt of S tokens sees S(S+1)/2 keys
    under a causal mask, S^2 under a bidirectional one; the dense count is the same in every mode."""
    from conftest import make_lm
    from kvla import TokenLayout

    layout = TokenLayout.single_prompt(num_visual=8, num_text=3, num_action_tokens=4, parallel_actions=True,
                                       mask_mode=mode)
    lm = make_lm("llama", num_layers=2)
    engine = PartialPrefillEngine(lm)
    result = engine.prefill(torch.randn(2, layout.seq_len, 64), layout, ReusePlan.full(2, layout, 2), EpisodeState())
    S, P = layout.seq_len, layout.action_span[0]
    expected = {"causal": S * (S + 1) // 2, "bidirectional": S * S,
                "prefix_lm": P * P + sum(P + i + 1 for i in range(S - P))}[mode]
    assert result.visible_keys.tolist() == [2 * expected] * 2
    shape = SimpleNamespace(num_heads=4, head_dim=16, hidden_size=64, num_kv_heads=2, intermediate_size=128,
                            num_layers=2, vocab_size=300, vision_macs_per_sample=0)
    flops = step_flops(shape, layout, result.computed_tokens, batch=2, visible_keys=result.visible_keys.tolist())
    assert flops.prefill_attention_visible == 2 * 2 * 4 * 16 * 2 * 2 * expected
    assert flops.prefill_attention_dense == 2 * 2 * 2 * (2 * S * 4 * 16 * (S + 1))  # S rows x (S + discard) slots
