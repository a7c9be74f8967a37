"""Helpers shared by the benchmark scripts: embedded infra on free ports, result tables."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@contextmanager
def embedded_infra(which=("broker", "redis")):
    from services.infra import InfraConfig, down, free_port, up

    # ephemeral: the numbers in benchmarks/results were measured on the in-memory broker (the
    # durable one, now infra's default, is to be measured beside it, not swapped in silently)
    cfg = InfraConfig(state_dir=Path(tempfile.mkdtemp(prefix="apmae-bench-")), kafka_port=free_port(),
                      redis_port=free_port(), prometheus_port=free_port(), ephemeral=True)
    up(cfg, which)
    try:
        yield cfg
    finally:
        down(cfg, which)


class Clock:
    """Wall seconds and busy CPU-seconds of the whole machine since :meth:`start`.

    Busy CPU is every process's (this one's threads, the broker's, Redis's): on a 2-core
    machine the stages of a service share one CPU budget, so a ratio below 1 is a physical
    limit only when the busy CPU-seconds of its parts add up to it (:func:`cpu_bound`)."""

    @staticmethod
    def busy() -> float:
        """Busy CPU-seconds of this machine, every core: user, nice, system and interrupts.
        Not steal (a VM's vCPU waiting while the host runs someone else) and not guest time
        (already inside user and nice): neither is work of ours."""
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def steal() -> float:
        """CPU-seconds the host took from this VM's vCPUs (0 on bare metal)."""
        import psutil

        return getattr(psutil.cpu_times(), "steal", 0.0)

    def start(self) -> Clock:
        self.cpu0, self.wall0 = self.busy(), time.perf_counter()
        return self

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, self.busy() - self.cpu0


def server_processes(infra, which=("broker", "redis")) -> dict:
    """name -> psutil.Process of each embedded server named (for :func:`cpu_split`)."""
    import psutil

    from services.infra import servers

    return {srv.name: psutil.Process(srv.pid()) for srv in servers(infra, which)}


_ENDED: list = []  # (native id, thread, its CPU-seconds) of each thread that ended since the watch began


def watch_thread_ends() -> None:
    """From now on, each Python thread that ends records its CPU clock as it ends (a
    thread's clock cannot be read once it is gone): :func:`span` then counts the work of a
    thread that ended inside a span (a per-batch helper, a client closed) in its group, not in
    ``main``. Hooks ``threading.Thread._bootstrap_inner`` (CPython's: it runs ``run``, which
    subclasses such as kafka-python's sender override); idempotent."""
    import threading

    inner = threading.Thread._bootstrap_inner
    if getattr(inner, "_records_ends", False):
        return

    def bootstrap_inner(self):
        try:
            inner(self)
        finally:
            _ENDED.append((self.native_id, self, time.thread_time()))

    bootstrap_inner._records_ends = True
    threading.Thread._bootstrap_inner = bootstrap_inner


def cpu_split(servers: dict, group) -> dict:
    """Clocks read at one moment (:func:`span` turns two into a span's seconds): ``wall``;
    ``busy``, the machine's busy CPU; ``process``, this process's CPU; ``threads``, each live
    Python thread but the main one as native id -> (``group(thread)``, its CPU clock), a
    group being a name or None (counted as main); ``ended``, the same for the threads that
    ended since :func:`watch_thread_ends` (called here on first use: threads started before
    it are seen only while alive); each server's process CPU (user + system)."""
    import threading

    watch_thread_ends()
    threads: dict[int, tuple[str, float]] = {}
    for t in threading.enumerate():
        name = None if t is threading.main_thread() or t.native_id is None else group(t)
        if name is None:
            continue
        try:
            threads[t.native_id] = (name, time.clock_gettime(time.pthread_getcpuclockid(t.ident)))
        except (OSError, ProcessLookupError):  # it ended meanwhile
            pass
    process = time.process_time()  # right after the threads' clocks: they run on meanwhile
    ended = tuple((tid, group(t), cpu) for tid, t, cpu in _ENDED)
    return {"wall": time.perf_counter(), "busy": Clock.busy(), "process": process, "threads": threads,
            "ended": ended, "main_thread": main_thread_sched(),
            **{name: sum(p.cpu_times()[:2]) for name, p in servers.items()}}


def main_thread_sched() -> tuple[float, float]:
    """The main thread's seconds on a CPU and seconds runnable but waiting for one (the
    kernel's ``schedstat``: time on a run queue, i.e. preempted or not yet scheduled); the
    rest of its wall time it was asleep (a lock, the GIL, a wait on another thread, I/O)."""
    import threading

    on_cpu, waiting, _ = open(f"/proc/self/task/{threading.main_thread().native_id}/schedstat").read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def span(a: dict, b: dict) -> dict[str, float]:
    """Seconds between two :func:`cpu_split` readings: ``wall``, ``busy``, each server's CPU,
    each thread group's CPU (its threads' clocks at ``b``, or as they ended, less their
    clocks at ``a`` where they were alive then), and ``main``: the rest of this process's CPU
    (its main thread and torch's OpenMP workers, and any thread not watched as it ended)."""
    before = a["threads"]
    groups: dict[str, float] = {}

    def add(tid: int, name: str | None, cpu: float) -> None:
        if name is not None:
            prior = before.get(tid)
            groups[name] = groups.get(name, 0.0) + cpu - (prior[1] if prior is not None else 0.0)

    for tid, (name, cpu) in b["threads"].items():
        add(tid, name, cpu)
    for tid, name, cpu in b["ended"][len(a["ended"]):]:  # ended inside the span
        add(tid, name, cpu)
    scalars = {k: b[k] - a[k] for k in b if k not in ("threads", "ended", "process", "main_thread")}
    (cpu_a, wait_a), (cpu_b, wait_b) = a["main_thread"], b["main_thread"]
    return {**scalars, "main": b["process"] - a["process"] - sum(groups.values()), **groups,
            "main_thread_on_cpu": cpu_b - cpu_a, "main_thread_waiting": wait_b - wait_a}


def cpu_shares(spans: list[dict[str, float]]) -> dict[str, float]:
    """Each part of :func:`span`'s results as a share of every core over its span, the median
    over the spans (rounds); a part missing from a span counts 0 there. Beside them, where
    the spans read the main thread's states, those as shares of the span's wall time (one
    thread: :func:`main_thread_states`), as ``main_thread_on_cpu`` / ``_waiting`` / ``_asleep``."""
    import os

    cores = os.cpu_count() or 1
    parts = sorted({p for x in spans for p in x} - {"wall"})
    shares = {p: statistics.median(x.get(p, 0.0) / (x["wall"] * cores) for x in spans) for p in parts
              if not p.startswith("main_thread_")}
    if spans and all("main_thread_on_cpu" in x for x in spans):
        shares |= {f"main_thread_{k}": v for k, v in main_thread_states(spans).items()}
    return shares


# printed under a table of cpu_shares
SHARES_LEGEND = ("*_share / cpu shares: of every core; main_thread_*: of the main thread's wall time (on a CPU, "
                 "runnable waiting for one, asleep)")


def main_thread_states(spans: list[dict[str, float]]) -> dict[str, float]:
    """Where the main thread's wall time went over each span (:func:`span`), as shares of the
    span's wall time, the median over the spans: ``on_cpu``, ``waiting`` (runnable, no core
    free: the other threads and processes had them) and ``asleep`` (the rest: the GIL, a
    lock, a join, I/O). Each part's median is taken on its own, so the three need not sum to
    1. Torch's OpenMP workers are other threads: not in these.

    Where every span also timed the main thread's states inside the model's forward calls
    (``main_thread_forward_wall`` / ``_on_cpu`` / ``_waiting``: :class:`ForwardStates`),
    three parts more, shares of the span's wall: ``in_forward`` (the wall inside them),
    ``asleep_in_forward`` (asleep there) and ``asleep_outside_forward`` (asleep elsewhere:
    the loop's waits)."""
    def share(x: dict, part: str) -> float:
        asleep = x["wall"] - x["main_thread_on_cpu"] - x["main_thread_waiting"]
        if part in ("in_forward", "asleep_in_forward", "asleep_outside_forward"):
            inside = x["main_thread_forward_wall"] - x["main_thread_forward_on_cpu"] - x["main_thread_forward_waiting"]
            return {"in_forward": x["main_thread_forward_wall"], "asleep_in_forward": inside,
                    "asleep_outside_forward": asleep - inside}[part] / x["wall"]
        return (asleep if part == "asleep" else x[f"main_thread_{part}"]) / x["wall"]

    parts = ["on_cpu", "waiting", "asleep"]
    if all("main_thread_forward_wall" in x for x in spans):
        parts += ["in_forward", "asleep_in_forward", "asleep_outside_forward"]
    return {part: statistics.median(share(x, part) for x in spans) for part in parts}


class ForwardStates:
    """Wraps a forward (``fn(x)``, run on the main thread) and adds up the main thread's wall,
    CPU and run-queue seconds inside its calls (:func:`main_thread_sched`; two small reads a
    call): ``reset()`` at a span's start, ``as_span()`` at its end, merged into
    :func:`span`'s result for :func:`main_thread_states`."""

    def __init__(self, fn):
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.wall = self.on_cpu = self.waiting = 0.0

    def __call__(self, x):
        import threading

        if threading.current_thread() is not threading.main_thread():  # the clocks read are the main thread's
            raise RuntimeError("ForwardStates times the main thread: call it there")
        (on0, wait0), t0 = main_thread_sched(), time.perf_counter()
        try:
            return self.fn(x)
        finally:
            (on, wait), self.wall = main_thread_sched(), self.wall + time.perf_counter() - t0
            self.on_cpu, self.waiting = self.on_cpu + on - on0, self.waiting + wait - wait0

    def as_span(self) -> dict[str, float]:
        return {"main_thread_forward_wall": self.wall, "main_thread_forward_on_cpu": self.on_cpu,
                "main_thread_forward_waiting": self.waiting}


def cpu_bound(raw_wall: float, cpu_seconds: list[float]) -> float:
    """The best service/raw ratio the machine allows: the raw side's wall time over the wall
    time the parts' busy CPU-seconds need on every core at once (never above 1)."""
    import os

    return min(1.0, raw_wall / (sum(cpu_seconds) / (os.cpu_count() or 1)))


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): a distribution-free interval for the median from the
    order statistics (binomial: each value is below the median with probability 1/2), the
    narrowest symmetric one whose coverage is at least ``level``; with too few values for
    that (n < 6 at 95%), the min-max and its lower coverage. No assumption of normal noise,
    which a shared 2-core machine does not give."""
    from math import comb

    xs, n = sorted(values), len(values)
    med = float(statistics.median(xs))

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k)), k 1-indexed
        return 1 - 2 * sum(comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return med, xs[k - 1], xs[n - k], coverage(k)


def timed_forward(embed, arrays, batch: int) -> tuple[float, float]:
    """``embed`` over ``arrays`` in batches of ``batch`` under ``inference_mode``: the raw
    forward every encoder benchmark times. Returns (wall seconds, busy CPU-seconds: :class:`Clock`)."""
    import torch

    clock = Clock().start()
    with torch.inference_mode():
        for k in range(0, len(arrays), batch):
            embed(arrays[k:k + batch])
    return clock.stop()


def traced_embed(model):
    """``model.embed`` (an AP-MAE in eval mode) traced with TorchScript and frozen: the same
    forward run as one graph that holds no GIL while it runs (the eager one takes the GIL back
    between its ops). ``torch.jit`` is deprecated in this torch but shipped; the benchmarks
    use it to measure what the GIL costs the forward, the services do not (docs/THROUGHPUT.md,
    session 28). Checked equal to the eager forward on a batch of another size."""
    import warnings

    import torch

    class Embed(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, p: torch.Tensor) -> torch.Tensor:
            return self.m.embed(p)

    s = model.cfg.pattern_size
    example = torch.rand(8, s * (s + 1) // 2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and the tracer's notes
        traced = torch.jit.freeze(torch.jit.trace(Embed(model).eval(), example))
    with torch.inference_mode():
        other = torch.rand(5, example.shape[1])
        if not torch.allclose(traced(other), model.embed(other), atol=1e-4):
            raise RuntimeError("the traced forward differs from the eager one")
    return traced


@contextmanager
def gil_switch_interval(seconds: float | None):
    """CPython's GIL switch interval at ``seconds`` inside the block (``None``: left as it is),
    restored after it: one condition of a paired run at another interval, the others at the
    default (5 ms)."""
    default = sys.getswitchinterval()
    if seconds is not None:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(default)


def add_allocator_option(ap) -> None:
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's malloc thresholds as they are; the services tune them at start "
                         "(services.runtime.tune_allocator), and so does a benchmark by default")


def tune_allocator(args) -> bool:
    """What the services do at start, unless ``--glibc-malloc``: both sides of a comparison run
    in this one process, so both get the same allocator. Returns whether it is tuned."""
    from services.runtime import tune_allocator as tune

    return False if args.glibc_malloc else tune()


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "-" * len(line)]
    out += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def code_version() -> str:
    """The commit the benchmark ran on, ``+changes`` where the checkout differed from it
    (tracked files only), or ``unknown`` outside a git checkout: which code a result is of."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def write_result(name: str, payload: dict) -> Path:
    """``results/NAME.json``, or ``results/NAME-TAG.json`` with ``APMAE_BENCH_TAG=TAG`` set: a
    run on another machine (benchmarks/spare_cores.sh) sits beside this machine's, never over it."""
    import os

    if os.environ.get("APMAE_BENCH_TAG"):
        name = f"{name}-{os.environ['APMAE_BENCH_TAG']}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
               "cpus": os.cpu_count(), "code": code_version(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
