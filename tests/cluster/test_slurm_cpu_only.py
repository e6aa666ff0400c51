"""slurm/finetune.sh on a CPU-only cluster: nodes that define NO GPU gres at all (no GresTypes, no Gres=).

The script's header asks for GPUs (--gpus-per-node=4); such a cluster refuses it as it stands ("Invalid
generic resource"), and accepts it once the request is shrunk on the sbatch command line:
`sbatch --gpus-per-node=0 --cpus-per-task=N slurm/finetune.sh ...` (Slurm 22.05). docs/cluster.md shows it.

Skips like tests/cluster/test_slurm.py when no local Slurm cluster can start (REQUIRE_SLURM_TESTS=1: fail)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import SlurmClusterError  # noqa: E402
from test_slurm import CPUS_PER_TASK, SCRIPT, TRAIN_ARGS, _report, local_cluster  # noqa: E402

pytestmark = pytest.mark.slow

CPU_ONLY_FIT = ["--gpus-per-node=0", "--cpus-per-task=%d" % CPUS_PER_TASK]


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory):
    yield from local_cluster(tmp_path_factory, "cpucluster", gpus_per_node=0)


def _env(tmp_path):
    return {"PYTHON": sys.executable, "TRAIN_PY": str(SCRIPT.parents[1] / "train.py"),
            "RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1", "SHUTDOWN_TIMEOUT": "60"}


def test_cluster_defines_no_gpu_gres(cpu_cluster):
    conf = cpu_cluster.conf.read_text()
    assert "GresTypes" not in conf and "Gres=" not in conf, conf
    assert not (cpu_cluster.conf.parent / "gres.conf").exists()


def test_gpu_header_is_refused_as_it_stands(cpu_cluster, shards, tmp_path):
    with pytest.raises(SlurmClusterError, match=r"Invalid generic resource"):
        cpu_cluster.sbatch(["--cpus-per-task=%d" % CPUS_PER_TASK, "--output", str(tmp_path / "job.out"),
                            str(SCRIPT), "--data", str(shards), *TRAIN_ARGS], env=_env(tmp_path), cwd=tmp_path)


def test_shrunk_request_runs_on_cpu_only_nodes(cpu_cluster, shards, tmp_path):
    log = tmp_path / "job.out"
    job = cpu_cluster.sbatch([*CPU_ONLY_FIT, "--output", str(log), str(SCRIPT), "--data", str(shards),
                              "--epochs", "1", *TRAIN_ARGS], env=_env(tmp_path), cwd=tmp_path)
    info = cpu_cluster.wait_job(job, timeout=300)
    text = log.read_text(errors="replace") if log.exists() else ""
    try:
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", info
        # No GPU from Slurm on either node, one CPU process each, world size 2.
        assert len(re.findall(r"device=cpu gpus_seen=0 slurm_gpus=none ", text)) == 2, text[-3000:]
        assert "world_size=2 nodes=2" in text
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert [e["epoch"] for e in metrics["epochs"]] == [1]
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, _report(cpu_cluster, log, info))) from None
