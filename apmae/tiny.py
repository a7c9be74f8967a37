"""A tiny StarCoder2-style model and tokenizer built on the spot, with no download.

Used by tests and the end-to-end smoke run to exercise the StarCoder2 code path (FIM
sentinels, GQA attention, RoPE) on CPU in seconds: a byte-level BPE tokenizer trained on the
given Java text with StarCoder2's special tokens, and a randomly initialised ``Starcoder2``
(2 layers, 4 query heads, 2 KV heads). Its predictions are meaningless; its shapes are real.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SC2_SPECIAL = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<file_sep>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SC2_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SC2_SPECIAL[1:])


def tiny_starcoder2(vocab_size: int, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
                    seed: int = 0):
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(seed)
    cfg = Starcoder2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=512, sliding_window=None, bos_token_id=0, eos_token_id=0)
    return Starcoder2ForCausalLM(cfg).eval()


def save_tiny(out_dir: Path, texts: Iterable[str], **kw) -> Path:
    """Write a tiny model + tokenizer directory loadable with ``from_pretrained``."""
    out_dir = Path(out_dir)
    tok = train_tokenizer(texts)
    model = tiny_starcoder2(len(tok), **kw)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


SAMPLE_JAVA = '''package demo.util;

import java.util.List;
import java.util.Map;

/** A small class with a bit of everything: "strings", 42, true && false. */
public class Counter<T extends Comparable<T>> {
    private static final double RATE = 3.5e2;
    private final Map<String, List<Integer>> buckets = new java.util.HashMap<>();
    private int count = 0;
    private long mask = 0x1FL;

    public int add(int x, int y) {
        int total = x + y * 2;
        total += count;
        count -= 1;
        if (total > 10 && !isEmpty() || total == 0) {
            total = total % 7;
        }
        return total;
    }

    public boolean isEmpty() {
        String label = "empty"; // count = 99 is not an assignment here
        return count <= 0 ? true : false;
    }

    public double scale(double value) {
        double scaled = value / RATE - 1.0;
        mask <<= 2;
        for (int i = 0; i < 3; i++) {
            scaled = scaled * 2;
        }
        return scaled;
    }
}
'''
