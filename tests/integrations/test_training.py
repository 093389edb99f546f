"""Training through ftattn's attention: a tiny Llama trained with
attn_implementation="ftattn" follows SDPA's loss curve, and a fault injected in the
backward of one step is corrected (the curve unchanged) while with protection off it
changes the curve."""
import pytest
import torch

pytest.importorskip("transformers")

from hf_models import tiny_llama  # noqa: E402

from ftattn.integrations import transformers as ft_hf  # noqa: E402

STEPS = 30


def _train(attn: str, protection: str = "full", fault_at: int = -1):
    model = tiny_llama(attn, seed=3).train()
    if attn == "ftattn":
        ft_hf.configure(model, protection=protection)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(4)
    data = torch.randint(1, 128, (2, 2, 24), generator=g)  # two batches, learnt by heart
    losses = []
    for step in range(STEPS):
        if step == fault_at:  # layer 0's attention in this step's backward: dV of key 5, head 1
            ft_hf.inject(model, [ft_hf.ScheduledFault(step=0, layer=0, site="dv", bit=29, batch=0, head=1, row=0,
                                                     col=5, dim=3)])
        loss = model(input_ids=data[step % 2], labels=data[step % 2]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    counts = ft_hf.counters(model) if attn == "ftattn" else None
    return torch.tensor(losses, dtype=torch.float64), counts


def test_tiny_llama_trains_like_sdpa_and_a_backward_fault_is_corrected():
    sdpa, _ = _train("sdpa")
    ours, counts = _train("ftattn")
    assert counts.detected == 0
    assert bool(((ours - sdpa).abs() <= 1e-4 * sdpa.abs()).all()), (ours - sdpa).abs().max()
    assert sdpa[-1] < sdpa[0] - 0.5  # it learns
    fixed, counts = _train("ftattn", fault_at=10)
    assert counts.injected == 1 and counts.detected >= 1 and counts.corrected == counts.detected
    assert torch.equal(fixed, ours)  # corrected: bit-identical gradients, the same curve
    broken, _ = _train("ftattn", protection="off", fault_at=10)
    assert torch.equal(broken[:11], ours[:11]) and not torch.equal(broken[11:], ours[11:])


def test_backward_checks_count_in_protect_counters():
    import ftattn

    model = tiny_llama("sdpa", seed=3).train()
    ftattn.protect_(model)
    data = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    ft_hf.inject(model, [ft_hf.ScheduledFault(step=0, layer=1, site="dq", bit=30, batch=1, head=2, row=20, dim=7)])
    model(input_ids=data, labels=data).loss.backward()
    c = ftattn.counters(model)
    attn = {name: m for name, m in c.per_module.items() if name.endswith("self_attn")}
    assert attn["model.layers.1.self_attn"].detected >= 1 and attn["model.layers.0.self_attn"].detected == 0
    assert c.corrected == c.detected >= 1
    assert attn["model.layers.1.self_attn"].calls == 1  # the backward's checks count, not as a call


def _padded_batch(layout: str):
    """(ids, mask, labels) of 3 samples of width 13: right padding (13, 9, 4 real tokens)
    or mixed (none, left by 5, right to 7 tokens); labels -100 on padding."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 128, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    if layout == "right":
        mask[1, 9:] = 0
        mask[2, 4:] = 0
    else:
        mask[1, :5] = 0
        mask[2, 7:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("layout", ["right", "mixed"])
def test_padded_batch_trains_like_sdpa(layout):
    """A right-padded (the usual layout of causal-LM fine-tuning) or mixed left / right
    padded batch trains through ftattn as through sdpa: the logits of the real tokens, the
    losses and every parameter's gradient over 4 AdamW steps within fp32 rounding (it
    raised "not a key-padding mask" on right padding)."""
    ids, mask, labels = _padded_batch(layout)
    runs = {}
    for attn in ("sdpa", "ftattn"):
        model = tiny_llama(attn, seed=3).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses, grads, logits = [], [], None
        for step in range(4):
            result = model(input_ids=ids, attention_mask=mask, labels=labels)
            if step == 0:
                logits = result.logits.detach()
            opt.zero_grad()
            result.loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            losses.append(result.loss.item())
        runs[attn] = torch.tensor(losses, dtype=torch.float64), grads, logits
    (sdpa, sdpa_grads, sdpa_logits), (ours, our_grads, our_logits) = runs["sdpa"], runs["ftattn"]
    real = mask.bool()
    assert (our_logits[real] - sdpa_logits[real]).abs().max() <= 1e-5 * sdpa_logits[real].abs().max()
    assert bool(((ours - sdpa).abs() <= 1e-5 * sdpa.abs()).all()), (ours - sdpa).abs().max()
    # step 0 (the same weights): fp32 rounding (measured 4.6e-7 of each tensor's largest);
    # later steps a little more: AdamW moves a weight whose gradient is near 0 by up to lr
    # whatever its size, so rounding there moves the weights apart (measured 8.2e-5)
    for step, (mine, theirs) in enumerate(zip(our_grads, sdpa_grads)):
        for a, b in zip(mine, theirs):
            tol = 1e-5 if step == 0 else 3e-4
            assert (a - b).abs().max() <= tol * max(b.abs().max().item(), 1e-3), (step, (a - b).abs().max())
    assert sdpa[-1] < sdpa[0]  # it learns


def _autocast_curve(model, ids, mask, labels, steps=4):
    """The losses of ``steps`` AdamW steps under torch.autocast("cpu", bfloat16), fp64; every
    gradient fp32."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right_padded"])
def test_trains_under_autocast_like_sdpa(padded):
    """Mixed-precision training, torch.autocast("cpu", bfloat16): Llama's rotary step gives
    fp32 q, k and a bf16 v; ftattn casts them as autocast does for SDPA (it raised "must
    share one dtype") and follows SDPA's loss curve within bf16's rounding, 2^-8 relative
    (measured 5.6e-4 over 6 steps; eager against SDPA 1.9e-3)."""
    ids, mask, labels = _padded_batch("right")
    if not padded:
        mask, labels = None, ids
    curves = {attn: _autocast_curve(tiny_llama(attn, seed=3).train(), ids, mask, labels)
              for attn in ("sdpa", "ftattn")}
    sdpa, ours = curves["sdpa"], curves["ftattn"]
    assert bool(((ours - sdpa).abs() <= 2.0**-8 * sdpa.abs()).all()), (ours - sdpa).abs().max()
    assert ours[-1] < ours[0] - 0.5  # it learns


def test_protected_model_trains_under_autocast():
    """torch.autocast("cpu", bfloat16) training of a model under ftattn.protect_ (its linear
    layers refused autocast before): the loss curve of the same model unprotected (ftattn's
    attention both) within bf16's rounding, gradients in fp32, no alarm over the steps
    (each step's new weights get new checksums of their casts)."""
    import ftattn

    ids, mask, labels = _padded_batch("right")
    plain = _autocast_curve(tiny_llama("ftattn", seed=3).train(), ids, mask, labels)
    model = ftattn.protect_(tiny_llama("ftattn", seed=3).train())
    ours = _autocast_curve(model, ids, mask, labels)
    counts = ftattn.counters(model)
    assert counts.detected == 0 and min(m.calls for m in counts.per_module.values()) == 4
    assert bool(((ours - plain).abs() <= 2.0**-8 * plain.abs()).all()), (ours - plain).abs().max()
    assert ours[-1] < ours[0] - 0.5  # it learns
