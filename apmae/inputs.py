"""Building the target model's inputs: exactly 256 tokens around a masked span (paper section 4, Data).

Two prompt modes, chosen per target model:

* ``fim`` (StarCoder2): PSM order ``<fim_prefix> P <fim_suffix> S <fim_middle>``, sentinels
  included in the 256 tokens; the prediction scored is the token after ``<fim_middle>``.
  Truncation is centred on ``<fim_suffix>``: if it sits early, the whole prefix is kept and
  the suffix cut; otherwise ~127 suffix tokens are kept and the prefix fills the rest.
* ``prefix`` (models without FIM training, like the local SmolLM2 default): the 256 tokens
  that end right before the span; the prediction is the next token.

The file is tokenized once; spans are snapped to token boundaries of that tokenization
(a span may absorb the whitespace before it, which byte-level BPE merges into the next
token; a span that starts inside any other token is rejected). So the prefix never ends
mid-token, which would otherwise show the model a tokenization it never saw in training.
Correct = greedy argmax equals the first token of the span's text tokenized on its own.
Inputs that cannot fill 256 tokens are rejected with a counted reason, never padded.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from apmae.tasks import Span


@dataclass(frozen=True)
class Sentinels:
    prefix: str = "<fim_prefix>"
    suffix: str = "<fim_suffix>"
    middle: str = "<fim_middle>"


@dataclass(frozen=True)
class ModelInput:
    """One prompt. ``input_ids``: exactly ``length`` ids. ``target_token`` None for noise."""

    task: str
    input_ids: tuple[int, ...]
    target_text: str
    target_token: int | None
    span_ids: tuple[int, ...]
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Rejected:
    task: str
    reason: str


@dataclass
class TokenizedFile:
    """Token ids with contiguous character boundaries: token k covers ``[starts[k], ends[k])``."""

    text: str
    ids: list[int]
    starts: list[int]
    ends: list[int]
    _byte_to_char: list[int] | None = field(default=None, repr=False)

    def char_offset(self, byte_offset: int) -> int:
        """tree-sitter gives byte offsets into the UTF-8 source; map them to characters."""
        if self._byte_to_char is None:
            cum, total = [], 0
            for ch in self.text:
                cum.append(total)
                total += len(ch.encode("utf-8"))
            cum.append(total)
            self._byte_to_char = cum
        return bisect.bisect_left(self._byte_to_char, byte_offset)


class InputBuilder:
    """Turns a file and its spans into exact-length model inputs for one tokenizer and mode."""

    def __init__(self, tokenizer: Any, mode: str = "fim", length: int = 256, sentinels: Sentinels = Sentinels(),
                 suffix_keep: int = 127):
        if mode not in ("fim", "prefix"):
            raise ValueError(f"prompt mode {mode!r}: choose 'fim' or 'prefix'")
        self.tok, self.mode, self.length, self.suffix_keep = tokenizer, mode, length, suffix_keep
        self.sentinel_ids: tuple[int, int, int] | None = None
        if mode == "fim":
            ids = [tokenizer.convert_tokens_to_ids(s) for s in (sentinels.prefix, sentinels.suffix, sentinels.middle)]
            unk = getattr(tokenizer, "unk_token_id", None)
            if any(i is None or i == unk for i in ids):
                raise ValueError(f"tokenizer has no FIM sentinels {sentinels}; use mode='prefix' or configure them")
            self.sentinel_ids = tuple(ids)  # type: ignore[assignment]
        self.special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(self.sentinel_ids or ())
        self.vocab_size = len(tokenizer)
        self.rejections: Counter = Counter()

    # -- tokenization ---------------------------------------------------------------------
    def tokenize(self, text: str) -> TokenizedFile:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        # offsets may be trimmed of leading spaces; boundaries are contiguous by construction
        ends = [max(ends[k], ends[k - 1]) if k else ends[k] for k in range(len(ends))]
        starts = [0] + ends[:-1]
        return TokenizedFile(text, list(enc["input_ids"]), starts, ends)

    def first_token(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    # -- spans -> token ranges ------------------------------------------------------------
    def token_range(self, tf: TokenizedFile, char_start: int, char_end: int) -> tuple[int, int] | str:
        """Tokens ``[i, j)`` covering the span, or the reason it cannot be cut there."""
        if char_end <= char_start:
            return "empty span"
        i = bisect.bisect_right(tf.ends, char_start)
        if i >= len(tf.ids):
            return "span past the last token"
        if tf.starts[i] < char_start and not tf.text[tf.starts[i]:char_start].isspace():
            return "span starts inside a token"
        j = bisect.bisect_left(tf.ends, char_end) + 1
        return i, min(j, len(tf.ids))

    # -- assembling 256 tokens ------------------------------------------------------------
    def assemble(self, tf: TokenizedFile, i: int, j: int, task: str) -> ModelInput | Rejected:
        text = tf.text[tf.starts[i]:tf.ends[j - 1]]
        target = self.first_token(text)
        if not target:
            return self._reject(task, "span tokenizes to nothing")
        prefix, suffix = tf.ids[:i], tf.ids[j:]
        if self.mode == "prefix":
            if len(prefix) < self.length:
                return self._reject(task, f"prefix shorter than {self.length} tokens")
            ids = prefix[-self.length:]
        else:
            p_id, s_id, m_id = self.sentinel_ids  # type: ignore[misc]
            budget = self.length - 3
            s_take = min(len(suffix), max(self.suffix_keep, budget - len(prefix)))
            p_take = budget - s_take
            if p_take > len(prefix):
                return self._reject(task, f"file too short for {self.length} tokens")
            ids = [p_id, *prefix[len(prefix) - p_take:], s_id, *suffix[:s_take], m_id]
        assert len(ids) == self.length, (len(ids), self.length)
        return ModelInput(task, tuple(ids), text, target[0], tuple(tf.ids[i:j]), tf.starts[i], tf.ends[j - 1])

    def build(self, tf: TokenizedFile, span: Span) -> ModelInput | Rejected:
        """A tree-sitter span (byte offsets) -> model input."""
        rng = self.token_range(tf, tf.char_offset(span.start), tf.char_offset(span.end))
        if isinstance(rng, str):
            return self._reject(span.task, rng)
        return self.assemble(tf, *rng, span.task)

    def random_span(self, tf: TokenizedFile, rng: random.Random) -> ModelInput | Rejected:
        """The random task: a uniform 3-10 token span at a position with enough context."""
        n = rng.randint(3, 10)
        lo = self.length if self.mode == "prefix" else 0
        hi = len(tf.ids) - n
        if self.mode == "fim" and len(tf.ids) - n < self.length - 3:
            return self._reject("random", f"file too short for {self.length} tokens")
        if hi < lo:
            return self._reject("random", f"prefix shorter than {self.length} tokens")
        i = rng.randint(lo, hi)
        return self.assemble(tf, i, i + n, "random")

    def noise(self, rng: random.Random) -> ModelInput:
        """The noise task: uniformly random non-special ids (around the sentinels in fim mode)."""

        def draw(k: int) -> list[int]:
            out = []
            while len(out) < k:
                t = rng.randrange(self.vocab_size)
                if t not in self.special:
                    out.append(t)
            return out

        if self.mode == "prefix":
            ids = draw(self.length)
        else:
            p_id, s_id, m_id = self.sentinel_ids  # type: ignore[misc]
            half = (self.length - 3) // 2
            ids = [p_id, *draw(half), s_id, *draw(self.length - 3 - half), m_id]
        return ModelInput("noise", tuple(ids), "", None, (), 0, 0)

    def _reject(self, task: str, reason: str) -> Rejected:
        self.rejections[(task, reason)] += 1
        return Rejected(task, reason)
