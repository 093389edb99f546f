"""Session fixtures of the ONNX generator tests: one tiny model, built and exported once.

The model is a randomly initialised Llama-style causal LM (2 layers, hidden 64,
4 heads, 2 KV heads) with a byte-level BPE tokenizer trained here on onnx_helpers.CORPUS;
nothing comes from a hub. It is exported twice: with
``ftattn.onnx.export`` (optimum layout, position_ids, left padding) and, when
onnxruntime-genai is installed, with its model builder (GroupQueryAttention, fp32
and int4).
"""
import pytest

from onnx_helpers import build_tiny_llama, run_builder


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
