"""The runtime every service shares: typed settings bound to flags and env variables, the
metrics/health endpoint, and the processing loop run as a service.

The CLI (:mod:`services.cli`) is a thin layer of commands over this module; services (the
trainer's own entry point, the demo) import it directly, never the CLI, so the import graph
has no circle.
"""

from __future__ import annotations

import importlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from apmae import config as C


def config_options(cls: type | str) -> Callable[[Callable], Callable]:
    """Decorator: one typed click option per field of ``cls`` (defaults come from
    ``config.resolve``, so an unset flag falls back to the env variable, then the default).

    ``cls`` may be ``"module:Class"``: the options are then made when the command is used
    (:class:`ConfigCommand`), so ``apmae --help`` lists commands without importing torch
    and transformers (5 s) for the configs of services it does not run."""

    def deco(fn: Callable) -> Callable:
        if isinstance(cls, str):
            fn.__apmae_config__ = cls  # type: ignore[attr-defined]
            return fn
        for decls, attrs in reversed(option_specs(cls)):
            fn = click.option(*decls, **attrs)(fn)
        return fn

    return deco


def option_specs(cls: type) -> list[tuple[list[str], dict[str, Any]]]:
    """(declarations, attributes) of the click option of each field of ``cls``, in order."""
    out: list[tuple[list[str], dict[str, Any]]] = [
        (["--config", "config_file"], {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path),
                                       "help": "Repeat a run: the resolved config JSON it wrote (flags and env "
                                               "variables still override it; secrets come from the environment)"})]
    defaults = C.flat_defaults(cls)
    for owner, f in C.flat_fields(cls):
        kind = C.field_type(owner, f.name)
        default = defaults[f.name]
        help_text = f"{f.metadata.get('help', '')}  [env: {C.env_name(f.name)}; default: {default}]"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            out.append(([f"{flag}/--no-{f.name.replace('_', '-')}", f.name], {"default": None, "help": help_text}))
        elif C.is_secret(f.name):  # kept only to refuse it with a useful message (build)
            out.append(([flag, f.name], {"default": None, "type": str, "hidden": True}))
        else:
            out.append(([flag, f.name], {"default": None, "help": help_text,
                                         "type": _click_type(kind, f.metadata.get("choices"))}))
    return out


def _click_type(kind: type, choices: tuple[str, ...] | None) -> click.ParamType:
    if choices:
        return click.Choice(choices)
    if kind is int:
        return click.INT
    if kind is float:
        return click.FLOAT
    if kind is Path:
        return click.Path(path_type=Path)
    return click.STRING  # lists and dicts: parsed by config.resolve from their text


class ConfigCommand(click.Command):
    """A command whose config options are made on first use (see :func:`config_options`)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        path = getattr(self.callback, "__apmae_config__", None)
        if path:
            module, name = path.split(":")
            cls = getattr(importlib.import_module(module), name)
            self.params.extend(click.Option(decls, **attrs) for decls, attrs in option_specs(cls))
            self.callback.__apmae_config__ = None  # type: ignore[union-attr]
        return super().get_params(ctx)


class ConfigGroup(click.Group):
    """A group whose commands (and subgroups) are :class:`ConfigCommand` s."""

    command_class = ConfigCommand
    group_class = type  # subgroups are ConfigGroups too


def build(cls: type, kwargs: dict[str, Any]) -> Any:
    for k, v in kwargs.items():
        # a secret on the command line is visible to every local user (ps, /proc) and lands
        # in shell history; the message never repeats the value
        if v is not None and (C.is_secret(k) or C.redact(k, v) != v):
            raise click.UsageError(f"--{k.replace('_', '-')}: secrets are not accepted on the command line; "
                                   f"set {C.env_name(k)} or, better, {C.env_name(k)}_FILE (a file with it)")
    names = {f.name for _, f in C.flat_fields(cls)}
    overrides = {k: v for k, v in kwargs.items() if k in names}
    try:
        path = kwargs.get("config_file")
        cfg = C.load(cls, path, overrides) if path else C.resolve(cls, overrides)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if isinstance(cfg, C.BusConfig):
        require_broker(cfg.bootstrap_servers)
    return cfg


def require_broker(bootstrap_servers: str, timeout_s: float = 2.0) -> None:
    """Fail fast, in one line, when no bootstrap server accepts a connection: the Kafka
    client would otherwise retry for ~35 s, logging an error per attempt, then raise."""
    tried = []
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as e:
            tried.append(f"{address.strip()} ({getattr(e, 'strerror', None) or e})")
    raise click.ClickException(f"no Kafka broker reachable at {', '.join(tried)}: start the embedded one with "
                               f"`apmae infra up`, or point --bootstrap-servers / APMAE_BOOTSTRAP_SERVERS at yours")


def start_service(cfg: C.BusConfig, service: str, health=None):
    """Start the /metrics + /healthz endpoint; register it with an embedded Prometheus if one
    runs under the same state directory (production scrapes via deploy/prometheus.yml)."""
    from services import infra, metrics
    from services.bus import native_crc32c

    metrics.check_native_crc32c(service, native_crc32c())
    server = metrics.serve(cfg.metrics_host, cfg.metrics_port, health)
    if (cfg.state_dir / "prometheus" / "targets").is_dir():
        infra.register_target(cfg.state_dir, service, f"127.0.0.1:{server.server_port}")
    metrics.UP.labels(service).set(1)
    return server


def run_loop(processor, service: str, cfg: C.BusConfig, max_messages: int | None, idle_timeout_s: float | None) -> int:
    """Run a Processor as a service: metrics endpoint, SIGTERM handling, a summary at the end."""
    start_service(cfg, service, health=lambda: {"status": "ok", "service": service,
                                                "processed": processor.processed})
    processor.install_signal_handlers()
    n = processor.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
    click.echo(json.dumps({"service": service, "processed": n}))
    return n


LOOP_OPTIONS = [
    click.option("--max-messages", type=int, default=None, help="Stop after this many input messages"),
    click.option("--idle-timeout", "idle_timeout_s", type=float, default=None,
                 help="Stop when nothing arrived for this many seconds (default: run forever)"),
]


def loop_options(fn):
    for opt in reversed(LOOP_OPTIONS):
        fn = opt(fn)
    return fn
