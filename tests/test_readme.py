"""Every ```python block of the READMEs runs as written (a block that needs a model
folder gets one: `path`, or the folder the block names, a tiny random Llama saved here)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ["README.md", "ftattn/mx/README.md", "ftattn/onnx/README.md"]


def _blocks():
    out = []
    for name in READMES:
        with open(os.path.join(ROOT, name)) as fh:
            text = fh.read()
        for i, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)):
            out.append(pytest.param(name, match.group(1), id=f"{name}-{i}"))
    return out


BLOCKS = _blocks()


def test_the_readmes_have_python_blocks():
    assert len([b for b in BLOCKS if b.values[0] == "README.md"]) >= 3


@pytest.mark.parametrize("name, code", BLOCKS)
def test_readme_block_runs(name, code, tmp_path, monkeypatch):
    namespace = {"__name__": "readme"}
    if "my-hf-llama/" in code:  # the ONNX README: a Hugging Face Llama folder with its tokenizer
        import sys

        sys.path.insert(0, os.path.join(ROOT, "tests", "onnx"))
        from onnx_helpers import build_tiny_llama

        build_tiny_llama(str(tmp_path / "my-hf-llama"))
        monkeypatch.chdir(tmp_path)
    if re.search(r"\bpath\b", code) and "from_pretrained(path" in code:
        import sys

        sys.path.insert(0, os.path.join(ROOT, "tests", "integrations"))
        from hf_models import tiny_llama

        tiny_llama("eager").save_pretrained(tmp_path)
        namespace["path"] = str(tmp_path)
    exec(compile(code, f"{name} (python block)", "exec"), namespace)
