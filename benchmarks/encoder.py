"""The encoder service against a raw in-memory forward of the same AP-MAE on the same patterns.

Raw: the patterns are decoded to packed float32 tensors before the clock starts; the clock runs over
``model.embed`` in batches of ``--batch`` (the floor: what the model alone costs). Both sides
feed the model packed lower triangles, the wire's layout (``APMAE.patches``); ``raw_square``
is the same forward fed (N, S, S) squares, the way the encoder did until 2026-12-03. Service:
the same patterns as PatternRecords on ``patterns.mine`` of the embedded broker; the
encoder's Processor (consume, decode, embed, publish embeddings, flush, done marks, commit)
runs with its group joined before the clock starts; ``service_inline`` is the same service
with the next batch polled after the handler, not during it (``Processor.prefetch`` off, the
loop until 2026-12-04), on its own copy of the topic; ``service_ending_inline`` prefetches but
ends each batch (publish, flush, done marks, commit) on the loop's thread, not beside the next
batch's forward (``Processor.overlap_ending`` off, the loop until 2026-12-06), on a third
copy; ``service_read_inline`` prefetches and overlaps the ending but reads each batch's
payloads (``read_packed``) on the loop's thread before its forward, not on the helper beside
the last one (``Processor.prepare`` off, the loop until 2026-12-07), on a fourth copy, paired
with ``service`` (``read_ahead_speedup``). ``raw_beside_poll`` is the raw forward
with a thread fetching the next batch from the broker during each batch's forward (the
prefetching loop with nothing else in it); ``handler_alone`` is ``Encoder.handle`` on the
same patterns as decoded Messages, no bus (the handler's own work). Together they are the
ceiling of the service's design on this machine, measured in the same run
(``benchmarks/core_sharing.py`` says why the poll beside the forward costs it: a busy
neighbour core slows the forward here). ``--switch-interval S`` adds ``service_switch``: the
service again, on a fourth copy, with CPython's GIL switch interval at S seconds (the default
is 5 ms) while it runs, paired with ``service`` (does a quicker GIL hand-off between the
forward and the loop's helper threads buy anything?). ``raw_traced`` and ``service_traced``
are both sides again with ``embed`` TorchScript-traced (``_common.traced_embed``: the whole
graph runs without the GIL), the service on its own copy: paired with each other and with
``service``, they say what the forward's GIL hand-offs cost the service (a measurement, not
the encoder's way: TorchScript is deprecated). Rounds alternate which goes first.
Beside ``raw`` and ``service``, where the cores went over the same spans (``cpu_split``): the
main thread with torch's workers, the Processor's ``prefetch`` and ``ending`` helpers, the
Kafka client's IO thread, other threads, the broker's and Redis's processes, each as a share
of every core; and the main thread's CPU in the service over the raw forward's for the same
patterns (``main_cpu_vs_raw``: the forward beside the loop's other threads, plus the loop's
own work on that thread). ``--only`` runs fewer of the other conditions (``raw`` and
``service`` always run): more rounds of one comparison in the same time.

    python benchmarks/encoder.py [--patterns 2048] [--variant small] [--rounds 2] [--switch-interval 0.0005]
                                 [--only service_read_inline]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    SHARES_LEGEND,
    Clock,
    ForwardStates,
    add_allocator_option,
    cpu_bound,
    cpu_shares,
    cpu_split,
    embedded_infra,
    gil_switch_interval,
    median_ci,
    server_processes,
    span,
    table,
    timed_forward,
    traced_embed,
    tune_allocator,
    watch_thread_ends,
    write_result,
)
from benchmarks.bus import pattern_records, patterns

# each service condition's own copy of a round's topic: the letter after "e{round}" in its prefix
# (each service's group and done marks are its own)
TOPIC_COPY = {"service": "", "service_inline": "i", "service_ending_inline": "e", "service_read_inline": "r",
              "service_switch": "s", "service_traced": "t"}
# the conditions beside ``raw`` and ``service`` (which always run), in the order a round runs them
CONDITIONS = ("service_inline", "service_ending_inline", "service_read_inline", "consume_alone", "decode_alone",
              "raw_square", "raw_beside_poll", "handler_alone", "raw_traced", "service_traced")


def run(n: int, variant_name: str, batch: int, rounds: int, compression: str = "auto",
        switch_s: float | None = None, only: tuple[str, ...] = CONDITIONS) -> dict:
    import numpy as np
    import torch

    from apmae.codec import decode_pattern, packed_values, read_packed
    from apmae.mae import APMAE, save_pretrained, variant
    from apmae.topics import PATTERNS_MINE, PatternRecord
    from services.bus import Output
    from services.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    ckpt = save_pretrained(APMAE(variant(variant_name)), Path(tempfile.mkdtemp(prefix="apmae-enc-")) / "ckpt")
    payloads = patterns(n)
    recs = pattern_records(payloads, "p")
    model = APMAE(variant(variant_name))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    model.eval()
    squares = torch.from_numpy(np.stack([decode_pattern(p, 256) for p in payloads]))
    packed = packed_values(read_packed(payloads, 256)[0])

    def forward(arrays: torch.Tensor, embed=model.embed) -> tuple[float, float]:
        return timed_forward(embed, arrays, batch)

    traced = traced_embed(model) if {"raw_traced", "service_traced"} & set(only) else None

    def raw() -> tuple[float, float]:
        return forward(packed)

    def raw_square() -> tuple[float, float]:
        return forward(squares)

    def raw_traced() -> tuple[float, float]:
        return forward(packed, traced)

    watch_thread_ends()  # before any thread starts: a thread that ends inside a span counts in its group
    with embedded_infra(("broker", "redis")) as infra:
        chosen: list[bool] = []
        servers = server_processes(infra)
        # where the cores went (cpu_split)
        splits: dict[str, list[dict]] = {"raw": [], "service": [], **({"service_traced": []} if "service_traced" in only
                                                                       else {})}

        def clocks() -> dict:
            return cpu_split(servers, thread_group)

        def raw_split() -> tuple[float, float]:
            c0 = clocks()
            out = raw()
            splits["raw"].append(span(c0, clocks()))
            return out

        def service(k: int, cond: str, prefetch: bool = True, overlap: bool = True, read_ahead: bool = True,
                    switch: float | None = None, split: list | None = None, traced_forward: bool = False
                    ) -> tuple[float, float]:
            cfg = EncoderConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                                topic_prefix=f"e{k}{TOPIC_COPY[cond]}.", checkpoint=str(ckpt),
                                batch_size=batch, compression=compression,
                                state_dir=Path(tempfile.mkdtemp(prefix="apmae-enc-state-")))
            enc = Encoder(cfg)
            proc = enc.processor()
            chosen.append(proc.prefetch)
            proc.prefetch, proc.overlap_ending = prefetch, prefetch and overlap
            if not read_ahead:
                proc.prepare = None
            enc.ensure_model()  # load the checkpoint before the clock (the raw side has it loaded too)
            # the instance's embed shadows the method: the handler calls the wrapper (the
            # traced graph, where asked), which times the main thread's states inside it
            inside = enc.model.embed = ForwardStates(traced_embed(enc.model) if traced_forward else enc.model.embed)
            if traced_forward:  # TorchScript's profiling runs before the clock, as on the raw side
                with torch.inference_mode():
                    for _ in range(3):
                        inside.fn(packed[:batch])
            proc.connect()
            while not proc.consumer.assignment():
                proc.consumer.poll(timeout_ms=200, max_records=1)
            proc.consumer.seek_to_beginning()
            last: list = [0, None]
            clock, c0 = Clock().start(), clocks()
            inside.reset()

            def progress(k: int) -> None:  # the clock stops at the last commit (closing is not work)
                last[0] += k
                if last[0] >= n:
                    last[1] = clock.stop()
                    if split is not None:
                        split.append(span(c0, clocks()) | inside.as_span())

            with gil_switch_interval(switch):
                done = proc.run(max_messages=n, idle_timeout_s=30, progress=progress)
            assert done >= n, f"encoder handled {done} of {n}"
            assert enc.model.embed is inside and inside.wall > 0, "the forward was not the timed one"
            return last[1]

        def assigned_consumer(k: int):
            """A kafka-python consumer of round k's topic, its partitions assigned directly (the
            cost of fetching, not of a group join), at the beginning."""
            from kafka import TopicPartition

            from services.bus import Bus

            bus = Bus(EncoderConfig(bootstrap_servers=infra.bootstrap_servers, topic_prefix=f"e{k}."), "bench")
            c = bus.consumer(None)
            name = bus.name(PATTERNS_MINE)
            parts: set[int] = set()
            deadline = time.perf_counter() + 30
            while not parts and time.perf_counter() < deadline:  # metadata arrives after the first request
                c.topics()
                parts = c.partitions_for_topic(name) or set()
            c.assign([TopicPartition(name, p) for p in sorted(parts)])
            c.seek_to_beginning()
            return c

        def consume_alone(k: int) -> tuple[float, float]:
            """kafka-python alone reading the same topic (what the service pays before decoding)."""
            c = assigned_consumer(k)
            got, clock = 0, Clock().start()
            while got < n and time.perf_counter() - clock.wall0 < 120:
                got += sum(len(v) for v in c.poll(timeout_ms=500, max_records=batch).values())
            out = clock.stop()
            c.close()
            assert got >= n, f"consumer alone got {got} of {n}"
            return out

        def raw_beside_poll(k: int) -> tuple[float, float]:
            """The raw forward while a thread fetches the next batch of round k's topic during
            each batch's forward, as the prefetching service's helper does (and then waits for
            it, as the service does): the service's loop with nothing else in it. Its rate over
            ``raw``'s is what the poll beside the forward costs (the GIL and the shared cores);
            the service's over its own is what the rest of the loop costs."""
            import threading

            c = assigned_consumer(k)
            go, fetched, stop = threading.Event(), threading.Event(), threading.Event()
            got = [0]

            def helper() -> None:
                while go.wait() and not stop.is_set():
                    go.clear()
                    want = min(batch, n - got[0])
                    while want > 0:
                        k_got = sum(len(v) for v in c.poll(timeout_ms=500, max_records=want).values())
                        got[0] += k_got
                        want -= k_got
                    fetched.set()

            th = threading.Thread(target=helper, daemon=True)
            th.start()
            go.set()  # the first batch, before the clock (the service's first poll is not overlapped either)
            if not fetched.wait(60):
                raise RuntimeError("the first poll beside the forward stalled")
            clock = Clock().start()
            with torch.inference_mode():
                for k_b in range(0, n, batch):
                    fetched.clear()
                    if k_b + batch < n:
                        go.set()  # the next batch, fetched during this one's forward
                    model.embed(packed[k_b:k_b + batch])
                    if k_b + batch < n and not fetched.wait(60):
                        raise RuntimeError("the poll beside the forward stalled")
            out = clock.stop()
            stop.set()
            go.set()
            th.join(10)
            c.close()
            assert got[0] >= n, f"the poll beside the forward got {got[0]} of {n}"
            return out

        from apmae.messages import decode, encode
        from services.bus import Message

        # the handler's own encoder, its model loaded before any clock (the service's is too),
        # and the patterns as the Processor hands them over: decoded Messages
        handler_enc = Encoder(EncoderConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                                            checkpoint=str(ckpt), batch_size=batch))
        handler_enc.ensure_model()
        msgs = [Message(PATTERNS_MINE.name, 0, i, 0, None, w, decode(w, PatternRecord, 1 << 30))
                for i, w in enumerate(encode(r) for r in recs)]

        def handler_alone() -> tuple[float, float]:
            """The encoder's handler (``Encoder.handle``: read, convert, embed, build the
            EmbeddingRecords) on the same patterns, no bus: what the service's work costs
            beside the raw forward before any consuming or publishing."""
            clock = Clock().start()
            for k_b in range(0, n, batch):
                handler_enc.handle(msgs[k_b:k_b + batch])
            return clock.stop()

        def decode_alone() -> tuple[float, float]:
            """What the encoder does to a batch's payloads before the forward (its handle)."""
            clock = Clock().start()
            for k in range(0, n, batch):
                packed_values(read_packed(payloads[k:k + batch], 256)[0])
            return clock.stop()

        def publish(k: int) -> None:
            """Round k's topic, read by the service and the consumer alone, and a copy of it
            for each other service condition this run has (``TOPIC_COPY``)."""
            from services.bus import Bus

            for cond in (c for c in TOPIC_COPY if c in t):
                bus = Bus(EncoderConfig(bootstrap_servers=infra.bootstrap_servers,
                                        topic_prefix=f"e{k}{TOPIC_COPY[cond]}.", compression=compression), "bench")
                bus.ensure_topics([PATTERNS_MINE])
                for r in recs:
                    bus.send(Output(PATTERNS_MINE, r, key=r.key))
                bus.close()

        raw(), raw_square()  # warm-up
        if traced is not None:
            raw_traced()
        t: dict[str, list[tuple[float, float]]] = {name: [] for name in ("raw", "service", *only)}
        if switch_s:
            t["service_switch"] = []
        for k in range(rounds):
            publish(k)
            steps = [("raw", raw_split), ("service", lambda k=k: service(k, "service", split=splits["service"])),
                     ("service_inline", lambda k=k: service(k, "service_inline", prefetch=False)),
                     ("service_ending_inline", lambda k=k: service(k, "service_ending_inline", overlap=False)),
                     ("service_read_inline", lambda k=k: service(k, "service_read_inline", read_ahead=False)),
                     ("consume_alone", lambda k=k: consume_alone(k)), ("decode_alone", decode_alone),
                     ("raw_square", raw_square), ("raw_beside_poll", lambda k=k: raw_beside_poll(k)),
                     ("handler_alone", handler_alone), ("raw_traced", raw_traced),
                     ("service_traced", lambda k=k: service(k, "service_traced", traced_forward=True,
                                                            split=splits.get("service_traced")))]
            if switch_s:
                steps.append(("service_switch", lambda k=k: service(k, "service_switch", switch=switch_s)))
            steps = [(name, fn) for name, fn in steps if name in t]
            for name, fn in steps if k % 2 == 0 else steps[::-1]:
                t[name].append(fn())
    prefetch_chosen = chosen[0]

    def paired(a: str, b: str) -> float:
        """Median over rounds of a's wall seconds over b's in the same round."""
        return statistics.median(x[0] / y[0] for x, y in zip(t[a], t[b], strict=True))

    med = {k: statistics.median(w for w, _ in v) for k, v in t.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in t.items()}
    row = {"variant": variant_name, "compression": compression, "patterns": n, "batch": batch, "rounds": rounds,
           "threads": torch.get_num_threads(),
           "raw_patterns_per_s": n / med["raw"], "service_patterns_per_s": n / med["service"],
           "service_vs_raw": med["raw"] / med["service"],
           # what the encoder chooses on this machine with these threads (Encoder.a_core_to_spare)
           "prefetch_chosen": prefetch_chosen,
           # busy cores while each ran (of os.cpu_count())
           "raw_cores_busy": cpu["raw"] / med["raw"], "service_cores_busy": cpu["service"] / med["service"]}
    if "service_inline" in t:  # paired per round: the same round's topic, the two services back to back
        row |= {"inline_patterns_per_s": n / med["service_inline"], "inline_vs_raw": med["raw"] / med["service_inline"],
                "prefetch_speedup": paired("service_inline", "service")}
    if "service_ending_inline" in t:  # the ending beside the next forward vs on the loop's thread (both prefetching)
        row |= {"ending_inline_patterns_per_s": n / med["service_ending_inline"],
                "overlap_speedup": paired("service_ending_inline", "service")}
    if "consume_alone" in t and "decode_alone" in t:
        # the service runs forward, consume and decode on the same 2 cores: its ratio if none of
        # them overlapped, and the ratio the machine's CPU allows if they overlapped perfectly
        row |= {"serial_bound": med["raw"] / (med["raw"] + med["consume_alone"] + med["decode_alone"]),
                "cpu_bound": cpu_bound(med["raw"], [cpu["raw"], cpu["consume_alone"], cpu["decode_alone"]]),
                "consume_alone_patterns_per_s": n / med["consume_alone"],
                "decode_alone_patterns_per_s": n / med["decode_alone"]}
    if "raw_square" in t:
        row["raw_square_patterns_per_s"] = n / med["raw_square"]
    if "raw_beside_poll" in t:
        # the prefetching loop with nothing in it but the poll (paired per round): what the
        # poll beside the forward costs the forward, and what the rest of the service costs
        row |= {"beside_poll_patterns_per_s": n / med["raw_beside_poll"],
                "beside_poll_vs_raw": paired("raw", "raw_beside_poll"),
                "service_vs_beside_poll": paired("raw_beside_poll", "service")}
    if "handler_alone" in t:  # the handler's own work (fresh input tensors, records built), no bus, paired
        row |= {"handler_patterns_per_s": n / med["handler_alone"], "handler_vs_raw": paired("raw", "handler_alone")}
    main_vs, main_lo, main_hi, _ = median_ci([s["main"] / r["main"] for r, s in zip(splits["raw"], splits["service"],
                                                                                    strict=True)])
    # the main thread's CPU (the forward and torch's workers, and in the service the loop's own
    # work: polls, decode, records) over the raw forward's, and the shares of every core
    sv, sv_lo, sv_hi, _ = median_ci([r[0] / x[0] for r, x in zip(t["raw"], t["service"], strict=True)])
    row |= {"paired_service_vs_raw": sv, "ci": f"{sv_lo:.3f}-{sv_hi:.3f}",
            "main_cpu_vs_raw": main_vs, "main_cpu_vs_raw_ci": f"{main_lo:.3f}-{main_hi:.3f}"}
    if "service_read_inline" in t:  # the payloads read on the helper beside the last forward over before this one's
        ra, ra_lo, ra_hi, _ = median_ci([x[0] / y[0] for x, y in zip(t["service_read_inline"], t["service"],
                                                                     strict=True)])
        row |= {"read_inline_patterns_per_s": n / med["service_read_inline"], "read_ahead_speedup": ra,
                "read_ahead_ci": f"{ra_lo:.3f}-{ra_hi:.3f}"}
    if "raw_traced" in t and "service_traced" in t:  # both sides without the forward's GIL hand-offs
        tr, tr_lo, tr_hi, _ = median_ci([r[0] / x[0] for r, x in zip(t["raw_traced"], t["service_traced"], strict=True)])
        te, te_lo, te_hi, _ = median_ci([x[0] / y[0] for x, y in zip(t["service"], t["service_traced"], strict=True)])
        row |= {"raw_traced_patterns_per_s": n / med["raw_traced"],
                "service_traced_patterns_per_s": n / med["service_traced"],
                "traced_service_vs_raw": tr, "traced_service_vs_raw_ci": f"{tr_lo:.3f}-{tr_hi:.3f}",
                "traced_vs_eager_service": te, "traced_vs_eager_service_ci": f"{te_lo:.3f}-{te_hi:.3f}"}
    split_rows = [{"span": cond, **cpu_shares(splits[cond])} for cond in splits]
    if switch_s:  # the service at the given GIL switch interval over the service at the default
        med_s, lo, hi, _ = median_ci([x[0] / y[0] for x, y in zip(t["service"], t["service_switch"], strict=True)])
        row |= {"switch_interval_s": switch_s, "switch_speedup": f"{med_s:.3f} ({lo:.3f}-{hi:.3f})"}
    return {"rows": [row], "cpu_shares": split_rows, "splits": splits, "seconds": {k: [w for w, _ in v] for k, v in t.items()},
            "cpu_seconds": {k: [c for _, c in v] for k, v in t.items()}}


def thread_group(t) -> str:
    """The encoder's Python threads, by what they do (``cpu_split``'s groups)."""
    if t.name in ("prefetch", "ending"):
        return t.name  # the Processor's helpers: the next batch's poll; a batch's ending beside it
    if t.name == "encoder-network-thread":
        return "producer_io"  # the service's kafka-python sender: the embeddings' batches and sockets
    return "other_threads"  # the consumer's heartbeats, the lag probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patterns", type=int, default=2048)
    ap.add_argument("--variant", default="small")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compression", default="auto", help="the patterns' codec on the wire (auto: zstd)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="also time the service with the GIL switch interval at this many seconds (paired)")
    ap.add_argument("--only", default=",".join(c for c in CONDITIONS if "traced" not in c),
                    help="the conditions to run beside raw and service, comma-separated, of "
                         f"{', '.join(CONDITIONS)} (default: all but the traced pair): fewer take less time a "
                         "round, for more rounds of one comparison")
    add_allocator_option(ap)
    args = ap.parse_args()
    only = tuple(c for c in args.only.split(",") if c)
    if unknown := set(only) - set(CONDITIONS):
        ap.error(f"unknown conditions {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
    tuned = tune_allocator(args)
    res = run(args.patterns, args.variant, args.batch, args.rounds, args.compression, args.switch_interval, only)
    print(table(res["rows"], list(res["rows"][0])))
    split = res["cpu_shares"]
    print(table(split, ["span", *sorted({k for r in split for k in r} - {"span"})]))
    print(SHARES_LEGEND)
    print("service_vs_raw = service patterns/s / raw in-memory forward patterns/s (target >= 0.9)")
    print("wrote", write_result("encoder" if args.compression == "auto" else f"encoder-{args.compression}",
                                {"allocator_tuned": tuned, **res}))


if __name__ == "__main__":
    main()
