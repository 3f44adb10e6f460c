"""Bad input to the data jobs: one line on stderr naming the option or file, exit code 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / job), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, (f, r.stderr)


@pytest.mark.parametrize("args, fragments", [
    (["--out", "/proc/no/such/dir"], ["--out /proc/no/such/dir: cannot write there"]),
    (["--train-images", "0"], ["--train-images 0: expected an int >= 1"]),
    (["--val-images", "-2"], ["--val-images -2: expected an int >= 1"]),
    (["--workers", "-1"], ["--workers -1: expected an int >= 1"]),
    (["--num-classes", "9"], ["--num-classes 9: expected an int in [1, 8]"]),
    (["--min-size", "300", "--max-size", "200"], ["--min-size/--max-size (300, 200)"]),
    (["--min-size", "16"], ["--min-size/--max-size (16, 256): expected a list of 2 ints, each >= 32"]),
    (["--seed", "-1"], ["--seed -1: expected an int >= 0"]),
    (["--train-images", "2.5"], ["--train-images", "invalid int value: '2.5'"]),
])
def test_make_synthetic_bad_input(tmp_path, args, fragments):
    out = tmp_path / "syn"
    r = _run("make_synthetic.py", *(["--out", str(out)] if "--out" not in args else []), *args)
    _one_line_error(r, *fragments)
    assert not (out / "train2017").exists()  # nothing generated before the check


def test_make_synthetic_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("keep me")
    _one_line_error(_run("make_synthetic.py", "--out", str(tmp_path / "f"), "--train-images", "1"),
                    f"--out {tmp_path / 'f'}: cannot write there")
    assert (tmp_path / "f").read_text() == "keep me"


def test_build_index_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json")
    _one_line_error(_run("build_index.py", str(bad)), "bad.json is not valid JSON")
    assert not (tmp_path / "bad.parquet").exists()
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    _one_line_error(_run("build_index.py", str(binary)), "bin.json")
    _one_line_error(_run("build_index.py", str(tmp_path / "none.json")), "none.json: no such file")
    _one_line_error(_run("build_index.py", str(bad), "--out", str(tmp_path / "x.csv")),
                    "--out", "x.csv", "must end in .parquet or .arrow")
    _one_line_error(_run("build_index.py", str(bad), "--out", "/proc/no/such/x.parquet"),
                    "--out /proc/no/such/x.parquet: cannot write in /proc/no/such")
    notcoco = tmp_path / "list.json"
    notcoco.write_text(json.dumps([1, 2, 3]))
    _one_line_error(_run("build_index.py", str(notcoco)), "list.json")


@pytest.mark.parametrize("job", ["make_synthetic.py", "build_index.py"])
def test_help_documents_exit_codes(job):
    r = _run(job, "--help")
    assert r.returncode == 0
    assert "exit codes:" in r.stdout and "  2    bad input" in r.stdout and "  1    internal failure" in r.stdout
    assert "bad input (exit 2):" in r.stdout
