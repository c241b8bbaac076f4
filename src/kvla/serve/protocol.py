"""openpi's wire format, so that robot code using `openpi-client` talks to kvla unchanged: msgpack
with numpy arrays as maps {b"__ndarray__": True, b"data", b"dtype", b"shape"} and numpy scalars as
{b"__npgeneric__": True, b"data", b"dtype"} (openpi_client/msgpack_numpy.py).

Packing matches openpi byte for byte. Unpacking is hardened, as openpi's is not: whatever a client
sends, it either decodes to plain values and writable native-endian arrays of a few numeric
dtypes whose bytes match their shape, or raises ProtocolError naming what was wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import numpy as np

ARRAY_KEY, SCALAR_KEY = b"__ndarray__", b"__npgeneric__"
ARRAY_FIELDS = {ARRAY_KEY, b"data", b"dtype", b"shape"}
SCALAR_FIELDS = {SCALAR_KEY, b"data", b"dtype"}
# what an observation can need: camera frames, token ids, flags, robot state
ACCEPTED_KINDS = {"b": "bool", "u": "unsigned integer", "i": "integer", "f": "floating point"}


class ProtocolError(ValueError):
    """A message that is not well-formed openpi msgpack-numpy, or exceeds a limit."""


@dataclass(frozen=True)
class DecodeLimits:
    max_message_bytes: int = 64 << 20
    max_array_elements: int = 16 << 20
    max_array_dims: int = 5
    max_container_len: int = 1024  # entries of one msgpack map or list
    max_str_len: int = 1 << 16


def _encode(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"cannot send numpy dtype {obj.dtype} (void, object and complex are not supported)")
    if isinstance(obj, np.ndarray):
        return {ARRAY_KEY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {SCALAR_KEY: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def pack(obj) -> bytes:
    """obj (dicts, lists, str, numbers, numpy arrays and scalars) -> one binary frame."""
    return msgpack.packb(obj, default=_encode)


def _dtype(value) -> np.dtype:
    if not isinstance(value, str):
        raise ProtocolError(f"an array's dtype must be a string such as '<f4', got {type(value).__name__}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"dtype {value!r} is not accepted: not a numpy dtype") from None
    if dtype.kind not in ACCEPTED_KINDS or dtype.subdtype is not None or dtype.itemsize > 8:
        raise ProtocolError(f"dtype {value!r} is not accepted: only bool, integers and floats up to 8 bytes")
    return dtype


def _array(fields: dict, limits: DecodeLimits) -> np.ndarray:
    if set(fields) != ARRAY_FIELDS:
        raise ProtocolError(f"an encoded array needs exactly the keys {sorted(k.decode() for k in ARRAY_FIELDS)}")
    dtype, shape, data = _dtype(fields[b"dtype"]), fields[b"shape"], fields[b"data"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"an array's shape must be a list of integers, got {shape!r}")
    if len(shape) > limits.max_array_dims or any(d < 0 for d in shape):
        raise ProtocolError(f"shape {list(shape)} is not accepted (at most {limits.max_array_dims} non-negative dims)")
    elements = math.prod(shape)
    if elements > limits.max_array_elements:
        raise ProtocolError(f"an array of {elements} elements exceeds the limit of {limits.max_array_elements}")
    if not isinstance(data, bytes) or len(data) != elements * dtype.itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ProtocolError(f"an array of shape {list(shape)} and dtype {dtype.str} needs {elements * dtype.itemsize} "
                            f"bytes of data, got {size}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def _scalar(fields: dict):
    if set(fields) != SCALAR_FIELDS:
        raise ProtocolError(f"an encoded numpy scalar needs exactly the keys {sorted(k.decode() for k in SCALAR_FIELDS)}")
    value, dtype_name = fields[b"data"], fields[b"dtype"]
    if isinstance(dtype_name, str) and dtype_name.lstrip("<>|=").startswith("U") and isinstance(value, str):
        return np.str_(value)  # openpi clients may send a prompt as a numpy string
    dtype = _dtype(dtype_name)
    if isinstance(value, bytes) or not isinstance(value, (bool, int, float)):
        raise ProtocolError(f"a numpy {dtype} scalar needs a number, got {type(value).__name__}")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError):
        raise ProtocolError(f"{value!r} does not fit a numpy {dtype} scalar") from None


PLAIN_TYPES = (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)


def _check_plain(message) -> None:
    """Only maps, lists and plain values: msgpack decodes its timestamp extension itself."""
    pending = [message]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif not isinstance(value, PLAIN_TYPES):
            raise ProtocolError(f"a {type(value).__name__} is not accepted in a message")


def _refuse_extension(code, data):
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def unpack(data: bytes, limits: DecodeLimits = DecodeLimits()):
    """One binary frame -> the message; ProtocolError on anything malformed or over the limits."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary frame, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise ProtocolError(f"a message of {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")

    def hook(fields: dict):
        if ARRAY_KEY in fields:
            return _array(fields, limits)
        if SCALAR_KEY in fields:
            return _scalar(fields)
        return fields

    try:
        # arrays travel as bin: an observation needs only small maps, lists and strings, and these
        # caps keep a frame of millions of empty maps from stalling the event loop
        message = msgpack.unpackb(bytes(data), object_hook=hook, ext_hook=_refuse_extension,
                                  max_map_len=limits.max_container_len, max_array_len=limits.max_container_len,
                                  max_str_len=limits.max_str_len)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.exceptions.UnpackException, RecursionError) as error:
        raise ProtocolError(f"not a well-formed msgpack message: {str(error) or type(error).__name__}") from None
    _check_plain(message)
    return message
