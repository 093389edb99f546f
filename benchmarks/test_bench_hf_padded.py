"""A left-padded batch through a Hugging Face model's generate(): ftattn against torch's
SDPA on the same model, paired in one run (this machine is shared and noisy).

8 prompts of 3..32 tokens, 32 new tokens, greedy, a random 4-layer Llama (hidden 256,
8 query / 2 key-value heads), fp32 on CPU. ftattn runs each layer's padded batch as one
call with per-sample key ranges (key_start / key_end); before those it ran one call per
sample: 228-232 ms against 118-121 ms with ranges on the development machine (2 cores).
The two implementations must give the same tokens.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import environment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "integrations"))

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=512)
LENGTHS = [5, 17, 9, 32, 3, 24, 12, 28]
NEW_TOKENS = 32


def _batch():
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(LENGTHS):
        ids[b, width - n:] = torch.randint(3, CONFIG["vocab_size"], (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tokens():
    return {}


@pytest.mark.parametrize("implementation", ["sdpa", "ftattn"])
def test_generate_left_padded_batch(benchmark, implementation, tokens):
    pytest.importorskip("transformers")
    from hf_models import tiny_llama

    model = tiny_llama(implementation, **CONFIG)
    ids, mask = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                  min_new_tokens=NEW_TOKENS)

    def run():
        with torch.inference_mode():
            return model.generate(**kwargs)

    out = benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    tokens[implementation] = out
    benchmark.extra_info.update({"prompts": LENGTHS, "new_tokens": NEW_TOKENS, "config": CONFIG,
                                 **environment("cpu")})
    if len(tokens) == 2:
        assert torch.equal(tokens["sdpa"], tokens["ftattn"])
