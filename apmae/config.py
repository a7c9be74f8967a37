"""Typed, frozen settings: one dataclass per service, resolved from defaults < env < flags.

Every field of a config is also a command-line option (``--batch-size``) and an environment
variable (``APMAE_BATCH_SIZE``); ``services/cli.py`` builds both from the dataclass, so the
three never drift apart. Unknown keys are an error, and ``save`` writes the resolved config
beside whatever artifact it produced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "APMAE_"
C = TypeVar("C")


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (shown by ``--help`` next to its env variable);
    ``choices``: the only values it accepts, from a flag, an env variable or a file."""
    meta = {"help": help} | ({"choices": tuple(choices)} if choices else {})
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(default: Any, prefix: str = "") -> Any:
    """A nested config field. ``prefix``: its settings' names in the holder (flags, env
    variables, overrides) start with it: the demo's ``train: TrainingConfig`` with prefix
    ``train_`` is set by ``--train-steps``, ``APMAE_TRAIN_BATCH_SIZE``, while the trainer
    holds the same config unprefixed (``--steps``). Saved configs stay nested objects."""
    return dataclasses.field(default_factory=lambda: default, metadata={"prefix": prefix})


class Flat(typing.NamedTuple):
    """One setting of a (nested) config: the class that declares it, its field, and its name
    in the holder (the field's name behind the nesting prefixes)."""

    owner: type
    field: dataclasses.Field
    name: str


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def field_type(cls: type, name: str) -> type:
    """The concrete Python type of a field (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return typing.get_origin(hint) or hint


def parse_value(kind: type, raw: Any) -> Any:
    """Convert an env/flag string to the field's type, with a clear error."""
    if not isinstance(raw, str) or kind is str:
        return raw
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind in (list, tuple):
        return [p.strip() for p in raw.split(",") if p.strip()]
    if kind is dict:
        return json.loads(raw)
    if kind is Path:
        return Path(raw)
    return kind(raw)


def is_config(kind: Any) -> bool:
    """A nested config: a field whose type is itself a dataclass (ClusterConfig in the cluster
    service's config, ClassifierConfig in the classifier's)."""
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def flat_fields(cls: type, prefix: str = "") -> list[Flat]:
    """Every setting of ``cls``, nested configs expanded in place.

    Nested settings keep their own names on the command line and in the environment
    (``--min-cluster-size``, ``APMAE_MIN_CLUSTER_SIZE``), behind the nesting's prefix if it
    declares one (:func:`nested`). Two settings of one name would be ambiguous, so that is an
    error here, at the first use of the class."""
    out: list[Flat] = []
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        out += (flat_fields(kind, prefix + f.metadata.get("prefix", "")) if is_config(kind)
                else [Flat(cls, f, prefix + f.name)])
    seen: dict[str, type] = {}
    for s in out:
        if s.name in seen:
            raise TypeError(f"{cls.__name__}: setting {s.name!r} is declared by both {seen[s.name].__name__} and "
                            f"{s.owner.__name__}")
        seen[s.name] = s.owner
    return out


def resolve(cls: type[C], overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
            base: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from its defaults, then ``base`` (a saved config, see :func:`load`), then
    ``APMAE_*`` environment variables, then overrides.

    Overrides whose value is None are ignored (an unset flag). Unknown override keys raise.
    Settings of nested configs are addressed by their own names (:func:`flat_fields`).
    """
    env = os.environ if env is None else env
    env = {**env, **_secret_files(cls, env)}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {s.name for s in flat_fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {sorted(unknown)}; known: {sorted(names)}")
    base = _flatten(cls, base or {})
    if set(base) - names:
        raise ValueError(f"unknown {cls.__name__} settings in the saved config: {sorted(set(base) - names)}")
    return _build(cls, overrides, env, base)


def from_flat(cls: type[C], **settings: Any) -> C:
    """``cls`` from settings named as on the command line (nested configs' settings by their
    flat names), typed values or strings, no environment: for code and tests that configure
    a service the way a user would."""
    return resolve(cls, settings, env={})


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def flat_defaults(cls: type) -> dict[str, Any]:
    """Each setting's default as the class declares it, nested configs included: a nested
    config's default object may differ from its class's defaults (the demo clusters with
    min_cluster_size 10, the library default is the paper's 25)."""
    out: dict[str, Any] = {}

    def walk(owner: type, obj: Any | None, prefix: str) -> None:
        for f in dataclasses.fields(owner):
            v = getattr(obj, f.name) if obj is not None else field_default(f)
            kind = field_type(owner, f.name)
            if is_config(kind):
                walk(kind, v, prefix + f.metadata.get("prefix", ""))
            else:
                out[prefix + f.name] = v

    walk(cls, None, "")
    return out


def _build(cls: type[C], overrides: dict[str, Any], env: typing.Mapping[str, str], base: dict[str, Any],
           default: Any | None = None, prefix: str = "") -> C:
    """``cls`` from its settings; ``default``: the object whose values unset settings keep
    (a nested config's declared default), else the class's field defaults; ``prefix``: its
    settings' names in the holder."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        if is_config(kind):
            inner = getattr(default, f.name) if default is not None else field_default(f)
            values[f.name] = _build(kind, overrides, env, base, inner, prefix + f.metadata.get("prefix", ""))
            continue
        name = prefix + f.name
        try:
            if name in overrides:
                values[f.name] = parse_value(kind, overrides[name])
            elif env_name(name) in env:
                values[f.name] = parse_value(kind, env[env_name(name)])
            elif name in base:
                values[f.name] = parse_value(kind, base[name])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cls.__name__}.{f.name}: {e}") from e
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            raise ValueError(f"{cls.__name__}.{f.name}: {values[f.name]!r} is not one of {', '.join(choices)}")
    return dataclasses.replace(default, **values) if default is not None else cls(**values)


def _flatten(cls: type, saved: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A saved (nested) config's values by setting name; secrets (saved redacted) are dropped."""
    out: dict[str, Any] = {}
    own = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in saved.items():
        kind = field_type(cls, k) if k in own else None
        if is_config(kind) and isinstance(v, dict):
            out.update(_flatten(kind, v, prefix + own[k].metadata.get("prefix", "")))
        elif not (is_secret(k) and v == "***") and not (isinstance(v, str) and ":***@" in v):
            out[prefix + k] = v  # (a redacted value was a secret: it comes from the environment again)
    return out


def load(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None,
         env: dict[str, str] | None = None) -> C:
    """The config a run saved (:func:`save`), to repeat it exactly; env and overrides still
    apply on top (secrets were never saved: they come from the environment again)."""
    payload = json.loads(Path(path).read_text())
    saved = payload.get("config", payload)
    if payload.get("config_class") not in (None, cls.__name__):
        raise ValueError(f"{path} holds a {payload['config_class']}, not a {cls.__name__}")
    return resolve(cls, overrides, env, base=saved)


SECRET_FIELDS = ("password", "secret", "token")  # fields whose names contain these are secrets
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@/]+)@")


def is_secret(name: str) -> bool:
    return any(s in name for s in SECRET_FIELDS)


def _secret_files(cls: type, env: typing.Mapping[str, str]) -> dict[str, str]:
    """``APMAE_<FIELD>_FILE=/run/secrets/x`` sets the field from that file (Docker/K8s secrets)."""
    out = {}
    for s in flat_fields(cls):
        path = env.get(env_name(s.name) + "_FILE")
        if path:
            try:
                out[env_name(s.name)] = Path(path).read_text().strip()
            except OSError as e:
                raise ValueError(f"{cls.__name__}.{s.name}: cannot read {env_name(s.name)}_FILE={path}: {e}") from e
    return out


def redact(name: str, value: Any) -> Any:
    """The value as it may be written to a log or a file: secrets and URL passwords masked."""
    if is_secret(name) and value:
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:***@", value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as JSON-able values (nested configs as nested objects), secrets redacted:
    this is what is saved and logged, and what ``--config FILE`` reads back."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else redact(f.name, str(v) if isinstance(v, Path) else v)
    return out


def save(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (beside a checkpoint, a cluster model, a classifier)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config_class": type(cfg).__name__, "config": to_dict(cfg)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


@dataclasses.dataclass(frozen=True)
class BusConfig:
    """What every service needs to reach the bus, Redis and Prometheus."""

    bootstrap_servers: str = setting("127.0.0.1:9092", "Kafka bootstrap servers (host:port,...)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss:// for TLS)")
    metrics_port: int = setting(0, "Port of the /metrics and /healthz endpoint (0 = pick a free one)")
    metrics_host: str = setting("127.0.0.1", "Address the metrics endpoint binds to")
    state_dir: Path = setting(Path(".apmae"), "Directory for infra state, artifacts and caches")
    topic_prefix: str = setting("", "Prefix for every topic name (isolates tenants and test runs)")
    compression: str = setting("auto", "Producer compression: auto (each topic's own codec, chosen from measurement: "
                                       "zstd, none for embeddings), none, gzip, lz4, zstd",
                               choices=("auto", "none", "gzip", "lz4", "zstd"))
    security_protocol: str = setting("PLAINTEXT", "Kafka security protocol", choices=("PLAINTEXT", "SSL", "SASL_SSL",
                                                                                     "SASL_PLAINTEXT"))
    sasl_mechanism: str = setting("", "SASL mechanism", choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str = setting("", "SASL user name")
    sasl_password: str = setting("", "SASL password")
    ssl_cafile: str = setting("", "CA bundle for TLS to the broker")
    max_message_bytes: int = setting(4 * 1024 * 1024, "Largest message a service will write or accept")
    group_poll_interval_ms: int = setting(
        10_000, "Consumer max_poll_interval_ms (the embedded broker stalls group joins at 300 s)"
    )
    leave_group: bool = setting(
        False, "A consumer that stops (or misses max_poll_interval) sends LeaveGroup, so its partitions move at "
               "once (Kafka). Off: they move when its session expires (<= 10 s). The embedded broker (Tansu 0.6) "
               "keeps a leader that leaves during a rebalance as the group's leader, and the group never forms again"
    )

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"
