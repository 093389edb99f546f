"""Reference attention and input factory shared by the attention tests (a uniquely
named module: `from conftest import` would pick whichever conftest.py was loaded last)."""
import math

import torch


def attention_ref(q, k, v, causal=False, scale=None, upcast=True):
    """softmax(q k^T * scale) v with bottom-right causal alignment and GQA.

    upcast=True computes in float64 (the reference); upcast=False in q's dtype,
    which is "torch's own attention in the same dtype" of the flash-attention
    test rule. Rows with no visible key are zeros.
    """
    dtype = torch.float64 if upcast else q.dtype
    N, M, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(N)[:, None]
        j = torch.arange(M)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p @ vd
    return torch.nan_to_num(out, nan=0.0)


def make_qkv(B=1, Hq=2, Hkv=None, N=17, M=17, D=16, dtype=torch.float32, seed=0, kind="normal"):
    """Seeded q, k, v of the given shapes, normal or uniform [-1, 1)."""
    Hkv = Hq if Hkv is None else Hkv
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, N, D), (B, Hkv, M, D), (B, Hkv, M, D))
    if kind == "uniform":
        ts = [torch.rand(*s, generator=g) * 2 - 1 for s in shapes]
    else:
        ts = [torch.randn(*s, generator=g) for s in shapes]
    return tuple(t.to(dtype) for t in ts)


# q, k, v (and the backward's out and grad_out) as the views models pass: each layout
# holds the contiguous tensor's values, with NaN in every element the view skips, so a
# kernel that reads outside the view shows it in its output or flags
def bnhd_view(t):  # [B, N, H, D] memory, heads transposed (a projection's view)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def padded_view(t):  # a slice of wider rows, [B, N, H, D + 5] (a fused qkv projection)
    buf = torch.full(t.shape[:1] + (t.shape[2], t.shape[1], t.shape[3] + 5), float("nan"), dtype=t.dtype)
    buf[..., :t.shape[3]] = t.transpose(1, 2)
    return buf[..., :t.shape[3]].transpose(1, 2)


def every_other_row_view(t):
    buf = torch.full(t.shape[:2] + (2 * t.shape[2], t.shape[3]), float("nan"), dtype=t.dtype)
    buf[:, :, ::2] = t
    return buf[:, :, ::2]


def cache_slice_view(t):  # the first rows of a preallocated cache [B, H, rows + 7, D]
    buf = torch.full(t.shape[:2] + (t.shape[2] + 7, t.shape[3]), float("nan"), dtype=t.dtype)
    buf[:, :, :t.shape[2]] = t
    return buf[:, :, :t.shape[2]]


LAYOUTS = {"bnhd": bnhd_view, "padded": padded_view, "every_other_row": every_other_row_view,
           "cache_slice": cache_slice_view}


def cancelling_acc_warp(D=59, N=3, M=4):
    """fp32 q, k, v and a warp of accumulator faults whose 32 deltas cancel exactly in the plain
    PV checksum: q = 0 gives every key p = 1, the values are M equal rows, so acc = M v exactly,
    with head dims 0..31 at 1 + b_d 2^-9 (b_d = 1 on the 16 dims of largest weight in the
    weighted checksum, ftattn.reference.pv_weight); bit 14 flipped on those 32 dims moves each by
    +-2^-9 of O (harmful: tau = 2^-10), sixteen up and sixteen down. Returns q, k, v, fault."""
    from ftattn import Fault
    from ftattn.reference import pv_weight

    order = sorted(range(32), key=pv_weight)
    row = torch.full((D,), 1.25)
    row[:32] = 1.0
    row[order[16:]] = 1.0 + 2.0**-9
    q = torch.zeros(1, 1, N, D)
    k = torch.randn(1, 1, M, D, generator=torch.Generator().manual_seed(3))
    v = row.expand(1, 1, M, D).clone()
    return q, k, v, Fault("acc", row=N // 2, col=0, dim=0, bit=14, span=32)


def cancelling_dv_warp(D=41):
    """fp32 q, k, v, dO and a warp on a dV row whose 32 deltas (+-2^-9, harmful: tau = 2^-10)
    cancel exactly in both 16-dim groups' checksums of the backward: q = 0 gives P = 1/4 on 4
    keys, so with 4 equal rows of dO each dV row is that row exactly, 1 + b_d 2^-9 on dims
    0..31 (b_d = 1 on the 8 dims of each group of largest weight in the weighted checksum,
    ftattn.reference.pv_weight). Returns q, k, v, do, fault."""
    from ftattn import Fault
    from ftattn.reference import pv_weight

    row = torch.full((D,), 1.25)
    row[:32] = 1.0
    for g0 in (0, 16):
        row[sorted(range(g0, g0 + 16), key=pv_weight)[8:]] = 1.0 + 2.0**-9
    q = torch.zeros(1, 1, 4, D)
    k, v = (torch.randn(1, 1, 4, D, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    return q, k, v, row.expand(1, 1, 4, D).clone(), Fault("dv", row=0, col=1, dim=0, bit=14, span=32)


def check_dv_warp_caught_at_full_only(attention, device="cpu"):
    """cancelling_dv_warp through ``attention`` (ftattn.attention with a backend): harmful at
    both levels; abft's plain sums do not see it; full flags it and corrects it bit for bit."""
    q, k, v, do, fault = (t.to(device) if torch.is_tensor(t) else t for t in cancelling_dv_warp())

    def grads(**kw):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, rep = attention(*leaves, return_report=True, **kw)
        out.backward(do)
        return [t.grad for t in leaves], rep

    for protection in ("abft", "full"):
        clean, rep = grads(protection=protection)
        assert torch.equal(clean[2][0, 0, 1], do[0, 0, 0]) and rep.backward.detected == 0
        raw, rep = grads(protection=protection, fault=fault, on_fault="report")
        moved = (raw[2] - clean[2]).abs()[0, 0, 1]
        assert torch.equal(moved[:32].cpu(), torch.full((32,), 2.0**-9))  # harmful
        if protection == "abft":
            assert rep.backward.detected == 0  # the plain sums cannot see it
            continue
        assert rep.backward.detected == 1
        fixed, rep = grads(fault=fault)
        assert rep.backward.corrected == 1 and all(torch.equal(a, b) for a, b in zip(fixed, clean))


def _backward_grads(attention, q, k, v, do, device, **kw):
    leaves = [t.to(device, copy=True).requires_grad_() for t in (q, k, v)]
    out, rep = attention(*leaves, return_report=True, **kw)
    out.backward(do.to(device))
    return [t.grad.cpu() for t in leaves], rep.backward


def check_masked_ds_faults_caught(attention, device="cpu"):
    """A dS fault on an entry the kernel masks (dS is 0 there by construction; the products
    read it all the same): a key past a causal row's last, and a row with no visible key,
    in either pass (dim even: the dQ pass, odd: the dK / dV pass), at abft and full: detected
    and corrected to the clean gradients bit for bit. (Review: the Triton backward's dS checks
    skipped masked entries and rows with no key, and the reference's row-sum check rows with
    no key, at abft; dQ and dK moved by ~1, unseen.)"""
    from ftattn import Fault

    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(*s, generator=g) for s in ((1, 1, 20, 16), (1, 1, 40, 16), (1, 1, 40, 16),
                                                          (1, 1, 20, 16)))
    for start, end, row, col in ((10, 35, 18, 34), (30, 35, 3, 31)):  # key 34 masked for row 18; row 3 sees none
        kw = dict(causal=True, key_start=torch.tensor([start]).to(device), key_end=torch.tensor([end]).to(device))
        for protection in ("abft", "full"):
            clean, _ = _backward_grads(attention, q, k, v, do, device, protection=protection, **kw)
            for dim in (2, 3):
                fault = Fault("ds", 0, 0, row=row, col=col, dim=dim, bit=30)
                got, rep = _backward_grads(attention, q, k, v, do, device, protection=protection, fault=fault, **kw)
                assert rep.detected > 0 and rep.corrected == rep.flagged_blocks, (start, row, dim, protection, rep)
                assert all(torch.equal(a, b) for a, b in zip(got, clean)), (start, row, dim, protection)


def check_nonfinite_outside_key_range_does_not_block_correction(attention, device="cpu"):
    """NaN in keys a sample never reads (before its key range) and a real fault on one of its
    keys: detected and corrected, not reported as non-finite input (review: the Triton and
    reference backwards took every key of the batch as the sample's input and returned the
    fault's gradients, detected 0)."""
    from ftattn import Fault

    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(*s, generator=g) for s in ((2, 2, 9, 24), (2, 1, 130, 24), (2, 1, 130, 24),
                                                          (2, 2, 9, 24)))
    k[0, :, 10] = float("nan")
    kw = dict(causal=True, key_start=torch.tensor([40, 0]).to(device), key_end=torch.tensor([101, 130]).to(device))
    clean, rep = _backward_grads(attention, q, k, v, do, device, **kw)
    assert rep.detected == 0 and all(bool(t.isfinite().all()) for t in clean)
    got, rep = _backward_grads(attention, q, k, v, do, device, fault=Fault("dk", 0, 1, row=0, col=70, dim=3, bit=30),
                               **kw)
    assert rep.detected == 1 and rep.corrected == 1 and not rep.nonfinite_input, rep
    assert all(torch.equal(a, b) for a, b in zip(got, clean))


def check_large_logit_constant_rows_backward_no_alarm(attention, device="cpu"):
    """Clean fp32 rows of equal scores at large logits (q or k x 1e20 / 1e30 on constant
    data: scores ~1e19-1e29, every key p = 1 / M): the backward at full raises no flag and
    gives off's gradients. (The reference's redundant softmax took 2^((s - lse) log2 e),
    whose lse = m + log l lost log l beside |m| in fp64: p2 = 1 against p = 1 / M, flagged.)"""
    g = torch.Generator().manual_seed(1)
    for sq, sk in ((1e30, 1.0), (1.0, 1e30), (1e20, 1.0)):
        q = torch.full((1, 2, 5, 8), 0.5) * sq
        k = torch.full((1, 2, 7, 8), 0.25) * sk
        v = torch.randn(1, 2, 7, 8, generator=g)
        do = torch.randn(1, 2, 5, 8, generator=g)
        grads = {}
        for protection in ("off", "full"):
            leaves = [t.to(device, copy=True).requires_grad_() for t in (q, k, v)]
            out, rep = attention(*leaves, protection=protection, return_report=True, on_fault="raise")
            out.backward(do.to(device))
            assert rep.detected == 0 and rep.backward.detected == 0, (sq, sk, protection, rep.backward)
            grads[protection] = [t.grad for t in leaves]
        assert torch.allclose(out.cpu(), v.mean(2, keepdim=True).expand_as(out), rtol=1e-6, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(grads["off"], grads["full"])), (sq, sk)


def check_subnormal_operand_backward_raises_no_alarm(attention, device="cpu", big=(1e4, 1e6)):
    """Clean fp32 input with fp32-subnormal keys (queries) and a large dO: the weighted
    checksum's value sums round within 2^-150 absolute there, which a bound relative to the
    operands' magnitudes alone did not cover once |dS| reached the hundreds (review: full
    flagged dQ's, and dK's, checksum; abft and the reference did not). Gradients at full are
    off's, with no flag."""
    g = torch.Generator().manual_seed(0)
    for small, big in zip(("k", "q"), big):
        q = torch.randn(1, 1, 33, 64, generator=g)
        k = torch.randn(1, 1, 65, 64, generator=g)
        v = torch.randn(1, 1, 65, 64, generator=g)
        do = (torch.randn(1, 1, 33, 64, generator=g) * big).to(device)
        q, k = (q * 1e-42, k) if small == "q" else (q, k * 1e-42)
        grads = {}
        for protection in ("off", "full"):
            leaves = [t.to(device, copy=True).requires_grad_() for t in (q, k, v)]
            out, rep = attention(*leaves, protection=protection, return_report=True)
            out.backward(do)
            assert rep.backward.detected == 0, (small, protection, rep.backward)
            grads[protection] = [t.grad for t in leaves]
        assert all(torch.equal(a, b) for a, b in zip(grads["off"], grads["full"])), small


def near_range_cases(dtype=torch.float32):
    """Clean operands near fp32's range, as (name, q, k, v, dO, scale): constant scores of
    1e37 and 3e38 (the kernels' fp32 checksums of S overflowed: forward and backward
    alarms, uncorrected), values of 1e37 (the backward's dO V^T checksum overflowed) and
    1e38 (P V's unnormalised accumulator overflowed: inf out of finite input, in every
    backend), GQA, causal."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for s in (1e37, 3e38):
        c = (s / 32) ** 0.5
        cases.append((f"scores {s:.0e}", torch.full((1, 2, 37, 32), c), torch.full((1, 1, 70, 32), c),
                      torch.randn(1, 1, 70, 32, generator=g), 1e-37))
    for s in (1e37, 1e38):
        cases.append((f"values {s:.0e}", torch.randn(1, 2, 37, 32, generator=g), torch.randn(1, 1, 70, 32, generator=g),
                      (1 + torch.rand(1, 1, 70, 32, generator=g)) * (s / 2), None))
    # scores beyond fp32 (q . k up to ~1.2e39) whose logits are not (scale 3e-39): unscaled, S
    # is inf and off gives NaN; scaled, right (and the C++ kernel's row maxima for the
    # backward would leave fp32 once scaled back: review)
    c = (6e38 / 32) ** 0.5
    cases.append(("scores 1e39, scale 3e-39", torch.full((1, 2, 37, 32), c),
                  (c * (1 + torch.rand(1, 1, 70, 1, generator=g))).expand(1, 1, 70, 32).contiguous(),
                  torch.randn(1, 1, 70, 32, generator=g), 3e-39))
    # (second review) the backward's dQ checksum sums |dS| |k| (dS ~ dO v^T), here ~8e38 on
    # ordinary scores; q alone near the range (the column reference adds q over rows); values
    # of 1e38 with one of 1e-38 (no exact scaling leaves that call in range: scaled anyway)
    cases.append(("dS |k| 1e39", torch.randn(1, 2, 37, 32, generator=g) * 1e-18,
                  torch.randn(1, 1, 70, 32, generator=g) * 1e18, torch.randn(1, 1, 70, 32, generator=g) * 3e9,
                  None))
    cases.append(("q 1e37, k 1e-12", (1 + torch.rand(1, 2, 37, 32, generator=g)) * 1e37,
                  torch.randn(1, 1, 70, 32, generator=g) * 1e-12, torch.randn(1, 1, 70, 32, generator=g), None))
    v = (1 + torch.rand(1, 1, 70, 32, generator=g)) * 5e37
    v[0, 0, 3, 4] = 1e-38
    cases.append(("values 1e38, one 1e-38", torch.randn(1, 2, 37, 32, generator=g),
                  torch.randn(1, 1, 70, 32, generator=g), v, None))
    do = torch.randn(1, 2, 37, 32, generator=g)
    dos = {"dS |k| 1e39": do * 3e9}
    return [(name, *(t.to(dtype) for t in (q, k, v, dos.get(name, do))), scale) for name, q, k, v, scale in cases]


def check_near_fp32_range_no_alarm(attention, device="cpu", dtype=torch.float32, backward=True,
                                   causals=(False, True)):
    """Clean operands near fp32's range (near_range_cases): forward and backward at abft and
    full, on_fault="raise", no flag (the call runs again on operands scaled by powers of
    two, ftattn/attention.py; before, every case alarmed in the C++ kernels, and values of
    1e38 gave inf in every backend). Output and gradients: protection off's bit for bit
    where off's are finite (the scaled call is exact), else the fp64 reference's within
    the dtype's rounding of their magnitude. Harmful faults on such data (a score, an
    accumulator element) are detected and corrected; NaN in keys outside the key range
    changes nothing."""
    from ftattn import Fault

    tol = 1e-5 if dtype == torch.float32 else 5e-2  # (bf16: dq cancels in the last case, 3 % as scaled by hand)
    for name, q, k, v, do, scale in near_range_cases(dtype):
        for causal in causals:
            results = {}
            for protection in ("off", "abft", "full"):
                leaves = [t.to(device, copy=True).requires_grad_(backward) for t in (q, k, v)]
                out, rep = attention(*leaves, causal=causal, scale=scale, protection=protection, on_fault="raise",
                                     return_report=True)
                results[protection] = [out]
                if backward:
                    out.backward(do.to(device))
                    assert rep.backward.detected == 0, (name, causal, protection, rep.backward)
                    results[protection] += [t.grad for t in leaves]
                assert rep.detected == 0, (name, causal, protection, rep)
            if all(bool(t.isfinite().all()) for t in results["off"]):
                for protection in ("abft", "full"):
                    assert all(torch.equal(a, b) for a, b in zip(results[protection], results["off"])), (
                        name, causal, protection)
                continue
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            ref = attention_ref(*leaves, causal=causal, scale=scale)
            ref.backward(do.double())
            want = [ref.detach()] + [t.grad for t in leaves]
            for protection in ("abft", "full"):
                for what, a, b in zip(("out", "dq", "dk", "dv"), results[protection], want):
                    a = a.detach().cpu().double()
                    assert bool(a.isfinite().all()), (name, causal, protection, what)
                    err = float((a - b).abs().max()) / float(b.abs().max())
                    assert err <= tol, (name, causal, protection, what, err)
        # (a report asked for: the flags are read, so a call whose checks overflowed runs scaled;
        # without one, values of 1e38 give inf as every flash-style kernel's accumulator does)
        clean, rep = attention(q.to(device), k.to(device), v.to(device), scale=scale, return_report=True)
        assert rep.detected == 0 and bool(clean.isfinite().all()), (name, rep)
        # the top exponent bit of the row's largest score flipped (a bit flip moves a scaled score
        # as the unscaled one: the same bits but the exponent's); an accumulator element zeroed
        # (at values of ~1.3e37 the PV check's bound overflowed and passed it: review)
        top = int((q[0, 1, 5].double() @ k[0, 0].double().T).argmax())
        for fault in (Fault("scores", 0, 1, row=5, col=top, bit=30), Fault("acc", 0, 1, row=5, dim=2, value=0.0)):
            out, rep = attention(q.to(device), k.to(device), v.to(device), scale=scale, fault=fault,
                                 return_report=True)
            raw, _ = attention(q.to(device), k.to(device), v.to(device), scale=scale, fault=fault,
                               on_fault="report", return_report=True)
            assert float((raw - clean).abs().max()) > 2.0 ** -10 * float(clean.abs().max()), (name, fault)
            assert rep.detected > 0 and rep.corrected == rep.flagged_blocks == 1, (name, fault, rep)
            assert torch.equal(out, clean), (name, fault)
    # NaN in a key no sample reads (past its range) neither blocks the scaled call nor is
    # taken for a fault (review: the operands' magnitude was NaN, and the call raised)
    name, q, k, v, do, scale = near_range_cases(dtype)[0]
    k = k.clone()
    k[0, 0, 65] = float("nan")
    ranges = dict(key_start=torch.tensor([0]).to(device), key_end=torch.tensor([60]).to(device))
    leaves = [t.to(device, copy=True).requires_grad_(backward) for t in (q, k, v)]
    out, rep = attention(*leaves, scale=scale, on_fault="raise", return_report=True, **ranges)
    want = attention(q.to(device), k[:, :, :60].to(device), v[:, :, :60].to(device), scale=scale, protection="off")
    assert rep.detected == 0 and torch.equal(out.detach(), want), rep
    if backward:
        out.backward(do.to(device))
        assert rep.backward.detected == 0 and not rep.backward.nonfinite_input, rep.backward


def cancelling_values_case(dtype=torch.float32, amp=3e4, Hq=2, N=3, D=7):
    """q, k, v where every output is ~0 while its values are large: three keys whose scores
    are 0, -0.1 and -0.2 after scaling (p = 1, e^-0.1, e^-0.2) with values -amp (p_1 + p_2),
    +amp and +amp in every dim, so sum_j p_j v_j cancels; a change dp of key 1's or 2's p moves
    the output by dp amp / l, harmful from dp ~ 2^-20 of p in fp32 (the bits a tolerance of
    64 u, the exp / exp2 redundant softmax before, passed: 15x the harm threshold missed at
    amp 3e4)."""
    M = 3
    q = torch.zeros(1, Hq, N, D, dtype=torch.float64)
    k = torch.zeros(1, 1, M, D, dtype=torch.float64)
    q[..., 0] = 1.0
    k[0, 0, 1, 0], k[0, 0, 2, 0] = -0.1 * math.sqrt(D), -0.2 * math.sqrt(D)
    p1, p2 = math.exp(-0.1), math.exp(-0.2)
    v = torch.empty(1, 1, M, D, dtype=torch.float64)
    v[0, 0, 0], v[0, 0, 1], v[0, 0, 2] = -amp * (p1 + p2), amp, amp
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_probs_faults_on_cancelling_values(attention, device="cpu", dtypes=(torch.float32, torch.bfloat16,
                                                                              torch.float16),
                                            bits=(0, 2, 4, 6), backward=True):
    """A fault on p (forward: `probs`; backward: `bwd_probs`) of low mantissa bits, on
    cancelling_values_case's data (outputs ~0, values of 3e4; for the backward dO of amp and
    -amp on rows 0 and 1, 0 on row 2, so dV cancels), at protection full: every one detected (the redundant softmax compares p
    made twice bit for bit) and, under "correct", the clean output and gradients bit for bit;
    some of them harmful (the test would pass vacuously otherwise). Clean calls at full raise
    nothing and equal off's bit for bit. Before (a 64 u tolerance): bits 1-4 missed in fp32
    (up to 15x the harm threshold), bits 2-5 in fp16, C++ and reference; dq moved 1.5x the
    threshold unseen at bit 4 (reference)."""
    from ftattn import Fault

    for dtype in dtypes:
        tau = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        amp = 3e3 if dtype == torch.float16 and backward else 3e4  # (fp16: dP = dO v within range)
        q, k, v = (t.to(device) for t in cancelling_values_case(dtype, amp))
        do = torch.zeros_like(q)  # dV_j = sum_i P_ij dO_i cancels too
        do[:, :, 0], do[:, :, 1] = amp, -amp

        def run(protection, fault=None, on_fault="raise"):
            leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
            out, rep = attention(*leaves, protection=protection, fault=fault, on_fault=on_fault, return_report=True)
            grads = []
            if backward:
                out.backward(do)
                grads = [t.grad for t in leaves]
            return [out.detach()] + grads, rep

        clean, rep = run("off")
        full, rep = run("full")
        assert rep.detected == 0 and (not backward or rep.backward.detected == 0), (dtype, rep)
        assert all(torch.equal(a, b) for a, b in zip(full, clean)), dtype
        sites = [("probs", 0)] + ([("bwd_probs", 1)] if backward else [])
        harmful = {site: 0 for site, _ in sites}
        for site, which in sites:
            for col in (1, 2):
                # (bf16: p is rounded to bf16 for the product, whose bits start 16 up)
                for bit in (bits if dtype != torch.bfloat16 else [b + 16 for b in bits]):
                    fault = Fault(site, 0, 1, row=1, col=col, bit=bit)
                    raw, rep = run("full", fault, on_fault="report")
                    got = rep if which == 0 else rep.backward
                    assert got.detected > 0, (dtype, site, col, bit)
                    moved = [float((a - b).abs().max()) / (tau * max(1.0, float(b.abs().max())))
                             for a, b in zip(raw, clean)]
                    harmful[site] += max(moved if which == 1 else moved[:1]) > 1.0
                    fixed, rep = run("full", fault, on_fault="correct")
                    got = rep if which == 0 else rep.backward
                    assert got.corrected == got.flagged_blocks > 0, (dtype, site, col, bit, got)
                    assert all(torch.equal(a, b) for a, b in zip(fixed, clean)), (dtype, site, col, bit)
        assert all(n > 0 for n in harmful.values()), (dtype, harmful)


def check_forward_faults_on_cancelling_values(attention, device="cpu", dtypes=(torch.float32, torch.bfloat16,
                                                                              torch.float16),
                                              bits=(0, 15, 18, 21, 26, 30), sites=("acc", "scores", "rowsum",
                                                                                    "output")):
    """Forward faults on cancelling_values_case's data (values of 3e4, outputs ~0) at protection
    full: every harmful one detected and, under "correct", the clean output bit for bit; some
    harmful (not vacuous); clean calls raise nothing and equal off's. The PV checksum's bound
    follows the magnitudes summed (kappa u sqrt(depth) sum_j p_j |v_j|_1), harm the output: the
    bound is ~60x the harm threshold here, and before a row was made again only above 1/8 of
    the bound: accumulator faults of up to 65x the threshold passed (fp32 bit 26, C++; fp16
    bits 15-21, every backend). Now such a row (BLIND) is made again and compared bit for bit."""
    from ftattn import Fault

    for dtype in dtypes:
        tau = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        q, k, v = (t.to(device) for t in cancelling_values_case(dtype))
        clean = attention(q, k, v, protection="off")
        full, rep = attention(q, k, v, protection="full", on_fault="raise", return_report=True)
        assert rep.detected == 0 and torch.equal(full, clean), (dtype, rep)
        harmful = 0
        for site in sites:
            for dim in (0, 3):
                for bit in bits:
                    fault = Fault(site, 0, 1, row=1, col=1, dim=dim, bit=bit)
                    raw, rep = attention(q, k, v, protection="full", fault=fault, on_fault="report",
                                         return_report=True)
                    moved = float((raw.double() - clean.double()).abs().max())
                    harm = not math.isfinite(moved) or moved > tau * max(1.0, float(clean.double().abs().max()))
                    harmful += harm
                    assert rep.detected > 0 or not harm, (dtype, site, dim, bit, moved)
                    if rep.detected:
                        fixed, rep = attention(q, k, v, protection="full", fault=fault, on_fault="correct",
                                               return_report=True)
                        assert rep.corrected == rep.flagged_blocks > 0, (dtype, site, dim, bit, rep)
                        assert torch.equal(fixed, clean), (dtype, site, dim, bit)
        assert harmful > 0, dtype


def check_backward_faults_on_cancelling_values(attention, device="cpu", dtypes=(torch.float32, torch.bfloat16),
                                               bits=(0, 10, 20, 26, 30), sites=("dq", "dk", "dv", "ds", "dp")):
    """Backward faults on cancelling_values_case's data (values of 3e3, outputs ~0; dO of +-3e3
    on rows 0 and 1, so dV cancels too) at protection full: every harmful one detected and,
    under "correct", the clean gradients bit for bit; some harmful; clean calls raise nothing
    and equal off's. The dQ / dK / dV checksums' bounds follow the magnitudes summed, harm the
    gradient: before, a dK fault of 774x the harm threshold and a dV one of 15x passed (fp32,
    C++), dS faults of up to 1548x (reference). Now a row whose checks cannot see every harmful
    fault (BLIND) has its task made again and compared bit for bit. (fp16: these gradients
    overflow its range.)"""
    from ftattn import Fault

    for dtype in dtypes:
        tau = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        q, k, v = (t.to(device) for t in cancelling_values_case(dtype, 3e3))
        do = torch.zeros_like(q)
        do[:, :, 0], do[:, :, 1] = 3e3, -3e3

        def run(protection, fault=None, on_fault="raise"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, rep = attention(*leaves, protection=protection, fault=fault, on_fault=on_fault, return_report=True)
            out.backward(do)
            return [t.grad for t in leaves], rep.backward

        clean, _ = run("off")
        full, rep = run("full")
        assert rep.detected == 0 and all(torch.equal(a, b) for a, b in zip(full, clean)), (dtype, rep)
        harmful = 0
        for site in sites:
            for col in (0, 1):
                for bit in bits:
                    fault = Fault(site, 0, 1, row=1, col=col, dim=3, bit=bit)
                    raw, rep = run("full", fault, on_fault="report")
                    harm = any(not bool(a.isfinite().all()) or
                               float((a.double() - b.double()).abs().max()) > tau * max(1.0, float(b.double().abs().max()))
                               for a, b in zip(raw, clean))
                    harmful += harm
                    assert rep.detected > 0 or not harm, (dtype, site, col, bit)
                    if rep.detected:
                        fixed, rep = run("full", fault, on_fault="correct")
                        assert rep.corrected == rep.flagged_blocks > 0, (dtype, site, col, bit, rep)
                        assert all(torch.equal(a, b) for a, b in zip(fixed, clean)), (dtype, site, col, bit)
        assert harmful > 0, dtype


def check_ds_faults_where_dp_cancels(attention, device="cpu"):
    """A dS fault on a key whose dP - D cancels, in a row whose other keys carry large dS (values
    Y +- X, X = Y = 1e4, and Y + 0.009; that key's |k| 100): bits 18-21 of its dS (~0.002) move dq
    by 6-50x the harm threshold. Each is detected (full: dS made again by the same operations,
    bit for bit) and corrected bit for bit. Before (found by review): the reference's and
    Triton's second dS within 2 u (|P dP| + |P D|) passed them (C++ compared bit for bit)."""
    from ftattn import Fault

    X = Y = 1e4
    D = 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 3, D)
    k[0, 0, 1, 1] = 100.0
    v = torch.zeros(1, 1, 3, D)
    v[0, 0, :, 0] = torch.tensor([Y + X, Y + 0.009, Y - X])
    do = torch.zeros(1, 1, 1, D)
    do[..., 0] = 1.0

    def run(fault=None, on_fault="raise"):
        leaves = [t.to(device, copy=True).requires_grad_() for t in (q, k, v)]
        out, rep = attention(*leaves, scale=1.0, protection="full", fault=fault, on_fault=on_fault,
                             return_report=True)
        out.backward(do.to(device))
        return [t.grad for t in leaves], rep.backward

    clean, rep = run()
    assert rep.detected == 0, rep
    for bit in (18, 19, 20, 21):
        fault = Fault("ds", 0, 0, row=0, col=1, bit=bit)
        raw, rep = run(fault, "report")
        moved = max(float((a - b).abs().max()) / (2.0**-10 * max(1.0, float(b.abs().max())))
                    for a, b in zip(raw, clean))
        assert moved > 5.0, (bit, moved)
        assert rep.detected > 0, (bit, moved)
        fixed, rep = run(fault, "correct")
        assert rep.corrected == rep.flagged_blocks > 0, (bit, rep)
        assert all(torch.equal(a, b) for a, b in zip(fixed, clean)), bit
