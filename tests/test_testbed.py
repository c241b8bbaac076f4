"""The reference VLA, its training step, evaluation statistics and a short closed loop."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from kvla.testbed.evaluate import EpisodeOutcome, episodes_as_json, summarise
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.model.reference import InstructionTokenizer, reference_config
from kvla.testbed.train import DemoFrames, action_logits, split_demos

INSTRUCTIONS = ["push the puck to the goal", "open the drawer"]


def _tiny_reference(parallel=False, chunk=1):
    tokenizer = InstructionTokenizer.from_instructions(INSTRUCTIONS)
    config = reference_config(tokenizer, parallel=parallel, action_chunk=chunk, image_size=32, patch_size=8,
                              vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64, hidden_size=64,
                              intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4)
    torch.manual_seed(0)
    return VLAModel(config).eval(), tokenizer


def _demos(n=3, length=6, size=32):
    return [SimpleNamespace(task=f"t{i % 2}", instruction=INSTRUCTIONS[i % 2], seed=i,
                            images=torch.randint(0, 255, (length, size, size, 3), dtype=torch.uint8),
                            proprio=torch.randn(length, 4), actions=torch.rand(length, 4) * 2 - 1)
            for i in range(n)]


def test_tokenizer_pads_and_rejects_long_text(tmp_path):
    tokenizer = InstructionTokenizer.from_instructions(INSTRUCTIONS)
    ids = tokenizer.encode("open the drawer")
    assert len(ids) == tokenizer.max_length == 6 and ids[-3:] == [0, 0, 0] and 3 not in ids  # no [UNK]
    with pytest.raises(ValueError, match="has 7 tokens"):
        tokenizer.encode("push the puck to the goal now")
    tokenizer.save(tmp_path)
    assert InstructionTokenizer.load(tmp_path).encode("open the drawer") == ids


def test_action_tokens_round_trip_to_bin_centres():
    model, _ = _tiny_reference()
    actions = torch.tensor([[-1.0, -0.5, 0.0, 1.0]])
    tokens = model.actions_to_tokens(actions)
    assert (tokens >= model.config.vocab_size - 256).all()
    assert (model.tokens_to_actions(tokens) - actions).abs().max() <= 1 / 256 + 1e-6


@pytest.mark.parametrize("parallel,chunk", [(False, 1), (True, 1), (True, 3)])
def test_teacher_forced_training_logits_equal_the_inference_path(parallel, chunk):
    """The logits training optimises are the ones the engine decodes from (no train/test mismatch)."""
    model, tokenizer = _tiny_reference(parallel, chunk)
    frames = DemoFrames(_demos(), tokenizer, chunk)
    images, proprio, text_ids, actions = frames.batch(torch.tensor([0, 7]))
    targets = model.actions_to_tokens(actions)
    with torch.no_grad():
        logits = action_logits(model, images, proprio, text_ids, targets)
    policy = CachedVLAPolicy(model, "full")
    out = policy.step(images, text_ids, proprio)
    if parallel:
        assert (out.logits - logits).abs().max() < 1e-4
    else:  # the first action token sees only the prompt
        assert (out.logits[:, -1] - logits[:, 0]).abs().max() < 1e-4
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_chunk_targets_and_split():
    demos = _demos(n=4, length=5)
    tokenizer = InstructionTokenizer.from_instructions(INSTRUCTIONS)
    frames = DemoFrames(demos[:1], tokenizer, action_chunk=3)
    acts = demos[0].actions.clamp(-1, 1)
    assert torch.allclose(frames.actions[3], torch.cat([acts[3], acts[4], acts[4]]))  # last action repeated
    train, val = split_demos(demos, val_per_task=1)
    assert sorted(d.seed for d in val) == [2, 3]  # the highest seed of each task is held out


def test_summary_pairs_by_job():
    def outcome(method, success, ms):
        return EpisodeOutcome(method=method, task="t", seed=0, success=success, steps=3, step_ms=[ms] * 3,
                              prefill_ms=[ms / 2] * 3, reuse=[0.5], flops=[1e9])
    results = [[outcome("full", True, 10.0), outcome("x", True, 5.0)],
               [outcome("full", False, 10.0), outcome("x", True, 4.0)]]
    rows = {(s.task, s.method): s for s in summarise(results, ["full", "x"])}
    assert rows[("all", "x")].success_rate == 1.0 and rows[("all", "x")].delta_vs_full == 0.5
    assert rows[("all", "x")].speedup_step == pytest.approx(2.25)  # median of 2.0 and 2.5
    assert rows[("t", "full")].speedup_step == 1.0


def test_short_closed_loop_end_to_end(tmp_path):
    """A tiny model in the real simulator for a few steps: catches a broken simulator install."""
    pytest.importorskip("metaworld")
    from kvla.testbed.evaluate import run_closed_loop

    model, tokenizer = _tiny_reference()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    results = run_closed_loop(str(tmp_path), ["full", "vla_cache:schedule=none"], ["reach-v3"], 1,
                              max_steps=4, workers=1, progress=False)
    assert len(results) == 1 and [o.method for o in results[0]] == ["full", "vla_cache:schedule=none"]
    for outcome in results[0]:
        assert outcome.steps == 4 and len(outcome.step_ms) == 4 and outcome.seed == 10_000
    assert results[0][0].reuse == [0.0] * 4
    records = episodes_as_json(results)
    assert [(r["method"], r["seed"], r["steps"]) for r in records] == [("full", 10_000, 4),
                                                                        ("vla_cache:schedule=none", 10_000, 4)]
    assert records[0]["reuse_ratio"] == 0.0 and records[0]["step_ms_median"] > 0
