"""ftattn.onnx.export's graph against the transformers forward, and `python -m ftattn generate`."""
import json
import os

import numpy as np
import pytest
import torch

from ftattn.__main__ import main as ftattn_main
from ftattn.onnx import Generator

from onnx_helpers import copy_folder, genai_greedy


def test_exported_logits_and_cache_match_transformers(exported, hf_model):
    import onnxruntime as ort
    from transformers.cache_utils import DynamicCache

    session = ort.InferenceSession(f"{exported}/model.onnx", providers=["CPUExecutionProvider"])
    config = hf_model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_size = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    batch, past_length, length = 3, 5, 4  # left-padded rows over a non-empty past
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, past_length + length, dtype=torch.int64)
    mask[1, :2] = 0
    mask[2, :6] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_length:]
    past = [torch.randn(batch, kv_heads, past_length, head_size, generator=generator) for _ in range(2 * layers)]
    cache = DynamicCache(config=config)
    for layer in range(layers):
        cache.update(past[2 * layer].clone(), past[2 * layer + 1].clone(), layer)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for layer in range(layers):
        feed[f"past_key_values.{layer}.key"] = past[2 * layer].numpy()
        feed[f"past_key_values.{layer}.value"] = past[2 * layer + 1].numpy()
    names = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    got = dict(zip(names, session.run(names, feed)))
    keep = mask[:, past_length:].bool().numpy()  # rows' real positions (fully padded query rows differ)
    np.testing.assert_allclose(got["logits"][keep], expected.logits.numpy()[keep], rtol=1e-4, atol=1e-4)
    # cache slots of real tokens (pad slots are masked forever and not compared)
    slots = mask.bool().numpy()
    for layer in range(layers):
        for kind, reference in (("key", cache.layers[layer].keys), ("value", cache.layers[layer].values)):
            present = got[f"present.{layer}.{kind}"].transpose(0, 2, 1, 3)  # (batch, slot, heads, size)
            np.testing.assert_allclose(present[slots], reference.numpy().transpose(0, 2, 1, 3)[slots],
                                       rtol=1e-5, atol=1e-5)


def test_cli_json_matches_api(exported, capsys):
    prompts = ["def main(args) -> int:", "Café"]
    assert ftattn_main(["generate", exported, *prompts, "--max-new-tokens", "6", "--threads", "1", "--no-spin",
                        "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = Generator.from_pretrained(exported).generate(prompts, 6)
    assert [p["token_ids"] for p in printed] == [r.token_ids for r in expected]
    assert [p["text"] for p in printed] == [r.text for r in expected]
    assert all(p["inter_token_s_median"] > 0 for p in printed)


def test_stop_escapes():
    from ftattn.onnx.cli import _unescape

    assert _unescape(r"\n\n") == "\n\n" and _unescape(r"a\tb\u00e9\x41\\") == "a\tbéA\\"
    for kept in (r"\begin{x}", "\\東", "end\\", "Café 😀"):  # not an escape: as written
        assert _unescape(kept) == kept


def test_median_gap():
    from ftattn.onnx.cli import _median_gap

    assert _median_gap([0.0, 1.0, 3.0, 6.0]) == 2.0  # gaps 1, 2, 3
    assert _median_gap([0.0, 1.0, 3.0]) == 1.5  # gaps 1, 2
    assert _median_gap([0.5]) == 0.0 and _median_gap([]) == 0.0


@pytest.mark.parametrize("extra", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_cli_text(exported, capsys, extra):
    assert ftattn_main(["generate", exported, "Café", "--max-new-tokens", "6", "--do-sample", "--seed", "3",
                        "--top-k", "20", *extra]) == 0
    captured = capsys.readouterr()
    expected = Generator.from_pretrained(exported).generate("Café", 6, do_sample=True, seed=3, top_k=20)[0]
    assert captured.out == expected.text + "\n"
    assert "tokens/s" in captured.err and "6 new" in captured.err


def test_cli_stop_reads_escapes(exported, capsys):
    """--stop "\\n" stops at a newline: backslash escapes in the argument are characters."""
    free = Generator.from_pretrained(exported).generate("Café", 30)[0].text
    assert len(free) >= 8
    stop = free[6:8]
    written = "".join(f"\\u{ord(c):04x}" for c in stop)  # the stop string as escapes only
    assert ftattn_main(["generate", exported, "Café", "--max-new-tokens", "30", "--stop", written, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]
    assert printed["finish_reason"] == "stop" and printed["text"] == free[:free.find(stop)]


def test_cli_chat_and_errors(exported, tmp_path, capsys):
    assert ftattn_main(["generate", exported, "Café?", "--chat", "--max-new-tokens", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    generator = Generator.from_pretrained(exported)
    assert printed[0]["prompt_tokens"] == len(generator.encode([{"role": "user", "content": "Café?"}]))
    assert ftattn_main(["generate", str(tmp_path), "x"]) == 2
    assert "no .onnx decoder" in capsys.readouterr().err
    assert ftattn_main(["generate", exported, "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    broken = copy_folder(exported, tmp_path / "broken")
    with open(os.path.join(broken, "tokenizer.json"), "w") as handle:
        handle.write("{}")
    assert ftattn_main(["generate", broken, "x"]) == 2  # the tokenizers library's error, as a message
    assert "tokenizer.json: the tokenizers library cannot read it" in capsys.readouterr().err


def test_export_command_errors(tmp_path, capsys):
    from ftattn.onnx.__main__ import main as export_main

    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert export_main([str(tmp_path), str(tmp_path)]) == 2  # a ValueError: a message, no traceback
    assert "is the model folder itself" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "config.json")]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "out"), "--opset", "3"]) == 2
    assert "opset=3: torch.onnx.export's dynamo exporter writes opset 18 or later" in capsys.readouterr().err
    # the same command in the main CLI
    assert ftattn_main(["export", str(tmp_path), str(tmp_path)]) == 2
    assert "python -m ftattn export: " in capsys.readouterr().err
    assert ftattn_main(["export", str(tmp_path), str(tmp_path / "out"), "--opset", "3"]) == 2
    assert "opset=3" in capsys.readouterr().err


def test_export_runs_in_onnxruntime_genai_too(exported, tiny_hf, tmp_path):
    """The export writes genai_config.json: onnxruntime-genai runs the same folder and its
    greedy tokens are the Generator's (one padded batch of prompts of different lengths);
    the Generator reads the folder the same way with and without that file."""
    pytest.importorskip("onnxruntime_genai")
    with open(os.path.join(exported, "genai_config.json")) as handle:
        genai = json.load(handle)
    assert genai["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert genai["search"]["past_present_share_buffer"] is False
    generator = Generator.from_pretrained(exported)
    ids = [generator.encode(p) for p in ("def main(args) -> int:", "Café", "The attention kernel checks every")]
    expected = [genai_greedy(exported, row, 12) for row in ids]
    assert [r.token_ids for r in generator.generate(ids, 12)] == expected
    without = copy_folder(exported, tmp_path / "no_genai", skip=("genai_config.json",))
    assert [r.token_ids for r in Generator.from_pretrained(without).generate(ids, 12)] == expected
