"""The pattern codec shared by every producer and consumer of attention patterns.

An attention pattern of a decoder-only model is an ``(n, n)`` lower-triangular matrix of
probabilities (row i attends to tokens 0..i). On the wire we keep only the lower triangle,
row-major, ``n (n + 1) / 2`` values (32,896 for n = 256), as raw probabilities in bfloat16:

* bfloat16 keeps float32's exponent range, so the tiny probabilities (1e-10 and below)
  that the paper's log scaling stretches out survive; float16 flushes them to zero below
  6e-8 and the scaled pattern would lose its whole lower range.
* its 8-bit mantissa costs at most ~0.4% relative error on a probability, i.e. ~0.004 on
  ``ln a`` and ``0.004 / |m|`` on the scaled value (``m`` ~ -10..-30): see the round-trip test.

Batch-level compression (zstd) is applied by the Kafka producer; the codec itself stays a
plain, zero-copy-friendly array. The paper's log scaling is a modelling step, not a wire
format: :mod:`apmae.scaling`.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import torch

WIRE_DTYPES = ("bfloat16", "float32")
# Byte order on the wire: little-endian, for both dtypes ("<f4", and bfloat16 as the upper
# 16 bits of a float32 stored as "<i2"), written explicitly so a big-endian host reads and
# writes the same bytes. (The envelope's header length is big-endian: apmae.messages.)
BF16_BITS = np.dtype("<i2")


class BadPattern(ValueError):
    """A pattern that must not enter the pipeline (NaN/Inf, wrong shape, out of range)."""


@lru_cache(maxsize=8)
def tril_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the lower triangle (diagonal included), row-major."""
    return np.tril_indices(n)


@lru_cache(maxsize=8)
def tril_mask(n: int) -> torch.Tensor:
    """(n, n) bool, True on the lower triangle (diagonal included)."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def packed_length(n: int) -> int:
    return n * (n + 1) // 2


def side_from_packed(length: int) -> int:
    """n such that n (n + 1) / 2 == length, or BadPattern."""
    n = int((np.sqrt(8 * length + 1) - 1) // 2)
    if packed_length(n) != length:
        raise BadPattern(f"{length} values is not a triangular number")
    return n


def check_pattern(a: np.ndarray) -> None:
    """Reject what would poison training: non-square, non-finite, negative or > 1 entries."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise BadPattern(f"pattern shape {a.shape} is not square")
    if not np.isfinite(a).all():
        raise BadPattern(f"pattern has {int((~np.isfinite(a)).sum())} non-finite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0 + 1e-3:
        raise BadPattern(f"pattern values in [{lo:.3g}, {hi:.3g}] are not probabilities")


def pack_lower(a: np.ndarray) -> np.ndarray:
    """``(n, n)`` -> ``(n (n + 1) / 2,)`` lower triangle, row-major."""
    rows, cols = tril_indices(a.shape[0])
    return a[rows, cols]


def unpack_lower(v: np.ndarray, n: int | None = None) -> np.ndarray:
    """``(n (n + 1) / 2,)`` -> ``(n, n)`` float32 with zeros above the diagonal."""
    n = side_from_packed(v.shape[0]) if n is None else n
    out = np.zeros((n, n), dtype=np.float32)
    rows, cols = tril_indices(n)
    out[rows, cols] = v
    return out


def bf16_bits(x: np.ndarray, nan_free: bool = False) -> np.ndarray:
    """float32 -> bfloat16 bits in wire order, rounded to nearest even, NaN as 0xFFFF: bit for
    bit what torch's CPU conversion writes (tests/unit/test_codec.py compares the two over
    random bit patterns of every class). numpy only, no torch op, so a producer may encode on
    its publisher thread: a torch op there gave that thread an OpenMP team of its own, beside
    which torch's work on the forward thread ran at ~0.8x (benchmarks/omp_threads.py).
    ``nan_free``: the caller has checked ``x`` (the NaN pass is skipped)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    bits = u >> 16  # in place from here on: one temporary the size of x
    bits &= 1
    bits += 0x7FFF
    bits += u  # no wrap for a finite or infinite value; NaNs are set below
    bits >>= 16
    out = bits.astype(np.uint16)
    if not nan_free:
        out[np.isnan(x)] = 0xFFFF
    return out.view(np.int16).astype(BF16_BITS, copy=False)  # wire order whatever the host's


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32 in host order (a copy): the upper half of a float32, exactly."""
    return (b.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_pattern(a: np.ndarray, dtype: str = "bfloat16") -> bytes:
    """``(n, n)`` float pattern -> wire bytes (lower triangle in ``dtype``). Validates first."""
    a = np.asarray(a, dtype=np.float32)
    check_pattern(a)
    v = pack_lower(a)
    if dtype == "bfloat16":
        return bf16_bits(v).tobytes()
    if dtype == "float32":
        return v.astype("<f4").tobytes()
    raise ValueError(f"unknown wire dtype {dtype!r}; choose one of {WIRE_DTYPES}")


def decode_pattern(buf: bytes, n: int, dtype: str = "bfloat16") -> np.ndarray:
    """Wire bytes -> ``(n, n)`` float32 pattern; BadPattern on a wrong size or dtype, or NaN/Inf."""
    if dtype not in WIRE_DTYPES:
        raise BadPattern(f"unknown wire dtype {dtype!r}; expected one of {WIRE_DTYPES}")
    if not isinstance(n, int) or n < 1:
        raise BadPattern(f"pattern size {n!r} is not a positive integer")
    width = 2 if dtype == "bfloat16" else 4
    expected = packed_length(n) * width
    if len(buf) != expected:
        raise BadPattern(f"pattern payload is {len(buf)} bytes, expected {expected} for n={n} {dtype}")
    if dtype == "bfloat16":
        v = _from_bf16_bits(np.frombuffer(buf, dtype=BF16_BITS))
    else:
        v = np.frombuffer(buf, dtype="<f4").astype(np.float32)
    if not np.isfinite(v).all():
        raise BadPattern("decoded pattern has non-finite values")
    return unpack_lower(v, n)


def payload_is_finite(buf, dtype: str = "bfloat16") -> bool:
    """True when no value of a wire payload is NaN or Inf, read without decoding it (an
    all-ones exponent marks both); a payload of the wrong dtype or length is left to the decoder."""
    if dtype == "bfloat16" and len(buf) % 2 == 0:
        return not bool(((np.frombuffer(buf, dtype="<u2") & 0x7F80) == 0x7F80).any())
    if dtype == "float32" and len(buf) % 4 == 0:
        return not bool(((np.frombuffer(buf, dtype="<u4") & 0x7F800000) == 0x7F800000).any())
    return True


def read_packed(bufs: list, n: int, dtype: str = "bfloat16") -> tuple[np.ndarray, list[int], dict[int, str]]:
    """The first half of :func:`decode_many`: check a batch of wire payloads of one size and
    dtype and stack their packed lower triangles, without unpacking them.

    Returns ``(bits (G, n (n + 1) / 2) uint16 for bfloat16 or uint32 for float32, kept indices
    (G,), {index: reason} for the rest)``. numpy only, no torch op: the trainer runs this on
    its prefetch thread, and a torch op there gave that thread its own OpenMP team, beside
    which the training step ran at 0.80x (small) and 0.87x (paper) (benchmarks/omp_threads.py).
    """
    if dtype not in WIRE_DTYPES:  # none kept; as wide as a good batch's bits, so the two stack
        width = packed_length(n) if isinstance(n, int) and n >= 1 else 1
        return np.zeros((0, width), np.uint16), [], {i: f"unknown wire dtype {dtype!r}" for i in range(len(bufs))}
    if not isinstance(n, int) or n < 1:
        return (np.zeros((0, 1), np.uint16), [],
                {i: f"pattern size {n!r} is not a positive integer" for i in range(len(bufs))})
    width = 2 if dtype == "bfloat16" else 4
    length = packed_length(n)
    bad: dict[int, str] = {}
    kept = []
    for i, b in enumerate(bufs):
        if len(b) != length * width:
            bad[i] = f"pattern payload is {len(b)} bytes, expected {length * width} for n={n} {dtype}"
        else:
            kept.append(i)
    bits = np.empty((len(kept), length), dtype=np.uint16 if width == 2 else np.uint32)
    wire = "<u2" if width == 2 else "<u4"
    for row, i in enumerate(kept):
        bits[row] = np.frombuffer(bufs[i], dtype=wire)
    # NaN/Inf read off the raw bits (an all-ones exponent): cheaper than isfinite on floats
    mask = 0x7F80 if width == 2 else 0x7F800000
    finite = ~((bits & mask) == mask).any(axis=1)
    if not finite.all():
        for row in np.flatnonzero(~finite).tolist():
            bad[kept[row]] = "decoded pattern has non-finite values"
        bits = bits[finite]
        kept = [i for row, i in enumerate(kept) if finite[row]]
    return bits, kept, bad


def packed_values(bits: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """Packed lower triangles (from :func:`read_packed`) to ``(G, n (n + 1) / 2)`` float32
    probabilities on ``device``, still packed: what :meth:`apmae.mae.APMAE.patches` takes,
    which lays out the model's patches without the square. One bf16 -> float32 conversion,
    on torch's threads: run it on the thread that runs the model. On a GPU the bits go over
    (half the bytes of float32) and the conversion runs there."""
    v = torch.from_numpy(bits.view(np.int16) if bits.dtype == np.uint16 else bits.view(np.float32)).to(device)
    return v.view(torch.bfloat16).float() if bits.dtype == np.uint16 else v


def unpack(bits: np.ndarray, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The second half of :func:`decode_many`: packed lower triangles (from
    :func:`read_packed`) to ``(G, n, n)`` float32 patterns on ``device``, zeros above the
    diagonal.

    One bf16 -> float32 conversion and one scatter for the batch, on torch's threads: run it
    on the thread that runs the model. On a GPU the packed bits go over (half the bytes of
    the unpacked float32 patterns, a quarter in bfloat16) and the scatter runs there.
    masked_scatter fills the True places in row-major order, the wire's order: measured 7x
    faster than index assignment (131 vs 974 us a 256-token pattern, one CPU thread)."""
    v = packed_values(bits, device)
    out = torch.zeros(len(bits), n, n, device=device)
    out.masked_scatter_(_tril_mask_on(n, str(torch.device(device))).expand(len(bits), n, n), v)
    return out


@lru_cache(maxsize=8)
def _tril_mask_on(n: int, device: str) -> torch.Tensor:
    return tril_mask(n).to(device)


def decode_many(bufs: list, n: int, dtype: str = "bfloat16",
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """Vectorised :func:`decode_pattern` for a batch of wire payloads of one size and dtype.

    Returns ``(patterns (G, n, n) float32 on device, kept indices (G,), {index: reason} for the
    rest)``: :func:`read_packed` then :func:`unpack`, for a caller that wants squares (the
    encoder and trainer feed the model packed triangles instead: :func:`packed_values`).
    """
    bits, kept, bad = read_packed(bufs, n, dtype)
    if not isinstance(n, int) or n < 1:
        return torch.zeros(0, 1, 1, device=device), kept, bad
    return unpack(bits, n, device), kept, bad


_staging = threading.local()  # per thread: a pinned host buffer reused by every GPU encode


def _pinned(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer of at least ``nbytes``, allocated once per thread (grown when
    needed). A fresh pageable tensor per call ran SC2-7B/15B's encode (38-61 MB per layer of
    16 samples) at ~1.2 GB/s while SC2-3B (25 MB) reached 5.6 GB/s; page faults above glibc's
    32 MB mmap threshold are our reading of that split (not profiled). This path: 4.8-5.7x on
    7B/15B in the same H100 run (benchmarks/gpu.py)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 64 << 20), dtype=torch.uint8, pin_memory=True)
        _staging.buf = buf
    return buf[:nbytes]


def encode_many(probs: torch.Tensor | np.ndarray, dtype: str = "bfloat16",
                pinned: bool = True) -> tuple[list[memoryview | bytes | None], list[str]]:
    """Vectorised ``encode_pattern`` for captured heads.

    probs: ``(N, n, n)`` float32 probabilities (one row per head): a CUDA tensor, or a host
    array (a CPU tensor is read as one, without a copy). Returns one wire payload per pattern
    (a view into one host array: no per-pattern copy), or None with a reason for a pattern
    that must be dead-lettered (NaN/Inf).
    """
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; choose one of {WIRE_DTYPES}")
    if isinstance(probs, torch.Tensor):
        if probs.is_cuda:
            return _encode_on_device(probs, dtype, pinned)
        probs = probs.detach().cpu().numpy()
    return _encode_on_host(np.asarray(probs, dtype=np.float32), dtype)


@lru_cache(maxsize=8)
def tril_flat_index(n: int) -> np.ndarray:
    """Flat positions in an ``(n, n)`` square of its lower triangle, row-major."""
    rows, cols = tril_indices(n)
    return (rows * n + cols).astype(np.intp)


def _encode_on_host(probs: np.ndarray, dtype: str) -> tuple[list[memoryview | None], list[str]]:
    """numpy only, no torch op: the producer encodes on its publisher thread, and a torch op
    there gave that thread an OpenMP team of its own, beside which the forward ran at ~0.8x
    (benchmarks/omp_threads.py). Not slower than torch on one thread either (256-token heads, min
    of 5, beside other work, 2026-12-05): 51 vs 153 us a head in calls of 9 heads, 87-104 vs
    133-142 us in calls of 270 (np.take of the triangle against torch's advanced indexing)."""
    n = probs.shape[-1]
    flat = np.take(probs.reshape(len(probs), n * n), tril_flat_index(n), axis=1)  # (N, n (n + 1) / 2)
    bad = (~np.isfinite(flat)).sum(axis=1).tolist()
    wire = bf16_bits(flat, nan_free=not any(bad)) if dtype == "bfloat16" else flat.astype("<f4", copy=False)
    return _with_reasons(_row_views(wire), bad)


def _encode_on_device(probs: torch.Tensor, dtype: str, pinned: bool) -> tuple[list[memoryview | bytes | None], list[str]]:
    """The triangle, the dtype conversion and the finiteness check run on the GPU; the host
    sees one copy of the whole batch and one of the finiteness counts. Asking the device per
    pattern (``bool(finite[i])``) synchronised a GPU thousands of times per batch (measured
    on an H100: capture + encoding at 14x the forward pass for SC2-15B)."""
    n = probs.shape[-1]
    rows, cols = (torch.from_numpy(i).to(probs.device) for i in tril_indices(n))
    flat = probs[:, rows, cols]  # (N, n (n + 1) / 2)
    bad = (~torch.isfinite(flat)).sum(dim=1).cpu().tolist()
    wire = flat.to(torch.bfloat16).view(torch.int16) if dtype == "bfloat16" else flat.float()
    order = BF16_BITS if dtype == "bfloat16" else "<f4"
    if pinned:
        # DMA into a reused page-locked buffer, then one small bytes object per pattern (64 KB
        # each, served from the heap): no large fresh allocation, so no page faults per call
        wire = wire.contiguous()
        host = _pinned(wire.numel() * wire.element_size()).view(wire.dtype).view(wire.shape)
        host.copy_(wire, non_blocking=True)
        torch.cuda.current_stream(wire.device).synchronize()
        arr = host.numpy().astype(order, copy=False)
        return _with_reasons(lambda i: arr[i].tobytes(), bad)
    return _with_reasons(_row_views(wire.cpu().numpy().astype(order, copy=False)), bad)


def _row_views(wire: np.ndarray):
    """``i -> row i's bytes``: one copy of the whole batch into bytes (not one per pattern);
    views of bytes hash and compare like bytes, so records carrying them behave as bytes do."""
    view = memoryview(np.ascontiguousarray(wire).tobytes())
    row = view.nbytes // max(1, len(wire))
    return lambda i: view[i * row:(i + 1) * row]


def _with_reasons(payload, bad: list[int]) -> tuple[list, list[str]]:
    """``payload(i)`` for each pattern with no non-finite value, else None and the reason."""
    out, reasons = [], []
    for i, k in enumerate(bad):
        out.append(payload(i) if k == 0 else None)
        reasons.append("" if k == 0 else f"pattern has {k} non-finite values")
    return out, reasons
