"""Command line: ``python -m ftattn <command> ...`` (also the ``ftattn`` script).

Each command lives in its own module (the tools in ftattn/tools/, generation with the
ONNX and Hugging Face harnesses in their packages), imported only when it runs, which
defines ``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "info": ("ftattn.tools.info", "versions, devices and which backends are available (and why not)"),
    "campaign": ("ftattn.tools.campaign", "fault-injection campaign: detection and correction per site"),
    "model-campaign": ("ftattn.tools.model_campaign", "faults anywhere in a protected model: harm at the op and at the model"),
    "mx-eval": ("ftattn.tools.mx_eval", "accuracy of MX formats on a classifier / transformer"),
    "export": ("ftattn.onnx.__main__", "export a Hugging Face causal LM to ONNX (ftattn and onnxruntime-genai layout)"),
    "generate": ("ftattn.onnx.cli", "token generation with an ONNX decoder on onnxruntime"),
    "bench-report": ("ftattn.tools.bench_report", "turn pytest-benchmark JSON into a table and plots"),
    "generate-hf": ("ftattn.integrations.generate_hf", "fault-injected generation with a Hugging Face LM"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ftattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    from ._checkout import unshadow_kernels

    unshadow_kernels()  # (from a checkout's root: transformers would import its kernels/)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional extra is missing
        print(f"ftattn {name}: cannot import {module_name}: {exc}\n"
              f"Install the extras: pip install 'ftattn[dev]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"python -m ftattn {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
