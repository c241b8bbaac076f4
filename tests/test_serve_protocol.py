"""openpi's msgpack-numpy wire format: packing laid out as openpi_client/msgpack_numpy.py lays it
out, and an unpacker that turns anything hostile into a ProtocolError."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvla.serve.protocol import DecodeLimits, ProtocolError, pack, unpack


def test_arrays_and_scalars_are_laid_out_as_openpi_lays_them_out():
    frame = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    expected = msgpack.packb({"image": {b"__ndarray__": True, b"data": frame.tobytes(), b"dtype": "|u1",
                                        b"shape": (2, 2, 3)},
                              "flag": {b"__npgeneric__": True, b"data": True, b"dtype": "|b1"},
                              "prompt": "push the puck"})
    assert pack({"image": frame, "flag": np.bool_(True), "prompt": "push the puck"}) == expected
    with pytest.raises(ValueError, match="object"):
        pack({"bad": np.array([object()])})


@pytest.mark.parametrize("dtype", ["|u1", "|b1", "<i4", "<i8", "<f4", "<f8", ">f4", ">i8"])
def test_accepted_arrays_round_trip_writable_and_native(dtype):
    array = (np.arange(24) % 2 == 1) if dtype == "|b1" else np.arange(24)
    array = array.astype(np.dtype(dtype)).reshape(2, 3, 4)
    decoded = unpack(pack({"x": array}))["x"]
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable and decoded.dtype.isnative and decoded.shape == (2, 3, 4)


def _array_map(data=b"\0" * 4, dtype="<f4", shape=(1,), **extra):
    return msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape, **extra}})


HOSTILE = {
    "truncated": (pack({"x": np.zeros(10, np.float32)})[:-3], "well-formed"),
    "a reserved byte": (b"\xc1", "well-formed"),
    "data shorter than the shape": (_array_map(data=b"abc"), "needs 4 bytes"),
    "a huge declared shape": (_array_map(shape=(1 << 20, 1 << 20)), "exceeds the limit"),
    "a negative dim": (_array_map(shape=(-1,)), "non-negative"),
    "too many dims": (_array_map(data=b"\0" * 4, shape=(1,) * 9), "at most 5"),
    "a float shape": (_array_map(shape=(1.0,)), "list of integers"),
    "an object dtype": (_array_map(dtype="|O"), "not accepted"),
    "a sub-array dtype": (_array_map(dtype="(1000000000,)f8"), "not accepted"),
    "a complex dtype": (_array_map(data=b"\0" * 8, dtype="<c8"), "not accepted"),
    "an unknown dtype": (_array_map(dtype="<q9"), "not a numpy dtype"),
    "a dtype that is not a string": (_array_map(dtype=5), "must be a string"),
    "an extra key in an array": (_array_map(extra=1), "exactly the keys"),
    "an extension type": (msgpack.packb({"x": msgpack.ExtType(7, b"payload")}), "extension type 7"),
    "a timestamp": (msgpack.packb({"x": msgpack.Timestamp(1, 0)}), "a Timestamp is not accepted"),
    "an integer map key": (msgpack.packb({1: 2}), "well-formed"),
    "deep nesting": (b"\x91" * 100_000, "well-formed"),
    "a scalar of bytes": (msgpack.packb({"x": {b"__npgeneric__": True, b"data": b"\0", b"dtype": "<f4"}}), "needs a number"),
    "an overflowing scalar": (msgpack.packb({"x": {b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}}), "does not fit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_messages_raise_a_protocol_error_naming_the_problem(case):
    data, fragment = HOSTILE[case]
    with pytest.raises(ProtocolError, match=fragment):
        unpack(data)


def test_the_message_size_limit_and_a_text_frame():
    with pytest.raises(ProtocolError, match="exceeds the limit of 100"):
        unpack(pack({"x": np.zeros(1000, np.uint8)}), DecodeLimits(max_message_bytes=100))
    with pytest.raises(ProtocolError, match="binary frame, got str"):
        unpack("a text frame")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_a_protocol_error(data):
    try:
        unpack(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["|u1", "<f4", "<i8", "|b1"]),
       st.lists(st.integers(-2, 40), max_size=4))
def test_arbitrary_array_maps_decode_to_their_shape_or_raise_a_protocol_error(data, dtype, shape):
    try:
        array = unpack(_array_map(data=data, dtype=dtype, shape=shape))["x"]
    except ProtocolError:
        return
    assert list(array.shape) == shape and array.nbytes == len(data)


def test_a_frame_of_a_million_empty_maps_is_refused_before_it_is_built():
    import time

    count = 1_000_000
    data = b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="well-formed"):
        unpack(data)
    assert time.perf_counter() - started < 1.0  # refused from the header, not after building the list
