"""What every service process shares at run time: logging, the metrics and health endpoint,
signal handling around the processing loop, and failing fast when the broker is not there.

Settings and their command-line binding are :mod:`services.settings`; the CLI
(:mod:`services.cli`) is a thin layer of commands over the two, and no service imports it.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

import click

from apmae import config as C

if TYPE_CHECKING:  # the bus (kafka-python) loads when a command runs, not for --help
    from services.bus import RunLimits

_handler: logging.Handler | None = None


def setup_logging(verbose: int = 0, json_format: bool = False) -> None:
    """Levels: apmae's INFO and everyone's warnings by default; ``-v`` apmae's DEBUG too;
    ``-vv`` everything at DEBUG, kafka-python's protocol chatter included.
    ``json_format``: one JSON object per line (for log shippers), else one text line."""
    global _handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if _handler is not None:  # called again: replace our handler, leave anyone else's
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.getLogger("apmae").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    logging.getLogger("kafka").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


# glibc's malloc serves a block above its mmap threshold (128 KB at first, raised on each free
# of such a block up to 32 MB) with fresh pages from the kernel and unmaps it on free, and trims
# the heap's free top above 2x that: the float32 temporaries of a training step (a few MB to
# hundreds) came back as new pages that the kernel zeroed, every step. perf on the trainer:
# clear_page_erms 23% of the machine's samples during its early steps. Thresholds above the
# step's largest temporaries keep them in the heap, reused (PyTorch's CPU tuning guide reaches
# the same end with jemalloc or tcmalloc, which would be a system dependency here). Measured,
# small AP-MAE training from RAM: 521-583 -> 622-637 patterns/s (benchmarks/trainer.py's
# memory side, paired runs, 2026-12-03); the trim threshold alone made it worse (345-352): it
# fixes the mmap threshold at 128 KB.
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 2 << 30


def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of returning it to the kernel (see above): the
    process keeps its peak heap resident. True when set (glibc), False elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators decide
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))


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


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's stack to stderr and the service goes on: a
    hang seen only on another machine (CI) is diagnosed from its log, not reproduced."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def start_service(cfg: C.BusConfig, service: str, health=None):
    """Start the /metrics + /healthz endpoint; register it with an embedded Prometheus if one
    runs under the same state directory (production scrapes via deploy/prometheus.yml)."""
    from services import infra, metrics
    from services.bus import native_crc32c

    dump_stacks_on_sigusr1()
    metrics.check_native_crc32c(service, native_crc32c())
    mismatch = infra.generation_mismatch(cfg.state_dir, cfg.redis_url)
    metrics.GENERATION_MISMATCH.labels(service).set(mismatch is not None)
    if mismatch:
        logging.getLogger("apmae").error("%s: %s", service, mismatch)
    server = metrics.serve(cfg.metrics_host, cfg.metrics_port, health)
    if (cfg.state_dir / "prometheus" / "targets").is_dir():
        infra.register_target(cfg.state_dir, service, f"127.0.0.1:{server.server_port}")
    metrics.UP.labels(service).set(1)
    return server


def run_loop(processor, service: str, cfg: C.BusConfig, limits: RunLimits) -> int:
    """Run a Processor as a service, until ``limits``: metrics endpoint, SIGTERM handling, a
    summary at the end."""
    start_service(cfg, service, health=lambda: {"status": "ok", "service": service,
                                                "processed": processor.processed})
    n = supervise(processor, service, limits)
    click.echo(json.dumps({"service": service, "processed": n}))
    return n


def supervise(processor, service: str, limits: RunLimits, **run_kw) -> int:
    """``processor.run(limits)`` in a service process: SIGTERM finishes the batch, and the
    process starts itself again when the loop stalls or a client call never returns."""
    from services.bus import ConsumerStalled

    processor.install_signal_handlers()
    watch(processor, service, lambda: restart_process(processor.processed, service))
    try:
        return processor.run(**vars(limits), **run_kw)
    except ConsumerStalled:
        restart_process(processor.processed, service)
        raise  # not reached: restart_process replaces the process or exits


def watch(processor, service: str, on_hang) -> None:
    """Start the watchdog thread of ``processor`` (:func:`_watch_polls`)."""
    threading.Thread(target=_watch_polls, args=(processor, service, on_hang), name="poll-watchdog",
                     daemon=True).start()


# How many times in a row a service may start itself again after a stall; past it, it exits
# non-zero and its supervisor (compose's restart policy, the demo) decides.
MAX_RESTARTS = 5
RESTARTS_ENV = "APMAE_STALL_RESTARTS"


def _watch_polls(processor, service: str, on_hang) -> None:
    """``on_hang()`` (start the process again, or end a pool's worker) when a call into its
    Kafka client (a poll, a commit, the close: :meth:`~services.bus.Processor._watched`) has
    not returned for ``processor.poll_hang_s``.
    Safe at any point: a batch's outputs are marked done only after their flush and committed
    after that, so whatever the hang interrupted is redone by the next process, and the done
    marks drop what was already durable."""
    while True:
        time.sleep(min(5.0, processor.poll_hang_s / 4))
        hung = processor.poll_hung()
        if hung is not None:
            from services import metrics

            metrics.CONSUMER_STALLED.labels(service).inc()
            logging.getLogger("apmae").error(
                "%s: a call into the Kafka client (poll, commit, close) has not returned for %.0f s", service, hung)
            on_hang()


def restart_process(processed: int, service: str) -> None:
    """Replace this process with a fresh run of the same command line (same pid, so whatever
    waits on it keeps waiting). The processing loop flushed and committed before it raised,
    so the new process resumes from the group's commits and loses nothing. Only a new process
    sheds a wedged kafka-python client (see :class:`services.bus.ConsumerStalled`). The count
    of restarts "in a row" starts over once a process got something done."""
    done = 0 if processed else int(os.environ.get(RESTARTS_ENV, "0"))
    log = logging.getLogger("apmae")
    if done >= MAX_RESTARTS:
        log.error("%s: stalled %d times in a row; giving up", service, done + 1)
        logging.shutdown()
        os._exit(75)  # EX_TEMPFAIL, try again later (from the watchdog thread too, where sys.exit ends only it)
    os.environ[RESTARTS_ENV] = str(done + 1)
    log.error("%s: starting again (%d of %d): %s", service, done + 1, MAX_RESTARTS, " ".join(sys.orig_argv))
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


LOOP_OPTIONS = [
    click.option("--max-messages", type=int, default=None,
                 help="Stop after this many input messages (per process, with --processes)"),
    click.option("--idle-timeout", "idle_timeout_s", type=float, default=None,
                 help="Stop when nothing arrived for this many seconds (default: run forever)"),
    click.option("--until-caught-up", is_flag=True, default=False,
                 help="Stop as soon as the group has read every input partition to its end (a batch "
                      "stage run after its producers finished; --idle-timeout still bounds a broker outage)"),
]


def loop_options(fn):
    """The loop options, given to the command as one ``limits`` (:class:`RunLimits`)."""

    @functools.wraps(fn)
    def command(max_messages, idle_timeout_s, until_caught_up, **kw):
        from services.bus import RunLimits

        return fn(limits=RunLimits(max_messages=max_messages, idle_timeout_s=idle_timeout_s,
                                   until_caught_up=until_caught_up), **kw)

    for opt in reversed(LOOP_OPTIONS):
        command = opt(command)
    return command
