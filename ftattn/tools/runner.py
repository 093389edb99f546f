"""The campaigns' runner: a campaign is a list of jobs (one dtype / protection / pass each),
each a list of work units (a clean run, or one input and its faults) cut into shards of a
few seconds; the shards run in this process, or as Ray tasks on a local Ray started here
(``workers``) or on an existing cluster (``ray_address``). Every unit draws its data and
faults from (seed, unit) only, so the counts are the same whichever way the shards run.

With ``out``, each finished shard appends one JSON line (flushed and fsynced) to a JSONL
file whose first line names the campaign's configuration; ``resume`` reruns only the
shards missing from such a file (a truncated or corrupt last line is dropped and its shard
rerun; a file of another configuration is refused). The results are merged from the
shards' records alone.

A shard's function is ``fn(job, start, stop) -> dict`` (JSON-serialisable), a module-level
function (Ray pickles it by reference). ``import ftattn`` never imports ray: only a run
with ``workers`` or ``ray_address`` does.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

FORMAT = "ftattn-campaign-shards/1"


class RunnerError(ValueError):
    """A campaign the runner cannot run as asked (a clear one-line reason)."""


def add_arguments(p) -> None:
    """The runner's command-line options, shared by `campaign` and `model-campaign`."""
    p.add_argument("--workers", type=int, default=None,
                   help="run the shards as N Ray tasks at a time on a local Ray started here (pip install "
                        "'ftattn[ray]'); default: in this process")
    p.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster (host:port, or 'auto'; RAY_ADDRESS also works)")
    p.add_argument("--out", default=None, help="append each finished shard to this JSONL file (fsynced)")
    p.add_argument("--resume", default=None, help="rerun only the shards missing from this JSONL file")


def check_arguments(args) -> None:
    """One clear line (SystemExit) for runner options that cannot work together."""
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"--workers {args.workers}: must be at least 1 (or leave it out to run in this process)")
    if args.resume is not None and args.out is not None and args.resume != args.out:
        raise SystemExit("--resume FILE continues FILE itself: leave out --out")


def shards_of(units: int, shard_units: int) -> List[Tuple[int, int]]:
    """[start, stop) ranges of at most shard_units units covering 0..units."""
    return [(s, min(units, s + shard_units)) for s in range(0, units, max(1, shard_units))]


def read_records(path: str, config: dict) -> Tuple[Dict[Tuple[str, int], dict], int]:
    """The finished shards of a JSONL file {(job, start): record} and the byte length of its
    valid prefix. Raises RunnerError for a missing file or one of another configuration."""
    if not os.path.exists(path):
        raise RunnerError(f"--resume {path}: no such file (start the campaign with --out {path})")
    records: Dict[Tuple[str, int], dict] = {}
    good = 0
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    for n, raw in enumerate(lines):
        end = good + len(raw) + 1
        if not raw.strip():
            break
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        complete = end <= len(data)  # the line ends with its newline
        if rec is None or not complete:
            break  # a truncated or corrupt line (the last one, after a crash): its shard reruns
        if n == 0:
            if rec.get("format") != FORMAT or rec.get("config") != config:
                raise RunnerError(
                    f"--resume {path}: the file is of another campaign ({rec.get('config')}); this one is {config}: "
                    f"rerun with that file's options, or start a new file with --out")
        else:
            records[(rec["job"], rec["start"])] = rec
        good = end
    if good == 0:
        raise RunnerError(f"--resume {path}: the file has no header line: not a campaign's shard file")
    return records, good


class _Sink:
    """Appends records to the JSONL file, each flushed and fsynced."""

    def __init__(self, path: Optional[str], config: dict, keep_bytes: Optional[int]):
        self.fh = None
        if path is None:
            return
        if keep_bytes is None:
            self.fh = open(path, "w", encoding="utf-8")
            self.write({"format": FORMAT, "config": config})
        else:
            with open(path, "r+b") as raw:
                raw.truncate(keep_bytes)
            self.fh = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _check_address(address: str, timeout: float = 10.0) -> None:
    """A clear error, within ``timeout``, for a Ray address nothing answers at."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise RunnerError(f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
                          f"`ray start --head` and pass the address it prints, or use --workers N for a local "
                          f"one") from exc


def run(fn: Callable, jobs: Sequence[Tuple[str, object, int]], shard_units: int, config: dict, *,
        workers: Optional[int] = None, ray_address: Optional[str] = None, out: Optional[str] = None,
        resume: bool = False, on_record: Optional[Callable[[dict], None]] = None) -> Dict[str, List[dict]]:
    """Runs every shard of ``jobs`` [(name, job argument, units)] and returns each job's
    shard records ({"job", "start", "stop", "seconds", "result"}) in unit order."""
    if workers is not None and workers < 1:
        raise RunnerError(f"--workers {workers}: must be at least 1 (or leave it out to run in this process)")
    done: Dict[Tuple[str, int], dict] = {}
    keep = None
    if resume:
        if out is None:
            raise RunnerError("resume needs the shard file (--resume FILE.jsonl)")
        done, keep = read_records(out, config)
    todo = [(name, arg, s, e) for name, arg, units in jobs for s, e in shards_of(units, shard_units)
            if (name, s) not in done]
    sink = _Sink(out, config, keep)
    try:
        def finish(name, s, e, result, seconds):
            rec = {"job": name, "start": s, "stop": e, "seconds": round(seconds, 3), "result": result}
            sink.write(rec)
            done[(name, s)] = rec
            if on_record is not None:
                on_record(rec)

        if workers is None and ray_address is None:
            for name, arg, s, e in todo:
                t0 = time.perf_counter()
                result = fn(arg, s, e)
                finish(name, s, e, result, time.perf_counter() - t0)
        else:
            _run_ray(fn, todo, workers, ray_address, finish)
    finally:
        sink.close()
    out_records: Dict[str, List[dict]] = {}
    for name, _, units in jobs:
        out_records[name] = [done[(name, s)] for s, _ in shards_of(units, shard_units)]
    return out_records


def _timed(fn, arg, start, stop, threads):
    # Ray puts the driver's working directory on a worker's sys.path: run from a checkout, its
    # kernels/ would shadow the `kernels` package transformers imports
    from .._checkout import unshadow_kernels

    unshadow_kernels()
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = fn(arg, start, stop)
    return result, time.perf_counter() - t0


def _run_ray(fn, todo, workers, ray_address, finish) -> None:
    try:
        import ray
    except ImportError as exc:
        raise RunnerError('--workers / --ray-address need Ray: pip install "ftattn[ray]"') from exc
    address = ray_address or os.environ.get("RAY_ADDRESS")
    started = False
    if not ray.is_initialized():
        if address:
            _check_address(address)
            ray.init(address=address, log_to_driver=False)
        else:
            # a new Ray in this process, never a running cluster found on the machine
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=3)(_timed)
        pending: Dict[object, tuple] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                name, arg, s, e = queue.pop(0)
                pending[task.remote(fn, arg, s, e, 1)] = (name, s, e)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name, s, e = pending.pop(ref)
                result, seconds = ray.get(ref)
                finish(name, s, e, result, seconds)
    finally:
        if started:
            ray.shutdown()
