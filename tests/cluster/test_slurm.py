"""`sbatch slurm/finetune.sh` on a throw-away two-node Slurm cluster on this machine.

The cluster (tests/slurm_cluster.py) runs real munged/slurmctld/slurmd daemons; each "node" is a slurmd
in its own UTS namespace (hostnames node0/node1) on 127.0.0.1/127.0.0.2. The job script is submitted
unchanged: its header asks for GPUs, which the test nodes declare as a countable resource backed by no
device (so the header is accepted; training runs on CPU/gloo). The sbatch command line only shrinks
the request to what the test nodes have (--gpus-per-node=1 --cpus-per-task=2), as a user would.

Skips (with the reason) when not root or when Slurm/munge are not installed (.ci/install-slurm.sh);
set REQUIRE_SLURM_TESTS=1 to make that a failure instead (CI, once the install step is wired in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import LocalSlurmCluster, _port_free  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "finetune.sh"

pytestmark = pytest.mark.slow

# Tiny, fast training: 32 px, random init, 3 steps of 8 images per epoch, 2 processes (one per node).
TRAIN_ARGS = ["--batch-size", "8", "--image-size", "32", "--pretrained", "none", "--precision", "no",
              "--workers", "0", "--max-steps-per-epoch", "3", "--log-every", "1"]
# The header asks for 4 GPUs and 32 CPUs per node; the test nodes have 2 (fake) GPUs and 2 CPUs, and bind
# each step to the CPUs Slurm gave it (task/affinity), as a real cluster does.
CPUS_PER_TASK = 2
SBATCH_FIT = ["--gpus-per-node=1", "--cpus-per-task=%d" % CPUS_PER_TASK]


def _skip_or_fail(reason: str):
    if os.environ.get("REQUIRE_SLURM_TESTS") == "1":
        pytest.fail("REQUIRE_SLURM_TESTS=1 but: " + reason)
    pytest.skip(reason)


def _free_job_id_base(span: int = 20) -> int:
    """A FirstJobId whose derived ports (20000 + id % 20000, see finetune.sh) are free for `span` jobs."""
    for base in range(23000, 39000, span):
        if all(_port_free(p) for p in range(base, base + span)):
            return base - 20000
    return 1


def local_cluster(tmp_path_factory, name: str = "cluster", gpus_per_node: int = 2):
    """A started two-node cluster for a module fixture (yield from it); skips when none can start.
    gpus_per_node=0: the nodes define no GPU gres at all."""
    reason = LocalSlurmCluster.unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    # munge/slurmd sockets live under it: keep the path short (AF_UNIX paths are limited to 108 bytes).
    work = tmp_path_factory.mktemp(name)
    c = LocalSlurmCluster(work, num_nodes=2, gpus_per_node=gpus_per_node, cpus_per_node=CPUS_PER_TASK,
                          first_job_id=_free_job_id_base(), task_plugin="task/affinity")
    try:
        c.start()
    except Exception as e:  # noqa: BLE001
        c.stop()
        _skip_or_fail("could not start the local Slurm cluster: %s" % e)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from local_cluster(tmp_path_factory)


def _submit(cluster: LocalSlurmCluster, tmp: Path, train_args: list[str], env: dict | None = None,
            sbatch_args: list[str] = ()) -> tuple[int, Path, Path]:
    run_dir, log = tmp / "run", tmp / "job.out"
    job_env = {
        "PYTHON": sys.executable,          # the interpreter running the tests has torch + accelerate
        "TRAIN_PY": str(REPO / "train.py"),
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",            # 2 cores shared by both "nodes"
        "SHUTDOWN_TIMEOUT": "60",
        **(env or {}),
    }
    job = cluster.sbatch([*SBATCH_FIT, "--output", str(log), *sbatch_args, str(SCRIPT), *train_args],
                         env=job_env, cwd=tmp)
    return job, run_dir, log


def _report(cluster: LocalSlurmCluster, log: Path, info: dict | None = None) -> str:
    job_log = log.read_text(errors="replace") if log.exists() else "(no job log)"
    return "scontrol: %s\n----- job log\n%s\n----- daemon logs\n%s" % (info, job_log[-8000:], cluster.logs(40))


def _ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]


def _assert_two_nodes(run_dir: Path, log_text: str, expect_node_ranks: bool = True) -> None:
    ranks = _ranks(run_dir)
    assert len(ranks) >= 2, ranks
    assert {r["world_size"] for r in ranks} == {len(ranks)}, ranks
    assert sorted(r["rank"] for r in ranks) == list(range(len(ranks))), ranks
    assert {r["hostname"] for r in ranks} == {"node0", "node1"}, ranks
    if expect_node_ranks:
        assert {r["node_rank"] for r in ranks} == {0, 1}, ranks
        for r in ranks:   # node rank and host agree: rank files come from the node they claim
            assert r["hostname"] == "node%d" % r["node_rank"], r
    # One start line per node task: hostname, node rank, processes it starts.
    starts = re.findall(r"\[finetune \S+ node\] host=(node\d) node_rank=(\d+) nproc=(\d+) world_size=(\d+)",
                        log_text)
    assert {(h, int(nr)) for h, nr, _, _ in starts} >= {("node0", 0), ("node1", 1)}, starts
    assert all(int(n) == 1 and int(w) == 2 for _, _, n, w in starts), starts
    # torch sees no GPU behind the fake ones, so each node runs one CPU process; Slurm gave it 1 (fake) GPU.
    assert len(re.findall(r"device=cpu gpus_seen=0 slurm_gpus=1 ", log_text)) >= 2, log_text[-3000:]


def _assert_run_outputs(run_dir: Path, epochs: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1)), metrics["epochs"]
    assert metrics["final"]["epoch"] == epochs
    assert metrics["epochs"][-1]["test_samples"] == 13      # the `shards` fixture's test split, each once
    assert list((run_dir / "checkpoints").glob("ckpt-*.pt")), "no checkpoint"
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run_dir / "model.pt").exists() and (run_dir / "config.yaml").exists()
    return metrics


def test_two_node_job_completes(cluster, shards, tmp_path):
    """2 nodes x 1 process through `accelerate launch` (static rendezvous on node0): world size 2."""
    job, run_dir, log = _submit(cluster, tmp_path, ["--data", str(shards), "--epochs", "2", *TRAIN_ARGS],
                                env={"MIXED_PRECISION": "bf16"})
    info = cluster.wait_job(job, timeout=300)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", _report(cluster, log, info)
    try:
        _assert_two_nodes(run_dir, text)
        _assert_run_outputs(run_dir, epochs=2)
        assert "world_size=2 nodes=2" in text
        # MIXED_PRECISION reached train.py through accelerate launch; TRAIN_ARGS' --precision no wins, in one line
        assert text.count("train.py's --precision no is used, not accelerate's mixed_precision") == 1, text[-3000:]
        # the derived rendezvous port: 20000 + job id % 20000, stable across requeues
        assert "master=node0:%d " % (20000 + job % 20000) in text
        assert "training finished (srun exit 0)" in text
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, _report(cluster, log, info))) from None


def test_step_gets_the_jobs_cpus(cluster, shards, tmp_path):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from the batch job: without passing it again
    each node's task (launcher, ranks, loader workers) is bound to one CPU. finetune.sh passes it; the node
    line (nproc) and every rank file (os.sched_getaffinity) show the job's CPUs."""
    job, run_dir, log = _submit(cluster, tmp_path, ["--data", str(shards), "--epochs", "1", *TRAIN_ARGS],
                                env={"OMP_NUM_THREADS": ""})
    info = cluster.wait_job(job, timeout=300)
    text = log.read_text(errors="replace") if log.exists() else ""
    try:
        assert info.get("JobState") == "COMPLETED", info
        cpus = re.findall(r"\[finetune \S+ node\] host=node\d .* cpus=(\d+) ", text)
        assert cpus == [str(CPUS_PER_TASK)] * 2, cpus
        ranks = _ranks(run_dir)
        assert len(ranks) == 2 and {r["cpus"] for r in ranks} == {CPUS_PER_TASK}, ranks
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, _report(cluster, log, info))) from None


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@T does) -> workers checkpoint and exit 75 ->
    scontrol requeue -> the same job id restarts with --resume auto and completes every epoch once."""
    epochs = 5
    job, run_dir, log = _submit(cluster, tmp_path, ["--data", str(shards), "--epochs", str(epochs),
                                                    "--save-every", "1", *TRAIN_ARGS])
    info: dict = {}
    try:
        # Progress first: a checkpoint exists, so the signal lands mid-training.
        cluster.wait_for(lambda: list((run_dir / "checkpoints").glob("ckpt-*.pt")), 240,
                         "the first checkpoint", job_id=job, poll=0.2)
        t_signal = time.monotonic()
        cluster.signal_batch(job, "USR1")
        cluster.wait_for(lambda: cluster.job_info(job).get("Restarts", "0") != "0", 90,
                         "the job to be requeued", poll=0.5)
        t_requeued = time.monotonic()
        info = cluster.wait_job(job, timeout=300)
    except Exception as e:
        raise AssertionError("%s\n%s" % (e, _report(cluster, log, info))) from None
    text = log.read_text(errors="replace")
    try:
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", info
        assert info.get("Restarts") == "1", info
        # The signal reached the workers through batch shell -> srun -> launcher (both nodes) -> workers.
        assert "got SIGUSR1" in text
        assert len(re.findall(r"Received 10 death signal", text)) >= 2, "launcher on each node forwards USR1"
        assert re.search(r"SIGUSR1 received: checkpoint saved at step \d+; exiting with 75", text)
        assert "requeueing job %d" % job in text
        # --open-mode=append: both runs' lines are in the one log file
        assert "job %d restart 0 " % job in text and "job %d restart 1 " % job in text
        assert "restart=1" in text                        # the second run's start lines
        assert re.search(r"resumed from step \d+", text)
        assert "training finished (srun exit 0)" in text
        _assert_two_nodes(run_dir, text)
        metrics = _assert_run_outputs(run_dir, epochs=epochs)   # every epoch exactly once, in order
        assert metrics["final"]["step"] == epochs * 3
        # One TensorBoard event file per run (before and after the requeue), same log dir.
        assert len(list((run_dir / "tb").rglob("events.out.tfevents.*"))) >= 2
        print("signal -> requeued: %.1fs" % (t_requeued - t_signal))
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, _report(cluster, log, info))) from None


def test_torchrun_c10d_variant(cluster, shards, tmp_path):
    """LAUNCHER=torchrun with the elastic c10d rendezvous: the same script, the other launcher."""
    job, run_dir, log = _submit(cluster, tmp_path, ["--data", str(shards), "--epochs", "1", *TRAIN_ARGS],
                                env={"LAUNCHER": "torchrun", "RDZV_BACKEND": "c10d", "MIXED_PRECISION": "bf16"})
    info = cluster.wait_job(job, timeout=300)
    text = log.read_text(errors="replace") if log.exists() else ""
    try:
        assert info.get("JobState") == "COMPLETED", info
        assert "launcher=torchrun" in text
        assert "train.py's --precision no is used, not accelerate's mixed_precision" in text   # torchrun: exported
        # c10d assigns node ranks by arrival, so only the set of hosts is fixed.
        _assert_two_nodes(run_dir, text, expect_node_ranks=False)
        _assert_run_outputs(run_dir, epochs=1)
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, _report(cluster, log, info))) from None


def test_sbatch_header_keeps_gpu_defaults():
    """The header is a real GPU job; the tests only shrink it on the sbatch command line."""
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SCRIPT.read_text(), re.M))
    assert header["nodes"] == "2" and header["ntasks-per-node"] == "1"
    assert int(header["gpus-per-node"]) >= 1 and int(header["cpus-per-task"]) > 1
    assert header["signal"].startswith("B:USR1@")
    assert "requeue" in header and header["open-mode"] == "append"
    assert header["output"] and header["time"]
    subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(SCRIPT)], check=True)


def _wait_array_done(cluster: LocalSlurmCluster, job: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = cluster.run(["squeue", "-h", "-r", "-j", str(job), "-o", "%i %T"], check=False)
        if res.returncode == 0 and not res.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError("job array %d not done after %.0fs" % (job, timeout))


def test_experiments_as_one_job_array_then_report(cluster, shards, tmp_path):
    """`compare --launcher slurm` submits variant x seed runs as ONE job array (one sbatch, one job id,
    one task per run) and returns; `report` gathers the table once the tasks are done."""
    out = tmp_path / "cmp"
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "experiments", "compare", "--data", str(shards), "--out", str(out),
           "--launcher", "slurm", "--sbatch-args", "--gpus-per-node=1 --cpus-per-task=1",
           "--variants", "finetune", "--seeds", "0,1", "--pretrained", "none", "--",
           "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "8", "--image-size", "32",
           "--workers", "0", "--precision", "no", "--eval-limit", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted job array (\d+) \(2 task\(s\)\)", proc.stdout)
    assert m, proc.stdout
    job = int(m.group(1))
    results = json.loads((out / "results.json").read_text())
    assert results["slurm"]["job_id"] == job
    assert {r["name"]: r["status"] for r in results["variants"]} == {"finetune-s0": "submitted",
                                                                     "finetune-s1": "submitted"}
    # One array: every task has the array's job id.
    tasks = cluster.run(["squeue", "-h", "-r", "-j", str(job), "-o", "%F %K"], check=False).stdout.split("\n")
    assert all(line.split()[0] == str(job) for line in tasks if line.strip()), tasks
    try:
        _wait_array_done(cluster, job, 400)
    except AssertionError as e:
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (out / "logs").glob("*"))
        raise AssertionError("%s\n%s\n%s" % (e, logs, cluster.logs(30))) from None
    rep = subprocess.run([sys.executable, "-m", "experiments", "report", "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    results = json.loads((out / "results.json").read_text())
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (out / "logs").glob("*"))
    assert {r["name"]: r["status"] for r in results["variants"]} == {"finetune-s0": "ok", "finetune-s1": "ok"}, logs
    md = (out / "results.md").read_text()
    assert "Mean over seeds 0, 1" in md and "| finetune-s0 |" in md and "| finetune-s1 |" in md
    for name in ("finetune-s0", "finetune-s1"):
        assert "--resume auto" in (out / "logs" / f"{name}.log").read_text()
        assert (out / name / "model.pt").exists()
