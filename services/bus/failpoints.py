"""Failpoints: named places in the processing loop where a fault test makes a running service
fail on purpose, at an exact point of the at-least-once protocol, the way FreeBSD's fail(9),
etcd's gofail and TiKV's fail-rs do.

A SIGKILL sent from outside lands wherever the service happens to be, so a test built on it
passes or fails with the timing. A failpoint lands where the test says::

    APMAE_FAILPOINTS="mid-publish=kill@3"   # 3rd batch: half its outputs flushed, then SIGKILL
    APMAE_FAILPOINTS="after-flush=kill@2"   # 2nd batch: all flushed, SIGKILL before its done marks
    APMAE_FAILPOINTS="flush=raise@2"        # 2nd batch: its flush fails (KafkaTimeoutError)

``mid-publish`` is reached after each half-batch in :class:`~services.bus.Processor` and after
each chunk the producer publishes from its handler. ``point=action@n`` fires once, on the n-th
time the point is reached (``@n`` omitted: the first). Actions: ``kill`` (SIGKILL this process: nothing runs after it, like a power cut) and
``raise`` (the transient error a broker that stops acknowledging gives). Unset, as in
production, :func:`hit` is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from kafka.errors import KafkaTimeoutError

ENV = "APMAE_FAILPOINTS"
POINTS = ("mid-publish", "after-flush", "flush")
ACTIONS = ("kill", "raise")


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """``"a=kill@3,b=raise"`` -> {"a": ("kill", 3), "b": ("raise", 1)}; a clear error otherwise."""
    out: dict[str, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, rest = part.partition("=")
        action, _, nth = rest.partition("@")
        if point not in POINTS or action not in ACTIONS or (nth and not nth.isdigit()) or nth == "0":
            raise ValueError(f"{ENV}: {part!r} is not point=action[@n] with point in {POINTS}, "
                             f"action in {ACTIONS}, n >= 1")
        out[point] = (action, int(nth or 1))
    return out


_armed = parse(os.environ.get(ENV, ""))
_reached: dict[str, int] = {}


def hit(point: str, before: Callable[[], object] | None = None) -> None:
    """Reached ``point``: fail here if a test armed it for this time, after running ``before``
    (what the fault needs to have happened first, e.g. a flush of what was sent so far)."""
    if point not in _armed:
        return
    _reached[point] = n = _reached.get(point, 0) + 1
    action, nth = _armed[point]
    if n != nth:
        return
    if before is not None:
        before()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise KafkaTimeoutError(f"failpoint {point} (test-injected flush failure)")
