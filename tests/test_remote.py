"""Remote data sets (issue 13, item 1) against real servers on loopback: a plain HTTP server (killed mid-staging
and restarted; killed for good; serving a tampered shard) and moto's S3-compatible server (data_prep --out s3://,
then staging from s3://). train.py is run once against the HTTP server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TINY, free_port, read_json, run_train, start_train, wait_for
from data_prep.manifest import file_sha256
from data_prep.remote import Backoff, Unreachable
from finetune import UsageError
from finetune.data import check_shards, load_manifest
from finetune.remote import cache_folder, stage

FAST = Backoff(tries=6, first=0.2, most=1.0)      # ~3 s of retries: tests do not wait for the defaults


class Server:
    """tests/shard_server.py in its own process, so it can be killed and restarted on the same port."""

    def __init__(self, folder: Path, delay: float = 0.0):
        self.folder, self.delay, self.port, self.proc = folder, delay, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "shard_server.py"), str(self.folder),
                                      str(self.port), str(self.delay)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("shard server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(shards, tmp_path):
    made = []

    def make(delay: float = 0.0, folder: Path | None = None) -> Server:
        made.append(Server(folder or shards, delay).start())
        return made[-1]
    yield make
    for s in made:
        if s.proc.poll() is None:
            s.kill()


def staged_tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar")) if folder.is_dir() else []


def stage_in_thread(url: str, cache: Path, backoff: Backoff):
    result = {}

    def body():
        try:
            result["folder"] = stage(url, cache, 10**9, backoff)
        except Exception as exc:      # noqa: BLE001 - the test inspects it
            result["error"] = exc
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


def test_http_staging_survives_a_server_restart(server, shards, tmp_path):
    srv = server(delay=0.3)
    thread, result = stage_in_thread(srv.url + "/", tmp_path / "cache", Backoff(tries=8, first=0.25, most=2.0))
    folder = cache_folder(tmp_path / "cache", srv.url)
    deadline = time.monotonic() + 30
    while not staged_tars(folder) and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.kill()                                   # mid-staging: at least one shard still to come
    assert len(staged_tars(folder)) < 7
    time.sleep(1.0)
    srv.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and "error" not in result, result
    manifest = load_manifest(result["folder"])
    assert check_shards(manifest) is None        # every shard present, sizes and sha256 as the manifest says
    assert {p.name for p in staged_tars(folder)} == {p.name for p in shards.glob("*.tar")}


def test_http_server_gone_for_good_stops_with_one_line_naming_the_shard(server, tmp_path):
    srv = server(delay=0.3)
    thread, result = stage_in_thread(srv.url, tmp_path / "cache", FAST)
    folder = cache_folder(tmp_path / "cache", srv.url)
    while not staged_tars(folder) and thread.is_alive():
        time.sleep(0.05)
    srv.kill()
    thread.join(timeout=30)
    assert not thread.is_alive(), "staging hung"
    error = result["error"]
    assert isinstance(error, Unreachable) and "\n" not in str(error)
    assert "shard " in str(error) and ".tar unreachable after 6 tries" in str(error)


def test_a_tampered_shard_is_refused(server, shards, tmp_path):
    copy = tmp_path / "served"
    shutil.copytree(shards, copy)
    shard = copy / "test-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF                            # same size, different bytes
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    srv = server(folder=copy)
    with pytest.raises(UsageError, match=r"shard test-000001.tar fails its sha256 check") as info:
        stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert "\n" not in str(info.value)
    assert not (cache_folder(tmp_path / "cache", srv.url) / "test-000001.tar").exists()


def test_cache_cap_evicts_older_data_sets_and_refuses_what_cannot_fit(server, shards, tmp_path):
    srv = server()
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    old = tmp_path / "cache" / "old-data-set"
    old.mkdir(parents=True)
    (old / "train-000000.tar").write_bytes(b"x" * total)
    stage(srv.url, tmp_path / "cache", int(total * 1.5), FAST)
    assert not old.exists()
    with pytest.raises(UsageError, match="do not fit --cache-size-gb"):
        stage(srv.url + "/", tmp_path / "other-cache", total // 2, FAST)


@pytest.mark.floor
def test_train_py_reads_a_data_set_over_http(server, shards, imagenet_like, tmp_path):
    """train.py stages from a real HTTP server; the server is killed as soon as staging is done, while the run
    is still starting or training: the run goes on from the local copy (2 epochs, every test sample). A
    second run with the server gone for good stops with one line, exit 2."""
    srv = server()
    proc = start_train(["--data", srv.url, "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "run",
                        "--pretrained", imagenet_like, "--epochs", "2", "--max-steps-per-epoch", "2", *TINY],
                       log=tmp_path / "run.log")
    staged = cache_folder(tmp_path / "cache", srv.url) / "manifest.json"     # written last by stage()
    wait_for(staged.exists, 200, "staging", [proc])
    srv.kill()                                   # mid-run: nothing more is read from the server
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert [e["test_samples"] for e in metrics["epochs"]] == [13, 13]
    proc = run_train(["--data", srv.url, "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "run2",
                      "--pretrained", imagenet_like, "--epochs", "1", "--max-steps-per-epoch", "1", *TINY],
                     timeout=200, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "manifest.json unreachable" in lines[-1]


# --------------------------------------------------------------------------- S3 (moto's server on loopback)
@pytest.fixture
def s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                           AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(key, value)
    import boto3
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="hotdog")
    yield "s3://hotdog"
    srv.stop()


@pytest.mark.floor
def test_data_prep_out_s3_then_stage_from_s3(s3, tmp_path, monkeypatch):
    import tempfile

    from data_prep import prepare
    from data_prep.synthetic import make_synthetic
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = make_synthetic(tmp_path / "src", train_per_class=6, test_per_class=3, min_side=32, max_side=48, seed=1)
    manifest = prepare(src, f"{s3}/sets/syn", samples_per_shard=4, workers=1, progress=False, log=lambda _: None)
    folder = stage(f"{s3}/sets/syn", tmp_path / "cache", 10**9, FAST)
    local = load_manifest(folder)
    assert local.test.num_samples == manifest["splits"]["test"]["num_samples"] == 6
    assert check_shards(local, hash_limit_bytes=1 << 40) is None
    assert all(file_sha256(u) == s["sha256"] for u, s in zip(local.train.urls, local.train.shards))


def test_one_node_that_cannot_reach_a_shard_stops_both_nodes_with_one_line(server, shards, imagenet_like, tmp_path):
    """Two nodes (one process each, real gloo process group), each staging into its own --cache-dir, as on a
    cluster. Node 0 already holds every shard; node 1 starts empty and the server no longer has
    train-000002.tar (404 on every try). Node 0 must not train alone or wait forever: both processes exit 2
    with the same one line naming the shard (exit 2; `accelerate launch` itself then exits 1 with its own
    ChildFailedError report, which names that exit code)."""
    served = tmp_path / "served"
    shutil.copytree(shards, served)
    srv = server(folder=served)
    stage(srv.url, tmp_path / "cache-node0", 10**9, FAST)          # node 0: a complete, verified copy
    (served / "train-000002.tar").unlink()
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [start_train(["--data", srv.url, "--cache-dir", tmp_path / f"cache-node{r}", "--output-dir",
                          tmp_path / "run", "--pretrained", imagenet_like, "--epochs", "1",
                          "--max-steps-per-epoch", "1", *TINY], nodes=2, node_rank=r, port=port, log=logs[r])
             for r in (0, 1)]
    try:
        codes = [n.wait(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [1, 1], texts                                   # the launcher's code for a failed worker
    for text in texts:
        assert "exitcode  : 2" in text, text                        # train.py's own exit: a usage error
        assert 'train.py", line' not in text and "finetune/" not in text, text     # no traceback of ours
        lines = [line for line in text.splitlines() if "train-000002.tar unreachable after" in line]
        assert len(lines) == 1, text
        assert "--data http://127.0.0.1" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()        # nobody trained
