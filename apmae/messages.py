"""The wire envelope every apmae message uses, and validation on read.

A message value is::

    b"AP" | format u8 (=1) | header_len u32 big-endian | header (UTF-8 JSON) | payload bytes

The header length is big-endian (network order, ``>I``); the pattern and embedding payloads
are little-endian (:mod:`apmae.codec`). The JSON header holds ``schema`` (record name), ``v``
(the schema's major version), ``minor`` (its minor version, absent when 0) and the record's
fields; the payload carries bulk binary data (a packed attention pattern, an embedding
vector) so that large arrays never pass through JSON. Records are frozen dataclasses that
subclass :class:`Record`; their type hints are the schema, checked field by field when a
message is decoded. A decode failure raises :class:`InvalidMessage` with the reason, which
the bus turns into a dead letter.

Schemas evolve the way Avro and protobuf readers allow: a writer that adds an optional field
(a default) bumps ``MINOR``; readers of an older minor ignore the fields they do not know, and
readers of a newer minor fill the missing ones from their defaults. A change that old readers
would misread (a renamed, retyped or removed field) bumps ``VERSION`` (major): readers reject
other majors. Unknown fields in a message that claims the reader's own minor or an older one
are malformed and rejected (no silent typo).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import struct
import types
import typing
from typing import Any, ClassVar, TypeVar

import orjson

MAGIC = b"AP"
FORMAT = 1
_HEAD = struct.Struct(">2sBI")
R = TypeVar("R", bound="Record")


class InvalidMessage(ValueError):
    """A message that cannot be decoded or fails its schema; carries a human-readable reason."""


def stable_id(*parts: Any) -> str:
    """A deterministic id from the parts that identify a record (so a retry reuses it)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of all message records. Subclasses set SCHEMA and VERSION and declare fields.

    ``id`` is deterministic (see :func:`stable_id`): reprocessing an input produces records
    with the same ids, which is how consumers drop duplicates.
    """

    SCHEMA: ClassVar[str] = "record"
    VERSION: ClassVar[int] = 1  # major: readers reject other majors
    MINOR: ClassVar[int] = 0  # bumped by adding optional fields: readable both ways
    id: str

    def header(self) -> dict[str, Any]:
        version = {"schema": self.SCHEMA, "v": self.VERSION} | ({"minor": self.MINOR} if self.MINOR else {})
        return version | {name: getattr(self, name) for name in _header_names(type(self))}


@functools.cache
def _header_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "payload")


def encode(record: Record) -> bytes:
    """Record -> message value bytes (the payload copied once, a view taken as it is).

    Raises ValueError for a NaN or infinite float in the header (JSON has no such number) or
    an int outside 64 bits (the header's reader parses those as floats), TypeError for a
    value JSON cannot hold."""
    header = record.header()
    for name, v in header.items():
        if type(v) is not str:  # most of a header: skipped without the checks' calls
            _check_number(name, v)
    # orjson, not the standard library's encoder: a pattern message's encode 4.5-5.0 vs 5.6 us,
    # the checks above included (micro-timed, min of 7, two runs; non-ASCII text written as
    # UTF-8 rather than escaped). What orjson will not write, the standard library's encoder
    # writes as it always did: text with a lone surrogate (a file name that is not UTF-8,
    # read with surrogateescape), escaped; a float subclass (numpy's float64).
    try:
        head = orjson.dumps(header)
    except orjson.JSONEncodeError:
        head = _JSON_OUT.encode(header).encode()
    payload = getattr(record, "payload", b"") or b""
    return b"".join((_HEAD.pack(MAGIC, FORMAT, len(head)), head, payload))


def _fits_64_bits(v: int) -> bool:
    """An int orjson reads and writes as one (int64 or uint64): the header's int range."""
    return -(1 << 63) <= v < 1 << 64


def _check_number(name: str, v: Any) -> None:
    """orjson writes NaN and Infinity as null (a field silently emptied) and reads an int
    outside 64 bits as a float: refuse both on the way out, naming the field."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"field {name!r}: {v} is not a JSON number")
    if isinstance(v, int) and not isinstance(v, bool) and not _fits_64_bits(v):
        raise ValueError(f"field {name!r}: an int of {v.bit_length()} bits is outside 64 bits")
    if isinstance(v, (list, tuple)):
        for item in v:
            _check_number(name, item)


def _check_type(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _check_type(name, arg, value)
            except InvalidMessage:
                pass
        raise InvalidMessage(f"field {name!r}: {_short(repr(value))} is not {hint}")
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool):
        raise InvalidMessage(f"field {name!r}: expected int, got bool")
    if base in (list, tuple) and isinstance(value, list):
        return list(value) if base is list else tuple(value)
    if not isinstance(value, base):
        raise InvalidMessage(f"field {name!r}: expected {getattr(base, '__name__', base)}, got {type(value).__name__}")
    return value


def _short(text: str, limit: int = 200) -> str:
    """A reason must stay readable and small whatever the message holds."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _reject_constant(name: str) -> Any:
    """NaN / Infinity are not JSON; Python's parser accepts them, and a record carrying one
    decodes but cannot be encoded again by whoever forwards it."""
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """1e999 parses to inf without passing through ``parse_constant``."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{_short(text, 40)} is out of a float's range")
    return v


def _int64(text: str) -> int:
    """What orjson reads as a float and encode() refuses to write is no int here either."""
    v = int(text)
    if not _fits_64_bits(v):
        raise ValueError(f"{_short(text, 40)} is outside 64 bits")
    return v


# made once: json's dumps/loads with options build a new encoder/decoder per call
_JSON_OUT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_IN = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64)


def _parse_header(view: memoryview) -> Any:
    """The header's JSON. orjson first: a pattern message's decode 5.0-5.7 vs 6.8-7.7 us with
    the standard library's parser (micro-timed, min of 7, two runs), the header's parse the
    largest piece of the bus adapter's per-message work on the consume path (#14). What orjson
    refuses goes to the standard library's parser, which decides as it always did: it takes
    text with an escaped lone surrogate (what encode() writes for a file name that is not
    UTF-8) and refuses, through the hooks above, NaN, Infinity and floats out of range
    (which orjson refuses too) and ints outside 64 bits. orjson reads such an int as a float,
    which an int field rejects (and encode() refuses to write one): no record carries one."""
    try:
        return orjson.loads(view)
    except orjson.JSONDecodeError:
        pass
    try:
        return _JSON_IN.decode(str(view, "utf-8"))
    except RecursionError as e:  # nesting deeper than the interpreter's stack: poison, not a crash
        raise InvalidMessage("header is nested too deeply") from e
    except ValueError as e:  # not JSON, not UTF-8, NaN/Infinity, an int of more than 4300 digits
        raise InvalidMessage(f"header is not JSON: {_short(str(e))}") from e


def _split(value: bytes) -> tuple[dict[str, Any], bytes]:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidMessage(f"value is {type(value).__name__}, not bytes")
    # A view, not a copy: the payload (64 KB for a pattern) is sliced out of the fetched
    # bytes without being copied twice per message (bytes(), then the slice).
    value = memoryview(value)
    if len(value) < _HEAD.size:
        raise InvalidMessage(f"message of {len(value)} bytes is shorter than the {_HEAD.size}-byte envelope")
    magic, fmt, n = _HEAD.unpack_from(value)
    if magic != MAGIC:
        raise InvalidMessage(f"bad magic {magic!r} (not an apmae message)")
    if fmt != FORMAT:
        raise InvalidMessage(f"unsupported envelope format {fmt}")
    if _HEAD.size + n > len(value):
        raise InvalidMessage(f"header length {n} runs past the end of a {len(value)}-byte message")
    head = _parse_header(value[_HEAD.size : _HEAD.size + n])
    if not isinstance(head, dict):
        raise InvalidMessage("header is not a JSON object")
    return head, value[_HEAD.size + n :]


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], tuple[dataclasses.Field, ...], frozenset[str]]:
    """(type hints, fields, allowed header keys) of a record class, resolved once: resolving
    hints per message was 80% of decoding a small record."""
    fields = dataclasses.fields(cls)
    return typing.get_type_hints(cls), fields, frozenset({f.name for f in fields} | {"schema", "v", "minor"})


@functools.cache
def _exact_types(cls: type) -> dict[str, frozenset[type]]:
    """Per field, the types a header value may have as is (``str``; ``bool`` and ``NoneType``
    for ``bool | None``): checking those first made decoding a pattern's header ~2x faster
    than walking every field's hint (the bus's per-message cost next to the client's own)."""
    hints, fields, _ = _schema(cls)
    out: dict[str, frozenset[type]] = {}
    for f in fields:
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        out[f.name] = frozenset(a for a in args if a in (str, int, float, bool, type(None)))
    return out


def decode(value: bytes, cls: type[R], max_bytes: int | None = None) -> R:
    """Message value bytes -> ``cls`` instance, validating schema name, version and fields.

    Raises only InvalidMessage: a consumer that dead-letters InvalidMessage then never
    crash-loops on one message (restarting at its offset), whatever the bytes are."""
    try:
        return _decode(value, cls, max_bytes)
    except InvalidMessage:
        raise
    except (RecursionError, MemoryError) as e:
        raise InvalidMessage(f"{cls.SCHEMA}: {type(e).__name__} while decoding") from e
    except Exception as e:  # noqa: BLE001 - any other failure is this message's, reported as such
        raise InvalidMessage(f"{cls.SCHEMA}: {type(e).__name__}: {_short(_safe_str(e))}") from e


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 - str() of an exception holding a huge int can itself raise
        return "(unprintable)"


def _decode(value: bytes, cls: type[R], max_bytes: int | None) -> R:
    if max_bytes is not None and value is not None and len(value) > max_bytes:
        raise InvalidMessage(f"message of {len(value)} bytes exceeds the {max_bytes}-byte limit")
    head, payload = _split(value)
    if head.get("schema") != cls.SCHEMA:
        raise InvalidMessage(f"schema {_short(repr(head.get('schema')))} where {cls.SCHEMA!r} was expected")
    if head.get("v") != cls.VERSION:
        raise InvalidMessage(f"{cls.SCHEMA} version {_short(repr(head.get('v')))} unsupported (this build reads v{cls.VERSION})")
    hints, fields, names = _schema(cls)
    fast = _exact_types(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name == "payload":
            kwargs["payload"] = payload
            continue
        if f.name not in head:
            if f.default is not dataclasses.MISSING:
                if f.init:  # what __init__ would set (an init=False field it sets itself)
                    kwargs[f.name] = f.default
                continue
            raise InvalidMessage(f"{cls.SCHEMA}: missing field {f.name!r}")
        v = head[f.name]
        exact = fast[f.name]
        # the common case, a value of exactly the declared type, without walking the hint
        kwargs[f.name] = v if type(v) in exact else _check_type(f.name, hints[f.name], v)
    extra = set(head) - names
    if extra:
        minor = head.get("minor", 0)
        if not isinstance(minor, int) or isinstance(minor, bool) or minor <= cls.MINOR:
            raise InvalidMessage(f"{cls.SCHEMA}: unknown fields {_short(repr(sorted(extra)))} in a "
                                 f"v{cls.VERSION}.{_short(repr(minor), 20)} message (this build reads "
                                 f"v{cls.VERSION}.{cls.MINOR}; newer minors may add fields)")
        # a newer minor's optional fields: this build does not know them and does not need them
    if _fills_plainly(cls):
        rec = object.__new__(cls)
        rec.__dict__.update(kwargs)  # every field, in field order: what __init__ would set
        return rec
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise InvalidMessage(f"{cls.SCHEMA}: {e}") from e


@functools.cache
def _fills_plainly(cls: type) -> bool:
    """Whether a record's __init__ only sets its fields, so that decode may fill the
    instance's __dict__ itself: a frozen dataclass's __init__ sets each field through
    object.__setattr__, 1.3 us of a pattern message's 5.1 us decode against 0.23 us
    (micro-timed, min of 7, 2026-12-07). Plain: the class is a dataclass itself with the
    __init__ the decorator wrote (not one of its own, not a subclass's), no __post_init__, no
    slots anywhere in its bases, no custom __new__, every field an init argument. (A filled
    __dict__ is a real dict: a PatternRecord is ~170 bytes larger, beside its 64 KB payload.)"""
    init = vars(cls).get("__init__")
    # dataclasses writes its __init__ with exec(), so its code's file is "<string>"; should a
    # later Python name it otherwise, this says False and decode calls __init__: slower, same
    generated = init is not None and getattr(getattr(init, "__code__", None), "co_filename", "") == "<string>"
    return (generated and "__dataclass_fields__" in vars(cls) and not hasattr(cls, "__post_init__")
            and cls.__new__ is object.__new__ and all("__slots__" not in vars(c) for c in cls.__mro__[:-1])
            and all(f.init for f in dataclasses.fields(cls)))
