"""Helpers of the ONNX generator tests: the tiny model and tokenizer, the genai builder, folder copies.

(A module of its own, not conftest.py: several test folders have a conftest.)
"""
import os
import subprocess
import sys

# Local training text for the tokenizer; the non-ASCII words give multi-byte tokens.
CORPUS = [
    "The fault-tolerant attention kernel checks every block of the softmax against a checksum.",
    "def main(args) -> int:\n    return generate(args.model, args.prompts, max_new_tokens=128)\n",
    "Quantised weights in MX formats share one power-of-two scale per block of 32 values.",
    "Tokens are decoded as they arrive; a multi-byte character waits until it is whole.",
    "Café, naïve, Zürich, Ångström, 東京, 😀 and 🚀 are words and symbols in UTF-8.",
    "import numpy as np\nimport onnxruntime as ort\nsession = ort.InferenceSession(path)\n",
    "for step in range(max_new_tokens): logits = run(ids); ids = argmax(logits)",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

EOS_ID, PAD_ID, BOS_ID = 1, 2, 0


def build_tokenizer(folder, vocab=512, chat_template=CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer on CORPUS and save it to ``folder``; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return tokenizer.get_vocab_size()


def save_random_model(folder, model_class, config, seed):
    """A randomly initialised ``model_class(config)`` saved to ``folder``."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # wider weights than the 0.02 init, so greedy tokens are not near-ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


def build_tiny_llama(folder, *, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                     context=256, seed=0, chat_template=CHAT_TEMPLATE):
    """Write a random Llama-style model and a trained byte-level BPE tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=build_tokenizer(folder, vocab, chat_template), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False)
    return save_random_model(folder, LlamaForCausalLM, config, seed)


def run_builder(hf_dir, out_dir, precision):
    """onnxruntime-genai's model builder, offline from the local folder."""
    result = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
         "-p", precision, "-e", "cpu", "-c", str(out_dir) + "_cache"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"genai builder failed ({precision}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return str(out_dir)


def copy_folder(source, destination, skip=()):
    import shutil

    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        if name not in skip:
            shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    return str(destination)


def edit_decoder(source, destination, edit):
    """Copy a model folder and rewrite its model.onnx with ``edit(graph)`` (weights inline)."""
    import onnx

    folder = copy_folder(source, destination)
    path = os.path.join(folder, "model.onnx")
    model = onnx.load(path)
    edit(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return folder


def rename_uses(graph, old, new):
    """Make every node that reads ``old`` read ``new`` instead."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def rename_output(graph, old, new):
    """Make the node that writes ``old`` write ``new`` (a node added after it writes ``old``)."""
    producer = next(node for node in graph.node if old in node.output)
    producer.output[:] = [new if name == old else name for name in producer.output]


# model families beyond Llama, for exports and builder models against transformers:
# Mistral's sliding window (6 tokens, so the test prompts and new tokens run past it),
# Gemma 2's sliding and full layers mixed (eager attention: it has no SDPA path), GPT-2's
# config spellings (n_positions, n_head) and fused projections
FAMILIES = {
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "gemma2-mixed": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=6)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def build_family(folder, family):
    """A tiny random model of one of FAMILIES with build_tiny_llama's tokenizer, in ``folder``."""
    import transformers

    config_name, model_name, options = FAMILIES[family]
    vocab = build_tokenizer(folder)
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if options is None:  # GPT-2 spells its sizes its own way
        config = getattr(transformers, config_name)(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                                    n_positions=256, **ids)
    else:
        config = getattr(transformers, config_name)(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **ids, **options)
    return save_random_model(folder, getattr(transformers, model_name), config, seed=1)


def transformers_greedy(folder, prompts, new_tokens, padding_side="left"):
    """transformers' greedy new tokens for a padded batch of ``prompts`` (EOS never stops)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = padding_side
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID,
                             eos_token_id=[])
    return out[:, encoded.input_ids.shape[1]:].tolist()


def genai_greedy(folder, ids, new_tokens):
    """onnxruntime-genai's own greedy tokens for one prompt of token ids (skips the test
    when onnxruntime-genai is not installed)."""
    import pytest

    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, min_length=0)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
