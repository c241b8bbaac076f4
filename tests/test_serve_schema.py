"""The served observation: parsed into exactly what the in-process policy takes, and refused
field by field otherwise, before anything reaches the episode."""

import numpy as np
import pytest
import torch

from kvla.model.inputs import InputError
from kvla.model.reference import InstructionTokenizer
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.serve.protocol import pack, unpack
from kvla.serve.schema import ObservationSchema

CAMERAS = ("corner2", "gripperPOV")


@pytest.fixture(scope="module")
def served():
    tokenizer = InstructionTokenizer.from_instructions(["push the puck to the goal", "open the drawer"])
    model = VLAModel.from_preset("tiny", seed=0, proprio_dim=4, num_cameras=2, vocab_size=tokenizer.text_vocab_size + 256,
                                 num_text_tokens=tokenizer.max_length)
    return model, ObservationSchema(model.config, CAMERAS, tokenizer, max_image_side=64), tokenizer


def _observation(seed=0, **changes):
    rng = np.random.default_rng(seed)
    observation = {"images": {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in CAMERAS},
                   "prompt": "push the puck to the goal", "proprio": rng.standard_normal(4)}
    observation.update(changes)
    return {k: v for k, v in observation.items() if v is not None}


def test_a_parsed_observation_gives_the_in_process_policy_s_actions(served):
    model, schema, tokenizer = served
    observation = schema.parse(unpack(pack(_observation(reset=np.bool_(True)))))
    assert observation.reset is True
    served_tokens = CachedVLAPolicy(model, "full").step(observation.images, observation.text_ids,
                                                        observation.proprio).action_tokens
    raw = _observation()
    images = torch.from_numpy(np.stack([raw["images"][c] for c in CAMERAS]))[None]
    direct = CachedVLAPolicy(model, "full").step(images, tokenizer.encode_batch([raw["prompt"]]),
                                                 torch.from_numpy(raw["proprio"]).float()[None]).action_tokens
    assert torch.equal(served_tokens, direct)
    by_ids = schema.parse(_observation(prompt=None, text_ids=np.array(tokenizer.encode(raw["prompt"]))))
    assert torch.equal(by_ids.text_ids, observation.text_ids) and by_ids.reset is False


FRAME = np.zeros((32, 32, 3), np.uint8)
BAD = {
    "not a map": (["images"], "observation", "must be a map"),
    "an unknown field": (_observation(state=np.zeros(4)), "state", "unknown field"),
    "a missing camera": (_observation(images={"corner2": FRAME}), "images", "missing ['gripperPOV']"),
    "an unknown camera": (_observation(images={"corner2": FRAME, "gripperPOV": FRAME, "top": FRAME}), "images",
                          "unknown ['top']"),
    "a float frame": (_observation(images={"corner2": FRAME.astype(np.float32), "gripperPOV": FRAME}),
                      "images.corner2", "must be a uint8 [H, W, 3] array, got float32"),
    "a channels-first frame": (_observation(images={"corner2": np.zeros((3, 32, 32), np.uint8), "gripperPOV": FRAME}),
                               "images.corner2", "looks like channels first"),
    "a huge frame": (_observation(images={"corner2": np.zeros((65, 32, 3), np.uint8), "gripperPOV": FRAME}),
                     "images.corner2", "outside 1..64"),
    "a zero-sized frame": (_observation(images={"corner2": np.zeros((0, 32, 3), np.uint8), "gripperPOV": FRAME}),
                           "images.corner2", "outside 1..64"),
    "cameras of two sizes": (_observation(images={"corner2": FRAME, "gripperPOV": np.zeros((16, 16, 3), np.uint8)}),
                             "images.gripperPOV", "the same size"),
    "both prompt and ids": (_observation(text_ids=np.zeros(6, np.int64)), "prompt", "exactly one"),
    "neither prompt nor ids": (_observation(prompt=None), "prompt", "exactly one"),
    "an unknown word": (_observation(prompt="push the cat"), "prompt", "['cat']"),
    "a prompt that is too long": (_observation(prompt="push " * 200), "prompt", "exceeds the limit of 512"),
    "a prompt that is a number": (_observation(prompt=5), "prompt", "must be a string"),
    "float text ids": (_observation(prompt=None, text_ids=np.zeros(6)), "text_ids", "integer array"),
    "text ids past the vocabulary": (_observation(prompt=None, text_ids=np.full(6, 10 ** 6)), "text_ids",
                                     "ids must be in [0,"),
    "NaN proprio": (_observation(proprio=np.array([0.0, np.nan, 0.0, 0.0])), "proprio", "holds nan at [0, 1]"),
    "proprio that overflows float32": (_observation(proprio=np.array([1e300, 0.0, 0.0, 0.0])), "proprio", "holds inf"),
    "proprio as a list": (_observation(proprio=[0.0] * 4), "proprio", "must be a float array [4], got list"),
    "proprio of the wrong width": (_observation(proprio=np.zeros(3)), "proprio", "must be [batch=1, 4]"),
    "no proprio": (_observation(proprio=None), "proprio", "needs proprio"),
    "a reset that is a string": (_observation(reset="yes"), "reset", "must be a bool"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_observations_are_refused_naming_the_field(served, case):
    _, schema, _ = served
    observation, field, fragment = BAD[case]
    with pytest.raises(InputError) as error:
        schema.parse(observation)
    assert error.value.field == field and fragment in str(error.value)


def test_the_published_format_names_the_cameras_and_sizes(served):
    _, schema, _ = served
    described = unpack(pack(schema.describe()))  # it travels in the metadata
    assert described["images"]["cameras"] == list(CAMERAS) and described["proprio"]["shape"] == [4]
    assert described["text_ids"]["shape"] == [schema.config.num_text_tokens]


def _values():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    arrays = hnp.arrays(st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.bool_]),
                        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(), st.text(max_size=20))
    return st.recursive(st.one_of(scalars, arrays),
                        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                st.dictionaries(st.sampled_from(CAMERAS + ("x",)), inner, max_size=3)),
                        max_leaves=6)


def test_any_observation_map_parses_or_is_refused_naming_a_field(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, schema, _ = served
    keys = st.sampled_from(["images", "prompt", "text_ids", "proprio", "reset", "other"])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(keys, _values(), max_size=5), st.booleans())
    def check(observation, with_good_images):
        if with_good_images:  # so that the later fields are reached too
            observation["images"] = {c: np.zeros((8, 8, 3), np.uint8) for c in CAMERAS}
        try:
            parsed = unpack(pack(observation))
        except ValueError:
            return  # not sendable in the first place (e.g. a NaN key); the codec has its own tests
        try:
            schema.parse(parsed)
        except InputError as error:
            assert error.field and str(error).startswith(error.field)

    check()
