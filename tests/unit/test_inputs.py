"""The 256-token invariant, truncation around <fim_suffix>, prefix mode, token boundaries."""

from __future__ import annotations

import random

import pytest

from apmae.inputs import InputBuilder, Rejected, TokenizedFile
from apmae.tasks import mine_spans
from apmae.tiny import SAMPLE_JAVA, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([SAMPLE_JAVA] * 3, vocab_size=600)


def crafted(n: int) -> TokenizedFile:
    """n one-character tokens 'a'.. with ids 1000+k: truncation arithmetic is easy to check."""
    text = "x" * n
    return TokenizedFile(text, [1000 + k for k in range(n)], list(range(n)), list(range(1, n + 1)))


def test_fim_truncation_early_suffix_keeps_whole_prefix(tok):
    b = InputBuilder(tok, "fim")
    p, s, m = b.sentinel_ids
    tf = crafted(600)
    out = b.assemble(tf, 40, 43, "random")  # prefix of 40 tokens: "<fim_suffix> sits early"
    ids = list(out.input_ids)
    assert len(ids) == 256 and ids[0] == p and ids[-1] == m
    assert ids[1:41] == [1000 + k for k in range(40)]  # the whole prefix
    assert ids[41] == s and ids[42:255] == [1043 + k for k in range(213)]  # suffix fills the rest
    assert out.span_ids == (1040, 1041, 1042)


def test_fim_truncation_late_suffix_keeps_127_suffix_tokens(tok):
    b = InputBuilder(tok, "fim")
    tf = crafted(1000)
    ids = list(b.assemble(tf, 500, 505, "random").input_ids)
    assert len(ids) == 256
    si = ids.index(b.sentinel_ids[1])
    assert ids[si + 1:255] == [1505 + k for k in range(127)]  # ~127 suffix tokens
    assert ids[1:si] == [1000 + k for k in range(500 - 126, 500)]  # prefix fills the rest, ends at the span


def test_fim_short_suffix_takes_more_prefix_and_too_short_is_rejected(tok):
    b = InputBuilder(tok, "fim")
    ids = list(b.assemble(crafted(300), 290, 295, "random").input_ids)
    assert len(ids) == 256 and ids[-6:-1] == [1295 + k for k in range(5)]
    r = b.assemble(crafted(100), 50, 53, "random")
    assert isinstance(r, Rejected) and "too short" in r.reason
    assert b.rejections[("random", r.reason)] == 1


def test_prefix_mode_ends_right_before_the_span(tok):
    b = InputBuilder(tok, "prefix")
    out = b.assemble(crafted(400), 300, 304, "random")
    assert list(out.input_ids) == [1000 + k for k in range(44, 300)]
    assert isinstance(b.assemble(crafted(400), 200, 204, "random"), Rejected)


def test_real_file_every_input_is_exactly_256_and_target_is_span_first_token(tok):
    text = SAMPLE_JAVA * 4
    b = InputBuilder(tok, "fim")
    tf = b.tokenize(text)
    res = mine_spans(text.encode())
    built = [b.build(tf, s) for t in res.spans.values() for s in t]
    ok = [x for x in built if not isinstance(x, Rejected)]
    assert len(ok) > 50
    for x in ok:
        assert len(x.input_ids) == 256
        assert x.target_token == tok(x.target_text, add_special_tokens=False)["input_ids"][0]
        assert x.input_ids.count(b.sentinel_ids[2]) == 1
        # the prefix ends on a token boundary: the text before the span re-tokenizes to the same ids
        before = tok(text[: x.char_start], add_special_tokens=False)["input_ids"]
        assert before[-5:] == list(tf.ids[len(before) - 5 : len(before)])
    eol = [x for x in ok if x.task == "end_of_line"]
    assert eol and all(x.target_text.lstrip(" \t").startswith("\n") for x in eol)


def test_spans_inside_tokens_are_rejected_not_misaligned(tok):
    b = InputBuilder(tok, "prefix")
    tf = TokenizedFile("abcdef", [1, 2], [0, 3], [3, 6])
    assert b.token_range(tf, 1, 3) == "span starts inside a token"
    tf2 = TokenizedFile("ab  cd", [1, 2], [0, 2], [2, 6])  # token 2 is "  cd"
    assert b.token_range(tf2, 4, 6) == (1, 2)  # whitespace before the span is absorbed


def test_random_and_noise_tasks(tok):
    b = InputBuilder(tok, "fim")
    tf = b.tokenize(SAMPLE_JAVA * 4)
    r = b.random_span(tf, random.Random(3))
    assert len(r.input_ids) == 256 and 3 <= len(r.span_ids) <= 10
    n1, n2 = b.noise(random.Random(7)), b.noise(random.Random(7))
    assert n1 == n2 and len(n1.input_ids) == 256 and n1.target_token is None
    inner = [i for i in n1.input_ids if i not in b.sentinel_ids]
    assert len(inner) == 253 and not (set(inner) & b.special)
    pre = InputBuilder(tok, "prefix").noise(random.Random(1))
    assert len(pre.input_ids) == 256


def test_fim_mode_requires_sentinels():
    from apmae.inputs import Sentinels
    from apmae.tiny import train_tokenizer as tt

    with pytest.raises(ValueError, match="sentinels"):
        InputBuilder(tt(["class A {}"], vocab_size=300), "fim", sentinels=Sentinels("<PRE>", "<SUF>", "<MID>"))
