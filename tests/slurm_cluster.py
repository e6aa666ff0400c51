"""A throw-away Slurm cluster on this machine, for tests.

``LocalSlurmCluster`` starts munged, slurmctld and one slurmd per node by hand
(no systemd), all configured from a temporary directory, and stops them again
by the PIDs it started. Each slurmd runs in its own UTS namespace
(``unshare --uts``) with hostname ``nodeK`` and address ``127.0.0.(K+1)``, and
``/etc/hosts`` gets one line per node name for the lifetime of the cluster:
with one shared hostname, torch's rendezvous (and gloo) cannot tell the nodes
apart. The lines are tagged and removed again on ``stop()``; the rest of
``/etc/hosts`` is left as it was.

Why these settings (Debian 12, Slurm 22.05):

* ``SlurmUser=root``: the tests run as root and there is no ``slurm`` user
  with a home for state files.
* ``ProctrackType=proctrack/pgid``, ``TaskPlugin=task/none`` (or
  ``task_plugin="task/affinity"`` with ``TaskPluginParam=Cores``: CPU binding with sched_setaffinity, so a
  step runs on exactly the CPUs Slurm gave it, as on a real cluster): no cgroups in a
  container. With pgid tracking, a step signal goes to the task's process
  group, i.e. also straight to the launcher's workers.
* ``SelectType=select/cons_tres``: the only select plugin that knows
  ``--gpus-per-node``.
* ``Gres=gpu:N`` with a ``gres.conf`` that names no device files: the nodes
  *declare* GPUs, so a job script whose header asks for GPUs is accepted as
  is; nothing pretends the GPUs exist (``torch.cuda.is_available()`` stays
  False and the training runs on CPU).
* ``AuthInfo=...,cred_expire=10``: a requeued job may not start until the
  credential of its previous run expired; the default (120 s + slack) makes a
  requeue test wait about 150 s. ``sched_interval=1,bf_interval=1`` so the
  scheduler notices at once when that wait is over (else up to 30-60 s more).
* no accounting (no slurmdbd): job state is read with ``scontrol show job``,
  so ``MinJobAge`` keeps finished jobs visible for a while.

Usage::

    with LocalSlurmCluster(tmpdir, num_nodes=2) as cluster:
        job = cluster.sbatch(["slurm/finetune.sh", ...], env=...)
        cluster.wait_job(job, timeout=120)

``LocalSlurmCluster.unavailable_reason()`` says why a cluster cannot be started
here (not root, binaries missing); tests skip with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOSTS_FILE = Path("/etc/hosts")
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "unshare")
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


class SlurmClusterError(RuntimeError):
    pass


def _port_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_block(count: int, start: int = 16817, stop: int = 30000) -> int:
    """First port P in [start, stop) with P..P+count-1 all free."""
    port = start
    while port + count < stop:
        if all(_port_free(p) for p in range(port, port + count)):
            return port
        port += count
    raise SlurmClusterError("no free block of %d ports" % count)


class LocalSlurmCluster:
    def __init__(self, workdir: os.PathLike | str, num_nodes: int = 2, gpus_per_node: int = 2,
                 cpus_per_node: int | None = None, debug: str = "info", first_job_id: int = 1,
                 task_plugin: str = "task/none"):
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.gpus_per_node = gpus_per_node
        self.cpus_per_node = cpus_per_node
        self.debug = debug
        self.first_job_id = first_job_id
        self.task_plugin = task_plugin
        self.nodes = ["node%d" % k for k in range(num_nodes)]
        self.conf = self.workdir / "etc" / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self.hosts_tag = "# local-slurm-test %d %s" % (os.getpid(), self.workdir)
        self._procs: dict[str, subprocess.Popen] = {}
        self._hosts_added = False
        self.started = False

    # ------------------------------------------------------------------ checks
    @staticmethod
    def unavailable_reason() -> str | None:
        """Why a local cluster cannot run here, or None when it can."""
        if sys.platform != "linux":
            return "local Slurm cluster needs Linux"
        if os.geteuid() != 0:
            return "local Slurm cluster needs root (unshare --uts, /etc/hosts, SlurmUser=root)"
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
        if missing:
            return "Slurm/munge not installed (missing %s); run .ci/install-slurm.sh" % ", ".join(missing)
        try:
            probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return "unshare --uts failed: %s" % e
        if probe.returncode != 0:
            return "unshare --uts not permitted here (needs CAP_SYS_ADMIN): %s" % probe.stderr.strip()
        if not os.access(HOSTS_FILE, os.W_OK):
            return "%s is not writable" % HOSTS_FILE
        return None

    # -------------------------------------------------------------- properties
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, scontrol, ...) against this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # Leftovers from an enclosing Slurm job would confuse sbatch/srun.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        return env

    def log_paths(self) -> list[Path]:
        return sorted((self.workdir / "log").glob("*.log"))

    def logs(self, tail: int = 60) -> str:
        """The tail of every daemon log, for failure reports."""
        out = []
        for path in self.log_paths():
            lines = path.read_text(errors="replace").splitlines()
            out.append("===== %s (last %d of %d lines) =====" % (path, min(tail, len(lines)), len(lines)))
            out.extend(lines[-tail:])
        return "\n".join(out)

    # ------------------------------------------------------------------ config
    def _write_config(self, ctld_port: int, slurmd_ports: list[int]) -> None:
        for sub in ["etc", "state", "log", "munge", "dev"] + ["spool/" + n for n in self.nodes]:
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        cpus = self.cpus_per_node
        if cpus is None:
            # What slurmd -C detects, so slurmd does not drain its node for
            # reporting fewer CPUs than configured.
            out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
            cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
        ctld_host = socket.gethostname().split(".")[0]
        w = self.workdir
        gres_line = "GresTypes=gpu\n" if self.gpus_per_node else ""
        lines = [
            "# generated by tests/slurm_cluster.py; throw-away test cluster",
            "ClusterName=localtest",
            "SlurmctldHost=%s(127.0.0.1)" % ctld_host,
            "SlurmctldPort=%d" % ctld_port,
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=socket=%s,cred_expire=10" % self.munge_socket,
            "StateSaveLocation=%s/state" % w,
            "SlurmdSpoolDir=%s/spool/%%n" % w,
            "SlurmctldPidFile=%s/state/slurmctld.pid" % w,
            "SlurmdPidFile=%s/spool/slurmd-%%n.pid" % w,
            "SlurmctldLogFile=%s/log/slurmctld.log" % w,
            "SlurmdLogFile=%s/log/slurmd-%%n.log" % w,
            "SlurmctldDebug=%s" % self.debug,
            "SlurmdDebug=%s" % self.debug,
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=%s" % self.task_plugin,
            # Bind each task to the cores of its step (what cgroups' ConstrainCores does on a real cluster).
            "TaskPluginParam=Cores" if self.task_plugin == "task/affinity" else "",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # A requeued job may start only after BeginTime = requeue + cred_expire
            # + 1 s, and nothing but the periodic passes (60 s main, 30 s
            # backfill) looks at it then: poll every second instead.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "FirstJobId=%d" % self.first_job_id,
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmdTimeout=120",
            "SlurmctldTimeout=60",
            "MailProg=/bin/true",
            gres_line.rstrip("\n"),
        ]
        for k, (node, port) in enumerate(zip(self.nodes, slurmd_ports)):
            gres = " Gres=gpu:%d" % self.gpus_per_node if self.gpus_per_node else ""
            lines.append("NodeName=%s NodeAddr=127.0.0.%d NodeHostname=%s Port=%d CPUs=%d%s State=UNKNOWN"
                         % (node, k + 1, node, port, cpus, gres))
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(l for l in lines if l) + "\n")
        if self.gpus_per_node:
            # slurmd drops a GPU gres without File= ("Removing file-less GPU"),
            # so each fake GPU gets an empty regular file as its "device".
            # task/none means nothing is constrained by it; Slurm only counts
            # them and sets CUDA_VISIBLE_DEVICES, which no GPU answers to.
            for i in range(self.gpus_per_node):
                (self.workdir / "dev" / ("fakegpu%d" % i)).touch()
            (self.workdir / "etc" / "gres.conf").write_text(
                "AutoDetect=off\nName=gpu File=%s/dev/fakegpu[0-%d]\n"
                % (self.workdir, self.gpus_per_node - 1))

    def _add_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        add = "".join("127.0.0.%d %s %s\n" % (k + 1, node, self.hosts_tag) for k, node in enumerate(self.nodes))
        if text and not text.endswith("\n"):
            add = "\n" + add
        with HOSTS_FILE.open("a") as f:
            f.write(add)
        self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        # Rewrite in place (Docker bind-mounts /etc/hosts; a rename would fail)
        # and drop only our tagged lines.
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        kept = [l for l in lines if not l.rstrip("\n").endswith(self.hosts_tag)]
        with HOSTS_FILE.open("w") as f:
            f.writelines(kept)
        self._hosts_added = False

    # --------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / "log" / ("%s.stdout.log" % name), "ab")
        env = self.env
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self._procs[name] = proc
        return proc

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmClusterError("%s exited with %s\n%s" % (name, proc.returncode, self.logs()))

    def start(self, timeout: float = 60) -> "LocalSlurmCluster":
        reason = self.unavailable_reason()
        if reason:
            raise SlurmClusterError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = _free_port_block(1 + self.num_nodes)
        ctld_port, slurmd_ports = base, [base + 1 + k for k in range(self.num_nodes)]
        self._write_config(ctld_port, slurmd_ports)
        try:
            self._start_munge()
            self._add_hosts()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                # unshare without --fork execs its command, so the PID we record
                # is slurmd's own; `hostname` only changes the new UTS namespace.
                self._spawn("slurmd-" + node, [
                    "unshare", "--uts", "sh", "-c",
                    'hostname "$0" && exec slurmd -D -N "$0" -f "$1"', node, str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def _start_munge(self) -> None:
        key = self.workdir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.workdir / "munge").chmod(0o700)
        self._spawn("munged", [
            "munged", "--foreground", "--force",
            "--key-file", str(key), "--socket", str(self.munge_socket),
            "--pid-file", str(self.workdir / "munge" / "munged.pid"),
            "--log-file", str(self.workdir / "log" / "munged.log"),
            "--seed-file", str(self.workdir / "munge" / "munged.seed"),
            "--num-threads", "2",
        ])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmClusterError("munged did not create its socket\n" + self.logs())
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env)
            if res.returncode == 0:
                states = dict(l.split(None, 1) for l in res.stdout.splitlines() if l.strip())
                if len(states) == self.num_nodes and all(s.strip() == "idle" for s in states.values()):
                    return
            time.sleep(0.3)
        raise SlurmClusterError("nodes not idle after %.0fs: %s\n%s" % (timeout, states, self.logs()))

    def stop(self) -> None:
        """Cancel jobs, stop the daemons we started (by PID), restore /etc/hosts."""
        try:
            if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
                self._cancel_all()
        finally:
            # slurmd first (their stepds talk to them), then the controller,
            # munged last (everything authenticates through it).
            order = sorted(self._procs, key=lambda n: (0 if n.startswith("slurmd") else
                                                       1 if n == "slurmctld" else 2))
            for name in order:
                self._terminate(self._procs[name])
            self._procs.clear()
            self._remove_hosts()
            self.started = False

    def _cancel_all(self, timeout: float = 30) -> None:
        env = self.env
        subprocess.run(["scancel", "--full", "--partition", "debug"], capture_output=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)

    @staticmethod
    def _terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------- jobs
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = kw.pop("env", None) or self.env
        res = subprocess.run(argv, capture_output=True, text=True, env=env, **kw)
        if check and res.returncode != 0:
            raise SlurmClusterError("%s failed (%d): %s%s" % (" ".join(argv), res.returncode, res.stdout, res.stderr))
        return res

    def sbatch(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit ``sbatch --parsable ARGV...``; returns the job id. ``env`` is added to the cluster env."""
        full_env = self.env
        full_env.update(env or {})
        res = self.run(["sbatch", "--parsable", *argv], env=full_env, cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty when the job is unknown)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if res.returncode != 0:
            return {}
        info: dict[str, str] = {}
        # Key=Value pairs; values have no spaces except in a few fields we do not need.
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: int, timeout: float, states=FINISHED_STATES, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job reaches one of ``states``; returns its ``scontrol`` info."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise SlurmClusterError("job %d not in %s after %.0fs: %s" % (job_id, sorted(states), timeout, info))

    def wait_for(self, predicate, timeout: float, what: str, job_id: int | None = None, poll: float = 0.3):
        """Poll ``predicate()`` until truthy; fail early if the job finished first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if job_id is not None:
                state = self.job_state(job_id)
                if state in FINISHED_STATES:
                    raise SlurmClusterError("job %d is %s while waiting for %s" % (job_id, state, what))
            time.sleep(poll)
        raise SlurmClusterError("timed out after %.0fs waiting for %s" % (timeout, what))

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """Signal only the batch shell, as ``#SBATCH --signal=B:SIG@T`` does."""
        self.run(["scancel", "--batch", "--signal=" + sig, str(job_id)])


if __name__ == "__main__":  # manual smoke test: python tests/slurm_cluster.py [DIR]
    import tempfile
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-")
    t0 = time.monotonic()
    with LocalSlurmCluster(d) as c:
        print("up in %.1fs; SLURM_CONF=%s" % (time.monotonic() - t0, c.conf))
        jid = c.sbatch(["--nodes=2", "--ntasks-per-node=1", "--wrap", "srun hostname"],
                       cwd=d)
        print(c.wait_job(jid, 60).get("JobState"))
        print((Path(d) / ("slurm-%d.out" % jid)).read_text())
    print("total %.1fs" % (time.monotonic() - t0))
