"""Bad input to ftattn.onnx gives errors that name the value and the fix."""
import os

import numpy as np
import pytest

from ftattn.onnx import Generator, export

from onnx_helpers import copy_folder

PROMPT = "def main(args) -> int:"


@pytest.fixture(scope="module")
def generator(exported):
    return Generator.from_pretrained(exported)


def test_folder_without_decoder(exported, tmp_path):
    folder = copy_folder(exported, tmp_path / "no_decoder", skip=("model.onnx",))
    with pytest.raises(FileNotFoundError, match="genai_config.json names the decoder 'model.onnx', which is not"):
        Generator.from_pretrained(folder)
    folder = copy_folder(exported, tmp_path / "no_decoder_no_genai", skip=("model.onnx", "genai_config.json"))
    with pytest.raises(FileNotFoundError, match="no .onnx decoder"):
        Generator.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Generator.from_pretrained(str(tmp_path / "missing"))


def test_folder_without_tokenizer(exported, tmp_path):
    folder = copy_folder(exported, tmp_path / "no_tokenizer", skip=("tokenizer.json",))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Generator.from_pretrained(folder)


def test_folder_without_config(exported, tmp_path):
    folder = copy_folder(exported, tmp_path / "no_config", skip=("config.json", "genai_config.json"))
    with pytest.raises(FileNotFoundError, match="neither genai_config.json nor config.json"):
        Generator.from_pretrained(folder)


def test_model_without_kv_inputs(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # input_ids -> embedding Gather -> logits: a decoder with no cache
    embedding = numpy_helper.from_array(np.zeros((16, 8), dtype=np.float32), "embedding")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "input_ids"], ["logits"])], "no_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 8])],
        initializer=[embedding])
    folder = copy_folder(exported, tmp_path / "no_cache", skip=("model.onnx",))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    with pytest.raises(ValueError, match="no KV-cache inputs"):
        Generator.from_pretrained(folder)


def test_saved_padding_and_truncation_are_not_applied(exported, tmp_path, generator):
    """A tokenizer.json saved with fixed padding and a truncation (what a batch encode
    leaves in it) turned the prompt "a" into 128 tokens of [PAD] and cut long prompts."""
    import json

    folder = copy_folder(exported, tmp_path / "padded_tokenizer")
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as fh:
        tok = json.load(fh)
    tok["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "[PAD]"}
    tok["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    with open(path, "w") as fh:
        json.dump(tok, fh)
    loaded = Generator.from_pretrained(folder)
    long_prompt = " ".join(["hello world how are you"] * 20)
    for prompt in ("a", PROMPT, long_prompt):
        assert loaded.encode(prompt) == generator.encode(prompt)
    assert len(loaded.encode("a")) < 8 and len(loaded.encode(long_prompt)) > 16
    out = loaded.generate("a", 3, eos_token_id=[])[0]
    assert out.token_ids == generator.generate("a", 3, eos_token_id=[])[0].token_ids


def test_prompt_longer_than_context(generator):
    context = generator.spec.context_length
    with pytest.raises(ValueError, match=f"context length {context}"):
        generator.generate([0] * (context + 1), 1)
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        generator.generate([0] * (context - 4), 5)
    assert len(generator.generate([0] * (context - 4), 4, eos_token_id=[])[0].token_ids) == 4  # fits exactly


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_max_new_tokens(generator, value):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate(PROMPT, value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed="7"), "seed"),
    (dict(seed=-1), "seed=-1: must be an int >= 0"),
    (dict(do_sample="no"), "do_sample='no': must be True"),
    (dict(eos_token_id=2.5), "eos_token_id=2.5"),
    (dict(eos_token_id=[None]), "eos_token_id"),
    (dict(eos_token_id="12"), "eos_token_id"),
    (dict(eos_token_id=[10 ** 6]), r"eos_token_id=\[1000000\]: must be a token id .* in \[0, "),
    (dict(eos_token_id=-5), "eos_token_id=-5"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop=5), "stop=5: must be a non-empty string"),
    (dict(stop=b"ab"), r"stop=b'ab': must be a non-empty string"),
    (dict(stream="print"), "stream"),
])
def test_invalid_generation_values(generator, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generator.generate(PROMPT, 4, **kwargs)


def test_temperature_zero_is_fine_for_greedy(generator):
    assert generator.generate(PROMPT, 4, temperature=0.0)[0].token_ids == generator.generate(PROMPT, 4)[0].token_ids


def test_numpy_values_are_accepted(generator):
    ids = generator.encode(PROMPT)
    expected = generator.generate(ids, 4, do_sample=True, seed=5, temperature=1.0)[0].token_ids
    assert generator.generate(np.array(ids), 4, do_sample=np.bool_(True), seed=np.int64(5),
                              temperature=np.int64(1))[0].token_ids == expected
    eos = generator.generate(ids, 4)[0].token_ids[1]
    assert generator.generate(ids, 4, eos_token_id=np.array(eos))[0].token_ids[-1] == eos  # a 0-d array: one id
    batch = generator.generate(np.array([ids, ids]), 4)  # a 2-D array: a batch
    assert len(batch) == 2 and batch[0].token_ids == batch[1].token_ids


@pytest.mark.parametrize("prompts,error", [
    ([], ValueError), ([3.5], TypeError), ([["a", "b"]], TypeError), ([[10 ** 6]], ValueError), (None, ValueError),
])
def test_bad_prompts(generator, prompts, error):
    with pytest.raises(error):
        generator.generate(prompts, 4)


def test_bad_loader_options(exported):
    with pytest.raises(ValueError, match="threads"):
        Generator.from_pretrained(exported, threads=0)
    assert Generator.from_pretrained(exported, threads=np.int64(1)).session.get_session_options() \
        .intra_op_num_threads == 1
    with pytest.raises(ValueError, match="not available"):
        Generator.from_pretrained(exported, providers=["NoSuchExecutionProvider"])
    for providers in (5, [], [None]):
        with pytest.raises(TypeError, match="providers=.*: must be a provider name or a non-empty list"):
            Generator.from_pretrained(exported, providers=providers)
    with pytest.raises(ValueError, match="GroupQueryAttention"):
        Generator.from_pretrained(exported, shared_buffer=True)


def test_export_needs_a_model_folder(tmp_path, tiny_hf):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="is the model folder itself"):
        export(tiny_hf, tiny_hf + "/.")


def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as handle:
        handle.write(text)


def _broken(folder, name, edit):
    import json

    path = os.path.join(folder, name)
    with open(path) as handle:
        config = json.load(handle)
    edit(config)
    _write(folder, name, json.dumps(config))


@pytest.mark.parametrize("source,name,damage,match", [
    ("exported", "config.json", lambda f: _write(f, "config.json", "[1, 2"), r"config.json: not valid JSON \("),
    ("exported", "config.json", lambda f: _write(f, "config.json", "[1, 2]"), r"config.json: holds a JSON list"),
    ("exported", "tokenizer_config.json", lambda f: _write(f, "tokenizer_config.json", "nope"),
     r"tokenizer_config.json: not valid JSON"),
    ("exported", "generation_config.json",  # (read for the EOS ids when genai_config.json has none)
     lambda f: (_broken(f, "genai_config.json", lambda c: c["model"].pop("eos_token_id")),
                _write(f, "generation_config.json", "nope")),
     r"generation_config.json: not valid JSON"),
    ("exported", "tokenizer.json", lambda f: _write(f, "tokenizer.json", "{}"),
     r"tokenizer.json: the tokenizers library cannot read it"),
    ("exported", "model.onnx", lambda f: _write(f, "model.onnx", "garbage"), r"model.onnx: not an ONNX model"),
    ("builder_fp32", "genai_config.json", lambda f: _write(f, "genai_config.json", "{oops"),
     r"genai_config.json: not valid JSON"),
    ("builder_fp32", "genai_config.json", lambda f: _write(f, "genai_config.json", '{"model": 3}'),
     r"genai_config.json: model is 3, not an object"),
    ("builder_fp32", "genai_config.json",
     lambda f: _broken(f, "genai_config.json", lambda c: c["model"].update(eos_token_id="</s>")),
     r"genai_config.json: model.eos_token_id is '</s>'; it must be an integer >= 0"),
    ("builder_fp32", "genai_config.json",
     lambda f: _broken(f, "genai_config.json", lambda c: c["model"].update(context_length="long")),
     r"genai_config.json: model.context_length is 'long'"),
    ("builder_fp32", "model.onnx.data", lambda f: os.remove(os.path.join(f, "model.onnx.data")),
     r"model.onnx: onnxruntime cannot load the decoder \(.*\); check that the file and its external data"),
])
def test_broken_model_folder_files(source, name, damage, match, request, tmp_path):
    """A broken config, tokenizer or decoder file: a ValueError naming the file and the fix."""
    folder = copy_folder(request.getfixturevalue(source), tmp_path / "broken")
    damage(folder)
    with pytest.raises(ValueError, match=match):
        Generator.from_pretrained(folder)


def test_greedy_search_refuses_nan_logits(exported, tmp_path):
    """argmax would pick a NaN's token id: greedy search raises instead, as sampling does."""
    import onnx
    from onnx import helper

    from onnx_helpers import edit_decoder, rename_output

    def edit(graph):  # logits * NaN
        rename_output(graph, "logits", "raw_logits")
        graph.node.extend([
            helper.make_node("Constant", [], ["nan"], value=onnx.numpy_helper.from_array(np.array(np.nan, np.float32))),
            helper.make_node("Mul", ["raw_logits", "nan"], ["logits"])])
    folder = edit_decoder(exported, tmp_path / "nan", edit)
    generator = Generator.from_pretrained(folder)
    with pytest.raises(ValueError, match="the logits of row 0 contain NaN at new token 0"):
        generator.generate(PROMPT, 3)
    with pytest.raises(ValueError, match=r"the logits of row 0 contain \d+ NaN"):  # sampling: the C sampler's check
        generator.generate(PROMPT, 3, do_sample=True, seed=0)
