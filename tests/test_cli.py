"""The command line: help texts, argument validation, the demo."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ultrarefiner
from ultrarefiner.cli import COMMANDS
from ultrarefiner.commands.args import check_range
from ultrarefiner.utils.flags import parse_list


def run(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "ultrarefiner", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _function(command: str):
    module, name = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), name)


def _summary(command: str) -> str:
    """The first line of the command function's docstring."""
    return inspect.getdoc(_function(command)).splitlines()[0]


def test_help_lists_every_command_with_its_summary():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    lines = [line.strip() for line in (res.stdout + res.stderr).splitlines()]
    for command in COMMANDS:
        name = command.replace("_", "-")
        assert name in lines, f"{name} is not in the command list: {lines}"
        assert lines[lines.index(name) + 1] == _summary(command)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    """``<command> --help`` gives the summary and lists every argument with its description from the docstring."""
    res = run(command.replace("_", "-"), "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert f"ultrarefiner {command.replace('_', '-')} - {_summary(command)}" in text
    lines = [line.strip() for line in text.splitlines()]
    for p in inspect.signature(_function(command)).parameters.values():
        # fire lists an argument without a default as "NAME", the others as "-n, --name=NAME" or "--name=NAME"
        head = p.name.upper() if p.default is inspect.Parameter.empty else f"--{p.name}={p.name.upper()}"
        at = next((i for i, line in enumerate(lines) if line == head or line.endswith(f", {head}")), None)
        assert at is not None, f"{head} is not in the help of {command}"
        # its "Type:" and "Default:" lines, then the description (not the next argument or section)
        desc = next((line for line in lines[at + 1 : at + 4] if not line.startswith(("Type:", "Default:"))), "")
        assert desc and not desc.startswith("-") and not desc.isupper(), f"{head} of {command} has no description"



def _docstring_args(doc: str) -> dict[str, str]:
    """The Args section of a Google-style docstring: name -> its description, continuation lines joined."""
    section = doc.split("\nArgs:\n", 1)[1]
    args: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("    "):
            break
        head, _, text = line.strip().partition(": ")
        if not line.startswith("     ") and head.isidentifier():
            args[head] = text
        else:
            args[next(reversed(args))] += " " + line.strip()
    return args


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_keeps_every_argument_description_whole(command):
    """fire's docstring parser drops the text after a colon on a continuation line, and reads ``word (...):`` there
    as a new argument: the help would cut the description short. Every description must come through whole."""
    from fire import docstrings

    doc = inspect.getdoc(_function(command))
    parsed = {a.name: " ".join(a.description.split()) for a in docstrings.parse(doc).args}
    written = _docstring_args(doc)
    assert set(parsed) == set(written) == set(inspect.signature(_function(command)).parameters)
    for name, text in written.items():
        assert parsed[name] == " ".join(text.split()), f"--help of {command} cuts the description of {name}"

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


def test_demo_prepare_only(tmp_path):
    res = run("demo", "--output_dir", str(tmp_path / "demo"), "--n_images", "12", "--prepare_only")
    assert res.returncode == 0, res.stderr
    assert "BUSI" in res.stdout and "samples" in res.stdout
    report = json.loads((tmp_path / "demo" / "dataset" / "processed" / "preprocess_report.json").read_text())
    assert report["datasets"]["BUSI"]["samples"] == 10  # 12 phantoms, 2 normal


def test_readme_walkthrough_is_the_demo_script():
    from ultrarefiner.walkthrough import WALKTHROUGH

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "```bash\n" + WALKTHROUGH + "```" in readme


def test_demo_python_is_this_interpreter(tmp_path):
    """The ``python`` that the demo puts on PATH for the walkthrough is this interpreter, virtualenv included: same
    sys.prefix, and ultrarefiner imports (a symlink to a venv's python elsewhere starts the base interpreter)."""
    from ultrarefiner.commands.demo import python_on_path

    env = python_on_path(tmp_path / "bin")

    def through_path(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"python -c '{code}'"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    res = through_path("import sys; print(sys.prefix); print(sys.executable)")
    assert res.returncode == 0, res.stderr
    prefix, executable = res.stdout.splitlines()
    assert prefix == sys.prefix and executable == sys.executable
    res = through_path("import ultrarefiner, monai; print(ultrarefiner.__file__)")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve() == Path(ultrarefiner.__file__).resolve()


def test_demo_runs_all_three_phases(tmp_path):
    """The README walkthrough with tiny settings: every phase, evaluation and prediction (a few minutes). The refiner
    is LiteMedSAM from its packaged weights, finetuned a little: the refined masks beat the coarse ones on the test
    split, and the closing lines say what was trained. Run by this interpreter; in CI that is a fresh virtualenv's
    (.ci/run), as for a user following the README, so the walkthrough's ``python`` must stay inside it
    (test_demo_python_is_this_interpreter)."""
    if os.environ.get("CI", "").lower() == "true":
        assert sys.prefix != sys.base_prefix, f"CI runs the tests outside a virtualenv ({sys.executable})"
    out = tmp_path / "demo"
    res = run("demo", "--output_dir", str(out), "--n_images", "24", timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "coarse" in res.stdout and "refined" in res.stdout and "improved/worsened" in res.stdout
    for k in range(5):
        assert (out / "checkpoints" / "transunet" / "BUSI" / f"fold_{k}" / "best.pt").is_file()
    assert (out / "predictions" / "transunet" / "BUSI" / "datalist.json").is_file()
    assert list((out / "dataset" / "augmented" / "BUSI" / "fold_0").glob("*"))
    assert (out / "checkpoints" / "sam_refiner" / "BUSI" / "fold_0" / "best.pt").is_file()
    eval_dir = out / "checkpoints" / "ultrarefiner" / "BUSI" / "fold_0" / "eval_test"
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["n_images"] > 0
    preds = json.loads((out / "predictions" / "ultrarefiner" / "predictions.json").read_text())
    overlays = list((out / "predictions" / "ultrarefiner" / "overlays").glob("*.png"))
    assert overlays and str(overlays[0].resolve()) in res.stdout
    assert preds
    # the last printed table (its [all] block; earlier ones are the phases' own evaluations) is summary.json's,
    # and refining helps
    lines = res.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("[all]"))
    dice_row = next(line.split() for line in lines[start:] if line.startswith("dice "))
    coarse, refined = float(dice_row[1]), float(dice_row[4])
    metrics = summary["metrics"]
    assert coarse == pytest.approx(metrics["coarse_dice"]["mean"], abs=1e-4)
    assert refined == pytest.approx(metrics["refined_dice"]["mean"], abs=1e-4)
    assert refined > coarse, res.stdout[-3000:]
    # the closing lines: the result, then what was trained
    closing = res.stdout.strip().splitlines()[-6:]
    result = f"Dice coarse {metrics['coarse_dice']['mean']:.3f}, refined {metrics['refined_dice']['mean']:.3f}"
    assert closing[0].startswith("Demo finished in ") and result in closing[0]
    assert closing[1].startswith("What was trained, on 24 synthetic phantoms")
    assert "TransUNet (64 px, ViT depth 2) from random init" in closing[2] and "on each of the 5 folds" in closing[2]
    assert "LiteMedSAM from its packaged weights" in closing[3] and "finetuned for" in closing[3]
    assert "end to end for" in closing[4]
    assert closing[5].startswith("These are smoke-test settings")
