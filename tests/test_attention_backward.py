"""The checked backward of ftattn.attention: gradients against fp64 within twice the error
of a pure-PyTorch attention in the same dtype (odd shapes, GQA, causal with N != M, rows
with no visible key, every dtype), off / abft / full bit-identical and deterministic, a
finite-difference check, opcheck with autograd, a compiled training step, every backward
fault site detected and corrected (bit-identical gradients), the campaign over the
backward (random and targeted) and clear errors."""
import functools
import math

import pytest
import torch

import ftattn
from ftattn import Check, Fault, FaultDetectedError
from ftattn.contract import Site
from ftattn.faults import BACKWARD_SITES
from ftattn.tools import campaign
from attention_reference import (bnhd_view, check_dv_warp_caught_at_full_only,
                                 check_large_logit_constant_rows_backward_no_alarm, check_masked_ds_faults_caught,
                                 check_backward_faults_on_cancelling_values, check_ds_faults_where_dp_cancels,
                                 check_near_fp32_range_no_alarm,
                                 check_probs_faults_on_cancelling_values,
                                 check_nonfinite_outside_key_range_does_not_block_correction,
                                 check_subnormal_operand_backward_raises_no_alarm, near_range_cases, padded_view)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# absolute slack of the gradient comparison, times max(1, max|g|): about one rounding of
# a gradient in its dtype
ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def _qkv(B, Hq, Hkv, N, M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype)
                 for s in ((B, Hq, N, D), (B, Hkv, M, D), (B, Hkv, M, D)))


def _torch_attention(q, k, v, causal, dtype):
    """softmax(q k^T / sqrt(D)) v in ``dtype`` with plain PyTorch ops (autograd through
    them), bottom-right causal, GQA, zero rows where no key is visible."""
    N, M, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        i, j = torch.arange(N)[:, None], torch.arange(M)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    return (e / torch.where(l > 0, l, torch.ones_like(l))) @ v


def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [t.grad for t in leaves]


GRID = [
    # B, Hq, Hkv, N, M, D, causal
    (1, 2, 2, 1, 1, 16, False),
    (2, 2, 1, 17, 97, 59, False),
    (1, 4, 2, 97, 17, 64, True),  # N > M: rows 0..79 see no key
    (1, 2, 1, 257, 97, 80, True),
    (1, 1, 1, 17, 257, 128, True),
    (1, 2, 2, 33, 65, 256, False),
]


def check_gradients_within_twice_torch(shape, dtype, attend, device="cpu"):
    """The gradients of ``attend(q, k, v, causal=...)`` (run on ``device``) against fp64,
    within twice a pure-PyTorch attention's error in ``dtype`` plus a few roundings."""
    B, Hq, Hkv, N, M, D, causal = shape
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, dtype, seed=N + M + D)
    do = torch.randn(B, Hq, N, D, generator=torch.Generator().manual_seed(1))
    exact = _grads(lambda *t: _torch_attention(*t, causal, torch.float64), q, k, v, do.double())
    plain = _grads(lambda *t: _torch_attention(*t, causal, dtype), q, k, v, do)
    ours = _grads(lambda *t: attend(*t, causal=causal), *(t.to(device) for t in (q, k, v, do)))
    for name, g, p, e in zip("qkv", ours, plain, exact):
        assert g.dtype == dtype and g.shape == e.shape
        slack = 4 * ULP[dtype] * max(1.0, e.abs().max().item())
        err, err_torch = (g.cpu().double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 2 * err_torch + slack, f"d{name}: {err} vs torch's {err_torch}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRID, ids=str)
def test_gradients_match_fp64_within_twice_torch(shape, dtype):
    check_gradients_within_twice_torch(shape, dtype, ftattn.attention)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_protection_levels_bit_identical_and_deterministic(dtype):
    q, k, v = _qkv(1, 4, 2, 37, 53, 40, dtype, seed=3)
    do = torch.randn(1, 4, 37, 40).to(dtype)
    runs = [_grads(lambda *t, p=p: ftattn.attention(*t, causal=True, protection=p), q, k, v, do)
            for p in ("off", "abft", "full", "full")]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_finite_differences_fp32():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 5, 7, 4, torch.float32, seed=5))
    assert torch.autograd.gradcheck(lambda *t: ftattn.attention(*t, causal=True), (q, k, v), eps=1e-3, atol=2e-3,
                                    rtol=2e-3, nondet_tol=0.0)


def test_opcheck_with_autograd_and_compiled_training_step():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 19, 23, 16, torch.float32, seed=6))
    torch.library.opcheck(torch.ops.ftattn.attention.default, (q, k, v), {"causal": True})
    do = torch.randn(1, 4, 19, 16)
    out = torch.ops.ftattn.attention(q, k, v, causal=True)
    torch.library.opcheck(torch.ops.ftattn.attention_bwd.default,
                          (q.detach(), k.detach(), v.detach(), out.detach(), do, True, 0.25, 2, True))

    w = torch.nn.Parameter(torch.randn(16, 16) / 4)

    @torch.compile(fullgraph=True)
    def step(x):
        out = torch.ops.ftattn.attention(x @ w, k.detach(), v.detach(), causal=True)
        return (out * out).sum()

    x = torch.randn(1, 4, 19, 16)
    loss = step(x)
    loss.backward()
    w_eager = w.detach().clone().requires_grad_()
    ref = torch.ops.ftattn.attention(x @ w_eager, k.detach(), v.detach(), causal=True)
    (ref * ref).sum().backward()
    assert torch.allclose(loss, (ref * ref).sum(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.grad, w_eager.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("site", BACKWARD_SITES)
def test_every_backward_site_detected_and_corrected(site, dtype):
    q, k, v = _qkv(1, 4, 2, 70, 90, 32, dtype, seed=7)
    do = torch.randn(1, 4, 70, 32).to(dtype)
    clean = _grads(lambda *t: ftattn.attention(*t, causal=True), q, k, v, do)
    # the most probable key of row 66 (head 3), a high exponent bit: harmful wherever it lands
    fault = Fault(site, batch=0, head=3, row=66, col=60, dim=5, bit=30)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = ftattn.attention(*leaves, causal=True, fault=fault, return_report=True)
    assert rep.backward is None  # until the backward runs
    out.backward(do)
    assert rep.detected == 0  # the forward is clean
    assert rep.backward.detected > 0 and rep.backward.corrected == rep.backward.flagged_blocks
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean))
    raw = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ftattn.attention(*raw, causal=True, fault=fault, on_fault="report")
    out.backward(do)
    assert not all(torch.equal(a.grad, b) for a, b in zip(raw, clean))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ftattn.attention(*leaves, causal=True, fault=fault, on_fault="raise")
    with pytest.raises(FaultDetectedError, match="attention backward"):
        out.backward(do)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dv_warp_that_cancels_in_both_groups_is_caught_at_full(backend):
    """A warp on a dV row whose 32 deltas (+-2^-9, harmful: tau = 2^-10) cancel exactly in both
    16-dim groups' checksums: q = 0 gives P = 1/4 on 4 keys, so with 4 equal rows of dO each dV
    row is that row exactly, 1 + b_d 2^-9 on dims 0..31 (b_d = 1 on the 8 dims of each group of
    largest weight in the weighted checksum). abft passes it; full's weighted checksum over
    every dim (csrc/attention_bwd_cpu.cpp's bwd_groups) flags it and the task is run again.
    (The random warp campaign passed one so, seed 620 bf16.)"""
    check_dv_warp_caught_at_full_only(functools.partial(ftattn.attention, backend=backend))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", [check_subnormal_operand_backward_raises_no_alarm,
                                  check_large_logit_constant_rows_backward_no_alarm, check_masked_ds_faults_caught,
                                  check_nonfinite_outside_key_range_does_not_block_correction,
                                  check_near_fp32_range_no_alarm, check_probs_faults_on_cancelling_values,
                                  check_backward_faults_on_cancelling_values, check_ds_faults_where_dp_cancels],
                         ids=lambda f: f.__name__.removeprefix("check_"))
def test_shared_backward_case(case, backend):
    """tests/attention_reference.py's backward cases (their docstrings say what each checks),
    on the C++ kernel and the reference; tests/test_attention_backward_triton.py runs them on
    the Triton kernel."""
    case(functools.partial(ftattn.attention, backend=backend))


def test_near_fp32_range_bfloat16():
    """tests/attention_reference.py's near-range case in bfloat16 (fp32's range: the same
    overflows), C++ kernel: no flag, protection off's output and gradients bit for bit."""
    check_near_fp32_range_no_alarm(functools.partial(ftattn.attention, backend="cpp"), dtype=torch.bfloat16,
                                   causals=(True,))


def test_near_fp32_range_through_the_op():
    """torch.ops.ftattn.attention with on_fault="raise" and its registered backward run a call
    whose checksums overflowed again scaled: no raise (before: the backward raised), off's
    output and gradients bit for bit. (Under torch.compile the op's backward reads no flag:
    its raise is an assertion in the graph, and such a call is not scaled.)"""
    on_fault = "raise"
    name, q, k, v, do, scale = near_range_cases()[0]  # scores of 1e37: the backward's checksums overflow
    grads = {}
    for protection in ("off", "full"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.ops.ftattn.attention(*leaves, scale=scale, protection=protection, on_fault=on_fault)
        out.backward(do)
        grads[protection] = [out.detach()] + [t.grad for t in leaves]
    assert all(torch.equal(a, b) for a, b in zip(grads["off"], grads["full"])), name


@pytest.mark.parametrize("protection", ["off", "abft", "full"])
def test_backward_with_an_empty_key_range(protection):
    """A sample with no key (key_start == key_end): the reference backward raised at abft / full
    (a max over an empty dim; review); it now gives the C++ kernel's gradients (zeros for the
    empty sample's queries) with no flag."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 4, 8, generator=g) for _ in range(3))
    ks, ke = torch.tensor([0, 3]), torch.tensor([4, 3])
    grads = {}
    for backend in ("cpp", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, rep = ftattn.attention(*leaves, backend=backend, protection=protection, key_start=ks, key_end=ke,
                                    return_report=True)
        out.sum().backward()
        assert protection == "off" or rep.backward.detected == 0
        grads[backend] = [t.grad for t in leaves]
    assert torch.equal(grads["reference"][0][1], torch.zeros(1, 4, 8))
    for a, b in zip(grads["cpp"], grads["reference"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protection", ["abft", "full"])
@pytest.mark.parametrize("bit", [0, 11, 22])
def test_every_ds_change_is_caught_by_the_cpp_kernel(bit, protection):
    """The C++ backward makes every dS entry again and compares it with the stored one, at
    abft and full: a flip of any mantissa bit is flagged and corrected, at a visible key (the
    row's most probable one) and at a masked one (dS = 0 there, which still feeds dK and dQ)."""
    q, k, v = _qkv(1, 2, 1, 37, 53, 24, torch.float32, seed=3)
    do = torch.randn(1, 2, 37, 24, generator=torch.Generator().manual_seed(4))
    clean = _grads(lambda *t: ftattn.attention(*t, causal=True, protection=protection), q, k, v, do)
    s = (q[0, 1, 30] @ k[0, 0].T)[: 30 + 53 - 37 + 1]
    for col, value in ((int(s.argmax()), None), (50, 1e-3)):  # key 50 is masked for row 30
        fault = Fault("ds", head=1, row=30, col=col, bit=None if value else bit, value=value)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, rep = ftattn.attention(*leaves, causal=True, protection=protection, fault=fault, return_report=True)
        out.backward(do)
        assert rep.backward.detected > 0, (col, bit)
        assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean))


@pytest.mark.parametrize("protection", ["abft", "full"])
def test_backward_campaign(protection):
    """The CLI's campaign over the backward: random faults at every backward site in three
    dtypes (2,100 at full) and the adversary's (outlier channels, huge logits, subnormals,
    mid-mantissa bits on the most probable keys): none harmful missed where the level
    claims the site, no false alarm, every detected fault corrected bit for bit."""
    n = 700 if protection == "full" else 210
    for dtype in campaign.DTYPES:
        for targeted in (False, True):
            res = campaign.run("cpp", "cpu", dtype, protection, n if not targeted else 210, seed=11,
                               progress=False, targeted=targeted, pass_="backward")
            assert res.failures() == [], campaign.format_table(res) + "\n" + "\n".join(res.missed_cases)
            assert sum(s.detected for s in res.sites.values()) > 0


def test_key_ranges_backward_equals_per_sample():
    q, k, v = _qkv(2, 2, 1, 9, 30, 16, torch.float32, seed=8)
    start, end = torch.tensor([3, 0]), torch.tensor([21, 30])
    do = torch.randn(2, 2, 9, 16)
    got = _grads(lambda *t: ftattn.attention(*t, causal=True, key_start=start, key_end=end), q, k, v, do)
    for b in range(2):
        s, e = int(start[b]), int(end[b])
        want = _grads(lambda *t: ftattn.attention(*t, causal=True), q[b:b + 1], k[b:b + 1, :, s:e],
                      v[b:b + 1, :, s:e], do[b:b + 1])
        assert torch.allclose(got[0][b:b + 1], want[0], atol=1e-6)
        assert torch.allclose(got[1][b:b + 1, :, s:e], want[1], atol=1e-6)
        assert torch.allclose(got[2][b:b + 1, :, s:e], want[2], atol=1e-6)
        assert not got[1][b, :, :s].any() and not got[1][b, :, e:].any()


# The backward on the views models pass (attention_reference's layouts, NaN wherever a view
# skips): q, k, v, out and the output's gradient converted to contiguous fp32 rows first.
@pytest.mark.parametrize("layout", [padded_view, bnhd_view], ids=["padded", "bnhd"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 53, 40, True), (1, 3, 1, 97, 17, 24, False)], ids=str)
def test_strided_views_backward_matches_contiguous(layout, shape):
    B, Hq, Hkv, N, M, D, causal = shape
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, torch.float32, seed=N)
    do = torch.randn(B, Hq, N, D, generator=torch.Generator().manual_seed(2))
    out = ftattn.attention(q, k, v, causal=causal)
    scale = D ** -0.5
    for prot in (0, 1, 2):
        want = torch.ops.ftattn.attention_bwd(q, k, v, out, do, causal, scale, prot, True)
        got = torch.ops.ftattn.attention_bwd(*(layout(t) for t in (q, k, v, out, do)), causal, scale, prot, True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), prot
        assert not want[3].any()
    # through autograd: leaves in the model's layout, the output's gradient a view too
    bufs = [bnhd_view(t).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]  # [B, N, H, D] leaves
    o = ftattn.attention(*(b.transpose(1, 2) for b in bufs), causal=causal)
    o.backward(padded_view(do))
    clean = _grads(lambda *t: ftattn.attention(*t, causal=causal), q, k, v, do)
    assert all(torch.equal(b.grad.transpose(1, 2), c) for b, c in zip(bufs, clean))


@pytest.mark.parametrize("site", ["dq", "ds", "dv"])
def test_strided_views_backward_fault_corrected(site):
    q, k, v = _qkv(1, 4, 2, 70, 90, 32, torch.float32, seed=7)
    do = torch.randn(1, 4, 70, 32)
    clean = _grads(lambda *t: ftattn.attention(*t, causal=True), q, k, v, do)
    fault = Fault(site, batch=0, head=3, row=66, col=60, dim=5, bit=30)
    bufs = [bnhd_view(t).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
    out, rep = ftattn.attention(*(b.transpose(1, 2) for b in bufs), causal=True, fault=fault, return_report=True)
    out.backward(padded_view(do))
    assert rep.backward.detected > 0 and rep.backward.corrected == rep.backward.flagged_blocks
    assert all(torch.equal(b.grad.transpose(1, 2), c) for b, c in zip(bufs, clean))


def test_strided_views_backward_nonfinite_input_is_not_a_fault():
    q, k, v = _qkv(1, 2, 1, 37, 45, 16, torch.float32, seed=9)
    do = torch.randn(1, 2, 37, 16)
    out = ftattn.attention(q, k, v)
    qv = padded_view(q)
    qv[0, 1, 5, 3] = float("inf")
    *_, flags = torch.ops.ftattn.attention_bwd(qv, padded_view(k), padded_view(v), out, padded_view(do), False, 0.25,
                                               2, True)
    # head 1 (the inf): reported as non-finite input, neither corrected nor uncorrected; head
    # 0 (its padding is NaN, never read): clean
    assert (flags[0, 1] & int(Check.NONFINITE_INPUT)).any()
    assert not (flags[0, 1] & int(Check.CORRECTED | Check.UNCORRECTED)).any()
    assert not flags[0, 0].any()


def test_bad_backward_faults_are_refused_clearly():
    q, k, v = _qkv(1, 2, 1, 5, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="in the backward"):
        ftattn.attention(q, k, v, fault=Fault("dq", bit=3))  # no gradient: no backward
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with pytest.raises(ValueError, match="col=6 is out of range"):
        ftattn.attention(*leaves, fault=Fault("dk", col=6, bit=3))
    with pytest.raises(ValueError, match="row=5 is out of range"):
        ftattn.attention(*leaves, fault=Fault("ds", row=5, bit=3))
    with pytest.raises(ValueError, match="not a site of attention_backward"):
        torch.ops.ftattn.attention_bwd(q.detach(), k.detach(), v.detach(), q.detach(), q.detach(), False, 0.3, 2,
                                       True, [0, 0, 0, 0, 0, 0, 3])


ENTRY_POINTS = {
    "function": lambda q, k, v, causal: ftattn.attention(q, k, v, causal=causal),
    "op": lambda q, k, v, causal: torch.ops.ftattn.attention(q, k, v, causal=causal),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("wrt", ["q", "v"])
def test_double_backward_raises_and_first_order_stays_right(entry, wrt):
    """create_graph=True gives the right first-order gradients; differentiating them again
    (a gradient penalty) raises instead of returning zeros (it returned zeros with only a
    warning of torch's: the checked backward has no autograd of its own). "v" with
    out.sum(): the incoming gradient needs no grad, the saved q and k do."""
    B, Hq, Hkv, N, M, D, causal = 1, 4, 2, 13, 19, 21, True
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, torch.float32, seed=7)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    index = "qkv".index(wrt)
    loss = (lambda o: o.pow(2).sum()) if wrt == "q" else (lambda o: o.sum())
    first, = torch.autograd.grad(loss(ENTRY_POINTS[entry](*leaves, causal)), leaves[index], create_graph=True)
    first_exact, = torch.autograd.grad(loss(_torch_attention(*exact, causal, torch.float64)), exact[index],
                                       create_graph=True)
    assert first.requires_grad
    assert (first.double() - first_exact).abs().max().item() <= 1e-5 * max(1.0, first_exact.abs().max().item())
    first_exact.pow(2).sum().backward()
    assert exact[0].grad.abs().max() > 1e-3  # the second-order gradient ftattn would have lost
    with pytest.raises(NotImplementedError, match="not differentiable.*scaled_dot_product_attention"):
        first.pow(2).sum().backward()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_create_graph_without_a_second_backward_is_unchanged(entry):
    """create_graph=True alone (the first-order gradients used as values) gives the same
    gradients, bit for bit, as a plain backward."""
    q, k, v = _qkv(2, 2, 1, 11, 7, 9, torch.float32, seed=8)
    do = torch.randn(2, 2, 11, 9, generator=torch.Generator().manual_seed(2))
    plain = _grads(lambda *t: ENTRY_POINTS[entry](*t, True), q, k, v, do)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    graph = torch.autograd.grad(ENTRY_POINTS[entry](*leaves, True), leaves, do, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, graph))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_casts_the_inputs_as_for_sdpa(entry, dtype):
    """Under torch.autocast("cpu", dtype) q, k, v are cast to dtype, as torch's SDPA's are:
    fp32 q, k with a low-precision v (Llama's rotary step under autocast) give dtype's
    output, bit for bit the call on the cast inputs, near fp64 as torch's attention in
    dtype is, and fp32 gradients for the fp32 leaves (it raised "must share one dtype")."""
    B, Hq, Hkv, N, M, D, causal = 2, 4, 2, 13, 19, 21, True
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, torch.float32, seed=9)
    v = v.to(dtype)
    do = torch.randn(B, Hq, N, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=dtype):
        out = ENTRY_POINTS[entry](*leaves, causal)
    assert out.dtype == dtype
    cast = [t.to(dtype) for t in (q, k, v)]
    assert torch.equal(out, ENTRY_POINTS[entry](*cast, causal))
    out.backward(do)
    assert [t.grad.dtype for t in leaves] == [torch.float32, torch.float32, dtype]
    low = _grads(lambda *t: ENTRY_POINTS[entry](*t, causal), *cast, do)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip((t.grad for t in leaves), low))
    exact = _grads(lambda *t: _torch_attention(*t, causal, torch.float64), *cast, do.double())
    plain = _grads(lambda *t: _torch_attention(*t, causal, dtype), *cast, do)
    for g, p, e in zip((t.grad for t in leaves), plain, exact):
        slack = 4 * ULP[dtype] * max(1.0, e.abs().max().item())
        assert (g.double() - e).abs().max().item() <= 2 * (p.double() - e).abs().max().item() + slack


def test_mixed_dtypes_outside_autocast_still_raise():
    q, k, v = _qkv(1, 2, 1, 5, 6, 8, torch.float32)
    for entry in ENTRY_POINTS.values():
        with pytest.raises(TypeError, match=r"share one dtype.*torch.autocast"):
            entry(q, k, v.bfloat16(), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not cast (as for SDPA): its error stays
        with pytest.raises(TypeError, match="float64 is not supported"):
            ftattn.attention(q.double(), k.double(), v.double())


# ---------------------------------------------------------------------------
# the forward's statistics (each row's max score and normaliser), kept for the backward


def _stats_call(q, k, v, causal, scale, protection=2):
    B, Hq, N, _ = q.shape
    stats = torch.full((B, Hq, N, 2), float("nan"))
    out, flags = torch.ops.ftattn.attention_fwd(q, k, v, causal, scale, protection, True, stats=stats)
    assert not flags.any()
    return out, stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    # B, Hq, Hkv, N, M, D, causal, scale
    (1, 4, 2, 97, 17, 64, True, 0.125),    # N > M: rows 0..79 see no key
    (2, 6, 2, 3, 300, 59, False, -0.3),    # stacked heads (a decode-like block), negative scale
    (1, 2, 1, 130, 257, 16, True, 0.25),   # two report blocks, two key tiles
], ids=str)
def test_forward_writes_each_rows_max_and_normaliser(shape, dtype):
    """attention_fwd's stats: per row the largest score of sgn(scale) q . k_j over its
    visible keys and the normaliser sum_j exp((s_j - max) |scale|) (fp64 reference of the
    same fp32 inputs); a row that sees no key gets -inf and 0. Every level writes the same
    bits (the backward's P does not depend on the level)."""
    B, Hq, Hkv, N, M, D, causal, scale = shape
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, dtype, seed=N + M)
    out, stats = _stats_call(q, k, v, causal, scale)
    for level in (0, 1):
        assert torch.equal(_stats_call(q, k, v, causal, scale, level)[1], stats)
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    s = (math.copysign(1.0, scale) * q.double()) @ kk.transpose(-1, -2)
    visible = torch.ones(N, M, dtype=torch.bool)
    if causal:
        visible = torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N)
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1)
    empty = ~visible.any(-1).expand_as(m)
    assert torch.all(stats[..., 0][empty] == float("-inf")) and torch.all(stats[..., 1][empty] == 0)
    mag = q.double().norm(dim=-1) * kk.norm(dim=-1).amax(-1, keepdim=True)  # bound of a score's rounding
    assert torch.all((stats[..., 0].double() - m).abs()[~empty] <= 1e-5 * mag[~empty])
    l = torch.exp((s - stats[..., 0].double()[..., None]) * abs(scale)).sum(-1)
    assert torch.allclose(stats[..., 1].double()[~empty], l[~empty], rtol=1e-5)


@pytest.mark.parametrize("protection", [0, 1, 2])
def test_backward_reads_the_forwards_statistics(protection):
    """The backward makes P from the forward's max and normaliser: its gradients agree with
    those of the backward that makes them itself (a first pass over the keys) within
    rounding; a normaliser changed by 1 % changes every gradient (so they are read), and the
    checks flag it (abft, full) as the normaliser invariant, uncorrected (the statistics are
    an input of the backward: a recomputation reads them again)."""
    q, k, v = _qkv(1, 4, 2, 70, 90, 32, torch.float32, seed=9)
    do = torch.randn(1, 4, 70, 32, generator=torch.Generator().manual_seed(2))
    out, stats = _stats_call(q, k, v, True, 0.2)
    args = (q, k, v, out, do, True, 0.2, protection, True)
    *own, flags = torch.ops.ftattn.attention_bwd(*args)
    *kept, flags_kept = torch.ops.ftattn.attention_bwd(*args, stats=stats)
    assert not flags.any() and not flags_kept.any()
    for a, b in zip(own, kept):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    bad = stats.clone()
    bad[0, 1, :, 1] *= 1.01
    *wrong, flags_bad = torch.ops.ftattn.attention_bwd(*args, stats=bad)
    assert not torch.allclose(wrong[0][0, 1], kept[0][0, 1], rtol=1e-3)
    if protection == 0:
        assert not flags_bad.any()
    else:
        rows = flags_bad[0, 1, :2]  # the report blocks of query head 1
        assert torch.all(rows & int(Check.ROWSUM_INVARIANT) != 0)
        assert torch.all(rows & int(Check.UNCORRECTED) != 0)
        assert not flags_bad[0, [0, 2, 3]].any()


@pytest.mark.parametrize("protection", [1, 2])
def test_statistics_that_disagree_with_the_mask_are_flagged(protection):
    """A row that sees keys with no max in the statistics (-inf), and a row that sees none
    with a finite one, are flagged: P would be zero, or made for keys the mask hides."""
    q, k, v = _qkv(1, 2, 1, 40, 30, 16, torch.float32, seed=10)  # causal, N > M: rows 0..9 see no key
    do = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(3))
    out, stats = _stats_call(q, k, v, True, 0.25)
    for row, m in ((20, float("-inf")), (3, 0.0)):
        bad = stats.clone()
        bad[0, 0, row] = torch.tensor([m, 1.0 if m == 0.0 else 0.0])
        *_, flags = torch.ops.ftattn.attention_bwd(q, k, v, out, do, True, 0.25, protection, True, stats=bad)
        assert flags[0, 0, 0] & int(Check.ROWSUM_INVARIANT), row
        assert not flags[0, 1].any()


def test_statistics_unused_where_the_scores_could_drift():
    """Where the backward's scores could round far from the forward's (logits of ~1e5 here:
    the bound of their difference exceeds 2^-12 in P), the backward makes the statistics
    itself: given wrong ones, its gradients are those it makes without them, bit for bit."""
    q, k, v = _qkv(1, 2, 1, 33, 41, 16, torch.float32, seed=11)
    do = torch.randn(1, 2, 33, 16, generator=torch.Generator().manual_seed(4))
    scale = 3e3
    out = ftattn.attention(q, k, v, scale=scale)
    garbage = torch.full((1, 2, 33, 2), 0.5)
    for protection in (0, 2):
        args = (q, k, v, out, do, False, scale, protection, True)
        *own, flags = torch.ops.ftattn.attention_bwd(*args)
        *given, flags_given = torch.ops.ftattn.attention_bwd(*args, stats=garbage)
        assert not flags.any() and not flags_given.any()
        assert all(torch.equal(a, b) for a, b in zip(own, given))


@pytest.mark.parametrize("kept", [False, True], ids=["own_statistics", "forwards_statistics"])
@pytest.mark.parametrize("bit", [0, 7, 15, 22, 29])
def test_every_probs_change_is_caught(bit, kept):
    """P as stored is summed again and compared with P as made: at abft a flip of any bit of
    an entry, the lowest mantissa bit included, is flagged and corrected bit for bit (the
    row sum against 1 alone let changes below (M + 8) u pass), with the backward's own
    statistics or the forward's."""
    q, k, v = _qkv(1, 2, 1, 37, 53, 24, torch.float32, seed=3)
    do = torch.randn(1, 2, 37, 24, generator=torch.Generator().manual_seed(4))
    out, stats = _stats_call(q, k, v, True, 24 ** -0.5, 1)
    extra = {"stats": stats} if kept else {}
    args = (q, k, v, out, do, True, 24 ** -0.5, 1, True)
    *clean, flags = torch.ops.ftattn.attention_bwd(*args, **extra)
    assert not flags.any()
    s = (q[0, 1, 30] @ k[0, 0].T)[: 30 + 53 - 37 + 1]
    for col in (int(s.argmax()), int(s.argmin())):
        fault = [int(Site.BWD_PROBS), 0, 1, 30, col, 0, bit]
        *got, flags = torch.ops.ftattn.attention_bwd(*args, fault, **extra)
        assert flags[0, 1, 0] & int(Check.CORRECTED), (col, bit)
        assert all(torch.equal(a, b) for a, b in zip(got, clean))


def test_bad_statistics_are_refused_clearly():
    q, k, v = _qkv(1, 2, 1, 5, 6, 8, torch.float32)
    for bad in (torch.empty(1, 2, 5), torch.empty(1, 2, 5, 2, dtype=torch.float64), torch.empty(1, 2, 2, 5).mT):
        with pytest.raises(ValueError, match=r"stats must be .*\[B, Hq, N, 2\] = \[1, 2, 5, 2\]"):
            torch.ops.ftattn.attention_fwd(q, k, v, False, 0.3, 2, True, stats=bad)
        with pytest.raises(ValueError, match=r"stats must be the forward's"):
            torch.ops.ftattn.attention_bwd(q, k, v, q, q, False, 0.3, 2, True, stats=bad)


@pytest.mark.parametrize("row", [5, 45, 70])
def test_column_groups_of_32_rows(row):
    """S and dP are column-checked per 32 rows of a 64-row block, each group against its
    own reference row: with the second group's queries 30x the first's, clean calls raise
    no flag (a group checked against another's sums would), and a mid-mantissa score fault
    in either group, or in a block of 40 rows (one group), is flagged and corrected."""
    q, k, v = _qkv(1, 2, 1, 104, 77, 24, torch.float32, seed=12)
    q[:, :, 32:64] *= 30
    do = torch.randn(1, 2, 104, 24, generator=torch.Generator().manual_seed(5))
    out, stats = _stats_call(q, k, v, False, 24 ** -0.5, 1)
    for protection in (1, 2):
        args = (q, k, v, out, do, False, 24 ** -0.5, protection, True)
        *clean, flags = torch.ops.ftattn.attention_bwd(*args, stats=stats)
        assert not flags.any()
        col = int((q[0, 1, row] @ k[0, 0].T).argmax())
        fault = [int(Site.BWD_SCORES), 0, 1, row, col, 0, 19]
        *got, flags = torch.ops.ftattn.attention_bwd(*args, fault, stats=stats)
        assert flags[0, 1, row // 64] & int(Check.CORRECTED)
        assert all(torch.equal(a, b) for a, b in zip(got, clean))


@pytest.mark.parametrize("k_scale", [1e-25, 1e20], ids=["tiny_keys", "huge_keys"])
def test_keys_whose_squares_leave_fp32(k_scale):
    """Keys whose squares underflow (1e-50) or overflow (1e40) in fp32, with queries scaled
    the other way so the scores are ordinary (the kernel makes those keys' norms, the column
    bounds' scale, in fp64): clean calls raise no flag and a score fault is still corrected.
    (A build without that fallback passes too: the column sums of |S| alone bound these
    clean calls, and infinite norms send every entry to the fp64 verification.)"""
    q, k, v = _qkv(1, 2, 1, 70, 45, 16, torch.float32, seed=13)
    q, k = q / k_scale, k * k_scale
    do = torch.randn(1, 2, 70, 16, generator=torch.Generator().manual_seed(6))
    out, stats = _stats_call(q, k, v, True, 0.25, 1)
    for protection in (1, 2):
        args = (q, k, v, out, do, True, 0.25, protection, True)
        *clean, flags = torch.ops.ftattn.attention_bwd(*args, stats=stats)
        assert not flags.any()
        col = int((q[0, 0, 60].double() @ k[0, 0].double().T)[:36].argmax())
        *got, flags = torch.ops.ftattn.attention_bwd(*args, [int(Site.BWD_SCORES), 0, 0, 60, col, 0, 21],
                                                     stats=stats)
        assert flags[0, 0, 0] & int(Check.CORRECTED)
        assert all(torch.equal(a, b) for a, b in zip(got, clean))


def test_the_python_autograd_passes_the_forwards_statistics():
    """ftattn.attention's backward on CPU is attention_bwd given the forward's statistics:
    its gradients equal that call's bit for bit, and not those of the backward that makes
    its own (whose normaliser is summed in fp64, not the forward's fp32)."""
    q, k, v = _qkv(1, 4, 2, 70, 300, 32, torch.float32, seed=14)
    do = torch.randn(1, 4, 70, 32, generator=torch.Generator().manual_seed(7))
    got = _grads(lambda *t: ftattn.attention(*t, causal=True, protection="abft"), q, k, v, do)
    out, stats = _stats_call(q, k, v, True, 32 ** -0.5, 1)
    args = (q, k, v, out, do, True, 32 ** -0.5, 1, True)
    *kept, _ = torch.ops.ftattn.attention_bwd(*args, stats=stats)
    *own, _ = torch.ops.ftattn.attention_bwd(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, kept))
    assert not all(torch.equal(a, b) for a, b in zip(got, own))


@pytest.mark.parametrize("shape", [GRID[1], GRID[3], GRID[5]], ids=str)
def test_bf16_products_on_the_bf16_gemm(shape, monkeypatch):
    """bf16 q, k, v, dO: the C++ backward makes S = Q K^T and dP = dO V^T on the bf16 GEMM (oneDNN's brgemm)
    (as the forward makes S), each column group's reference row as three bf16 rows, and dV,
    dK, dQ from P and dS rounded to bf16 (the references of their checks from the same
    rounded values: made from the unrounded ones, this test and the bf16 cases of the
    grid and of every backward site fail on clean data). The
    gradients meet the house tolerance with it and with sgemm (FTATTN_GEMM16=0), every level
    gives the same bits, and a mid-mantissa fault on S or dP in either 32-row group of a
    block is flagged and corrected to the clean gradients."""
    for flag in ("0", "1"):
        monkeypatch.setenv("FTATTN_GEMM16", flag)
        check_gradients_within_twice_torch(shape, torch.bfloat16, ftattn.attention)
    B, Hq, Hkv, N, M, D, causal = shape
    q, k, v = _qkv(B, Hq, Hkv, N, M, D, torch.bfloat16, seed=21)
    do = torch.randn(B, Hq, N, D, generator=torch.Generator().manual_seed(2)).bfloat16()
    runs = [_grads(lambda *t, p=p: ftattn.attention(*t, causal=causal, protection=p), q, k, v, do)
            for p in ("off", "abft", "full")]
    assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))
    out, stats = _stats_call(q, k, v, causal, D ** -0.5, 1)
    rows = [r for r in (5, 40, N - 1) if r < N]
    for protection in (1, 2):
        args = (q, k, v, out, do, causal, D ** -0.5, protection, True)
        *clean, flags = torch.ops.ftattn.attention_bwd(*args, stats=stats)
        assert not flags.any()
        for site, x, y in ((Site.BWD_SCORES, q, k), (Site.DP, do, v)):
            for row in rows:
                h = Hq - 1
                visible = M if not causal else max(0, min(M, row + M - N + 1))
                if visible == 0:
                    continue
                col = int((x[0, h, row].double() @ y[0, h // (Hq // Hkv), :visible].double().T).abs().argmax())
                fault = [int(site), 0, h, row, col, 0, 20]
                *got, flags = torch.ops.ftattn.attention_bwd(*args, fault, stats=stats)
                assert flags[0, h, row // 64] & int(Check.CORRECTED), (site, row)
                assert all(torch.equal(a, b) for a, b in zip(got, clean))


@pytest.mark.parametrize("case", ["q, k x 2^-64", "dO, v x 2^-64"])
def test_bf16_products_flushed_by_the_bf16_gemm_raise_no_alarm(case):
    """Tiny normal bf16 inputs whose products fall below 2^-126, which the bf16 GEMM
    flushes to 0 (AMX, AVX512-BF16): the backward's bounds on S and dP carry 2^-126 per
    operation there, so clean calls raise no flag (a build with 2^-149 fails this wherever
    the hardware flushes)."""
    q, k, v = _qkv(1, 2, 1, 70, 45, 16, torch.float32, seed=14)
    do = torch.randn(1, 2, 70, 16, generator=torch.Generator().manual_seed(7))
    if case.startswith("q"):
        q, k = q * 2.0**-64, k * 2.0**-64
    else:
        do, v = do * 2.0**-64, v * 2.0**-64
    q, k, v, do = (t.bfloat16() for t in (q, k, v, do))
    out, stats = _stats_call(q, k, v, True, 0.25, 1)
    for protection in (1, 2):
        for st in (stats, None):
            *grads, flags = torch.ops.ftattn.attention_bwd(q, k, v, out, do, True, 0.25, protection, True, stats=st)
            assert not flags.any(), flags.nonzero().tolist()
            assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 257, 128), (3, 2, 1, 257, 16), (1, 1, 65, 257, 128)])
def test_bits_do_not_depend_on_the_thread_count(dtype, shape):
    """A call of one worker (one query row, or a last block of one row) ran its task on the
    caller's thread, outside the pool's parallel region, where MKL split its GEMMs over every
    thread: outputs and gradients differed by ~1e-7 between 1 and 2 threads (found by
    review). The kernels' tasks now run their GEMMs sequentially, as inside the region."""
    B, H, N, M, D = shape
    g = torch.Generator().manual_seed(N + D)
    q, dout = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, H, M, D, generator=g), torch.randn(B, H, M, D, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = ftattn.attention(*leaves)
            out.backward(dout.to(dtype))
            results.append([out] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_func_grad_and_vjp_run_the_checked_backward(backend):
    """torch.func.grad and torch.func.vjp over ftattn.attention give autograd's gradients bit
    for bit (they raised before: the autograd.Function had no setup_context), GQA and causal,
    and a backward fault given to the call is corrected under them too; grad of grad raises
    ftattn's clear error (not zeros). (torch.ops.ftattn.attention: torch's register_autograd
    does not support torch.func in this torch.)"""
    q, k, v = _qkv(1, 4, 2, 13, 19, 21, torch.float32, seed=9)
    do = torch.randn(1, 4, 13, 21, generator=torch.Generator().manual_seed(3))

    def loss(q, k, v, fault=None):
        return (ftattn.attention(q, k, v, causal=True, backend=backend, fault=fault) * do).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*leaves).backward()
    want = [t.grad for t in leaves]
    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    fixed = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, Fault("dv", 0, 1, row=0, col=4, dim=3, bit=28))
    assert all(torch.equal(a, b) for a, b in zip(fixed, want))
    out, vjp = torch.func.vjp(lambda q, k, v: ftattn.attention(q, k, v, causal=True, backend=backend), q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(vjp(do), want))
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q, k, v).sum())(q)



@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_func_vmap_and_per_sample_gradients(backend):
    """torch.func.vmap over ftattn.attention (the kernels had no batching rule: it failed
    inside) folds the mapped dimension into the batch: bit for bit the call on the folded
    batch, with inputs not mapped repeated and key ranges mapped or not; per-sample
    gradients, vmap(grad(f)), are the folded call's autograd gradients bit for bit (its
    backward read its flags from a batched tensor and failed)."""
    n = 3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(n, 2, 4, 13, 21, generator=g)
    k, v = (torch.randn(n, 2, 2, 19, 21, generator=g) for _ in range(2))
    do = torch.randn(n, 2, 4, 13, 21, generator=g)
    fold = functools.partial(torch.flatten, start_dim=0, end_dim=1)

    def att(q, k, v, **kw):
        return ftattn.attention(q, k, v, causal=True, backend=backend, **kw)

    assert torch.equal(torch.func.vmap(att)(q, k, v), att(fold(q), fold(k), fold(v)).unflatten(0, (n, 2)))
    k1 = k[0]  # one key and value set for every mapped sample
    got = torch.func.vmap(att, in_dims=(0, None, None))(q, k1, k1)
    assert torch.equal(got, att(fold(q), k1.repeat(n, 1, 1, 1), k1.repeat(n, 1, 1, 1)).unflatten(0, (n, 2)))
    start, end = torch.tensor([[0, 3], [2, 5], [1, 1]]), torch.tensor([[19, 11], [17, 19], [9, 19]])
    got = torch.func.vmap(lambda q, k, v, s, e: att(q, k, v, key_start=s, key_end=e))(q, k, v, start, end)
    assert torch.equal(got, att(fold(q), fold(k), fold(v), key_start=fold(start), key_end=fold(end)).unflatten(0, (n, 2)))
    got = torch.func.vmap(lambda q, k, v: att(q, k, v, key_start=start[0], key_end=end[0]))(q, k, v)
    want = att(fold(q), fold(k), fold(v), key_start=start[0].repeat(n), key_end=end[0].repeat(n))
    assert torch.equal(got, want.unflatten(0, (n, 2)))
    with pytest.raises(ValueError, match=r"sample 0 has keys \[0, 20\)"):  # (checked once folded)
        torch.func.vmap(lambda q, k, v, s, e: att(q, k, v, key_start=s, key_end=e))(q, k, v, start, end + 1)

    def loss(q, k, v, do):
        return (att(q, k, v) * do).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v, do)
    leaves = [fold(t).clone().requires_grad_() for t in (q, k, v)]
    (att(*leaves) * fold(do)).sum().backward()
    assert all(torch.equal(a, b.grad.unflatten(0, (n, 2))) for a, b in zip(per_sample, leaves))



def test_compiled_call_with_grad_traces_the_function():
    """torch.compile of ftattn.attention with q requiring grad (an override of its
    Function's apply broke the trace: found the same session): as eager."""
    q, k, v = _qkv(1, 2, 1, 7, 9, 8, torch.float32, seed=2)
    leaf = q.clone().requires_grad_()
    ftattn.attention(leaf, k, v, causal=True).square().sum().backward()
    want = leaf.grad
    leaf = q.clone().requires_grad_()
    torch.compile(lambda a: ftattn.attention(a, k, v, causal=True))(leaf).square().sum().backward()
    assert torch.allclose(leaf.grad, want)

def test_forward_mode_raises_clearly():
    """Forward mode through ftattn.attention: its tangent was dropped without a word
    (forward_ad) or came back wrong (torch.func.jvp); now a clear error, the op's too."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = _qkv(1, 2, 1, 5, 7, 8, torch.float32, seed=1)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        with fwAD.dual_level():
            ftattn.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        with fwAD.dual_level():
            torch.ops.ftattn.attention(q, k, fwAD.make_dual(v, torch.ones_like(v)))
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda a: ftattn.attention(a, k, v), (q,), (torch.ones_like(q),))
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jacfwd(lambda a: ftattn.attention(a, k, v))(q)

def _checked_grads(q, k, v, do, fault=None, protection="full", causal=True, backend="auto"):
    """fp64 gradients of a checked call (on_fault="report") and its backward's detections."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, rep = ftattn.attention(*leaves, causal=causal, protection=protection, on_fault="report", backend=backend,
                              fault=fault, return_report=True)
    o.backward(do)
    return [t.grad.double() for t in leaves], rep.backward.detected


def _clean_as_off(grads):
    """The clean call's gradients of ``grads(fault, protection)`` at full, after asserting it
    detects nothing and equals protection off bit for bit."""
    clean, det = grads(None)
    off, _ = grads(None, "off")
    assert det == 0 and all(torch.equal(a, b) for a, b in zip(clean, off))
    return clean


def gqa_loss_scaled_data(N=211):
    """GQA 2:1 (one key head, two query heads): normal q, k, v, and dO x1024 (loss scaling)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, N, 64, generator=g)
    k, v = (torch.randn(1, 1, N, 64, generator=g) for _ in range(2))
    return q, k, v, torch.randn(1, 2, N, 64, generator=g) * 1024


def _harmful_grads(got, clean, tau):
    """FAULT_MODEL.md's gradient harm: some gradient moved by more than tau max(1, max |g|)."""
    return any(bool(((a - b).abs() > tau * max(1.0, b.abs().max().item())).any()) for a, b in zip(got, clean))


def test_loss_scaled_gradients_leave_normal_rows_seen():
    """With gradients of 1e4 (fp16 loss scaling) the dQ / dK / dV checks' bounds, from the sum of
    |terms|, grow as the keys while the harm grows as their square root: at N = M = 2048 half
    the key blocks of normal data were BLIND (made again and compared) before the blind rule
    took the bound's statistical estimate. The reference's raw flags: none blind now."""
    from ftattn.reference import _backward_raw

    g = torch.Generator().manual_seed(0)
    N = 2048
    q, k, v = (torch.randn(1, 1, N, 64, generator=g) for _ in range(3))
    o = ftattn.attention(q, k, v, causal=True, backend="reference")
    do = torch.randn(1, 1, N, 64, generator=g) * 1e4
    *_, flags = _backward_raw(q, k, v, o, do, True, 64**-0.5, 2, None, None, None, None)
    assert not bool(((flags & int(Check.BLIND)) != 0).any())
    assert not bool(((flags & int(ftattn.faults.CHECK_MASK)) != 0).any())


@pytest.mark.parametrize("backend, dtype", [("cpp", torch.float32), ("cpp", torch.float16),
                                            ("reference", torch.float32)], ids=str)
def test_faults_on_the_largest_loss_scaled_gradients_are_caught(backend, dtype):
    """The adversary's faults for the blind rule above: mid-mantissa bits (10..22) of the
    largest dq, dk, dv entries, gradients of 1e2 (loss scaling), causal N = M = 300: every
    harmful one detected at full."""
    g = torch.Generator().manual_seed(1)
    N, tau = 300, 2.0**-10
    q, k, v = (torch.randn(1, 2, N, 64, generator=g).to(dtype) for _ in range(3))
    do = (torch.randn(1, 2, N, 64, generator=g) * 100).to(dtype)

    def grads(fault):
        return _checked_grads(q, k, v, do, fault, backend=backend)

    clean, det = grads(None)
    assert det == 0
    harmful = 0
    for si, site in enumerate(("dq", "dk", "dv")):
        top = clean[si][0].abs().flatten().topk(3).indices.tolist()
        for x in top:
            h, i, d = x // (N * 64), (x // 64) % N, x % 64
            for bit in (10, 13, 16, 19, 22):
                got, det = grads(Fault(site, 0, h, row=i, col=i, dim=d, bit=bit))
                harm = _harmful_grads(got, clean, tau)
                harmful += harm
                assert det > 0 or not harm, (site, h, i, d, bit)
    assert harmful >= 10


@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("protection", ["abft", "full"])
def test_score_faults_with_loss_scaled_gradients_are_caught(hkv, protection):
    """With gradients of ~1e3 (loss scaling) the C++ backward verifies the entries of S and dP
    against TAU_VERIFY times the gradients' scale (without GQA), not the floor alone, which
    had it verify most entries in fp64 (5x off at N = M = 2048). Faults on the top-probability
    key of rows (low and mid-mantissa bits, S, dP and P), peaked rows: every harmful one caught."""
    g = torch.Generator().manual_seed(7)
    N, tau = 200, 2.0**-10
    q = torch.randn(1, 2, N, 64, generator=g)
    k, v = (torch.randn(1, hkv, N, 64, generator=g) for _ in range(2))
    q[..., :2] *= 8
    k[..., :2] *= 8
    do = torch.randn(1, 2, N, 64, generator=g) * 1024
    s = (q @ k.repeat_interleave(2 // hkv, 1).transpose(-1, -2)).masked_fill(torch.ones(N, N).triu(1).bool(),
                                                                             float("-inf"))

    def grads(fault):
        return _checked_grads(q, k, v, do, fault, protection)

    clean, det = grads(None)
    assert det == 0
    harmful = 0
    for row in range(5, N, 39):
        for h in range(2):
            col = int(s[0, h, row].argmax())
            for site in ("bwd_scores", "dp", "bwd_probs"):
                for bit in (0, 3, 6, 9, 12, 16):
                    got, det = grads(Fault(site, 0, h, row=row, col=col, bit=bit))
                    harm = _harmful_grads(got, clean, tau)
                    harmful += harm
                    assert det > 0 or not harm, (site, h, row, col, bit)
    assert harmful >= 20


def test_task_whose_gradients_fall_below_the_assumed_scale_is_compared():
    """The second half of the queries repeats the first with dO negated (not causal): each
    key's dK and dV cancel to ~0 over the task while the first blocks' partial sums set the
    verification's scale ~1e3, so the task's gradients end below the scale it assumed (its
    rows and keys blind, made again and compared). No alarm on the clean call (gradients those
    of protection off, bit for bit), and small faults on a score of the second half, within
    what the scaled verification lets through, still caught. (Here the dK / dV checks' own
    blind rule, H from cancelled rows, catches them as well: a build without the task's
    comparison passes this test too.)"""
    g = torch.Generator().manual_seed(3)
    N, tau = 256, 2.0**-10
    half = torch.randn(1, 1, N // 2, 64, generator=g)
    q = torch.cat([half, half], 2)
    k, v = (torch.randn(1, 1, N, 64, generator=g) for _ in range(2))
    dh = torch.randn(1, 1, N // 2, 64, generator=g) * 1024
    do = torch.cat([dh, -dh], 2)

    def grads(fault, protection="full"):
        return _checked_grads(q, k, v, do, fault, protection, causal=False)

    clean = _clean_as_off(grads)
    assert clean[1].abs().max() < 1e-2 * clean[0].abs().max()  # dk cancels
    # (row 200: in the fourth block of 64 queries, verified at the scale of the first three's
    # partial sums)
    s = q[0, 0, 200] @ k[0, 0].t()
    col = int(s.argmax())
    harmful = 0
    for bit in range(0, 14):
        got, det = grads(Fault("bwd_scores", 0, 0, row=200, col=col, bit=bit))
        harm = _harmful_grads(got, clean, tau)
        harmful += harm
        assert det > 0 or not harm, bit
    assert harmful >= 1


def test_gqa_loss_scaled_key_rows_are_not_blind():
    """GQA 2:1, gradients of ~1e3 (loss scaling): the reference's dK / dV blind rule took the floor
    alone (a group's heads may cancel in dk, dv), and every key row went blind, the whole
    backward made again at full. Now tau max(1, max |g|) of the call's dk, dv (the heads summed):
    its raw flags hold no BLIND, no failed check (tests/test_attention_backward_triton.py: the
    Triton kernels' likewise)."""
    from ftattn.reference import _backward_raw

    q, k, v, do = gqa_loss_scaled_data()
    o = ftattn.attention(q, k, v, causal=True, backend="reference")
    *_, flags = _backward_raw(q, k, v, o, do, True, 64**-0.5, 2, None, None, None, None)
    assert not bool(((flags & int(Check.BLIND)) != 0).any())
    assert not bool(((flags & int(ftattn.faults.CHECK_MASK)) != 0).any())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gqa_heads_that_cancel_in_dk_and_dv_are_compared(backend):
    """GQA: a key's dk and dv add the group's query heads. Two heads with the same queries and
    dO negated cancel there (dk, dv ~0) while each head's own sums, which set its verification
    scale and its blind rule's threshold, are ~1e3: once every task has run, the call's
    gradients fall below what the tasks assumed, and they are made again and compared. Faults
    on a dk / dv accumulator (harmful against the cancelled gradients' floor) are caught.
    (tests/test_attention_backward_triton.py runs it on the Triton kernels.)"""
    check_gqa_heads_that_cancel(backend)


def check_gqa_heads_that_cancel(backend):
    """test_gqa_heads_that_cancel_in_dk_and_dv_are_compared on ``backend``."""
    g = torch.Generator().manual_seed(5)
    N, tau = 130, 2.0**-10
    q0 = torch.randn(1, 1, N, 64, generator=g)
    q = torch.cat([q0, q0], 1)
    k, v = (torch.randn(1, 1, N, 64, generator=g) for _ in range(2))
    d0 = torch.randn(1, 1, N, 64, generator=g) * 1024
    do = torch.cat([d0, -d0], 1)

    def grads(fault, protection="full"):
        return _checked_grads(q, k, v, do, fault, protection, backend=backend)

    clean = _clean_as_off(grads)
    assert clean[1].abs().max() < 1e-3 * clean[0].abs().max()
    harmful = 0
    for site in ("dk", "dv"):
        for bit in (2, 6, 10, 14, 18):
            got, det = grads(Fault(site, 0, 0, col=77, dim=5, bit=bit))
            harm = _harmful_grads(got, clean, tau)
            harmful += harm
            assert det > 0 or not harm, (site, bit)
    assert harmful >= 4
