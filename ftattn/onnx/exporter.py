"""Export a local Hugging Face causal LM to the decoder layout the generator loads.

The layout is optimum's: inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` (batch, kv_heads, past,
head_size); outputs ``logits`` and ``present.{i}.key/value`` (batch, kv_heads,
past + sequence, head_size). A small wrapper turns the flat past tensors into the
model's cache: with transformers 5 that is ``DynamicCache(config=...)`` filled
with ``cache.update`` (``from_legacy_cache`` is gone), and the presents are read
back from ``cache.layers``. The graph comes from ``torch.onnx.export`` (the
torch.export-based exporter) with batch, sequence and past length dynamic.

Sliding-window (and chunked) layers get full caches: filled from a past input, such a
layer would count the window it keeps as the tokens it has seen and misplace its mask
once rows are padded; the model's masks apply the window. Models without an SDPA path
(Gemma 2) export with eager attention. Tested against transformers' generate() on tiny
Llama, Mistral (sliding window), Gemma 2 (sliding and full layers) and GPT-2 models;
Qwen2/3, Phi-3, Gemma, Gemma 3, Granite and OLMo 2 gave the same tokens too.
"""
from __future__ import annotations

import os
import shutil

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")




def _cache_wrapper(model, with_position_ids: bool = True):
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    num_layers = model.config.num_hidden_layers

    class DecoderWithCache(torch.nn.Module):
        """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present);
        without position_ids: forward(input_ids, attention_mask, *past), the positions
        counted on from the cache length (as transformers does when none are given)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            position_ids, past = (rest[0], rest[1:]) if with_position_ids else (None, rest)
            cache = DynamicCache(config=self.model.config)
            # a sliding-window (or chunked) layer keeps only its window and counts the tokens it
            # has seen; filled from a past input it would count the window, not the tokens, and
            # place its mask wrongly once rows are padded: full layers here, the window applied
            # by the model's masks alone (the presents then keep every position, as full layers do)
            cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                            for layer in cache.layers]
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in range(num_layers):
                present += [cache.layers[layer].keys, cache.layers[layer].values]
            return (out.logits, *present)

    return DecoderWithCache()


def export(hf_model_dir: str, out_dir: str, opset: int | None = None, position_ids: bool = True) -> str:
    """Export ``hf_model_dir`` (a local transformers causal LM) to ``out_dir``; returns the .onnx path.

    Writes ``model.onnx`` (weights inline below 2 GB, else ``model.onnx.data``),
    ``config.json``, ``genai_config.json`` (so onnxruntime-genai runs the same folder) and
    the tokenizer files found in ``hf_model_dir``. Only fp32
    export; the model is traced on CPU. ``position_ids=False`` leaves that input out,
    as some exports do: positions then follow the cache length, so a batch of prompts
    of different lengths cannot be padded, and the generator runs them one by one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf_model_dir = os.fspath(hf_model_dir)
    out_dir = os.fspath(out_dir)
    if not os.path.isfile(os.path.join(hf_model_dir, "config.json")):
        raise FileNotFoundError(f"{hf_model_dir!r} has no config.json; pass a local Hugging Face model folder "
                                f"(save_pretrained output)")
    if not os.path.isfile(os.path.join(hf_model_dir, "tokenizer.json")):
        raise FileNotFoundError(f"{hf_model_dir!r} has no tokenizer.json; the generator needs a fast tokenizer: "
                                f"AutoTokenizer.from_pretrained(...).save_pretrained({hf_model_dir!r})")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset={opset!r}: torch.onnx.export's dynamo exporter writes opset 18 or later "
                         f"(an older one came out as 18); pass an integer >= 18 or None for its default")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir!r} is a file; pass a folder to write model.onnx into (it is made "
                         f"when missing)")
    if os.path.isdir(out_dir) and os.path.samefile(hf_model_dir, out_dir):
        raise ValueError(f"out_dir={out_dir!r} is the model folder itself; export into a new folder (the "
                         f"export writes its own config.json and model.onnx beside a copy of the tokenizer)")
    try:  # one fused SDPA node per layer in the graph where the model has it
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    except ValueError:  # models that need their own attention (Gemma 2's soft-capping, say)
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32,
                                                     attn_implementation="eager")
    model.eval()
    # the layout holds one key and one value tensor per layer: attention layers' caches only
    # (not linear-attention or convolution states, nor layers that reuse another's cache)
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    kinds = sorted({type(layer).__name__ for layer in DynamicCache(config=model.config).layers
                    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if kinds:
        raise ValueError(f"{hf_model_dir!r} has cache layers of kind {kinds}; the export's layout holds one key and "
                         f"one value tensor per layer, for attention layers (DynamicLayer, "
                         f"DynamicSlidingWindowLayer) only")
    config = model.config
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // num_heads

    # example shapes: all > 1 and distinct, so torch.export specialises none of them
    batch, sequence, past_length = 2, 3, 4
    input_ids = torch.randint(0, config.vocab_size, (batch, sequence))
    attention_mask = torch.ones(batch, past_length + sequence, dtype=torch.int64)
    positions = torch.arange(past_length, past_length + sequence).expand(batch, sequence).contiguous()
    past = tuple(torch.zeros(batch, num_kv_heads, past_length, head_size) for _ in range(2 * num_layers))

    batch_dim = torch.export.Dim("batch_size")
    sequence_dim = torch.export.Dim("sequence_length")
    past_dim = torch.export.Dim("past_sequence_length")
    total_dim = torch.export.Dim("total_sequence_length")
    dynamic_shapes = {
        "input_ids": {0: batch_dim, 1: sequence_dim},
        "attention_mask": {0: batch_dim, 1: total_dim},
        "rest": ((({0: batch_dim, 1: sequence_dim},) if position_ids else ())
                 + tuple({0: batch_dim, 2: past_dim} for _ in range(2 * num_layers))),
    }
    input_names = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else []) + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    with torch.no_grad():
        program = torch.onnx.export(
            _cache_wrapper(model, position_ids).eval(),
            (input_ids, attention_mask, *((positions,) if position_ids else ()), *past), None,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            dynamo=True, optimize=True, opset_version=opset, verbose=False)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(path, external_data=size >= 2 ** 31)  # protobuf's 2 GB limit

    config.save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        source = os.path.join(hf_model_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out_dir, name))
    _write_genai_config(out_dir, config, model.generation_config, position_ids, num_kv_heads, head_size)
    return path


# model types onnxruntime-genai runs as a plain decoder (its "decoder" type covers others)
_GENAI_TYPES = ("gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "mistral", "olmo", "phi", "phi3",
                "qwen2", "qwen3")


def _write_genai_config(out_dir: str, config, generation_config, position_ids: bool, num_kv_heads: int,
                        head_size: int) -> None:
    """genai_config.json, so that onnxruntime-genai runs the same folder: the decoder's
    file and tensor names (optimum's layout, with position_ids when exported), head
    sizes, context length, special ids and greedy search defaults. Past and present are
    separate tensors (the graph concatenates): past_present_share_buffer false."""
    import json

    def first(value):
        return value[0] if isinstance(value, (list, tuple)) and value else value

    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = first(eos) if eos is not None else 0
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    genai = {
        "model": {
            "bos_token_id": first(getattr(config, "bos_token_id", None)) or 0,
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": int(head_size),
                "hidden_size": int(config.hidden_size),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": int(config.num_hidden_layers),
                "num_key_value_heads": int(num_kv_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": int(first(pad)),
            "type": config.model_type if config.model_type in _GENAI_TYPES else "decoder",
            "vocab_size": int(config.vocab_size),
        },
        "search": {"do_sample": False, "max_length": int(context), "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    with open(os.path.join(out_dir, "genai_config.json"), "w") as f:
        json.dump(genai, f, indent=4)

