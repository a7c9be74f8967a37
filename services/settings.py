"""Typed settings on the command line: one click option per config field, bound to its
environment variable and default (:mod:`apmae.config` resolves them: flag > env > saved
config > default), nested configs flattened under their own names, ``--config FILE`` to
repeat a run. The CLI's commands and the trainer's own entry point use these.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from apmae import config as C
from services.runtime import require_broker


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
    for owner, f, name in C.flat_fields(cls):
        kind = C.field_type(owner, f.name)
        help_text = f"{f.metadata.get('help', '')}  [env: {C.env_name(name)}; default: {defaults[name]}]"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            out.append(([f"{flag}/--no-{name.replace('_', '-')}", name], {"default": None, "help": help_text}))
        elif C.is_secret(name):  # kept only to refuse it with a useful message (build)
            out.append(([flag, name], {"default": None, "type": str, "hidden": True}))
        else:
            out.append(([flag, name], {"default": None, "help": help_text,
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


def build(cls: type, kwargs: dict[str, Any], needs_broker: bool = True) -> Any:
    """The config of ``cls`` from a command's options (see :func:`config_options`). A bus
    config is checked for a reachable broker first, unless the command reads no topic
    (``needs_broker=False``: ``eval`` on Parquet files)."""
    for k, v in kwargs.items():
        # a secret on the command line is visible to every local user (ps, /proc) and lands
        # in shell history; the message never repeats the value
        if v is not None and (C.is_secret(k) or C.redact(k, v) != v):
            raise click.UsageError(f"--{k.replace('_', '-')}: secrets are not accepted on the command line; "
                                   f"set {C.env_name(k)} or, better, {C.env_name(k)}_FILE (a file with it)")
    names = {s.name for s in C.flat_fields(cls)}
    overrides = {k: v for k, v in kwargs.items() if k in names}
    try:
        path = kwargs.get("config_file")
        cfg = C.load(cls, path, overrides) if path else C.resolve(cls, overrides)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if needs_broker and isinstance(cfg, C.BusConfig):
        require_broker(cfg.bootstrap_servers)
    return cfg
