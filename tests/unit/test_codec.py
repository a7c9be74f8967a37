import numpy as np
import pytest
import torch

from apmae.codec import (
    BadPattern,
    decode_many,
    decode_pattern,
    encode_pattern,
    pack_lower,
    packed_length,
    packed_values,
    read_packed,
    unpack,
)
from apmae.scaling import log_scale, pattern_log_min


def causal_softmax(n: int, seed: int = 0, sharp: float = 8.0) -> np.ndarray:
    g = np.random.default_rng(seed)
    logits = g.normal(size=(n, n)) * sharp
    logits[np.triu_indices(n, 1)] = -np.inf
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def test_packed_length_for_256():
    assert packed_length(256) == 32_896
    assert pack_lower(np.ones((256, 256))).shape == (32_896,)


def test_round_trip_error_on_scaled_pattern_is_bounded():
    a = causal_softmax(256)
    back = decode_pattern(encode_pattern(a), 256)
    assert np.triu(back, 1).sum() == 0
    err = (log_scale(back) - log_scale(a)).abs().max().item()
    assert err < 0.01, err  # bfloat16: ~0.4% on a -> ~0.004 / |m| on the scaled value
    f32 = decode_pattern(encode_pattern(a, "float32"), 256, "float32")
    assert np.array_equal(f32, a)


def test_log_scale_matches_reference_formula():
    a = causal_softmax(16, seed=3)
    s = log_scale(a).numpy()
    la = np.log(a[a > 0])
    m = la.min()
    expected = np.zeros_like(a)
    expected[a > 0] = (la - m) / (-m)
    assert np.allclose(s, expected, atol=1e-6)
    assert s.min() >= 0 and s.max() <= 1 and s[0, 0] == 1.0  # row 0 attends only to token 0
    assert np.all(s[np.triu_indices(16, 1)] == 0)


def test_log_scale_is_per_pattern_in_a_batch():
    a = np.stack([causal_softmax(8, 1), causal_softmax(8, 2, sharp=1.0)])
    batch = log_scale(a)
    assert torch.allclose(batch[1], log_scale(a[1]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5, 7.0])
def test_bad_patterns_are_rejected(bad):
    a = causal_softmax(8)
    a[3, 1] = bad
    with pytest.raises(BadPattern):
        encode_pattern(a)


def test_wrong_payload_size_is_rejected():
    with pytest.raises(BadPattern, match="expected"):
        decode_pattern(b"\x00" * 10, 256)
    nan_bits = np.full(packed_length(4), 0x7FC0, dtype=np.uint16).tobytes()
    with pytest.raises(BadPattern, match="non-finite"):
        decode_pattern(nan_bits, 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decode_many_equals_decode_pattern_and_sorts_out_bad_payloads(dtype):
    good = [encode_pattern(causal_softmax(64, seed=s), dtype) for s in range(4)]
    nan = bytearray(good[1])
    nan[0:2 if dtype == "bfloat16" else 4] = (b"\xc0\x7f" if dtype == "bfloat16" else b"\x00\x00\xc0\x7f")
    batch = [good[0], b"short", memoryview(good[2]), bytes(nan), good[3]]
    x, kept, bad = decode_many(batch, 64, dtype)
    assert kept == [0, 2, 4]
    assert sorted(bad) == [1, 3] and "bytes" in bad[1] and "non-finite" in bad[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    for row, i in enumerate(kept):
        assert np.array_equal(x[row].numpy(), decode_pattern(bytes(batch[i]), 64, dtype))
    bits, kept_too, _ = read_packed(batch, 64, dtype)  # the trainer's two halves, on two threads
    assert kept_too == kept and torch.equal(unpack(bits, 64), x)
    with pytest.raises(BadPattern):
        decode_pattern(bytes(nan), 64, dtype)


def test_decode_many_rejects_unknown_dtype_for_every_item():
    x, kept, bad = decode_many([b"", b""], 8, "float16")
    assert kept == [] and sorted(bad) == [0, 1] and x.shape[0] == 0


def test_unlog_inverts_the_log_scaling():
    from apmae.scaling import pattern_log_min, unlog

    a = torch.from_numpy(np.stack([causal_softmax(32, seed=s) for s in range(3)]))
    s, m = log_scale(a), pattern_log_min(a)
    back = unlog(s, m)
    keep = s > 0  # the smallest probability of each pattern maps to 0, like the zeros
    assert torch.allclose(back[keep], a[keep], rtol=1e-4, atol=1e-7)
    assert (back[~keep] == 0).all() and (a[~keep] <= torch.exp(m).expand_as(a)[~keep] * (1 + 1e-5)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pinned staging buffer is the GPU path")
def test_gpu_encode_through_the_pinned_buffer_gives_the_same_bytes():
    from apmae.codec import encode_many

    a = torch.from_numpy(np.stack([causal_softmax(64, seed=s) for s in range(5)])).cuda()
    a[3, 10, 2] = float("nan")
    for dtype in ("bfloat16", "float32"):
        pinned, why = encode_many(a, dtype)
        pageable, why2 = encode_many(a, dtype, pinned=False)
        cpu, _ = encode_many(a.cpu(), dtype)  # the host path: numpy
        assert [None if p is None else bytes(p) for p in pinned] == [None if p is None else bytes(p) for p in cpu]
        assert [None if p is None else bytes(p) for p in pageable] == [None if p is None else bytes(p) for p in cpu]
        assert pinned[3] is None and why[3] == why2[3] != ""
    big = torch.rand(40, 64, 64, device="cuda")  # a larger batch after a smaller one: the buffer grows
    assert len(encode_many(big)[0]) == 40


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_reading_packed_patterns_on_a_side_thread_starts_no_openmp_team():
    """The trainer reads patterns on its prefetch thread: read_packed is numpy, so a side thread
    that reads leaves no thread behind (tests/openmp.py says why that matters); the conversion
    (torch) runs on the training thread."""
    from tests.openmp import workers_beside

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: OpenMP makes no team to detect")
    rng = np.random.default_rng(0)
    pats = [np.tril(rng.random((256, 256))).astype(np.float32) for _ in range(16)]
    bufs = [encode_pattern(p / p.sum(1, keepdims=True)) for p in pats]
    (torch.zeros(16, 256, 256) + 1).sum()  # this thread's team exists before the count

    assert workers_beside(lambda: read_packed(bufs, 256)) == 0
    # the count sees a team: after a torch op, a worker beside the side thread
    assert workers_beside(lambda: (torch.zeros(16, 256, 256) + 1).sum()) > 0


@pytest.mark.gpu
def test_unpack_on_the_gpu_equals_the_cpu():
    """The trainer and the encoder convert on the model's device: the packed bits go over and
    the conversion (and, for a square, the scatter) runs there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the unpack on the device is the GPU path")
    for dtype in ("bfloat16", "float32"):
        bufs = [encode_pattern(causal_softmax(64, seed=s), dtype) for s in range(3)]
        bits, kept, _ = read_packed(bufs, 64, dtype)
        on_gpu = unpack(bits, 64, "cuda")
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), unpack(bits, 64))
        values = packed_values(bits, "cuda")
        assert values.is_cuda and torch.equal(values.cpu(), packed_values(bits))


def test_log_scale_of_underflows_and_subnormals_matches_the_formula():
    """Zeros inside the triangle (underflow) scale to 0 and do not set the minimum; a
    subnormal probability counts as the smallest normal float (ln of it sets m)."""
    a = causal_softmax(16, seed=4)
    a[9, 2] = 0.0
    s = log_scale(a).numpy()
    la = np.log(a[a > 0])
    expected = np.zeros_like(a)
    expected[a > 0] = (la - la.min()) / (-la.min())
    assert np.allclose(s, expected, atol=1e-6) and s[9, 2] == 0.0
    a[11, 3] = 1e-42  # subnormal in float32
    s = log_scale(a).numpy()
    tiny = np.log(np.finfo(np.float32).tiny)
    assert s[11, 3] == 0.0 and float(pattern_log_min(a)) == pytest.approx(tiny, rel=1e-6)
    assert np.all(s[np.triu_indices(16, 1)] == 0) and s.max() == 1.0


def test_a_batch_with_an_unknown_dtype_group_still_stacks():
    """The trainer reads a batch per wire dtype and concatenates the packed values: a group
    whose dtype is unknown (all dead-lettered) must not break the good group's batch."""
    good = [encode_pattern(causal_softmax(16, seed=s)) for s in range(3)]
    bits_good, kept_good, _ = read_packed(good, 16)
    bits_bad, kept_bad, bad = read_packed(good[:2], 16, "float16")
    assert kept_bad == [] and set(bad) == {0, 1} and "unknown wire dtype" in bad[0]
    x = torch.cat([packed_values(bits_good), packed_values(bits_bad)])
    assert x.shape == (3, packed_length(16))


def test_bf16_bits_are_torchs_conversion_bit_for_bit():
    """The host encoder converts to bfloat16 with numpy (no torch op on the producer's publisher
    thread); the wire must not change with it: every class of float32 (random bit patterns:
    normals, subnormals, both zeros, Inf, NaN, ties to even) gives torch's bits."""
    from apmae.codec import bf16_bits

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, size=4096, dtype=np.uint32) << 16) | 0x8000  # exactly halfway
    x = np.concatenate([bits, ties, np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 1, 0x7F7FFFFF],
                                             np.uint32)]).view(np.float32)
    ours = bf16_bits(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    finite_or_inf = ~np.isnan(x)
    assert np.array_equal(ours[finite_or_inf], theirs[finite_or_inf])
    back = ours.astype(np.uint16).astype(np.uint32) << 16
    assert np.isnan(back[~finite_or_inf].view(np.float32)).all()  # a NaN stays a NaN


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_encode_many_on_the_host_writes_what_one_pattern_at_a_time_does(dtype):
    """encode_many (one gather and one conversion for the batch, numpy) against encode_pattern
    (per pattern) and a torch conversion of the triangle; a non-finite head is left out with
    its count, the heads around it kept; a CPU tensor and its array encode alike."""
    from apmae.codec import encode_many, tril_indices

    a = np.stack([causal_softmax(64, seed=s) for s in range(6)])
    a[2, 10, 3], a[2, 11, 0], a[4, 0, 0] = np.nan, np.inf, -np.inf
    payloads, why = encode_many(a, dtype)
    assert [p is None for p in payloads] == [False, False, True, False, True, False]
    assert why[2] == "pattern has 2 non-finite values" and why[4] == "pattern has 1 non-finite values"
    rows, cols = tril_indices(64)
    for i in (0, 1, 3, 5):
        assert bytes(payloads[i]) == encode_pattern(a[i], dtype)
        t = torch.from_numpy(a[i][rows, cols])
        ref = t.to(torch.bfloat16).view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()
        assert bytes(payloads[i]) == ref.tobytes()
        assert np.allclose(decode_pattern(payloads[i], 64, dtype), a[i], rtol=1e-2, atol=1e-6)
    from_tensor, _ = encode_many(torch.from_numpy(a), dtype)
    assert [None if p is None else bytes(p) for p in from_tensor] == [None if p is None else bytes(p) for p in payloads]
