"""``python -m ftattn.onnx HF_DIR OUT_DIR``: export a local Hugging Face causal LM (see exporter.py)."""
import argparse
import sys

from .exporter import export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftattn.onnx", description=__doc__.splitlines()[0])
    parser.add_argument("hf_model_dir", help="local Hugging Face causal LM folder (config.json, weights, tokenizer.json)")
    parser.add_argument("out_dir", help="folder to write model.onnx, config.json and the tokenizer files to")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    arguments = parser.parse_args(argv)
    try:
        print(export(arguments.hf_model_dir, arguments.out_dir, opset=arguments.opset))
    except (OSError, ValueError) as exc:
        print(f"python -m ftattn.onnx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
