"""The harness on onnxruntime-genai builder models gives genai's own greedy tokens.

The peer is onnxruntime-genai's Generator on the same model folder (fp32 and int4
MatMulNBits), fed the same token ids (genai's tokenizer does not add the BOS that
tokenizer.json's post-processor adds, so both get the ids from ours). Skips when
onnxruntime-genai is not installed.
"""
import pytest

from ftattn.onnx import Generator, Padding

from onnx_helpers import genai_greedy

PROMPTS = ["def main(args) -> int:", "Café", "The fault-tolerant attention kernel checks every block of"]
NEW_TOKENS = 20


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("shared_buffer", [True, False])
def test_builder_model_greedy_matches_genai(precision, shared_buffer, request):
    folder = request.getfixturevalue(f"builder_{precision}")
    generator = Generator.from_pretrained(folder, shared_buffer=shared_buffer)
    assert generator.spec.group_query_attention and generator.spec.padding is Padding.RIGHT
    assert generator.shared_buffer is shared_buffer
    ids = [generator.encode(p) for p in PROMPTS]
    expected = [genai_greedy(folder, row, NEW_TOKENS) for row in ids]
    # genai stops at the model's EOS id (1) as the harness does; both run to 20 here
    assert [r.token_ids for r in generator.generate(ids, NEW_TOKENS)] == expected  # one padded batch
    assert generator.generate(ids[0], NEW_TOKENS)[0].token_ids == expected[0]


def test_int4_model_is_quantised(builder_int4):
    import onnx

    model = onnx.load(f"{builder_int4}/model.onnx", load_external_data=False)
    assert any(node.op_type == "MatMulNBits" for node in model.graph.node)


def test_builder_fp16_cpu_model_runs(tiny_hf, builder_fp32, tmp_path):
    """The builder's fp16 CPU model (MultiHeadAttention, position_ids, a float16 cache):
    onnxruntime 1.31 reuses the buffer of a Cast it inserts across shapes and stops at the
    first decode step ("Shape mismatch attempting to re-use buffer"; onnxruntime-genai 0.18
    stops there too); the loader turns buffer reuse off for float16 graphs on CPU. Its greedy
    tokens equal the fp32 model's where fp32's two best logits are 0.06 or more apart (the
    first 4 tokens of these two prompts), in a left-padded batch and alone."""
    import numpy as np

    from onnx_helpers import run_builder

    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai builds the model")
    folder = run_builder(tiny_hf, tmp_path / "fp16", "fp16")
    generator = Generator.from_pretrained(folder)
    assert generator.spec.kv_dtype == np.float16 and generator.spec.padding is Padding.LEFT
    reference = Generator.from_pretrained(builder_fp32)
    ids = [reference.encode(p) for p in PROMPTS[:2]]
    expected = [r.token_ids for r in reference.generate(ids, 4, eos_token_id=[])]
    assert [r.token_ids for r in generator.generate(ids, 4, eos_token_id=[])] == expected
    assert generator.generate(ids[1], 4, eos_token_id=[])[0].token_ids == expected[1]
