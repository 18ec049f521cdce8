"""AMF0, the encoding of RTMP's commands (connect, createStream, publish, onStatus):
the subset publishers send and servers answer with, decoded defensively (a malformed
or oversized value raises `AmfError`, never loops or allocates without bound)."""

from __future__ import annotations

import struct
import typing

NUMBER, BOOLEAN, STRING, OBJECT, NULL, UNDEFINED, ECMA_ARRAY, OBJECT_END, STRICT_ARRAY = (
    0, 1, 2, 3, 5, 6, 8, 9, 10)
MAX_DEPTH = 8
MAX_ITEMS = 256

Value = typing.Any  # float | bool | str | dict[str, Value] | list[Value] | None


class AmfError(ValueError):
    """Bytes that are not the AMF0 an RTMP publisher sends."""


def decode_all(data: bytes) -> list[Value]:
    """Every value in ``data``, in order."""
    out, pos = [], 0
    while pos < len(data):
        value, pos = _decode(data, pos, 0)
        out.append(value)
    return out


def _need(data: bytes, pos: int, n: int) -> None:
    if pos + n > len(data):
        raise AmfError("truncated AMF0 value")


def _string(data: bytes, pos: int, long: bool = False) -> tuple[str, int]:
    size_len = 4 if long else 2
    _need(data, pos, size_len)
    n = int.from_bytes(data[pos:pos + size_len], "big")
    pos += size_len
    _need(data, pos, n)
    return data[pos:pos + n].decode("utf-8", "replace"), pos + n


def _properties(data: bytes, pos: int, depth: int) -> tuple[dict[str, Value], int]:
    out: dict[str, Value] = {}
    while True:
        if len(out) > MAX_ITEMS:
            raise AmfError("an AMF0 object with too many properties")
        key, pos = _string(data, pos)
        _need(data, pos, 1)
        if key == "" and data[pos] == OBJECT_END:
            return out, pos + 1
        out[key], pos = _decode(data, pos, depth + 1)


def _decode(data: bytes, pos: int, depth: int) -> tuple[Value, int]:
    if depth > MAX_DEPTH:
        raise AmfError("AMF0 values nested too deep")
    _need(data, pos, 1)
    marker, pos = data[pos], pos + 1
    if marker == NUMBER:
        _need(data, pos, 8)
        return struct.unpack(">d", data[pos:pos + 8])[0], pos + 8
    if marker == BOOLEAN:
        _need(data, pos, 1)
        return data[pos] != 0, pos + 1
    if marker == STRING:
        return _string(data, pos)
    if marker == 0x0C:  # long string
        return _string(data, pos, long=True)
    if marker == OBJECT:
        return _properties(data, pos, depth)
    if marker == ECMA_ARRAY:
        _need(data, pos, 4)
        return _properties(data, pos + 4, depth)
    if marker == STRICT_ARRAY:
        _need(data, pos, 4)
        n = int.from_bytes(data[pos:pos + 4], "big")
        if n > MAX_ITEMS:
            raise AmfError("an AMF0 array with too many items")
        pos += 4
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if marker in (NULL, UNDEFINED):
        return None, pos
    raise AmfError(f"AMF0 marker {marker} is not one a publisher sends")


def encode(*values: Value) -> bytes:
    """AMF0 bytes of ``values`` (numbers, booleans, strings, dicts as objects, None)."""
    out = bytearray()
    for v in values:
        _encode(out, v)
    return bytes(out)


def _encode(out: bytearray, v: Value) -> None:
    if v is None:
        out.append(NULL)
    elif isinstance(v, bool):
        out += bytes((BOOLEAN, 1 if v else 0))
    elif isinstance(v, (int, float)):
        out.append(NUMBER)
        out += struct.pack(">d", float(v))
    elif isinstance(v, str):
        raw = v.encode()
        out.append(STRING)
        out += len(raw).to_bytes(2, "big") + raw
    elif isinstance(v, dict):
        out.append(OBJECT)
        for key, item in v.items():
            raw = key.encode()
            out += len(raw).to_bytes(2, "big") + raw
            _encode(out, item)
        out += b"\x00\x00" + bytes((OBJECT_END,))
    else:
        raise TypeError(f"cannot encode {type(v).__name__} as AMF0")
