"""``python -m ftattn generate-hf``: greedy generation with a Hugging Face causal LM
through ftattn attention, with N random faults injected during decoding.

Three runs of ``generate()`` on the same prompt: clean (no fault), unprotected
(protection "off", the faults injected) and protected (the chosen protection and
``on_fault``, the same faults at the same coordinates). It prints the tokens of
each run, where they differ from the clean run, and the fault counters: the
end-to-end demonstration that the checks turn silent corruption into correct
output. Exit status 1 when the protected run differs from the clean one.

Faults: each one hits one attention call (a layer at a decoding step >= 1; step 0
is the prefill) at a random site, head, key and head-dim index, flipping one bit
drawn from ``--bits``. Mantissa bits (0..22) mostly give benign faults (below one
ulp of the output, FAULT_MODEL.md), hence the default of the exponent bits.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import List, Optional

import torch

from ..faults import ATTENTION_SITES, Site

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a Hugging Face causal LM (config + weights)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text (repeat for a left-padded batch); needs the model's tokenizer")
    parser.add_argument("--prompt-ids", action="append", default=None,
                        help="prompt as comma-separated token ids, for models without a tokenizer (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--inject", type=int, default=1, metavar="N", help="faults to inject during decoding")
    parser.add_argument("--sites", default="all", help="comma-separated sites to draw from: "
                        + ", ".join(ATTENTION_SITES) + " (default all)")
    parser.add_argument("--bits", default="23-30", help="fp32 bits to flip, a range LO-HI within 0-31 (default: exponent)")
    parser.add_argument("--protection", default="full", choices=["off", "abft", "full"])
    parser.add_argument("--on-fault", default="correct", choices=["correct", "report"])
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan and coordinates")


def _parse_bits(spec: str) -> List[int]:
    try:
        lo, _, hi = spec.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--bits {spec!r} is not a range; write LO-HI, e.g. 23-30 or 0-31") from None
    if not 0 <= lo <= hi <= 31:
        raise ValueError(f"--bits {spec!r} leaves the 32 bits of an fp32 value; use a range within 0-31")
    return list(range(lo, hi + 1))


def _parse_sites(spec: str) -> List[str]:
    if spec == "all":
        return list(ATTENTION_SITES)
    sites = [Site.parse(s.strip()).name.lower() for s in spec.split(",") if s.strip()]
    for s in sites:
        if s not in ATTENTION_SITES:
            raise ValueError(f"--sites: {s} is not an attention site; use {', '.join(ATTENTION_SITES)}")
    return sites


def plan_faults(n: int, steps: int, layers: int, sites: List[str], bits: List[int], seed: int):
    """N faults at distinct (step, layer) among decoding steps 1..steps-1."""
    from .transformers import ScheduledFault

    slots = [(s, l) for s in range(1, steps) for l in range(layers)]
    if n > len(slots):
        raise ValueError(
            f"--inject {n} needs {n} distinct (step, layer) calls but {steps - 1} decoding steps x {layers} layers "
            f"give {len(slots)}; raise --max-new-tokens or lower --inject"
        )
    rng = random.Random(seed)
    return [ScheduledFault(step, layer, rng.choice(sites), bit=rng.choice(bits))
            for step, layer in sorted(rng.sample(slots, n))]


def _load(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach for the hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import transformers as ft_hf

    ft_hf.register()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model!r} is not a folder with a config.json; give the local folder of a "
                         f"Hugging Face causal LM (model.save_pretrained(folder)): nothing is downloaded")
    model = AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation=ft_hf.IMPLEMENTATION, dtype=_DTYPES[args.dtype]
    ).eval()
    tokenizer = None
    if args.prompt:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"  # decoders continue from the right end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _inputs(args, tokenizer, pad_id: int):
    if args.prompt and args.prompt_ids:
        raise ValueError("pass --prompt or --prompt-ids, not both")
    if args.prompt:
        enc = tokenizer(args.prompt, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]
    if not args.prompt_ids:
        raise ValueError("no prompt: pass --prompt TEXT (with a tokenizer in --model) or --prompt-ids 1,2,3")
    try:
        rows = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    except ValueError:
        raise ValueError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated integers, e.g. 5,17,42") from None
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def generate(model, ids, mask, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``max_new_tokens`` tokens (no early stop, so that
    every run has the same decoding steps); returns the new tokens [B, T]."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, pad_token_id=model.generation_config.pad_token_id or 0,
        )
    return out[:, ids.shape[1]:]


def _show(name: str, tokens: torch.Tensor, clean: Optional[torch.Tensor], tokenizer) -> None:
    for b, row in enumerate(tokens.tolist()):
        diff = ""
        if clean is not None:
            pos = [i for i, (x, y) in enumerate(zip(row, clean[b].tolist())) if x != y]
            diff = "  == clean" if not pos else f"  differs from clean at {len(pos)} positions, first {pos[0]}"
        print(f"{name:<12} [{b}] {row}{diff}")
        if tokenizer is not None:
            print(f"{'':<12}     {tokenizer.decode(row)!r}")


def main(args) -> int:
    from . import transformers as ft_hf

    try:
        bits, sites = _parse_bits(args.bits), _parse_sites(args.sites)
        if args.max_new_tokens < 1 or args.inject < 0:
            raise ValueError(f"--max-new-tokens must be >= 1 and --inject >= 0, got {args.max_new_tokens}, {args.inject}")
        model, tokenizer = _load(args)
        ids, mask = _inputs(args, tokenizer, model.generation_config.pad_token_id or 0)
        plan = plan_faults(args.inject, args.max_new_tokens, model.config.num_hidden_layers, sites, bits, args.seed)
    except ValueError as exc:
        print(f"ftattn generate-hf: {exc}", file=sys.stderr)
        return 2

    print(f"model {args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers, {args.dtype}), "
          f"prompt {tuple(ids.shape)}, {args.max_new_tokens} new tokens")
    ft_hf.configure(model, protection=args.protection, on_fault=args.on_fault)
    clean = generate(model, ids, mask, args.max_new_tokens)
    clean_counts = ft_hf.counters(model)

    ft_hf.configure(model, protection="off")
    ft_hf.inject(model, plan, seed=args.seed)
    unprotected = generate(model, ids, mask, args.max_new_tokens)
    placed = ft_hf.injected(model)

    ft_hf.configure(model, protection=args.protection, on_fault=args.on_fault)
    ft_hf.inject(model, plan, seed=args.seed)
    protected = generate(model, ids, mask, args.max_new_tokens)
    counts = ft_hf.counters(model)

    print(f"\n{len(placed)} faults injected during decoding:")
    for p in placed:
        f = p["fault"]
        print(f"  step {p['step']:>3} layer {p['layer']:>2}: {f.site:<7} bit {f.bit:>2}  "
              f"batch {f.batch} head {f.head} row {f.row} col {f.col} dim {f.dim}")
    print()
    _show("clean", clean, None, tokenizer)
    _show("unprotected", unprotected, clean, tokenizer)
    _show(f"{args.protection}/{args.on_fault}", protected, clean, tokenizer)
    print(f"\nclean run counters:     {clean_counts}")
    print(f"protected run counters: {counts}")
    if not torch.equal(protected, clean):
        print("protected tokens differ from the clean run", file=sys.stderr)
        return 1
    return 0
