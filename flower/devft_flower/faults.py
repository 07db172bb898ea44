"""Malformed replies, made on purpose by a ClientApp under the run config's `fault`.

A devft message is `DEVFTMSG`, the protocol version (u32 LE), the JSON header's length
(u64 LE), the JSON header, then one safetensors buffer (u64 LE header length, JSON header,
data). `nan` rewrites the first value of the first non-empty F32 tensor in that buffer.
"""

from __future__ import annotations

import json
import random
import struct

MAGIC = b"DEVFTMSG"
PREAMBLE = 8 + 4 + 8


def set_first_float_nan(message: bytes) -> bytes:
    """The message with its first float32 tensor value replaced by NaN."""
    if message[:8] != MAGIC or len(message) < PREAMBLE:
        raise ValueError("not a devft message")
    (header_len,) = struct.unpack_from("<Q", message, 12)
    tensors_at = PREAMBLE + header_len
    (st_header_len,) = struct.unpack_from("<Q", message, tensors_at)
    st_header = json.loads(message[tensors_at + 8 : tensors_at + 8 + st_header_len])
    data_at = tensors_at + 8 + st_header_len
    for name, info in sorted(st_header.items()):
        if name == "__metadata__" or info.get("dtype") != "F32":
            continue
        begin, end = info["data_offsets"]
        if end - begin >= 4:
            out = bytearray(message)
            out[data_at + begin : data_at + begin + 4] = struct.pack("<f", float("nan"))
            return bytes(out)
    raise ValueError("the message has no float32 value")


def corrupt(kind: str, reply: bytes, max_reply_bytes: int, seed: int) -> bytes:
    """The reply made malformed as `kind` says (see settings.FAULT_KINDS)."""
    if kind == "garbage":
        rng = random.Random(seed)
        return bytes(rng.getrandbits(8) for _ in range(len(reply)))
    if kind == "truncated":
        return reply[: len(reply) // 2]
    if kind == "oversized":
        return reply + b"\0" * max(max_reply_bytes + 1 - len(reply), 1)
    if kind == "nan":
        return set_first_float_nan(reply)
    raise ValueError(f"fault `{kind}` does not rewrite bytes")
