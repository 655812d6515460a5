"""Several processes with JAX's multi-controller runtime (`jaxattr explain --distributed`): two
CPU processes on the loopback address, with a local coordinator, write the files a single process
writes, bit for bit, and one summary; a coordinator nobody runs is a clear error within its timeout."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _images import noise_images

from jaxattr import cli
from jaxattr.distributed import shard

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from jaxattr.cli import main; sys.exit(main(sys.argv[1:]))"


def test_shards_are_disjoint_balanced_and_cover_every_name():
    names = [f"im{i}" for i in (5, 3, 9, 0, 7, 1, 2)]
    shards = [shard(names, k, 3) for k in range(3)]
    assert sorted(n for s in shards for n in s) == sorted(names)
    assert [len(s) for s in shards] == [3, 2, 2]
    assert shards[0] == ["im0", "im3", "im9"]  # sorted, dealt round-robin: the same in every process
    with pytest.raises(ValueError):
        shard(names, 3, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    # One JAXATTR_HOME for the test's processes: the later ones read the programs the first
    # compiled from its compile cache (the same executables, so the same bits).
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAXATTR_OFFLINE": "1", "PYTHONPATH": str(ROOT), "JAXATTR_HOME": str(home)}


def _start(argv: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MAIN, *argv], env=_env(home), cwd=home.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _job(images: Path, out: Path, home: Path) -> list[tuple[int, str]]:
    """Two processes of one distributed run, on the loopback address: [(exit status, stderr)]."""
    argv = _argv(images, out) + ["--distributed", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    processes = [_start([*argv, "--process-id", str(k)], home) for k in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    return [(p.returncode, err) for p, err in zip(processes, errors)]


@pytest.fixture
def images(tmp_path) -> Path:
    return noise_images(tmp_path / "images", 5, (40, 48))


def _argv(images: Path, out: Path) -> list[str]:
    # EfficientNet-Lite0's embedded weights, 32-px crops, batches of 2: the shards (3 and 2
    # images) run in batches of the same shape as the single process, padded the same way.
    return ["explain", str(images), "--out", str(out), "--method", "saliency", "--crop", "32", "--batch-size", "2",
            "--loaders", "0"]


def test_two_processes_write_what_one_process_writes(images, tmp_path):
    home = tmp_path / "home"
    (status0, err0), (status1, err1) = _job(images, tmp_path / "two", home)
    assert status0 == status1 == 0, (err0[-3000:], err1[-3000:])
    assert "process 0 of 2: 3 explained" in err0 and "process 1 of 2: 2 explained" in err1
    assert "all 2 processes done" in err0

    single = _start(_argv(images, tmp_path / "one"), home)
    assert single.wait(timeout=600) == 0, single.communicate()[1][-3000:]
    one = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").iterdir()) if p.suffix in (".png", ".npy")}
    two = {p.name: p.read_bytes() for p in sorted((tmp_path / "two").iterdir()) if p.suffix in (".png", ".npy")}
    assert len(one) == 10 and one == two  # bit-identical .npy and .png files
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summaries[0] == summaries[1]  # one summary with every shard's records, sorted by name
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # no temporary files

    # Running the job again resumes every shard: all are done, the processes only meet.
    (status0, err0), (status1, err1) = _job(images, tmp_path / "two", home)
    assert status0 == status1 == 0, (err0[-3000:], err1[-3000:])
    assert "3 of 3 images already have outputs" in err0 and "2 of 2 images already have outputs" in err1


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(images, tmp_path):
    argv = _argv(images, tmp_path / "out") + [
        "--distributed", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1",
        "--coordinator-timeout", "3",
    ]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", MAIN, *argv], env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120, check=False)
    assert time.monotonic() - start < 60
    assert done.returncode == 1
    assert "jaxattr: error: cannot start the distributed run with the coordinator 127.0.0.1" in done.stderr
    assert "not every process connected within 3 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert cli.main([*_argv(images, tmp_path / "out"), "--no-compile-cache", "--process-id", "1"]) == 2  # needs --distributed


def test_a_bad_coordinator_address_is_a_usage_error(images, tmp_path, capsys):
    """HOST:PORT is checked when the arguments are parsed: one line, exit 2, before any runtime starts."""
    distributed = ["--distributed", "--num-processes", "2", "--process-id", "0", "--coordinator"]
    for bad in ("nonsense", "host:", ":1234", "host:0", "host:65536", "host:12a", "::1:1234", "[]:1234"):
        assert cli.main([*_argv(images, tmp_path / "out"), *distributed, bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "argument --coordinator: expected HOST:PORT" in err and repr(bad) in err, err
    assert not (tmp_path / "out").exists()
    for good in ("127.0.0.1:1234", "node-0.cluster:65535", "[::1]:1"):
        assert cli.parse_args([*_argv(images, tmp_path / "out"), *distributed, good]).coordinator == good


def test_inconsistent_process_numbers_are_refused_before_jax_starts():
    from jaxattr.distributed import DistributedError, initialize

    with pytest.raises(DistributedError, match="not in"):
        initialize("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(DistributedError, match="at least 1"):
        initialize("127.0.0.1:1", num_processes=0, process_id=0)


def test_a_coordinator_port_in_use_is_one_line_before_jax_binds_it(images, tmp_path):
    """jaxlib crashes (SIGSEGV) when process 0's coordinator port is taken: refused first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = _argv(images, tmp_path / "out") + [
            "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
        done = subprocess.run([sys.executable, "-c", MAIN, *argv], env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert f"port {port} is in use by another program; choose another port" in done.stderr


def test_processes_started_with_different_counts_all_stop_with_one_line(images, tmp_path):
    """A process started with --num-processes 3 beside one started with 2 would join as "1 of 2":
    every process compares what the others asked for and stops."""
    argv = _argv(images, tmp_path / "out") + ["--distributed", "--coordinator", f"127.0.0.1:{_free_port()}", "--coordinator-timeout", "60"]
    processes = [_start([*argv, "--num-processes", str(n), "--process-id", str(k)], tmp_path / "home") for k, n in ((0, 2), (1, 3))]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    for process, err in zip(processes, errors):
        assert process.returncode == 1 and err.count("\n") == 1, err[-2000:]
        assert "the processes disagree" in err and "--num-processes 3" in err
    assert not (tmp_path / "out").exists()


def test_coordinator_options_are_checked_when_parsed(images, tmp_path, capsys):
    distributed = ["--distributed", "--num-processes", "2", "--process-id", "0"]
    for option, bad, needle in [
        ("--coordinator", "a b:12", "expected HOST:PORT"),
        ("--coordinator", "999.1.1.1:12", "expected HOST:PORT"),
        ("--coordinator", "[::zz]:12", "expected HOST:PORT"),
        ("--coordinator", "-host:12", "expected HOST:PORT"),
        ("--coordinator-timeout", "1e20", "expected a number of seconds"),
        ("--coordinator-timeout", "100000000000000000000", "must be in [1, 604800] seconds"),
        ("--coordinator-timeout", "0", "must be in [1, 604800] seconds"),
    ]:
        assert cli.main([*_argv(images, tmp_path / "out"), *distributed, f"{option}={bad}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {option}: {needle}" in err, err
