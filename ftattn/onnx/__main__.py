"""``python -m ftattn export HF_DIR OUT_DIR`` (also ``python -m ftattn.onnx HF_DIR OUT_DIR``):
export a local Hugging Face causal LM to a folder that both ftattn's Generator and
onnxruntime-genai run (see exporter.py)."""
import argparse
import sys

from .exporter import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_model_dir", help="local Hugging Face causal LM folder (config.json, weights, tokenizer.json)")
    parser.add_argument("out_dir", help="folder to write model.onnx, config.json, genai_config.json and the tokenizer "
                                        "files to")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-position-ids", action="store_true",
                        help="leave the position_ids input out (positions follow the cache; prompts of different "
                             "lengths then run one at a time)")


def run(arguments: argparse.Namespace, prog: str) -> int:
    try:
        print(export(arguments.hf_model_dir, arguments.out_dir, opset=arguments.opset,
                     position_ids=not arguments.no_position_ids))
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(args=None) -> int:
    """``python -m ftattn export`` (parsed arguments) or ``python -m ftattn.onnx`` (an argv
    list or None), the entry point from before ``python -m ftattn export``."""
    if isinstance(args, argparse.Namespace):
        return run(args, "python -m ftattn export")
    parser = argparse.ArgumentParser(prog="python -m ftattn.onnx", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(args), "python -m ftattn.onnx")


if __name__ == "__main__":
    sys.exit(main())
