"""The SDPA + selected-heads capture equals eager attention; head subsampling; labelling."""

from __future__ import annotations

import pytest
import torch

from apmae import capture
from apmae.inputs import ModelInput
from apmae.target import TargetModel, is_correct
from apmae.tiny import SAMPLE_JAVA, tiny_starcoder2, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer([SAMPLE_JAVA] * 3, vocab_size=700)
    return tok, tiny_starcoder2(len(tok), layers=2, heads=4, kv_heads=2)


def eager_attentions(model, ids):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(ids, output_attentions=True).attentions


def test_capture_of_all_heads_equals_eager(tiny):
    tok, model = tiny
    ids = torch.randint(10, len(tok), (3, 256), generator=torch.Generator().manual_seed(0))
    ref = eager_attentions(model, ids)
    cap = capture.install(model)
    for layer in range(2):
        cap.select[layer] = torch.arange(4).expand(3, 4)
    with torch.no_grad():
        logits = model(ids).logits
    for layer in range(2):
        got = cap.captured[layer]
        assert got.shape == (3, 4, 256, 256)
        assert (got - ref[layer]).abs().max().item() < 1e-5
    # and the model's output is unchanged by capturing (SDPA path)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, atol=1e-5)


def test_capture_of_a_per_sample_subset_maps_query_heads_to_kv_heads(tiny):
    tok, model = tiny
    ids = torch.randint(10, len(tok), (2, 256), generator=torch.Generator().manual_seed(1))
    ref = eager_attentions(model, ids)
    cap = capture.install(model)
    sel = torch.tensor([[3], [1]])  # head 3 reads KV head 1, head 1 reads KV head 0
    cap.select[1] = sel
    with torch.no_grad():
        model(ids)
    assert 0 not in cap.captured  # unselected layers cost nothing
    got = cap.captured[1]
    assert got.shape == (2, 1, 256, 256)
    assert torch.allclose(got[0, 0], ref[1][0, 3], atol=1e-5) and torch.allclose(got[1, 0], ref[1][1, 1], atol=1e-5)
    assert torch.all(got.triu(1) == 0) and torch.allclose(got.sum(-1), torch.ones(2, 1, 256))


def test_random_heads_are_25_percent_and_fresh_per_draw():
    g = torch.Generator().manual_seed(0)
    draws = [capture.random_heads(24, 0.25, g) for _ in range(20)]
    assert all(len(d) == 6 and len(set(d.tolist())) == 6 for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 15  # fresh, not one fixed subset
    assert len(capture.random_heads(9, 0.25, g)) == 2 and len(capture.random_heads(2, 0.25, g)) == 1


def mi(target: int | None) -> ModelInput:
    return ModelInput("identifier", (1,) * 256, "x", target, (target or 0,), 0, 1)


def test_correctness_labelling():
    assert is_correct(5, mi(5)) is True
    assert is_correct(6, mi(5)) is False
    assert is_correct(5, mi(None)) is None  # noise: no label
    assert is_correct(torch.tensor(5), mi(5)) is True


def test_runner_predicts_greedy_argmax_and_generates_spans(tiny):
    tok, model = tiny
    lm = TargetModel(model, tok, "tiny")
    x = ModelInput("random", tuple(range(10, 266)), "abc", 7, (7, 8, 9), 0, 3)
    res = lm.run([x, x], {0: torch.tensor([[0, 2], [1, 3]])}, generate_span=True)
    with torch.no_grad():
        expect = model(torch.tensor([list(x.input_ids)])).logits[0, -1].argmax().item()
    assert res.predicted.tolist() == [expect, expect]
    assert res.patterns[0].shape == (2, 2, 256, 256) and list(res.patterns) == [0]
    assert len(res.generated) == 2 and len(res.generated[0]) == 3 and res.generated[0][0] == expect


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bf16 batched capture runs on GPU only")
def test_bf16_batched_capture_on_gpu(tiny):
    tok, model = tiny
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(10, len(tok), (8, 256), device="cuda")
    ref = eager_attentions(model, ids)
    cap = capture.install(model)
    cap.select[0] = torch.arange(4, device="cuda").expand(8, 4)
    with torch.no_grad():
        model(ids)
    assert (cap.captured[0] - ref[0].float()).abs().max().item() < 2e-2  # bf16 logits, fp32 softmax


def test_importing_apmae_leaves_transformers_attention_registry_alone():
    import subprocess
    import sys

    code = ("from transformers import AttentionInterface; import apmae.capture, apmae.target; "
            "print('apmae_capture' in AttentionInterface._global_mapping)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
