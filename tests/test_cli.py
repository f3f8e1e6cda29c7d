"""The command line: help texts, argument validation, the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ultrarefiner.cli import COMMANDS
from ultrarefiner.commands.args import check_range, parse_list


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ultrarefiner", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    res = run(command.replace("_", "-"), "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert "NAME" in text and "FLAGS" in text or "POSITIONAL ARGUMENTS" in text
    assert len(text) > 300  # a real description, not only the signature


def test_list_and_range_parsing():
    assert parse_list("BUSI,BUSBRA", "datasets") == ["BUSI", "BUSBRA"]
    assert parse_list(("BUSI", "BUSBRA"), "datasets", ["BUSI", "BUSBRA"]) == ["BUSI", "BUSBRA"]
    with pytest.raises(ValueError, match="unknown value"):
        parse_list("BUSI,XYZ", "datasets", ["BUSI"])
    assert check_range(5, "n_splits", 2, 20, integer=True) == 5
    for bad in (1, 2.5, "3", True):
        with pytest.raises(ValueError, match="--n_splits"):
            check_range(bad, "n_splits", 2, 20, integer=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--test_ratio", "1.5"], "--test_ratio must be in"),
        (["--n_splits", "1"], "--n_splits must be in"),
        (["--datasets", "BUSI,NOPE"], "unknown value(s) NOPE"),
        (["--layout", "flat"], "--layout must be one of"),
    ],
)
def test_preprocess_validation(tmp_path, args, message):
    res = run("preprocess", "--raw_root", str(tmp_path), *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_demo_runs_on_phantoms(tmp_path):
    res = run("demo", "--output_dir", str(tmp_path / "demo"), "--n_images", "12")
    assert res.returncode == 0, res.stderr
    assert "BUSI" in res.stdout and "samples" in res.stdout
    report = json.loads((tmp_path / "demo" / "processed" / "preprocess_report.json").read_text())
    assert report["datasets"]["BUSI"]["samples"] == 10  # 12 phantoms, 2 normal
    assert (tmp_path / "demo" / "processed" / "BUSI" / "datalist.json").is_file()
