"""``python -m ftattn generate-hf`` (ftattn/integrations/generate_hf.py) on a tiny random Llama saved to disk."""
import re

import pytest

from ftattn.__main__ import main
from ftattn.integrations.generate_hf import plan_faults

from hf_models import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama("eager").save_pretrained(path)
    return str(path)


def test_generate_hf_corrects_injected_faults(model_dir, capsys):
    rc = main(["generate-hf", "--model", model_dir, "--prompt-ids", "5,17,42,9,77", "--prompt-ids", "3,8,11",
               "--inject", "5", "--max-new-tokens", "10", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "5 faults injected during decoding" in out
    assert len(re.findall(r"^  step +\d+ layer +\d+: ", out, re.M)) == 5
    protected = [line for line in out.splitlines() if line.startswith("full/correct")]
    assert len(protected) == 2 and all(line.endswith("== clean") for line in protected)
    counts = re.search(r"protected run counters: Counters\(calls=(\d+), detected=(\d+), corrected=(\d+)", out)
    calls, detected, corrected = map(int, counts.groups())
    assert calls == 10 * 2  # steps x layers (left-padded samples: key ranges, one call per layer)
    assert 1 <= detected == corrected <= 5  # exponent flips: harmful ones are all caught; benign ones may pass


def test_plan_faults_draws_distinct_decoding_calls():
    plan = plan_faults(7, steps=5, layers=2, sites=["acc", "probs"], bits=[30], seed=0)
    assert len({(f.step, f.layer) for f in plan}) == 7
    assert all(1 <= f.step < 5 and 0 <= f.layer < 2 and f.bit == 30 for f in plan)
    with pytest.raises(ValueError, match="raise --max-new-tokens"):
        plan_faults(9, steps=5, layers=2, sites=["acc"], bits=[30], seed=0)


@pytest.mark.parametrize("argv, message", [
    (["--inject", "50", "--max-new-tokens", "3"], "raise --max-new-tokens"),
    (["--bits", "20-40"], "within 0-31"),
    (["--sites", "softmax"], "unknown fault site"),
])
def test_generate_hf_rejects_bad_arguments(model_dir, capsys, argv, message):
    rc = main(["generate-hf", "--model", model_dir, "--prompt-ids", "5,6,7"] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_generate_hf_model_that_is_not_a_folder(tmp_path, capsys):
    """It gave transformers' traceback about hub repo ids."""
    for model in ("nope", str(tmp_path)):
        rc = main(["generate-hf", "--model", model, "--prompt-ids", "5,6,7"])
        assert rc == 2
        assert "is not a folder with a config.json" in capsys.readouterr().err
