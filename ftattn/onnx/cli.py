"""``python -m ftattn generate MODEL_DIR "prompt" ...``: generation with an ONNX decoder.

Streams the text of a single prompt as it is decoded (several prompts run as one
batch and print when done), then the timing on stderr: time to first token and
decode tokens/s over the tokens actually made. ``--json`` prints the results as
JSON instead.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys


_ESCAPE = re.compile(r"\\(?:[nrt0\\'\"]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def _unescape(text: str) -> str:
    r"""A command-line string with its backslash escapes (\n \r \t \0 \\ \' \" \xhh \uhhhh
    \Uhhhhhhhh) read as characters; any other backslash and every other character stay."""
    return _ESCAPE.sub(lambda match: match.group(0).encode("ascii").decode("unicode_escape"), text)


def _median_gap(times: list[float]) -> float:
    """The median time between two new tokens (0.0 with fewer than two): steadier than the
    mean rate when other jobs stall a few steps."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder: .onnx decoder, tokenizer.json, genai_config.json or config.json")
    parser.add_argument("prompts", nargs="+", help="one or more prompts (several run as one padded batch)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering (1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, type=_unescape,
                        help=r"stop string (repeatable); backslash escapes such as \n and \t are read as the "
                             r"characters (write \\ for a backslash)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message and apply the tokenizer's chat template")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--provider", action="append", default=None,
                        help="onnxruntime execution provider (repeatable; default CPUExecutionProvider)")
    parser.add_argument("--no-spin", action="store_true",
                        help="idle onnxruntime threads sleep instead of busy-waiting (faster on a busy machine)")
    parser.add_argument("--no-stream", action="store_true", help="print the text only when it is complete")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (implies --no-stream)")


def main(args: argparse.Namespace) -> int:
    from . import Generator

    try:
        generator = Generator.from_pretrained(args.model, threads=args.threads, providers=args.provider,
                                               allow_spinning=not args.no_spin)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ftattn generate: {exc}", file=sys.stderr)
        return 2
    prompts = [[{"role": "user", "content": p}] for p in args.prompts] if args.chat else list(args.prompts)
    streaming = len(prompts) == 1 and not args.no_stream and not args.json

    def stream(index: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        results = generator.generate(
            prompts, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=args.stop, stream=stream if streaming else None)
    except (TypeError, ValueError) as exc:
        print(f"ftattn generate: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # onnxruntime's failures while running the model
        print(f"ftattn generate: onnxruntime failed while generating: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{
            "prompt": args.prompts[i], "text": r.text, "token_ids": r.token_ids,
            "prompt_tokens": len(r.prompt_token_ids), "finish_reason": r.finish_reason,
            "time_to_first_token_s": r.time_to_first_token_s, "decode_tokens_per_s": r.decode_tokens_per_s,
            "inter_token_s_median": _median_gap(r.token_times_s),
        } for i, r in enumerate(results)], indent=2))
        return 0
    for i, result in enumerate(results):
        if streaming:
            sys.stdout.write("\n")
        else:
            if len(results) > 1:
                print(f"--- prompt {i}: {args.prompts[i]!r}")
            print(result.text)
        print(f"[{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} new, "
              f"finish: {result.finish_reason}, TTFT {result.time_to_first_token_s * 1e3:.1f} ms, "
              f"decode {result.decode_tokens_per_s:.1f} tokens/s, median inter-token "
              f"{_median_gap(result.token_times_s) * 1e3:.2f} ms]", file=sys.stderr)
    return 0
