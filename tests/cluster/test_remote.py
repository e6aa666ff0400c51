"""Remote data sets (issue 13, item 1) against real servers on loopback: a plain HTTP server (killed mid-staging
and restarted; killed for good; serving a tampered shard) and moto's S3-compatible server (data_prep --out s3://,
then staging from s3://). train.py is run once against the HTTP server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TINY, free_port, read_json, run_train, start_train, wait_for
from data_prep.manifest import file_sha256
from data_prep.remote_io import Backoff, Unreachable
from finetune import UsageError
from finetune.data.manifest import check_shards, load_manifest
from finetune.staging import cache_folder, stage

FAST = Backoff(tries=6, first=0.2, most=1.0)      # ~3 s of retries: tests do not wait for the defaults


class Server:
    """tests/shard_server.py in its own process, so it can be killed and restarted on the same port."""

    def __init__(self, folder: Path, delay: float = 0.0, mode: str = "plain", log: Path | None = None):
        self.folder, self.delay, self.mode, self.port, self.proc = folder, delay, mode, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **({"SHARD_SERVER_LOG": str(log)} if log else {})}

    def start(self) -> Server:
        self.proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "shard_server.py"), str(self.folder),
                                      str(self.port), str(self.delay), self.mode], env=self.env)
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

    def make(delay: float = 0.0, folder: Path | None = None, mode: str = "plain", log: Path | None = None) -> Server:
        made.append(Server(folder or shards, delay, mode, log).start())
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def two_data_sets(shards: Path, tmp_path: Path) -> Path:
    """A served folder holding two copies of the shards, a/ and b/: two URLs, two cache folders."""
    served = tmp_path / "served"
    for name in ("a", "b"):
        shutil.copytree(shards, served / name)
    return served


@pytest.mark.slow
def test_cache_cap_evicts_only_staged_data_sets_and_says_so(server, shards, tmp_path, capsys):
    """Issue 20, item 1: a user's folder in --cache-dir is never evicted (nor counted); an older staged data
    set is, with one line naming it; what cannot fit is refused."""
    srv = server(folder=two_data_sets(shards, tmp_path))
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    cache = tmp_path / "cache"
    older = stage(srv.url + "/a", cache, 10**9, FAST)
    mine = cache / "my-results"
    mine.mkdir()
    (mine / "train-000000.tar").write_bytes(b"x" * total)        # looks like a data set; is not staging's
    capsys.readouterr()
    stage(srv.url + "/b", cache, int(total * 1.5), FAST)
    assert not older.exists() and (mine / "train-000000.tar").stat().st_size == total
    lines = [line for line in capsys.readouterr().err.splitlines() if "evicting" in line]
    assert len(lines) == 1 and f"--data {srv.url}/a" in lines[0] and str(older) in lines[0], lines
    with pytest.raises(UsageError, match="do not fit --cache-size-gb"):
        stage(srv.url + "/b/", tmp_path / "other-cache", total // 2, FAST)


@pytest.mark.slow
def test_a_data_set_in_use_is_never_evicted(server, shards, tmp_path):
    """Issue 20, item 2: run A (another process) holds its staged data set for its lifetime; run B staging
    another URL into the same cache cannot evict it, and says why it does not fit. Once A is gone, B can."""
    srv = server(folder=two_data_sets(shards, tmp_path))
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    cache = tmp_path / "cache"
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from finetune.staging import stage; "
                               f"held = []; stage({srv.url + '/a'!r}, {str(cache)!r}, 10**9, held=held); "
                               "print('staged', flush=True); "
                               "time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "staged"
        with pytest.raises(UsageError, match=r"1 staged data set\(s\) in use by running jobs were kept"):
            stage(srv.url + "/b", cache, int(total * 1.5), FAST)
        assert len(staged_tars(cache_folder(cache, srv.url + "/a"))) == 7
    finally:
        holder.kill()
        holder.wait()
    stage(srv.url + "/b", cache, int(total * 1.5), FAST)
    assert not cache_folder(cache, srv.url + "/a").exists()


def served_copy(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "served"
    shutil.copytree(shards, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


@pytest.mark.slow
def test_a_shard_larger_than_the_manifest_says_is_cut_off_at_size_plus_one(server, shards, tmp_path):
    """Issue 20, item 4: the server sends 8 MB where the manifest says a few KB: staging stops reading one byte
    past the manifest's size, at the first try, with one line naming the shard; no partial file stays."""
    copy = served_copy(shards, tmp_path)
    with open(copy / "train-000001.tar", "ab") as f:
        f.write(b"\0" * (8 << 20))
    srv = server(folder=copy)
    with pytest.raises(UsageError, match=r"shard train-000001.tar: the server sends more than the \d+ bytes") as info:
        stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert "\n" not in str(info.value) and "unreachable" not in str(info.value)
    assert not list(cache_folder(tmp_path / "cache", srv.url).glob("*.part-*"))


@pytest.mark.slow
def test_a_huge_manifest_is_refused_at_its_cap(server, shards, tmp_path):
    """Issue 20, item 4: a 'manifest' larger than 64 MiB is not read into memory or kept in .incoming/."""
    from finetune.staging import MANIFEST_CAP
    copy = served_copy(shards, tmp_path)
    with open(copy / "manifest.json", "r+b") as f:
        f.truncate(MANIFEST_CAP + (1 << 20))                     # sparse: no 65 MB written to the test disk
    srv = server(folder=copy)
    with pytest.raises(UsageError, match=rf"manifest.json: the server sends more than the {MANIFEST_CAP} bytes"):
        stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert not list(cache_folder(tmp_path / "cache", srv.url).rglob("manifest.json"))


def staging_outcome(url: str, cache: Path, backoff: Backoff, limit: float) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    thread, result = stage_in_thread(url, cache, backoff)
    thread.join(timeout=limit)
    assert not thread.is_alive(), f"staging still running after {limit} s"
    return time.monotonic() - start, result.get("error")


@pytest.mark.slow
def test_a_server_that_never_answers_fails_after_one_read_timeout(server, shards, tmp_path, monkeypatch):
    """Issue 20, item 5: a server that accepts and never answers: one line saying so, after one read timeout
    (HOTDOG_REMOTE_TIMEOUT_S, 1 s here; 60 s by default), not FileNotFoundError after minutes."""
    monkeypatch.setenv("HOTDOG_REMOTE_TIMEOUT_S", "1")
    srv = server(mode="hang")
    elapsed, error = staging_outcome(srv.url, tmp_path / "cache", FAST, 30)
    assert isinstance(error, UsageError), error
    assert "accepted the connection but sent no answer within 1 s" in str(error) and "\n" not in str(error)
    assert elapsed < 10


@pytest.mark.slow
def test_a_trickling_server_fails_in_bounded_time(server, shards, tmp_path, monkeypatch):
    """Issue 20, item 5: a server that sends a byte at a time, slower than 1 KiB/s, is a stalled transfer:
    each try ends after about one timeout window, and the last one stops staging with one line."""
    monkeypatch.setenv("HOTDOG_REMOTE_TIMEOUT_S", "1")
    srv = server(delay=0.2, mode="trickle")
    elapsed, error = staging_outcome(srv.url, tmp_path / "cache", Backoff(tries=2, first=0.1), 30)
    assert isinstance(error, Unreachable) and "stalled" in str(error) and ".tar unreachable after 2 tries" in str(error)
    assert elapsed < 15
    assert not list(cache_folder(tmp_path / "cache", srv.url).glob("*.part-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_during_staging_stops_it_with_one_line(server, shards, imagenet_like, tmp_path, sig, code):
    """Issue 20, item 5: SIGTERM (a preemption signal by default) during staging from a trickling server stops
    the run within seconds with exit 75 and one line; Ctrl-C (SIGINT) with 130 and one line, no traceback.
    Partial files are removed either way."""
    srv = server(delay=0.2, mode="trickle")
    cache = tmp_path / "cache"
    # A shell that starts pytest in the background leaves SIGINT ignored, and a child inherits that (Python then
    # installs no KeyboardInterrupt handler): give train.py the default disposition a user's terminal gives.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = start_train(["--data", srv.url, "--cache-dir", cache, "--output-dir", tmp_path / "run",
                            "--pretrained", imagenet_like, "--epochs", "1", *TINY], log=tmp_path / "run.log")
    finally:
        signal.signal(signal.SIGINT, saved)
    folder = cache_folder(cache, srv.url)
    wait_for(lambda: any(folder.glob("*.part-*")), 120, "a shard transfer", [proc])
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == code
    text = (tmp_path / "run.log").read_text()
    assert "Traceback" not in text, text
    assert len([line for line in text.splitlines() if "staging" in line]) == 1, text
    assert not list(folder.glob("*.part-*"))


@pytest.mark.slow
def test_two_runs_staging_one_url_download_it_once(server, shards, tmp_path):
    """Issue 20, item 6: run A (another process) stages a slow server's data set; run B, started meanwhile on
    the same URL and cache, waits for A (one line) and uses its shards: every file is downloaded once."""
    log = tmp_path / "requests.log"
    srv = server(delay=0.3, log=log)
    cache = tmp_path / "cache"
    script = f"from finetune.staging import stage; stage({srv.url!r}, {str(cache)!r}, 10**9)"
    first = subprocess.Popen([PYTHON, "-c", script], cwd=REPO)
    try:
        wait_for(lambda: log.exists() and ".tar" in log.read_text(), 60, "the first run's downloads", [first])
        folder = stage(srv.url, cache, 10**9, FAST)
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    requests = log.read_text().split()
    assert sorted(r for r in requests if r.endswith(".tar")) == sorted(f"/{p.name}" for p in shards.glob("*.tar"))
    assert check_shards(load_manifest(folder)) is None


@pytest.mark.slow
def test_a_cached_shard_damaged_in_place_is_fetched_again(server, shards, tmp_path, capsys):
    """Issue 20, item 7: a staged shard whose bytes changed (same size) is re-fetched, not trusted."""
    srv = server()
    folder = stage(srv.url, tmp_path / "cache", 10**9, FAST)
    shard = folder / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert file_sha256(shard) == file_sha256(shards / "train-000003.tar")
    assert "train-000003.tar does not match the manifest's sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_same_size_shards_of_a_new_manifest_replace_the_cached_ones(server, shards, tmp_path):
    """Issue 20, item 7: the server now serves other bytes of the same size under a new manifest sha256, at
    the same URL: staging into the same cache uses the new bytes (a cache reused on size alone would not)."""
    import json
    copy = served_copy(shards, tmp_path)
    srv = server(folder=copy)
    folder = stage(srv.url, tmp_path / "cache", 10**9, FAST)
    shard = copy / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["splits"]["test"]["shards"]:
        if entry["name"] == shard.name:
            entry["sha256"] = file_sha256(shard)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert (folder / shard.name).read_bytes() == bytes(data)


@pytest.mark.slow
def test_leftovers_of_a_killed_staging_are_removed(server, shards, tmp_path):
    """Issue 20, item 7: `NAME.part-PID` of a staging killed outright goes on the next run, if PID is dead;
    one of a live process is kept."""
    srv = server()
    folder = stage(srv.url, tmp_path / "cache", 10**9, FAST)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    stale, live = folder / f"train-000000.tar.part-{dead.pid}", folder / f"train-000001.tar.part-{os.getppid()}"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)
    stage(srv.url, tmp_path / "cache", 10**9, FAST)
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_a_full_cache_disk_is_a_local_error_not_retried(server, shards, tmp_path):
    """Issue 20, item 8: --cache-dir on a full disk (a 64 KiB tmpfs, in a user+mount namespace): one line
    saying it is the local disk, at the first try (not 'server unreachable after 6 tries')."""
    srv = server()
    if subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -Urm (user namespaces) to mount a small tmpfs")
    script = (f"mount -t tmpfs -o size=64k tmpfs {tmp_path}/small && exec {PYTHON} -c "
              f"\"from data_prep.remote_io import Backoff; from finetune.staging import stage; "
              f"stage('{srv.url}', '{tmp_path}/small/cache', 10**9, Backoff(tries=6, first=5))\"")
    (tmp_path / "small").mkdir()
    start = time.monotonic()
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "No space left on device" in last and "local disk" in last, proc.stderr
    assert "unreachable" not in last and time.monotonic() - start < 20


@pytest.mark.slow
def test_a_url_is_never_folded_into_a_path(tmp_path):
    """Issue 20, item 8: `data_prep verify` (and anything else reading a manifest) given a URL says it reads a
    local folder and names the staged copy, instead of 'no manifest.json in http:/host...'."""
    from data_prep.remote_io import staged_folder
    url = "http://user:secret@127.0.0.1:9/sets/d2l"
    proc = subprocess.run([PYTHON, "-m", "data_prep", "verify", url], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "http:/1" not in proc.stderr and "secret" not in proc.stderr
    assert "http://user:***@127.0.0.1:9/sets/d2l is a URL" in proc.stderr
    assert str(staged_folder(url)) in proc.stderr


def test_fetch_mirror_refuses_an_oversized_file_before_writing_it(tmp_path, monkeypatch, capsys):
    """Issue 20, item 4: `finetune.fetch --mirror` with a 300 MB fake hotdog.zip (sparse here) stops at the
    size cap with one line; no hotdog.zip or .part file is left. A torchvision file larger than its published
    size likewise."""
    from types import SimpleNamespace

    from finetune import fetch, weights
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    with open(mirror / "hotdog.zip", "wb") as f:
        f.truncate(fetch.HOTDOG_ZIP_CAP + 1)
    for var in ("TORCH_HOME", "HF_HOME", "HOTDOG_CACHE"):
        monkeypatch.setenv(var, "unset-by-test")
    start = time.monotonic()
    (mirror / "resnet18-0123abcd.pth").write_bytes(b"x" * 5000)
    monkeypatch.setattr(weights, "torchvision_weights", lambda arch: SimpleNamespace(
        url="https://download.pytorch.org/models/resnet18-0123abcd.pth", meta={"_file_size": 0.003}))
    assert fetch.main(["--arch", "resnet18", "--cache", str(cache), "--mirror", str(mirror)]) == 2
    assert "5000 bytes, more than the 4194 a real resnet18-0123abcd.pth can have" in capsys.readouterr().err
    monkeypatch.setattr(fetch, "fetch_weights", lambda arch, mirror: "skipped")
    assert fetch.main(["--cache", str(cache), "--mirror", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert f"more than the {fetch.HOTDOG_ZIP_CAP} a real hotdog.zip can have; nothing written" in err
    assert len(err.strip().splitlines()) == 1 and time.monotonic() - start < 10
    assert not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.floor
def test_train_py_reads_a_data_set_over_http(server, shards, imagenet_like, tmp_path):
    """train.py stages from a real HTTP server; the server is killed as soon as staging is done, while the run
    is still starting or training: the run goes on from the local copy (2 epochs, every test sample). A
    second run with the server gone for good stops with one line, exit 2."""
    srv = server()
    url = srv.url.replace("://", "://user:s3cret-token@")   # issue 20, item 8: credentials are never recorded
    proc = start_train(["--data", url, "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "run",
                        "--pretrained", imagenet_like, "--epochs", "2", "--max-steps-per-epoch", "2", *TINY],
                       log=tmp_path / "run.log")
    staged = cache_folder(tmp_path / "cache", url) / "manifest.json"     # written last by stage()
    wait_for(staged.exists, 200, "staging", [proc])
    srv.kill()                                   # mid-run: nothing more is read from the server
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert [e["test_samples"] for e in metrics["epochs"]] == [13, 13]
    recorded = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + [tmp_path / "run.log"]
    assert not [p for p in recorded if b"s3cret-token" in p.read_bytes()]
    assert "user:***@127.0.0.1" in (tmp_path / "run" / "config.yaml").read_text()
    from finetune.export import load_run             # the recorded (redacted) URL still finds the staged copy
    assert load_run(tmp_path / "run", False, None).test.num_samples == 13
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


@pytest.mark.slow
def test_a_node_whose_staging_fails_otherwise_stops_both_nodes_within_seconds(server, shards, imagenet_like, tmp_path):
    """Issue 19, item 2: node 1's staging fails with an error that is no UsageError (its --cache-dir is a
    file: NotADirectoryError). Both nodes stop at once with the same one line, exit 2; node 0 does not wait
    --startup-timeout (set to 600 s here) for a node that is gone."""
    srv = server()
    (tmp_path / "not-a-folder").write_text("x")
    caches = [tmp_path / "cache-node0", tmp_path / "not-a-folder"]
    start = time.monotonic()
    codes, texts = two_nodes(tmp_path, lambda r: ["--data", srv.url, "--cache-dir", caches[r], "--output-dir",
                                                  tmp_path / "run", "--pretrained", imagenet_like, "--epochs", "1",
                                                  "--startup-timeout", "600", *TINY])
    assert codes == [1, 1] and time.monotonic() - start < 200, texts
    for text in texts:
        assert "exitcode  : 2" in text and 'train.py", line' not in text, text
        lines = [line for line in text.splitlines() if "cannot stage into" in line and "local disk" in line]
        assert len(lines) == 1, text


@pytest.mark.slow
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
    codes, texts = two_nodes(tmp_path, lambda r: ["--data", srv.url, "--cache-dir", tmp_path / f"cache-node{r}",
                                                  "--output-dir", tmp_path / "run", "--pretrained", imagenet_like,
                                                  "--epochs", "1", "--max-steps-per-epoch", "1", *TINY])
    assert codes == [1, 1], texts                                   # the launcher's code for a failed worker
    for text in texts:
        assert "exitcode  : 2" in text, text                        # train.py's own exit: a usage error
        assert 'train.py", line' not in text and "finetune/" not in text, text     # no traceback of ours
        lines = [line for line in text.splitlines() if "train-000002.tar unreachable after" in line]
        assert len(lines) == 1, text
        assert "--data http://127.0.0.1" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()        # nobody trained


def two_nodes(tmp_path, args_of_rank) -> tuple[list[int], list[str]]:
    """Two nodes of one process each (a real gloo process group), node r run with args_of_rank(r): their launchers'
    exit codes and logs."""
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [start_train(args_of_rank(r), nodes=2, node_rank=r, port=port, log=logs[r]) for r in (0, 1)]
    try:
        codes = [n.wait(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    return codes, [log.read_text() for log in logs]
