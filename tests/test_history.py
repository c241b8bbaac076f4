"""The history VLA: the per-step cache path against the teacher-forced sequence forward, the
history baselines' budgets, per-episode reset, and the memory task variants."""

import numpy as np
import pytest
import torch

from kvla.engine.history import FRAME, POOLED, HistoryError, HistoryState
from kvla.history_policy import HistoryVLAPolicy
from kvla.methods import HistoryFull, parse_method
from kvla.model.history import HistoryConfig, HistoryLayout, sequence_logits
from kvla.engine.history import HistoryEngine
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.testbed.sim import ALL_TASKS, MEMORY_TASKS, TASKS, base_task, parse_tasks


def _tiny_history_model(seed=0, family="llama"):
    return VLAModel.from_preset("tiny", seed=seed, family=family, proprio_dim=4, parallel_actions=True,
                                action_chunk=2, num_cameras=2).float()


def _episode(frames=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (frames, 2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return images, torch.randn(frames, 4, generator=generator), torch.randint(4, 200, (1, 6), generator=generator)


def _run(policy, images, proprio, text):
    policy.reset()
    return torch.stack([policy.step(images[i:i + 1], text, proprio[i:i + 1]).logits[0] for i in range(len(images))])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("spec,window", [("history_full", None), ("history_window:frames=2", 2), ("no_history", 0)])
def test_the_cache_path_equals_the_teacher_forced_sequence(family, spec, window):
    """Frame by frame through the cache equals one forward over the whole episode: exact for
    every past frame kept, and for the window the training mask builds."""
    model = _tiny_history_model(family=family)
    images, proprio, text = _episode()
    with torch.no_grad():
        reference = sequence_logits(model, HistoryEngine(model.language_model), images, proprio, text, window)
    stepped = _run(HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), spec), images, proprio, text)
    assert stepped.shape == reference.shape
    assert (stepped - reference).abs().max() < 1e-4


def test_without_history_a_step_is_the_single_frame_vla():
    """A block with no history is the reference VLA's own prompt: no_history gives its logits."""
    model = _tiny_history_model()
    images, proprio, text = _episode(frames=3)
    single = CachedVLAPolicy(model, "full")
    history = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "no_history")
    history.reset()
    for i in range(3):
        single.reset()
        expected = single.step(images[i:i + 1], text, proprio[i:i + 1]).logits
        got = history.step(images[i:i + 1], text, proprio[i:i + 1]).logits
        assert (expected - got).abs().max() < 1e-4


def test_history_changes_the_prediction_and_full_history_grows():
    model = _tiny_history_model()
    images, proprio, text = _episode()
    full = _run(HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full"), images, proprio, text)
    none = _run(HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "no_history"), images, proprio, text)
    assert torch.equal(full[0], none[0])  # the first frame has no history either way
    assert (full[1:] - none[1:]).abs().amax(dim=(1, 2)).min() > 1e-3
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full")
    policy.reset()
    layout = HistoryLayout.of(model.config)
    for i in range(4):
        out = policy.step(images[i:i + 1], text, proprio[i:i + 1])
        assert out.attended_entries == i * layout.frame_len and out.entries == (i + 1) * layout.frame_len
    assert policy.state.frames_held() == [0, 1, 2, 3]
    assert policy.state.kv_bytes() == out.kv_bytes > 0


@pytest.mark.parametrize("spec", ["history_window:frames=3", "no_history", "history_window:frames=0"])
def test_a_history_run_never_exceeds_its_budget(spec):
    model = _tiny_history_model()
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), spec)
    layout = HistoryLayout.of(model.config)
    budget = policy.method.budget_entries(layout)
    images, proprio, text = _episode(frames=8)
    policy.reset()
    for i in range(8):
        out = policy.step(images[i:i + 1], text, proprio[i:i + 1])
        assert out.entries <= budget
        assert out.attended_entries <= budget
    assert policy.state.peak_entries == budget  # reached, never passed
    frames = getattr(policy.method, "frames", 0)
    assert policy.state.frames_held() == list(range(8 - frames, 8))


def test_a_method_over_its_budget_is_stopped():
    class Leaky(HistoryFull):
        def budget_entries(self, layout):
            return layout.frame_len  # one frame, but it keeps every frame

    model = _tiny_history_model()
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), Leaky())
    images, proprio, text = _episode(frames=2)
    policy.step(images[:1], text, proprio[:1])
    with pytest.raises(HistoryError, match="over its budget"):
        policy.step(images[1:2], text, proprio[1:2])


def test_reset_starts_a_clean_episode():
    model = _tiny_history_model()
    images, proprio, text = _episode()
    other_images, other_proprio, _ = _episode(seed=1)
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full")
    first = _run(policy, images, proprio, text)
    _run(policy, other_images, other_proprio, text)  # another episode in between
    again = _run(policy, images, proprio, text)  # _run resets
    assert torch.equal(first, again)
    policy.reset()
    assert policy.state.num_entries == 0 and policy.state.kv_bytes() == 0 and policy.state.step == 0


def test_history_misuse_names_the_problem():
    model = _tiny_history_model()
    images, proprio, text = _episode(frames=2)
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full")
    policy.step(images[:1], text, proprio[:1])
    with pytest.raises(HistoryError, match="instruction changed"):
        policy.step(images[1:2], text + 1, proprio[1:2])
    with pytest.raises(ValueError, match="not a history method"):
        HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "vla_cache")
    with pytest.raises(ValueError, match="history method"):
        CachedVLAPolicy(model, "history_full")
    with pytest.raises(ValueError, match="frames >= 0"):
        parse_method("history_window:frames=-1")


def test_cache_edits_keep_position_order():
    model = _tiny_history_model()
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full")
    images, proprio, text = _episode(frames=3)
    policy.reset()
    for i in range(3):
        policy.step(images[i:i + 1], text, proprio[i:i + 1])
    state, layout = policy.state, policy.layout
    with pytest.raises(HistoryError, match="ascending"):
        state.keep(torch.tensor([3, 1]))
    layers = state.layers()
    run = slice(0, layout.frame_len)
    pooled_keys = [layer.keys[:, :, run].mean(2, keepdim=True) for layer in layers]
    pooled_values = [layer.values[:, :, run].mean(2, keepdim=True) for layer in layers]
    state.replace_run(0, layout.frame_len, pooled_keys, pooled_values, frame=0)
    assert state.num_entries == 2 * layout.frame_len + 1
    assert state.entry_kind[0] == POOLED and (state.entry_kind[1:] == FRAME).all()
    assert (state.entry_position.diff() > 0).all()
    assert torch.equal(layers[0].keys[:, :, :1], pooled_keys[0])
    with pytest.raises(HistoryError, match="cannot be replaced"):
        state.replace_run(1, 2, [layer.keys[:, :, :2] for layer in layers], [layer.values[:, :, :2] for layer in layers], 1)


def test_sequence_mask_reads_only_frames_never_other_queries():
    layout = HistoryLayout(num_text=2, num_visual=3, num_action_tokens=2)  # frame 5 rows, query 4
    mask = layout.sequence_mask(3)
    block = layout.block_len
    query_rows = [t * block + layout.frame_len + j for t in range(3) for j in range(layout.query_len)]
    # a step's query rows are seen by its own later rows only
    for row in query_rows:
        seen_by = torch.nonzero(mask[:, row]).flatten()
        assert seen_by.min() >= row and seen_by.max() < (row // block + 1) * block
    # the last step's placeholders see every frame row and their own block
    last = mask[-1]
    expected = torch.zeros_like(last)
    for t in range(3):
        expected[t * block:t * block + layout.frame_len] = True
    expected[2 * block:] = True
    assert torch.equal(last, expected)
    windowed = layout.sequence_mask(3, window=1)[-1]
    assert not windowed[:layout.frame_len].any() and windowed[block:block + layout.frame_len].all()


def test_memory_tasks_are_named_beside_mt10():
    assert set(MEMORY_TASKS) <= set(ALL_TASKS) and not set(MEMORY_TASKS) & set(TASKS)
    for name, variant in MEMORY_TASKS.items():
        assert base_task(name) == variant.base and ALL_TASKS[name] == TASKS[variant.base]
    assert parse_tasks("mt10") == list(TASKS)
    assert parse_tasks("memory,reach-v3") == [*MEMORY_TASKS, "reach-v3"]
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("reach-v9")


@pytest.mark.skipif(__import__("importlib").util.find_spec("metaworld") is None, reason="needs metaworld")
def test_a_memory_task_shows_its_goal_only_in_the_first_steps():
    from kvla.testbed.sim import SimEnv, expert_action

    name = "push-hidden-goal-v3"
    visible = MEMORY_TASKS[name].visible_steps
    with SimEnv(name, 3) as env:
        obs = env.reset()
        shown = []
        for step in range(visible + 2):
            # the same state rendered with and without the marker: only the marker's pixels differ
            env._live_env.model.site_rgba[env._goal_site, 3] = 0.0
            hidden = env._render(env.cameras[0], env._camera_ids[0])
            shown.append(not np.array_equal(hidden, obs["image"]))
            obs, _, _ = env.step(expert_action(name, obs["state"]))
        assert shown == [True] * visible + [False] * 2
        assert env.instruction == TASKS["push-v3"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("metaworld") is None, reason="needs metaworld")
def test_history_closed_loop_in_the_simulator(tmp_path):
    """The eval path builds history policies for a history checkpoint, pairs them against
    history_full, executes frame_stride actions per call and records the cache at every step."""
    from conftest import make_history_checkpoint
    from kvla.testbed import evaluate

    make_history_checkpoint(tmp_path)
    assert evaluate.reference_method(tmp_path) == "history_full"
    results = evaluate.run_closed_loop(str(tmp_path), ["history_full", "no_history", "history_window:frames=1"],
                                       ["push-hidden-goal-v3"], 1, max_steps=12, workers=1, progress=False)
    full, none, window = results[0]
    assert full.steps == none.steps == window.steps == 12  # random weights never succeed: 3 calls of 4 actions
    assert full.attended == [0, 34, 68] and none.attended == [0, 0, 0] and window.attended == [0, 34, 34]
    assert full.kv_bytes[0] < full.kv_bytes[1] < full.kv_bytes[2] and none.kv_bytes == [0, 0, 0]
    assert full.attention_flops[2] > full.attention_flops[1] > full.attention_flops[0] == none.attention_flops[2]
    summaries = evaluate.summarise(results, [o.method for o in results[0]])
    assert [s.method for s in summaries if s.task == "all"] == ["history_full", "no_history", "history_window:frames=1"]


def test_a_history_step_refuses_bad_input_before_it_enters_the_cache():
    from kvla.model.inputs import InputError

    model = VLAModel.from_preset("tiny", seed=0, proprio_dim=4, parallel_actions=True, action_chunk=2,
                                 num_cameras=2).float()
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), "history_full")
    images = torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8)
    text = torch.ones(1, model.config.num_text_tokens, dtype=torch.long)
    policy.step(images, text, torch.zeros(1, 4))
    entries = policy.state.num_entries
    with pytest.raises(InputError, match=r"proprio: holds nan at \[0, 1\]"):
        policy.step(images, text, torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(InputError, match=r"text_ids: id 99999 is outside the vocabulary"):
        policy.step(images, text.index_fill(1, torch.tensor([0]), 99999), torch.zeros(1, 4))
    assert policy.state.num_entries == entries and policy.state.step == 1
