"""Decoder layouts beyond the two of the main tests: element types and inputs read
from the session (int32 position ids, optimum's merged-decoder use_cache_branch),
inputs the loop cannot feed, other model families' exports (sliding windows, mixed
layers, GPT-2), and a session with a provider before the CPU one."""
import json
import os

import numpy as np
import pytest
import torch

from ftattn.onnx import Generator

from onnx_helpers import EOS_ID, PAD_ID, build_tiny_llama, edit_decoder, rename_output, rename_uses

PROMPTS = ["def main(args) -> int:", "Café", "The fault-tolerant attention kernel checks every block of"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(exported):
    """The exported model's greedy tokens for PROMPTS (one padded batch)."""
    return [r.token_ids for r in Generator.from_pretrained(exported).generate(PROMPTS, NEW_TOKENS)]


def test_int32_position_ids(exported, tmp_path, reference):
    from onnx import TensorProto, helper

    def edit(graph):  # position_ids becomes int32, cast to int64 inside the graph
        rename_uses(graph, "position_ids", "position_ids_int64")
        graph.node.insert(0, helper.make_node("Cast", ["position_ids"], ["position_ids_int64"], to=TensorProto.INT64))
        next(i for i in graph.input if i.name == "position_ids").type.tensor_type.elem_type = TensorProto.INT32

    generator = Generator.from_pretrained(edit_decoder(exported, tmp_path / "int32", edit))
    assert generator.spec.position_ids_dtype == np.int32
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)] == reference


def _with_use_cache_branch(graph, vocab):
    """optimum's merged-decoder input: here it pushes token 7 to the top of the logits
    whenever it disagrees with whether the past holds tokens, so a wrong flag shows."""
    from onnx import TensorProto, helper, numpy_helper

    graph.input.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    rename_output(graph, "logits", "logits_raw")  # logits = logits_raw + the check's penalty
    bump = np.zeros(vocab, dtype=np.float32)
    bump[7] = 1e4
    graph.initializer.extend([numpy_helper.from_array(bump, "bump_7"),
                              numpy_helper.from_array(np.array(2, dtype=np.int64), "axis_2"),
                              numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")])
    graph.node.extend([
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
        helper.make_node("Gather", ["past_shape", "axis_2"], ["past_length"]),
        helper.make_node("Greater", ["past_length", "zero"], ["has_past"]),
        helper.make_node("Xor", ["use_cache_branch", "has_past"], ["wrong_branch"]),
        helper.make_node("Cast", ["wrong_branch"], ["wrong_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wrong_float", "bump_7"], ["penalty"]),
        helper.make_node("Add", ["logits_raw", "penalty"], ["logits"]),
    ])


def test_merged_decoder_use_cache_branch(exported, tmp_path, reference):
    vocab = Generator.from_pretrained(exported).vocab_size
    folder = edit_decoder(exported, tmp_path / "merged", lambda graph: _with_use_cache_branch(graph, vocab))
    generator = Generator.from_pretrained(folder)
    assert generator.spec.use_cache_branch_name == "use_cache_branch"
    tokens = [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)]
    assert 7 not in {t for row in reference for t in row}  # else the check below could not tell
    assert tokens == reference


def test_input_the_loop_cannot_feed(exported, tmp_path):
    from onnx import TensorProto, helper

    def edit(graph):  # a used token_type_ids input, as BERT-style exports have
        graph.input.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
        rename_output(graph, "logits", "logits_raw")
        graph.node.extend([helper.make_node("Cast", ["token_type_ids"], ["types_float"], to=TensorProto.FLOAT),
                           helper.make_node("Unsqueeze", ["types_float", "minus_one"], ["types_3d"]),
                           helper.make_node("Add", ["logits_raw", "types_3d"], ["logits"])])
        graph.initializer.append(helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]))

    with pytest.raises(ValueError, match=r"inputs the generator does not know how to feed: \['token_type_ids'\]"):
        Generator.from_pretrained(edit_decoder(exported, tmp_path / "extra", edit))


def test_unsupported_element_type(exported, tmp_path):
    from onnx import TensorProto, helper

    def edit(graph):  # a bfloat16 cache: cast to float inside, back to bfloat16 outside
        for layer_input in [i for i in graph.input if i.name.startswith("past_key_values.")]:
            rename_uses(graph, layer_input.name, layer_input.name + ".f32")
            graph.node.insert(0, helper.make_node("Cast", [layer_input.name], [layer_input.name + ".f32"],
                                                  to=TensorProto.FLOAT))
            layer_input.type.tensor_type.elem_type = TensorProto.BFLOAT16

    with pytest.raises(ValueError, match=r"'past_key_values.0.key' is tensor\(bfloat16\); the generator supports"):
        Generator.from_pretrained(edit_decoder(exported, tmp_path / "bf16", edit))


# model families beyond Llama, exported and run against transformers: Mistral's sliding
# window (6 tokens, so the prompts and new tokens run past it), Gemma 2's sliding and full
# layers mixed (with eager attention: it has no SDPA path), GPT-2's config spellings
# (n_positions, n_head) and fused projections
FAMILIES = {
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "gemma2-mixed": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=6)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_family_matches_transformers(family, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftattn.onnx import export

    config_name, model_name, options = FAMILIES[family]
    folder = build_tiny_llama(str(tmp_path / "hf"))  # its tokenizer; the model is replaced
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    vocab = len(AutoTokenizer.from_pretrained(folder))
    ids = dict(bos_token_id=0, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if options is None:  # GPT-2 spells its sizes its own way
        config = getattr(transformers, config_name)(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                                    n_positions=256, **ids)
    else:
        config = getattr(transformers, config_name)(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **ids, **options)
    torch.manual_seed(1)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    export(folder, str(tmp_path / "onnx"))
    generator = Generator.from_pretrained(str(tmp_path / "onnx"))
    assert generator.spec.context_length == 256 and generator.spec.eos_token_ids == (EOS_ID,)

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # 9, 3 and 12 tokens
    with torch.no_grad():
        expected = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD_ID,
                                  eos_token_id=[])[:, encoded.input_ids.shape[1]:].tolist()
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, eos_token_id=[])] == expected
    assert generator.generate(PROMPTS[1], NEW_TOKENS, eos_token_id=[])[0].token_ids == expected[1]


def test_export_refuses_layers_without_a_kv_cache(tmp_path):
    from ftattn.onnx import exporter

    assert exporter._ATTENTION_LAYER_TYPES == {"full_attention", "sliding_attention", "chunked_attention"}
    folder = build_tiny_llama(str(tmp_path / "hf"))
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["layer_types"] = ["full_attention", "linear_attention"]
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match=r"\['linear_attention'\] layers; the export's layout holds one key"):
        exporter.export(folder, str(tmp_path / "onnx"))


def test_provider_before_cpu_turns_the_shared_buffer_off(builder_fp32):
    import onnxruntime as ort

    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a second execution provider in this onnxruntime build")
    providers = ["AzureExecutionProvider", "CPUExecutionProvider"]
    generator = Generator.from_pretrained(builder_fp32, providers=providers)
    assert not generator.shared_buffer  # host buffers would be copied to the provider's memory
    cpu = Generator.from_pretrained(builder_fp32, providers="CPUExecutionProvider")  # one name as a string
    assert cpu.shared_buffer
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS)] == \
        [r.token_ids for r in cpu.generate(PROMPTS, NEW_TOKENS)]
    with pytest.raises(ValueError, match="needs the CPU provider alone"):
        Generator.from_pretrained(builder_fp32, providers=providers, shared_buffer=True)
