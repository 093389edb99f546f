"""Tiny Hugging Face models for the integration tests (a uniquely named module:
`from conftest import` would pick whichever conftest.py was loaded last)."""
import torch

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per key/value head
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(attn_implementation: str, seed: int = 0, **overrides):
    """A randomly initialised Llama-style causal LM (head_dim 16), the same weights for one seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftattn.integrations.transformers import register

    register()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()
