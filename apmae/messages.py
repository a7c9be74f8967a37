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

    Raises ValueError for a NaN or infinite float in the header (JSON has no such number) and
    orjson's TypeError for an int past 64 bits (no reader here takes one)."""
    header = record.header()
    _refuse_non_finite(header.values())
    # orjson, not the standard library's encoder: a pattern message's encode 4.2 vs 6.1 us
    # (micro-timed, min of 7; the header's bytes the same but for non-ASCII text, written as
    # UTF-8 rather than escaped)
    head = orjson.dumps(header)
    payload = getattr(record, "payload", b"") or b""
    return b"".join((_HEAD.pack(MAGIC, FORMAT, len(head)), head, payload))


def _refuse_non_finite(values: Any) -> None:
    """orjson writes NaN and Infinity as null (a field silently emptied): refuse them, as
    the standard library's ``allow_nan=False`` did."""
    for v in values:
        if type(v) is float and not math.isfinite(v):
            raise ValueError(f"{v} is not a JSON number")
        if isinstance(v, (list, tuple)):
            _refuse_non_finite(v)


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
    # orjson, not the standard library's parser: a pattern message's decode 5.1 vs 6.7 us
    # (micro-timed, min of 7); the header's parse was its largest piece, and decode the largest
    # piece of the bus adapter's per-message work on the consume path (#14). It
    # refuses what a record must never carry, each as a JSONDecodeError: NaN and Infinity
    # (which Python's parser takes, and encode() would then refuse to forward), numbers out of
    # a float's range (1e999, a 5000-digit int), nesting past 1024 levels, invalid UTF-8 and
    # lone surrogates. An integer past 64 bits parses as a float, which an int field rejects.
    try:
        head = orjson.loads(value[_HEAD.size : _HEAD.size + n])
    except orjson.JSONDecodeError as e:
        raise InvalidMessage(f"header is not JSON: {_short(str(e))}") from e
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
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise InvalidMessage(f"{cls.SCHEMA}: {e}") from e
