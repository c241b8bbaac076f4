"""Several robots' episodes through one batched step: each sample gets exactly what its own
episode gives when stepped alone, whatever the robots' steps, resets and reuse plans."""

import pytest
import torch

from kvla.engine.state import EpisodeState
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy

ROBOTS, STEPS = 4, 5


def _scenes(seed=0):
    """Per robot a static scene in which one 8 x 8 block changes per step, proprio and an instruction."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (ROBOTS, 32, 32, 3), generator=generator, dtype=torch.uint8)
    sequence = []
    for step in range(STEPS):
        frames = frames.clone()
        row, column = 8 * (step % 4), 8 * ((step * 3 + 1) % 4)
        frames[:, row:row + 8, column:column + 8] = torch.randint(0, 256, (ROBOTS, 8, 8, 3), generator=generator,
                                                                  dtype=torch.uint8)
        sequence.append(frames)
    proprio = torch.randn(STEPS, ROBOTS, 4, generator=generator)
    text = torch.randint(4, 200, (ROBOTS, 6), generator=generator)
    return sequence, proprio, text


# which robots step at each step (robot 3 joins late, robot 1 skips a step), and who resets
SCHEDULE = [([0, 1, 2], []), ([0, 1, 2], []), ([0, 2, 3], []), ([0, 1, 2, 3], [2]), ([3, 1, 0, 2], [])]


# the paper's vla_cache (relevance and entropy collected on the way), settings that reuse in every
# layer and filter by relevance, static reuse, and fastv's pruning
SPECS = ["full", "vla_cache", "vla_cache:top_k=10:schedule=code",
         "vla_cache:top_k=10:relevance_rule=top_k:task_top_k=2:schedule=none", "static", "fastv"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("parallel", [False, True])
def test_batched_episodes_equal_each_episode_stepped_alone(spec, parallel):
    model = VLAModel.from_preset("tiny", seed=0, proprio_dim=4, parallel_actions=parallel,
                                 action_chunk=2 if parallel else 1).float()
    frames, proprio, text = _scenes()
    batched = CachedVLAPolicy(model, spec)
    alone = [CachedVLAPolicy(model, spec) for _ in range(ROBOTS)]
    states = [EpisodeState() for _ in range(ROBOTS)]
    reused = 0.0
    for step, (robots, resets) in enumerate(SCHEDULE):
        for robot in resets:
            states[robot].reset()
            alone[robot].reset()
        index = torch.tensor(robots)
        outputs = batched.step_episodes([states[r] for r in robots], frames[step][index], text[index],
                                        proprio[step][index])
        for out, robot in zip(outputs, robots):
            expected = alone[robot].step(frames[step][robot:robot + 1], text[robot:robot + 1],
                                         proprio[step][robot:robot + 1])
            assert torch.equal(out.action_tokens, expected.action_tokens), (spec, step, robot)
            torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
            assert out.reuse_ratio == pytest.approx(expected.reuse_ratio)
            assert states[robot].step == alone[robot].state.step
            assert torch.equal(states[robot].source_step, alone[robot].state.source_step)
            reused += out.reuse_ratio
    if spec not in ("full", "vla_cache"):
        assert reused > 0  # the batch did reuse, so the equality above covers the cache path


def test_step_episodes_refuses_a_state_twice_or_a_count_mismatch():
    model = VLAModel.from_preset("tiny", seed=0).float()
    policy, state = CachedVLAPolicy(model, "full"), EpisodeState()
    images, text = torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="one distinct episode state per sample"):
        policy.step_episodes([state, state], images, text)
    with pytest.raises(ValueError, match="2 states for a batch of 1"):
        policy.step_episodes([state, EpisodeState()], images[:1], text[:1])
