"""Analytic FLOP counts against torch's FlopCounterMode on the real forward."""

import json

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
