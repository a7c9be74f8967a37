"""The encoder's loop with each batch's ending in line vs beside the next forward (issue #14).

``Processor.overlap_ending`` moves a batch's ending (publish its embeddings, flush, done marks,
commit) onto the helper thread that fetches the next batch, while the loop's thread runs the
next forward. Whether that pays depends on what the forward leaves free, so two forwards:

- ``cpu``: the real small AP-MAE, one torch thread (a core to spare on 2 cores): the helper's
  work lands on the neighbour vCPU, which slows the forward here (``benchmarks/core_sharing.py``);
- ``offcpu``: a stand-in that holds no CPU and no GIL for ``--offcpu-ms`` per batch (a sleep, as
  a GPU forward's wait on the device is), then returns zero embeddings of the model's width;
  the rest of the handler (``read_packed``, ``packed_values``, building the records) is real.
  It measures the loop, not a GPU: what the ending costs when the forward leaves the CPU free.

Both: the real encoder service (``Encoder.handle`` in its ``Processor``, prefetching, the
embedded broker and Redis), the same patterns on a fresh copy of the topic per run, group
joined before the clock, the clock stopped at the last commit. Paired rounds, order
alternating; ratio overlapped / in line per round, median and distribution-free interval.
``forward_alone``: the forward (or the stand-in) alone over the same batches, the floor.
``read_inline``: overlapped, but each batch's payloads read (``read_packed``) on the loop's
thread before its forward rather than on the helper beside the last one (``Processor.prepare``
off); ``read_ahead_speedup`` is overlapped's rate over it, paired.

    python benchmarks/ending_overlap.py [--patterns 2048] [--rounds 6] [--offcpu-ms 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    add_allocator_option,
    embedded_infra,
    median_ci,
    table,
    tune_allocator,
    write_result,
)
from benchmarks.bus import pattern_records, patterns


def run(n: int, batch: int, rounds: int, offcpu_ms: float) -> dict:
    import torch

    from apmae.mae import APMAE, save_pretrained, variant
    from apmae.topics import PATTERNS_MINE
    from services.bus import Bus, Output
    from services.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    ckpt = save_pretrained(APMAE(variant("small")), Path(tempfile.mkdtemp(prefix="apmae-eo-")) / "ckpt")
    recs = pattern_records(patterns(n), "p")

    def offcpu(model: APMAE):
        """The stand-in forward: off the CPU for offcpu_ms, then zeros of the model's width."""
        with torch.inference_mode():
            width = model.embed(torch.zeros(1, 256 * 257 // 2)).shape[1]

        def embed(x: torch.Tensor) -> torch.Tensor:
            time.sleep(offcpu_ms / 1000)
            return torch.zeros(x.shape[0], width)
        return embed

    rows = []
    with embedded_infra(("broker", "redis")) as infra:
        runs = [0]

        def service(forward: str, overlap: bool, read_ahead: bool = True) -> float:
            runs[0] += 1
            cfg = EncoderConfig(bootstrap_servers=infra.bootstrap_servers, redis_url=infra.redis_url,
                                topic_prefix=f"eo{runs[0]}.", checkpoint=str(ckpt), batch_size=batch,
                                state_dir=Path(tempfile.mkdtemp(prefix="apmae-eo-state-")))
            bus = Bus(cfg, "bench")
            bus.ensure_topics([PATTERNS_MINE])
            for r in recs:
                bus.send(Output(PATTERNS_MINE, r, key=r.key))
            bus.close()
            enc = Encoder(cfg)
            proc = enc.processor()
            proc.prefetch, proc.overlap_ending = True, overlap
            if not read_ahead:  # the payloads read on the loop's thread, not on the helper (Processor.prepare)
                proc.prepare = None
            enc.ensure_model()
            if forward == "offcpu":
                enc.model.embed = offcpu(enc.model)
            proc.connect()
            while not proc.consumer.assignment():
                proc.consumer.poll(timeout_ms=200, max_records=1)
            proc.consumer.seek_to_beginning()
            done, t0 = [0, 0.0], time.perf_counter()

            def progress(k: int) -> None:  # the clock stops at the last commit
                done[0] += k
                if done[0] >= n:
                    done[1] = time.perf_counter()

            assert proc.run(max_messages=n, idle_timeout_s=30, progress=progress) >= n
            return done[1] - t0

        model = APMAE(variant("small")).eval()

        def forward_alone(forward: str) -> float:
            from apmae.codec import packed_values, read_packed

            payloads = [r.payload for r in recs]
            embed = offcpu(model) if forward == "offcpu" else model.embed
            t0 = time.perf_counter()
            with torch.inference_mode():
                for k in range(0, n, batch):
                    embed(packed_values(read_packed(payloads[k:k + batch], 256)[0]))
            return time.perf_counter() - t0

        for forward in ("cpu", "offcpu"):
            t: dict[str, list[float]] = {"alone": [], "inline": [], "overlapped": [], "read_inline": []}
            forward_alone(forward)  # warm-up
            for k in range(rounds):
                steps = [("alone", partial(forward_alone, forward)), ("inline", partial(service, forward, False)),
                         ("overlapped", partial(service, forward, True)),
                         ("read_inline", partial(service, forward, True, False))]
                for name, fn in steps if k % 2 == 0 else steps[::-1]:
                    t[name].append(fn())
            med = {k: statistics.median(v) for k, v in t.items()}
            ratio, lo, hi, _ = median_ci([a / b for a, b in zip(t["inline"], t["overlapped"], strict=True)])
            ra, ra_lo, ra_hi, _ = median_ci([a / b for a, b in zip(t["read_inline"], t["overlapped"], strict=True)])
            rows.append({"forward": forward, "offcpu_ms": offcpu_ms if forward == "offcpu" else None,
                         "threads": torch.get_num_threads(), "patterns": n, "batch": batch, "rounds": rounds,
                         "alone_patterns_s": n / med["alone"], "inline_patterns_s": n / med["inline"],
                         "overlapped_patterns_s": n / med["overlapped"],
                         "inline_vs_alone": med["alone"] / med["inline"],
                         "overlapped_vs_alone": med["alone"] / med["overlapped"],
                         "overlap_speedup": ratio, "overlap_ci": f"{lo:.3f}-{hi:.3f}",
                         # both overlapped: the payloads read on the helper (prepare) over on the loop's thread
                         "read_inline_patterns_s": n / med["read_inline"], "read_ahead_speedup": ra,
                         "read_ahead_ci": f"{ra_lo:.3f}-{ra_hi:.3f}",
                         "seconds": {k: [round(x, 3) for x in v] for k, v in t.items()}})
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patterns", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--offcpu-ms", type=float, default=20.0,
                    help="the stand-in forward's time per batch (an H100 embeds 128 patterns of the paper "
                         "variant in ~22 ms in float32, ~5 ms in bf16: benchmarks/results/gpu.json)")
    add_allocator_option(ap)
    args = ap.parse_args()
    tuned = tune_allocator(args)
    res = run(args.patterns, args.batch, args.rounds, args.offcpu_ms)
    cols = [c for c in res["rows"][0] if c != "seconds"]
    print(table(res["rows"], cols))
    print("overlap_speedup = in-line seconds / overlapped seconds, paired per round (median, 95% interval)")
    print("wrote", write_result("ending_overlap", {"allocator_tuned": tuned, **res}))


if __name__ == "__main__":
    main()
