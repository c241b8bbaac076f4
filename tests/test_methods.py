"""Reuse methods: what they select, their schedules, and their settings."""

import math

import pytest
import torch

from kvla import EpisodeState, TokenLayout
from kvla.methods import (FastV, PlanContext, StaticReuse, VLACache, code_reuse_ratios, method_label,
                          paper_reuse_ratios, parse_method)
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy

LAYOUT = TokenLayout.single_prompt(num_visual=8, num_text=3)


def _state(source_patches, step=1, relevance=None, entropy=None):
    state = EpisodeState()
    state.cache = object()  # only has_cache is read by the planners
    state.source_patches = source_patches
    state.source_step = torch.zeros(source_patches.shape[:2], dtype=torch.long)
    state.kv_complete = torch.ones(source_patches.shape[:2], dtype=torch.bool)
    state.step = step
    state.relevance = relevance
    state.layer_entropy = entropy
    return state


def _patches(values):
    """One patch per value: patch i = [1, values[i]], so similarity to [1, 0] is known. Not RGB pixels:
    the tests that use them name the paper's cosine rule (the photometric one needs RGB patches)."""
    return torch.tensor([[[1.0, v] for v in values]])


def test_static_reuses_exactly_the_patches_above_tau():
    source = _patches([0.0] * 8)
    current = _patches([0.0, 0.0, 1.0, 0.0, 0.05, 0.0, 0.2, 0.0])  # cos of [1,v] vs [1,0] = 1/sqrt(1+v^2)
    ctx = PlanContext(patches=current, state=_state(source), layout=LAYOUT, num_layers=4)
    plan = StaticReuse(change="cosine", tau=0.996).plan(ctx)
    assert plan.visual_depth.tolist() == [[0, 0, 4, 0, 0, 0, 4, 0]]  # 1/sqrt(1.0025)=0.9988 stays static


def test_first_step_of_an_episode_is_full_for_every_method():
    ctx = PlanContext(patches=_patches([0.0] * 8), state=EpisodeState(), layout=LAYOUT, num_layers=4)
    for method in (StaticReuse(), VLACache(), FastV()):
        plan = method.plan(ctx)
        assert (plan.visual_depth == 4).all()


def test_vla_cache_top_k_relevance_and_empty_set():
    source = _patches([0.0] * 8)
    current = _patches([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.5, 0.6])  # 6 static, graded similarity
    relevance = torch.tensor([[0.9, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]])  # token 0 is task-relevant
    state = _state(source, relevance=relevance)
    ctx = PlanContext(patches=current, state=state, layout=LAYOUT, num_layers=4)
    plan = VLACache(change="cosine", top_k=3, schedule="none").plan(ctx)
    # top-3 most static are 0, 1, 2; 0 is removed by the relevance threshold (normalised 1.0 > 0.5)
    assert plan.visual_depth.tolist() == [[4, 0, 0, 4, 4, 4, 4, 4]]
    plan = VLACache(change="cosine", top_k=3, schedule="none", relevance_rule="top_k", task_top_k=2).plan(ctx)
    assert plan.visual_depth.tolist() == [[4, 0, 0, 4, 4, 4, 4, 4]]  # removes 0 and 3; 3 was not kept anyway
    # nothing static -> nothing reused, no crash
    moving = _patches([1.0] * 8)
    empty = VLACache(change="cosine", schedule="paper").plan(PlanContext(
        patches=moving, state=_state(source, relevance=relevance, entropy=torch.tensor([[4.0, 3.0, 2.0, 1.0]])),
        layout=LAYOUT, num_layers=4))
    assert (empty.visual_depth == 4).all()


def test_paper_schedule_formula():
    entropy = torch.tensor([[4.0, 3.0, 2.4, 2.4]])
    # R = [0.25, 0.2, 0.0]; alpha = min(k * cumsum, 1) with alpha_0 = 0
    ratios = paper_reuse_ratios(entropy, k=2.0)
    assert torch.allclose(ratios, torch.tensor([[0.0, 0.5, 0.9, 0.9]]))
    rising = paper_reuse_ratios(torch.tensor([[2.0, 3.0, 1.5]]), k=1.0)  # negative R never un-reuses
    assert torch.allclose(rising, torch.tensor([[0.0, 0.0, 0.0]])) or (rising.diff(dim=1) >= 0).all()
    assert (rising.diff(dim=1) >= 0).all()


def test_code_schedule_applies_only_at_its_layers():
    entropy = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])  # raw 1 - minmax = [0, .25, .5, .75, 1]
    ratios = code_reuse_ratios(entropy, smoothing=0.5, layers=(2, 4))
    # smoothed: 0, .125, .3125, .53125, .765625 ; applied at 2 and 4 only
    assert torch.allclose(ratios, torch.tensor([[0.0, 0.0, 0.3125, 0.3125, 0.765625]]))


def test_layer_schedule_depths_follow_the_ratios():
    source = _patches([0.0] * 8)
    current = _patches([0.0, 0.01, 0.02, 0.03, 0.5, 0.5, 0.5, 0.5])  # 4 static, most static first
    entropy = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # R = .25, .333, .5 -> k=1: alpha = 0, .25, .583, 1
    ctx = PlanContext(patches=current, state=_state(source, entropy=entropy), layout=LAYOUT, num_layers=4)
    plan = VLACache(change="cosine", top_k=8, schedule="paper", entropy_k=1.0).plan(ctx)
    # quota per layer floor(alpha * 4) = 0, 1, 2, 4 -> ranks 0..3 reused from layers 1, 2, 3, 3
    assert plan.visual_depth.tolist() == [[1, 2, 3, 3, 4, 4, 4, 4]]


def test_static_detection_compares_with_the_source_frame_and_max_age():
    torch.manual_seed(0)
    model = VLAModel.from_preset("tiny")
    base = torch.randint(60, 200, (1, 32, 32, 3), dtype=torch.uint8)
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    policy = CachedVLAPolicy(model, StaticReuse(tau=0.9995))
    policy.reset()
    policy.step(base, text)
    # drift the image slowly: each frame is static w.r.t. the previous one, not w.r.t. the source
    direction = torch.where(torch.rand(base.shape) < 0.5, -3, 3)
    frames = [(base.int() + k * direction).to(torch.uint8) for k in range(1, 5)]
    patches = [model.image_patches(model.policy_images(f)) for f in [base, *frames]]
    cos = torch.nn.functional.cosine_similarity
    assert (cos(patches[1], patches[2], dim=-1) >= 0.9995).all()  # consecutive frames look static
    assert (cos(patches[0], patches[2], dim=-1) < 0.9995).all()  # but not against the source frame
    reused = [policy.step(f, text).reuse_ratio for f in frames]
    assert reused[0] == 1.0
    assert reused[1] == 0.0  # compared with the source frame (base), not the previous frame
    # max_age forces a recompute even of an unchanged frame
    aged = CachedVLAPolicy(model, StaticReuse(max_age=2))
    ratios = [aged.step(base, text).reuse_ratio for _ in range(4)]
    assert ratios == [0.0, 1.0, 0.0, 1.0]


def test_fastv_drops_tokens_after_its_layer():
    model = VLAModel.from_preset("tiny", num_layers=4)
    policy = CachedVLAPolicy(model, FastV(layer=1, ratio=0.5))
    frame = torch.randint(0, 255, (1, 32, 32, 3), dtype=torch.uint8)
    out = policy.step(frame, torch.randint(3, 200, (1, model.config.num_text_tokens)))
    seq = model.layout.seq_len
    assert out.computed_tokens == [seq, seq, seq - 8, seq - 8]
    assert out.reuse_ratio == pytest.approx(0.5 * 2 / 4)
    # its next step cannot reuse the pruned tokens' incomplete K/V
    assert not policy.state.kv_complete.all()


def test_parse_method_and_label():
    method = parse_method("vla_cache:top_k=180:relevance_layers=2/5:schedule=none")
    assert isinstance(method, VLACache) and method.top_k == 180 and method.relevance_layers == (2, 5)
    assert method_label(method) == "vla_cache:top_k=180:relevance_layers=2/5:schedule=none"
    for bad, message in [("nope", "unknown method"), ("vla_cache:top_k", "key=value"),
                         ("vla_cache:topk=3", "no setting"), ("vla_cache:top_k=x", "not a valid int"),
                         ("vla_cache:schedule=fast", "schedule must be")]:
        with pytest.raises(ValueError, match=message):
            parse_method(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_method_runs_a_batch_of_two_over_real_frames(dtype):
    from kvla.measure.frames import load_frames

    frames = load_frames().frames[:4]
    model = VLAModel.from_preset("tiny").to(dtype)
    text = torch.randint(3, 200, (2, model.config.num_text_tokens))
    for spec in ("full", "static", "vla_cache", "vla_cache:schedule=code", "fastv", "periodic"):
        policy = CachedVLAPolicy(model, spec)
        for t in range(3):
            batch = torch.stack([frames[t], frames[t + 1]])
            out = policy.step(batch, text)
            assert out.action_tokens.shape == (2, 7)
            assert out.actions.min() >= -1 and out.actions.max() <= 1
            assert not math.isnan(out.logits.sum().item())


def test_code_schedule_recomputes_the_entropy_at_every_step():
    model = VLAModel.from_preset("tiny")
    torch.manual_seed(0)
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    base = torch.randint(60, 200, (1, 32, 32, 3), dtype=torch.uint8)
    frames = [base, base, (base.int() + 40).clamp(0, 255).to(torch.uint8), base]
    method = VLACache(schedule="code", relevance_rule="top_k", task_top_k=2)
    policy = CachedVLAPolicy(model, method)
    seen = []
    for frame in frames:
        ctx = PlanContext(patches=model.image_patches(model.policy_images(frame)), state=policy.state,
                          layout=model.layout, num_layers=3)
        used = policy.state.layer_entropy
        assert method.plan(ctx).collect_entropy  # every step collects the entropy the next step uses
        policy.step(frame, text)
        seen.append(policy.state.layer_entropy)
        assert seen[-1] is not used
    assert not torch.equal(seen[1], seen[2])  # a different frame gives a different schedule
    # the paper's schedule takes the entropy once, from the first (full) frame
    paper = CachedVLAPolicy(model, "vla_cache")
    paper.step(base, text)
    first = paper.state.layer_entropy
    paper.step(base, text)
    assert paper.state.layer_entropy is first


def test_official_code_settings_are_expressible():
    from kvla.methods.vla_cache import OFFICIAL_CODE_SPEC

    method = parse_method(OFFICIAL_CODE_SPEC)
    assert (method.top_k, method.relevance_rule, method.task_top_k, method.schedule) == (130, "top_k", 100, "code")
    for num_layers, layer in [(32, 15), (16, 8), (3, 1)]:
        ctx = PlanContext(patches=_patches([0.0] * 8), state=EpisodeState(), layout=LAYOUT, num_layers=num_layers)
        assert method.plan(ctx).relevance_layers == (layer,)  # round(15 * L / 32)
        assert VLACache().plan(ctx).relevance_layers == (num_layers // 2,)  # default: the middle layer
    assert VLACache().task_top_k == 100
    with pytest.raises(ValueError, match="relevance_depth"):
        VLACache(relevance_depth=1.5)


def _plain_actions(model, frames, text):
    """The plain model's own forward and greedy generate on the same prompt."""
    embeds = model.prompt_embeddings(model.encode_images(model.policy_images(frames)), text)
    lm = model.language_model
    with torch.no_grad():
        logits = lm(inputs_embeds=embeds).logits[:, -1:]
        tokens = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    return logits, tokens


def test_every_method_handles_two_cameras():
    model = VLAModel.from_preset("tiny", num_cameras=2)
    assert model.layout.visual_spans == ((1, 17), (17, 33))
    torch.manual_seed(0)
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    base = torch.randint(60, 200, (1, 2, 32, 32, 3), dtype=torch.uint8)
    moved = base.clone()
    moved[:, 1] = 255 - moved[:, 1]  # the wrist camera changes completely, the main camera does not
    frames = [base, base, moved, torch.randint(60, 200, base.shape, dtype=torch.uint8)]
    top_k = 5
    specs = ["full", "static", f"vla_cache:top_k={top_k}:relevance_rule=top_k:task_top_k=0:schedule=none",
             f"vla_cache:top_k={top_k}:schedule=code", "fastv", "periodic:every=2"]
    for spec in specs:
        policy = CachedVLAPolicy(model, spec)
        for t, frame in enumerate(frames):
            out = policy.step(frame, text)
            reused = (out.visual_depth < 3).view(2, 16).sum(1).tolist()  # per camera
            if spec == "fastv":
                assert sum(reused) == 16  # half of all 32 visual tokens dropped
                continue
            if spec.startswith("vla_cache"):
                assert max(reused) <= top_k
            if spec.startswith("vla_cache:top_k=5:relevance"):
                # unchanged cameras reuse exactly their own top-k; a changed camera reuses nothing
                assert reused == {0: [0, 0], 1: [top_k, top_k], 2: [top_k, 0], 3: [0, 0]}[t]
            if spec == "static":
                assert reused == {0: [0, 0], 1: [16, 16], 2: [16, 0], 3: [0, 0]}[t]
            if spec.startswith("periodic"):
                assert reused == ([0, 0] if t % 2 == 0 else [16, 16])  # both cameras, whatever changed
            if out.reuse_ratio == 0.0:
                logits, tokens = _plain_actions(model, frame, text)
                assert (out.logits - logits).abs().max() < 1e-4
                assert torch.equal(out.action_tokens, tokens)


def test_embedding_similarity_selects_by_decoder_input_not_pixels():
    # pixels identical everywhere, but the embeddings of tokens 2 and 5 moved: only they are recomputed
    source = _patches([0.0] * 8)
    state = _state(source)
    state.source_embeddings = torch.ones(1, 8, 4)
    moved = torch.ones(1, 8, 4)
    moved[0, 2] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # cos 0
    moved[0, 5] = torch.tensor([1.0, 1.0, 1.0, 0.8])  # cos 0.994 < 0.996
    ctx = PlanContext(patches=source.clone(), state=state, layout=LAYOUT, num_layers=4, visual_embeddings=moved)
    by_pixels = VLACache(change="cosine", schedule="none", top_k=8).plan(ctx)
    by_embeddings = VLACache(change="cosine", schedule="none", top_k=8, similarity="embeddings").plan(ctx)
    assert (by_pixels.visual_depth == 0).all()
    assert by_embeddings.visual_depth.tolist() == [[0, 0, 4, 0, 0, 4, 0, 0]]
    with pytest.raises(ValueError, match="similarity"):
        VLACache(similarity="features")
    no_embeddings = PlanContext(patches=source.clone(), state=state, layout=LAYOUT, num_layers=4)
    with pytest.raises(RuntimeError, match="embedding"):
        VLACache(schedule="none", similarity="embeddings").plan(no_embeddings)


def test_source_embeddings_follow_the_recomputed_tokens():
    model = VLAModel.from_preset("tiny")
    torch.manual_seed(0)
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    base = torch.randint(60, 200, (1, 32, 32, 3), dtype=torch.uint8)
    changed = base.clone()
    changed[:, :8, :8] = 0  # one corner patch changes
    visual = model.layout.visual_positions

    def embeddings_of(frame):
        images = model.policy_images(frame)
        return model.prompt_embeddings(model.encode_images(images), text, None)[:, visual].float()

    # the encoder mixes the whole image: every embedding moves, the changed patch's most
    similarity = torch.nn.functional.cosine_similarity(embeddings_of(changed), embeddings_of(base), dim=-1)
    tau = similarity.median().item()
    policy = CachedVLAPolicy(model, f"vla_cache:schedule=none:similarity=embeddings:tau={tau}:top_k=64")
    policy.step(base, text)
    assert torch.equal(policy.state.source_embeddings, embeddings_of(base))
    out = policy.step(changed, text)
    recomputed = out.visual_depth >= policy.engine.num_layers
    assert recomputed.any() and not recomputed.all()
    assert recomputed[similarity < tau].all()  # every token whose embedding moved more than tau is recomputed
    expected = torch.where(recomputed[..., None], embeddings_of(changed), embeddings_of(base))
    assert torch.equal(policy.state.source_embeddings, expected)


def test_periodic_refreshes_every_n_calls_and_reuses_the_refreshed_kv_in_between():
    model = VLAModel.from_preset("tiny")
    torch.manual_seed(0)
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    frames = [torch.randint(60, 200, (1, 32, 32, 3), dtype=torch.uint8) for _ in range(7)]
    frames[1] = frames[0]  # the first reused call sees the refresh frame itself
    policy = CachedVLAPolicy(model, "periodic:every=3")
    outputs = [policy.step(frame, text) for frame in frames]
    for t, out in enumerate(outputs):
        if t % 3 == 0:  # refresh: everything computed, equal to the plain model's forward
            assert out.reuse_ratio == 0.0
            logits, tokens = _plain_actions(model, frames[t], text)
            assert (out.logits - logits).abs().max() < 1e-4
            assert torch.equal(out.action_tokens, tokens)
        else:  # every visual token reused in every layer
            assert out.reuse_ratio == 1.0 and (out.visual_depth == 0).all()
    # reusing the refresh frame's own K/V is exact
    plain_logits, _ = _plain_actions(model, frames[0], text)
    assert (outputs[1].logits - plain_logits).abs().max() < 1e-4
    # between refreshes the output does not depend on the frame at all, only on the last refresh
    assert (outputs[2].logits - outputs[1].logits).abs().max() < 1e-5
    assert (outputs[4].logits - outputs[1].logits).abs().max() > 1e-3  # a new refresh at call 3
    # every=1 is full
    full = CachedVLAPolicy(model, "periodic:every=1")
    assert all(full.step(frame, text).reuse_ratio == 0.0 for frame in frames[:3])
    with pytest.raises(ValueError, match="every >= 1"):
        parse_method("periodic:every=0")
