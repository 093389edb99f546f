"""Session fixtures of the ONNX generator tests: one tiny model, built and exported once.

The model is a randomly initialised Llama-style causal LM (2 layers, hidden 64,
4 heads, 2 KV heads) with a byte-level BPE tokenizer trained here on the corpus
below; nothing comes from a hub. It is exported twice: with
``ftattn.onnx.export`` (optimum layout, position_ids, left padding) and, when
onnxruntime-genai is installed, with its model builder (GroupQueryAttention, fp32
and int4).
"""
import os
import subprocess
import sys

import pytest

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


def build_tiny_llama(folder, *, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                     context=256, seed=0, chat_template=CHAT_TEMPLATE):
    """Write a random Llama-style model and a trained byte-level BPE tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider weights than the 0.02 init, so greedy tokens are not near-ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


def run_builder(hf_dir, out_dir, precision):
    """onnxruntime-genai's model builder, offline from the local folder."""
    result = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
         "-p", precision, "-e", "cpu", "-c", str(out_dir) + "_cache"],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"genai builder failed ({precision}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_hf")))


@pytest.fixture(scope="session")
def hf_model(tiny_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_hf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def exported(tiny_hf, tmp_path_factory):
    from ftattn.onnx import export

    out = str(tmp_path_factory.mktemp("tiny_onnx"))
    export(tiny_hf, out)
    return out


@pytest.fixture(scope="session")
def builder_fp32(tiny_hf, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install onnxruntime-genai)")
    return run_builder(tiny_hf, tmp_path_factory.mktemp("genai") / "fp32", "fp32")


@pytest.fixture(scope="session")
def builder_int4(tiny_hf, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install onnxruntime-genai)")
    return run_builder(tiny_hf, tmp_path_factory.mktemp("genai") / "int4", "int4")


@pytest.fixture(scope="session")
def generators(exported, request):
    """Generator per model kind, loaded once: exported (left padding) and builder fp32 (GQA)."""
    from ftattn.onnx import Generator

    cache = {}

    def get(kind, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            folder = exported if kind == "exported" else request.getfixturevalue("builder_fp32")
            cache[key] = Generator.from_pretrained(folder, **kwargs)
        return cache[key]

    return get


def copy_folder(source, destination, skip=()):
    import shutil

    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        if name not in skip:
            shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    return str(destination)
