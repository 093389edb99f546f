"""Decoder layouts beyond the two of the main tests: element types and inputs read
from the session (int32 position ids, optimum's merged-decoder use_cache_branch),
inputs the loop cannot feed, other model families' exports (sliding windows, mixed
layers, GPT-2), and a session with a provider before the CPU one."""
import json
import os

import numpy as np
import pytest

from ftattn.onnx import Generator

from onnx_helpers import (EOS_ID, FAMILIES, build_family, build_tiny_llama, copy_folder, edit_decoder,
                          rename_output, rename_uses, run_builder, transformers_greedy)

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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_family_matches_transformers(family, tmp_path):
    from ftattn.onnx import export

    folder = build_family(str(tmp_path / "hf"), family)
    export(folder, str(tmp_path / "onnx"))
    generator = Generator.from_pretrained(str(tmp_path / "onnx"))
    assert generator.spec.context_length == 256 and generator.spec.eos_token_ids == (EOS_ID,)
    expected = transformers_greedy(folder, PROMPTS, NEW_TOKENS)  # 9, 3 and 12 tokens, left-padded
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, eos_token_id=[])] == expected
    assert generator.generate(PROMPTS[1], NEW_TOKENS, eos_token_id=[])[0].token_ids == expected[1]


@pytest.fixture(scope="module")
def builder_family(tmp_path_factory):
    """genai builder (fp32) models of FAMILIES, built once per family."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (it builds the model)")
    built = {}

    def build(family):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            hf = build_family(str(root / "hf"), family)
            built[family] = (hf, run_builder(hf, root / "genai", "fp32"))
        return built[family]
    return build


def test_builder_windowed_layers_match_transformers(builder_family):
    """Gemma 2 from the builder: GQA applies the 6-token window on layer 0 in a window-sized
    ring (sliding_window_cache=1), which wants a buffer of at least the window and takes no
    padded prompt rows: the prompts (9, 3, 12 tokens) run one length at a time and give
    transformers' tokens, with layer 0's buffer of 6 positions and layer 1's of the request."""
    hf, folder = builder_family("gemma2-mixed")
    generator = Generator.from_pretrained(folder)
    spec = generator.spec
    assert (spec.sliding_window, spec.sliding_window_in_graph, spec.sliding_window_ring,
            spec.sliding_window_set_by_loader) == (6, True, True, False)
    assert spec.ring_past_names == {"past_key_values.0.key", "past_key_values.0.value"}
    assert [spec.kv_capacity(f"past_key_values.{i}.{kind}", 50) for i in (0, 1) for kind in ("key", "value")] \
        == [6, 6, 50, 50]
    assert [spec.kv_capacity(f"past_key_values.{i}.key", 5) for i in (0, 1)] == [6, 5]
    long = 40  # the ring turns over several times
    expected = [transformers_greedy(hf, [p], long)[0] for p in PROMPTS]
    assert [r.token_ids for r in generator.generate(PROMPTS, long, eos_token_id=[])] == expected
    # a request shorter than the window (3 + 2 tokens): the ring still holds the window
    assert generator.generate(PROMPTS[1], 2, eos_token_id=[])[0].token_ids == expected[1][:2]
    with pytest.raises(ValueError, match="need a preallocated past/present buffer of at least the window"):
        Generator.from_pretrained(folder, shared_buffer=False)


def _edit_json(folder, name, edit):
    path = os.path.join(folder, name)
    with open(path) as handle:
        config = json.load(handle)
    edit(config)
    with open(path, "w") as handle:
        json.dump(config, handle)


def test_builder_window_the_graph_leaves_out_is_applied_by_the_loader(builder_family, tmp_path):
    """Mistral from the builder: the config has a 6-token window and no layer_types, so the
    builder gives every layer full attention and puts the window in genai_config with no
    layers (onnxruntime-genai 0.18 then attends to every position too). Transformers
    applies the window in every layer; the loader sets it on every GQA node, and a padded
    batch past the window (9, 3, 12 prompt tokens + 12) gives transformers' tokens."""
    hf, folder = builder_family("mistral-sliding")
    generator = Generator.from_pretrained(folder)
    spec = generator.spec
    assert (spec.sliding_window, spec.sliding_window_in_graph, spec.sliding_window_set_by_loader,
            spec.sliding_window_ring) == (6, True, True, False)
    expected = transformers_greedy(hf, PROMPTS, NEW_TOKENS)
    full = copy_folder(hf, tmp_path / "hf_full_attention")
    _edit_json(full, "config.json", lambda config: config.update(sliding_window=None))
    assert transformers_greedy(full, PROMPTS, NEW_TOKENS) != expected  # the window changes these tokens
    batches = []
    run = generator._run
    generator._run = lambda rows, *args: (batches.append(len(rows)), run(rows, *args))
    assert [r.token_ids for r in generator.generate(PROMPTS, NEW_TOKENS, eos_token_id=[])] == expected
    assert batches == [3]  # one padded batch: no window-sized ring, so GQA takes padded rows
    # a request shorter than the window (3 + 2), and presents that onnxruntime allocates
    # (no shared buffer), give the same tokens
    assert generator.generate(PROMPTS[1], 2, eos_token_id=[])[0].token_ids == expected[1][:2]
    unshared = Generator.from_pretrained(folder, shared_buffer=False)
    assert [r.token_ids for r in unshared.generate(PROMPTS, NEW_TOKENS, eos_token_id=[])] == expected


def test_builder_config_window_the_loader_cannot_place_is_refused_past_it(builder_family, tmp_path):
    """genai_config names the layers of a window that the graph does not apply: the loader
    does not guess, and a request longer than the window is refused; one within it runs."""
    hf, folder = builder_family("mistral-sliding")
    folder = copy_folder(folder, tmp_path / "layers_named")
    _edit_json(folder, "genai_config.json", lambda c: c["model"]["decoder"]["sliding_window"].update(layers=[0]))
    generator = Generator.from_pretrained(folder)
    assert generator.spec.sliding_window == 6 and not generator.spec.sliding_window_in_graph
    with pytest.raises(ValueError, match=r"> the model's sliding window 6 \(genai_config.json\), which its graph"):
        generator.generate(PROMPTS, NEW_TOKENS)
    short = "Café"  # 3 tokens + 4 new: the last step (the 4th token is not fed back) sees 6 positions
    assert generator.generate(short, 4, eos_token_id=[])[0].token_ids == transformers_greedy(hf, [short], 4)[0]
    with pytest.raises(ValueError, match="attends to 7 > the model's sliding window 6"):
        generator.generate(short, 5)


def test_builder_config_window_of_the_whole_context_is_no_window(builder_family, tmp_path):
    _, folder = builder_family("mistral-sliding")
    folder = copy_folder(folder, tmp_path / "window_is_context")
    _edit_json(folder, "genai_config.json",
               lambda c: c["model"]["decoder"]["sliding_window"].update(window_size=c["model"]["context_length"]))
    spec = Generator.from_pretrained(folder).spec
    assert spec.sliding_window is None and not spec.sliding_window_in_graph and not spec.sliding_window_set_by_loader


def test_builder_window_longer_than_the_context_is_refused(builder_family, tmp_path):
    _, folder = builder_family("gemma2-mixed")
    folder = copy_folder(folder, tmp_path / "short_context")
    # below the graph's window of 6
    _edit_json(folder, "genai_config.json", lambda config: config["model"].update(context_length=5))
    with pytest.raises(ValueError, match="applies a window of 6 tokens, more than its context length 5"):
        Generator.from_pretrained(folder)


def test_export_refuses_layers_without_a_kv_cache(tmp_path):
    from ftattn.onnx import exporter

    folder = build_tiny_llama(str(tmp_path / "hf"))
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["layer_types"] = ["full_attention", "linear_attention"]
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match=r"cache layers of kind \['LinearAttentionLayer'\]; the export's layout"):
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
