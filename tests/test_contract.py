"""The fault contract is one table per language: ftattn/contract.py (Python, Triton,
the reference, the tests) and csrc/fault_contract.h (the C++ kernels). These tests
fail when the two drift apart, or when the Python face or the Triton kernel stop
taking their values from the contract."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from ftattn import contract, faults

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = (ROOT / "csrc" / "fault_contract.h").read_text()


def _camel(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.lower().split("_"))


def _cpp_enum(name: str) -> dict:
    body = re.search(r"enum " + name + r" : \w+ \{(.*?)\};", HEADER, re.S).group(1)
    out = {}
    for key, expr in re.findall(r"(k\w+) = ([^,]+)", body):
        shift = re.fullmatch(r"1 << (\d+)", expr.strip())
        out[key] = 1 << int(shift.group(1)) if shift else int(expr, 0)
    return out


def _cpp_const(name: str) -> int:
    return int(re.search(r"constexpr \w+ " + name + r" = (-?\w+);", HEADER).group(1), 0)


def test_cpp_sites_match():
    assert _cpp_enum("Site") == {_camel(s.name): int(s) for s in contract.Site}
    assert _cpp_const("kNumSites") == len(contract.Site)
    attention = sorted(int(s) for s in contract.OP_SITES["attention"])
    assert attention == list(range(_cpp_const("kNumAttentionSites")))
    assert sorted(int(s) for s in contract.OP_SITES["linear"]) == [_cpp_enum("Site")["kGemm"], _cpp_enum("Site")["kWeight"]]
    # every site belongs to exactly one op
    owned = [int(s) for sites in contract.OP_SITES.values() for s in sites]
    assert sorted(owned) == sorted(int(s) for s in contract.Site)


def test_cpp_check_bits_match():
    assert _cpp_enum("CheckBit") == {_camel(c.name): int(c) for c in contract.Check}
    assert _cpp_const("kCheckMask") == contract.CHECK_MASK == 0x7FFF


def test_cpp_encoding_and_blocks_match():
    assert _cpp_const("kReportBlockM") == contract.REPORT_BLOCK_M
    assert _cpp_const("kFaultFields") == len(contract.FAULT_FIELDS)
    assert _cpp_const("kBitReplace") == contract.BIT_REPLACE
    assert _cpp_const("kBitMask") == contract.BIT_MASK
    assert _cpp_const("kWarp") == contract.WARP == 32
    # the C++ side's axis of a span: head dims for the sites contract.SPAN_AXIS names "dim"
    body = re.search(r"span_along_dims\(int64_t site\) \{(.*?)\}", HEADER, re.S).group(1)
    dims = {_camel(s.name) for s in contract.Site if contract.span_axis(s) == "dim"}
    assert set(re.findall(r"site == (k\w+)", body)) == dims


def test_every_check_bit_has_a_name_and_the_mask_covers_exactly_them():
    named = {int(c) for c in contract.CHECK_NAMES}
    status = {int(contract.Check.NONFINITE_INPUT), int(contract.Check.CORRECTED), int(contract.Check.UNCORRECTED),
              int(contract.Check.BLIND)}
    assert named | status == {int(c) for c in contract.Check} and not named & status
    assert all(not (s & contract.CHECK_MASK) for s in status)


def test_python_face_and_triton_take_the_contract():
    assert faults.Site is contract.Site and faults.Check is contract.Check
    assert faults.CHECK_MASK == contract.CHECK_MASK and faults.REPORT_BLOCK_M == contract.REPORT_BLOCK_M
    pytest.importorskip("triton")
    kern = importlib.import_module("ftattn.kernels.attention")
    for c in contract.Check:
        assert getattr(kern, c.name).value == int(c)
    for s in contract.Site:
        assert getattr(kern, f"SITE_{s.name}").value == int(s)
    assert kern.CHECK_MASK.value == contract.CHECK_MASK and kern.BLOCK_REPORT.value == contract.REPORT_BLOCK_M


def test_contract_needs_no_torch():
    # loaded as a file of its own, as the C++ side's build tools or a campaign worker could
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'triton', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "ftattn" / "contract.py")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("fault,fault_value,match", [
    ([0, 0, 0, 0, 0, 0], None, "must be \\[site, batch"),
    ([6, 0, 0, 0, 0, 0, 3], None, "site 6"),
    ([0, 2, 0, 0, 0, 0, 3], None, "batch=2 is out of range: it must be 0..1"),
    ([0, 0, 0, 0, 11, 0, 3], None, "col=11"),
    ([0, 0, 0, 0, 0, 0, 32], None, "bit 32"),
    ([0, 0, 0, 0, 0, 0, -1], None, "needs fault_value"),
    ([0, 0, 0, 0, 0, 0, 3, 0], None, "span=0 must be >= 1"),
    ([0, 0, 0, 0, 0, 0, 3, 1, 1], None, "must be \\[site, batch"),
])
def test_fault_encoding_is_validated_with_the_field_named(fault, fault_value, match):
    with pytest.raises(ValueError, match=match):
        contract.check_fault_encoding(fault, fault_value, 2, 3, 5, 11, 8)


def test_fault_encoding_roundtrip():
    f = faults.Fault("output", 1, 2, row=4, col=99, dim=7, value=float("nan"))
    enc, value = f.encode()
    # an output fault ignores col (any value), and a replacement carries its value
    assert contract.check_fault_encoding(enc, value, 2, 3, 5, 11, 8) == (int(contract.Site.OUTPUT), 1, 2, 4, 99, 7,
                                                                          contract.BIT_REPLACE, 1)
    # seven ints (no span) mean span 1
    assert contract.check_fault_encoding(enc[:-1], value, 2, 3, 5, 11, 8) == tuple(enc)


def test_span_is_encoded_and_one_value_per_row_sites_keep_one():
    f = faults.Fault("acc", 0, 1, row=2, col=3, dim=32, bit=5, span=contract.WARP)
    enc, value = f.encode()
    assert enc[-1] == 32 and contract.check_fault_encoding(enc, value, 2, 3, 5, 11, 64)[-1] == 32
    for site in ("rowmax", "rowsum"):  # one value per row: the span is 1 whatever is asked
        enc, value = faults.Fault(site, row=2, col=3, bit=5, span=32).encode()
        assert contract.check_fault_encoding(enc, value, 2, 3, 5, 11, 64)[-1] == 1
    assert {contract.span_axis(s) for s in contract.Site} == {"col", "dim", None}
    for bad in (0, -3):
        with pytest.raises(ValueError, match="span"):
            faults.Fault("acc", bit=3, span=bad)
    with pytest.raises(TypeError, match="span"):
        faults.Fault("acc", bit=3, span=2.0)


def test_multibit_fault_encodes_its_mask_and_is_validated():
    f = faults.Fault("scores", 1, 2, row=4, col=9, dim=7, bits=[30, 3, 17])
    assert f.bits == (3, 17, 30)
    enc, value = f.encode()
    assert enc[-2] == contract.BIT_MASK and value == float((1 << 3) | (1 << 17) | (1 << 30))
    assert contract.check_fault_encoding(enc, value, 2, 3, 5, 11, 8)[-2] == contract.BIT_MASK
    assert contract.xor_mask(contract.BIT_MASK, float(1 << 31 | 1)) == -(1 << 31) + 1  # (as a signed int32)
    assert contract.xor_mask(31, None) == -(1 << 31) and contract.xor_mask(contract.BIT_REPLACE, 2.5) == 0
    for bad in ([], [3, 3], [32], [-1], (True,), "3"):
        with pytest.raises(ValueError, match="bits"):
            faults.Fault("scores", bits=bad)
    with pytest.raises(ValueError, match="exactly one"):
        faults.Fault("scores", bit=3, bits=(4, 5))
    for value in (None, 0.0, 2.0**32, 3.5, -4.0):
        with pytest.raises(ValueError, match="mask"):
            contract.check_fault_encoding(enc[:-2] + [contract.BIT_MASK, 1], value, 2, 3, 5, 11, 8)
