"""Bad input to the data jobs: one line on stderr naming the option or file, exit code 2, nothing written."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import call_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic_job", REPO / "jobs" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def test_make_synthetic_bad_input(make_synthetic, tmp_path, capsys, args, fragments):
    out = tmp_path / "syn"
    code = call_main(make_synthetic.main, [*(["--out", str(out)] if "--out" not in args else []), *args])
    _one_line_error(subprocess.CompletedProcess(args, code, "", capsys.readouterr().err), *fragments)
    assert not (out / "train2017").exists()  # nothing generated before the check


def test_make_synthetic_exit_code_end_to_end(tmp_path):
    _one_line_error(_run("make_synthetic.py", "--out", str(tmp_path / "s"), "--train-images", "0"),
                    "--train-images 0: expected an int >= 1")


def _job_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job_under_test", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_process(module, capsys, *args: str) -> subprocess.CompletedProcess:
    code = call_main(module.main, list(args))
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def test_make_synthetic_out_is_a_file(make_synthetic, tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    _one_line_error(_in_process(make_synthetic, capsys, "--out", str(tmp_path / "f"), "--train-images", "1"),
                    f"--out {tmp_path / 'f'}: cannot write there")
    assert (tmp_path / "f").read_text() == "keep me"


def test_build_index_bad_input(tmp_path, capsys):
    build_index = _job_module("build_index")
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json")
    _one_line_error(_run("build_index.py", str(bad)), "bad.json is not valid JSON")  # end to end once
    assert not (tmp_path / "bad.parquet").exists()
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    _one_line_error(_in_process(build_index, capsys, str(binary)), "bin.json")
    _one_line_error(_in_process(build_index, capsys, str(tmp_path / "none.json")), "none.json: no such file")
    _one_line_error(_in_process(build_index, capsys, str(bad), "--out", str(tmp_path / "x.csv")),
                    "--out", "x.csv", "must end in .parquet or .arrow")
    _one_line_error(_in_process(build_index, capsys, str(bad), "--out", "/proc/no/such/x.parquet"),
                    "--out /proc/no/such/x.parquet: cannot write in /proc/no/such")
    notcoco = tmp_path / "list.json"
    notcoco.write_text(json.dumps([1, 2, 3]))
    _one_line_error(_in_process(build_index, capsys, str(notcoco)), "list.json")


@pytest.mark.parametrize("job", ["make_synthetic", "build_index"])
def test_help_documents_exit_codes(job):
    text = _job_module(job).build_parser().format_help()
    assert "exit codes:" in text and "  2    bad input" in text and "  1    internal failure" in text
    assert "bad input (exit 2):" in text
