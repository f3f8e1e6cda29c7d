"""Unknown options of ``python -m monai.bundle run`` stop the run before any work, with suggestions (the original
scripts' flag names mapped to ours); declared options, nested ids, the demo's and the benchmark script's commands
pass."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_utils import REPO, bundle_argv
from ultrarefiner.errors import UnknownOptionError
from ultrarefiner.utils.options import (
    bundle_run_args,
    check_bundle_options,
    check_options,
    fire_kwargs,
    run_options,
    unknown_options,
)

BUNDLES = REPO / "bundles"
CHECK = "$ultrarefiner.utils.options.check_bundle_options()"
MAIN = str(Path("/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"))  # argv[0] of python -m monai.bundle


def config(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names or ("train",)]


def problems(args: list[str]) -> list[str]:
    """What the check says about a ``monai.bundle run`` command line (the arguments after ``run``)."""
    overrides, files, tracking = run_options(args)
    return unknown_options(overrides, files, tracking)


def test_every_initialize_starts_with_the_check():
    configs = [p for p in sorted(BUNDLES.glob("*/configs/*.json")) if "initialize" in json.loads(p.read_text())]
    assert len(configs) >= 12
    for path in configs:
        c = json.loads(path.read_text())
        assert c["initialize"][0] == CHECK, path
        assert "$import ultrarefiner.utils.options" in c["imports"], path


@pytest.mark.parametrize(
    "bundle, configs, args, expected",
    [
        ("transunet", ["train"], ["--max_epochs", "5", "--lr", "1e-4", "--vit_pretrained", "x.npz"],
         ["--max_epochs: did you mean --epochs?", "--lr: did you mean --learning_rate?",
          "--vit_pretrained: did you mean --pretrained_npz?"]),
        ("sam_refiner", ["train"], ["--sam_model_type", "vit_b", "--lr", "1e-4"],
         ["--sam_model_type: did you mean --model_type?", "--lr: did you mean --learning_rate?"]),
        ("ultrarefiner", ["train"], ["--max_epochs", "5", "--transunet_checkpoint", "tu.pt", "--lr", "1e-4"],
         ["--max_epochs: did you mean --epochs?", "--transunet_checkpoint: did you mean --transunet_ckpt?",
          "--lr: did you mean --transunet_lr or --sam_lr?"]),
        ("transunet", ["inference"], ["--checkpoint", "m.pt"], ["--checkpoint: did you mean --ckpt_path?"]),
    ],
)
def test_unknown_options_stop_the_run_before_any_work(tmp_path, bundle, configs, args, expected):
    """The real command line: exit status 2, one line per unknown option, and nothing written (no checkpoint folder,
    no output folder, no model)."""
    out = tmp_path / "out"
    ov = {"ckpt_root": str(out / "ckpt"), "model_path": str(out / "model.pt")} if configs == ["train"] else {
        "input_dir": str(tmp_path), "output_dir": str(out / "pred")}
    cmd = bundle_argv("run", bundle, [f"{c}.json" for c in configs], ov) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    for line in expected:
        assert line in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Nothing was run" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_declared_options_and_nested_ids_pass():
    files = config("transunet")
    check_options({"epochs": 1, "learning_rate": 0.1, "bundle_root": ".", "train#trainer#max_epochs": 1,
                   "train::trainer::max_epochs": 1, "validate#dataloader#batch_size": 2}, files)
    check_options(["fold", "data_root", "dataset_name", "_meta_#version"], files)
    assert problems(["--config_file", files[0], "--bundle_root", "bundles/transunet", "--meta_file", "m.json",
                     "--logging_file", "l.conf", "--fold=1", "--train#trainer#max_epochs", "1", "--amp", "False"]) == []
    # options of evaluate.json count when it is one of the files; in the ultrarefiner bundle sam_model_type exists
    assert problems(["--config_file", json.dumps(config("sam_refiner", "train", "evaluate")),
                     "--eval_samples_per_image", "2"]) == []
    assert problems(["--config_file", str(config("ultrarefiner")), "--sam_model_type", "vit_b"]) == []


def test_nested_id_needs_a_declared_first_component():
    with pytest.raises(UnknownOptionError) as e:
        check_options({"trian#trainer#max_epochs": 1}, config("transunet"))
    assert "--trian#trainer#max_epochs: no config id 'trian': did you mean --train#trainer#max_epochs?" in str(e.value)


def test_suggestions_depend_on_the_bundle():
    assert problems(["--config_file", config("ultrarefiner")[0], "--model_type", "vit_b"]) == [
        "--model_type: did you mean --sam_model_type?"]
    # TransUNet has no SAM: an original SAM flag gets no look-alike
    assert problems(["--config_file", config("transunet")[0], "--sam_model_type", "vit_b", "--xyzzy", "1"]) == [
        "--sam_model_type: no such option in this bundle", "--xyzzy: no such option"]
    assert problems(["--config_file", config("sam_refiner")[0], "--medsam_checkpoint", "m.pth", "--fodl", "1"]) == [
        "--medsam_checkpoint: did you mean --sam_checkpoint?", "--fodl: did you mean --fold?"]
    # the original scripts' LoRA options are the bundles' own
    assert problems(["--config_file", config("sam_refiner")[0], "--lora_dropout", "0.1", "--lora_target_modules",
                     "['qkv','proj']"]) == []


def test_args_file_and_extra_config_files_are_checked(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": config("transunet")[0], "max_epochs": 3, "fold": 1}))
    assert problems(["--args_file", str(args_file), "--batch_size", "2"]) == ["--max_epochs: did you mean --epochs?"]
    # a file merged after the bundle's own: its ids must be the bundle's, unless the configs reference them
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"max_epochs": 3, "epochs": 2, "my_lr": 0.5, "learning_rate": "@my_lr"}))
    assert problems(["--config_file", json.dumps(config("transunet") + [str(extra)])]) == [
        f"max_epochs (in {extra}): did you mean epochs?"]


def test_check_is_skipped_outside_the_monai_bundle_cli(capsys):
    assert bundle_run_args() is None  # pytest's own argv: runs started from Python are not checked
    check_bundle_options()
    assert bundle_run_args([MAIN, "verify_metadata", "--x", "1"]) is None
    assert bundle_run_args([MAIN, "run", "--x", "1"]) == ["--x", "1"]
    with pytest.raises(SystemExit) as e:
        check_bundle_options([MAIN, "run", "--config_file", config("transunet")[0], "--max_epochs", "5"])
    assert e.value.code == 2
    assert "--max_epochs: did you mean --epochs?" in capsys.readouterr().err


def test_fire_kwargs_reads_the_command_line_as_fire_does():
    import fire.core
    import fire.inspectutils
    from monai.bundle.scripts import run

    args = ["training", "--a=1", "--flag", "--b", "2", "--x-y", "-1", "--noamp", "--c"]
    expected = {"a": "1", "flag": "True", "b": "2", "x_y": "-1", "amp": "False", "c": "True"}
    assert fire_kwargs(args + ["--", "--help"]) == expected  # after the last lone "--": fire's own flags
    assert fire.core._ParseKeywordArgs(args, fire.inspectutils.GetFullArgSpec(run))[0] == expected


def _bundle_runs(text: str) -> list[list[str]]:
    """The ``monai.bundle run`` command lines of a shell text, as arguments after ``run``."""
    runs = []
    for line in text.replace("\\\n", " ").splitlines():
        if "-m monai.bundle run" in line and not line.lstrip().startswith("#"):
            tokens = shlex.split(line)
            runs.append(tokens[tokens.index("run") + 1:])
    return runs


def test_walkthrough_and_demo_commands_pass(monkeypatch):
    from ultrarefiner.walkthrough import WALKTHROUGH, tiny_script

    monkeypatch.chdir(REPO)
    for script in (WALKTHROUGH, tiny_script()):
        runs = _bundle_runs(script)
        assert len(runs) == 5
        for args in runs:
            assert problems(args) == [], args
    assert any("demo_configs" in " ".join(a) for a in _bundle_runs(tiny_script()))


@pytest.mark.parametrize("env", [{}, {"TINY": "1", "REFINER_CKPT": "r.pt", "EMB_CACHE": "/tmp/emb"},
                                 {"P3_ARGS": "--epoch_length 50 --lr_schedule constant --output_dir arm_a"}])
def test_benchmark_script_commands_pass(tmp_path, monkeypatch, env):
    """benchmarks/busi_fold0.sh with a stand-in python that records its arguments instead of running; P3_ARGS reach
    phase 3's training and both its evaluations (an arm's own --output_dir)."""
    calls = tmp_path / "calls"
    calls.mkdir()
    fake = tmp_path / "py"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$(mktemp -p "$CALLS" call.XXXXXX)"\n')
    fake.chmod(0o755)
    run_env = {**os.environ, **env, "PY": str(fake), "CALLS": str(calls), "CKPT": str(tmp_path / "ckpt"),
               "OUT": str(tmp_path / "out"), "STAGES": "p1 p1pred p2 p3 p3iter"}
    res = subprocess.run(["bash", "benchmarks/busi_fold0.sh"], cwd=REPO, env=run_env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    monkeypatch.chdir(REPO)
    runs = [a[3:] for a in (f.read_bytes().decode().split("\0")[:-1] for f in calls.iterdir())
            if a[:3] == ["-m", "monai.bundle", "run"]]
    assert len(runs) == 8
    for args in runs:
        assert problems(args) == [], args
    if "P3_ARGS" in env:
        assert sum("arm_a" in args for args in runs) == 3


def test_error_message_lists_every_problem():
    with pytest.raises(UnknownOptionError) as e:
        check_options({"max_epochs": 5, "n_gpu": 2}, config("transunet"))
    msg = str(e.value)
    assert msg.startswith("unknown options for --config_file ") and sys.executable not in msg
    assert "--max_epochs: did you mean --epochs?" in msg and "--n_gpu: several GPUs: " in msg


def test_bad_input_errors_print_their_message_without_monai_tracebacks(tmp_path):
    """Under ``python -m monai.bundle run`` an error of ours (here a fold the datalist does not have) ends the run
    with its message alone (exit status 1), before ``fold_<k>/`` exists; ``ULTRAREFINER_TRACEBACK=1`` shows the
    traceback."""
    from bundle_utils import preprocessed_phantoms

    data = preprocessed_phantoms(tmp_path / "data")
    ov = {"data_root": str(data / "processed"), "ckpt_root": str(tmp_path / "ckpt"), "fold": -1}
    cmd = bundle_argv("run", "transunet", ["train.json"], ov)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "monai.bundle run: error: fold -1 does not exist in" in res.stderr and "(0..1)" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "ckpt").exists()
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "ULTRAREFINER_TRACEBACK": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "fold -1 does not exist" in res.stderr


def test_a_file_refused_in_a_loader_worker_ends_the_run_with_its_message(tmp_path):
    """A coarse mask the reading rules refuse, read in a DataLoader worker of the sam_refiner bundle's inference
    (MONAI's Compose wraps the error there, and torch rebuilds it as a RuntimeError), ends the run with one line
    naming the file, not some 500 lines of nested tracebacks."""
    import numpy as np
    from PIL import Image

    from conftest import save, scan

    save(tmp_path / "images" / "case.png", scan(0, 40, 56))
    bad = tmp_path / "coarse" / "case.tif"
    bad.parent.mkdir()
    Image.fromarray(np.full((40, 56), -3.0, np.float32)).save(bad)
    ov = {"input_dir": str(tmp_path / "images"), "coarse_dir": str(tmp_path / "coarse"),
          "output_dir": str(tmp_path / "out"), "num_workers": 1, "device": "$torch.device('cpu')"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(bundle_argv("run", "sam_refiner", ["inference.json"], ov), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"monai.bundle run: error: {bad}: mask holds negative values" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not list((tmp_path / "out").rglob("*.png"))


def test_error_hook_finds_our_error_behind_monai_and_dataloader_workers(monkeypatch, capsys):
    """A BadInputError raised in a DataLoader worker keeps its class (torch rebuilds it from the message) and the hook
    prints its last line; a bug (no error of ours in the chain) goes to the previous hook with its traceback."""
    from torch.utils.data import DataLoader, Dataset

    from ultrarefiner.errors import BadInputError
    from ultrarefiner.utils.options import install_error_hook, user_error

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[1]))
    install_error_hook()

    class Bad(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            raise BadInputError("/data/a_mask.png", "300x200 differs from its image's 557x473")

    try:
        try:
            next(iter(DataLoader(Bad(), num_workers=1)))
        except Exception as e:
            raise RuntimeError("applying transform") from e
    except RuntimeError as wrapped:
        assert isinstance(user_error(wrapped), BadInputError)
        sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "monai.bundle run: error: /data/a_mask.png: 300x200 differs from its image's 557x473"
    assert not seen

    class Wrapped(Dataset):  # as MONAI's Compose raises it inside the worker: the rebuilt error is a RuntimeError
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            try:
                raise BadInputError("/data/b.tif", "mask holds negative values (down to -4; logits?)")
            except BadInputError as e:
                raise RuntimeError("applying transform <LoadSoftMaskd>") from e

    try:
        next(iter(DataLoader(Wrapped(), num_workers=1)))
    except RuntimeError as rebuilt:
        assert user_error(rebuilt) is None  # no error of ours in the chain: only in the worker's traceback text
        sys.excepthook(type(rebuilt), rebuilt, rebuilt.__traceback__)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("monai.bundle run: error: /data/b.tif: mask holds negative values (down to -4; "
                                   "logits?)")
    assert not seen
    bug = KeyError("x")
    sys.excepthook(KeyError, bug, None)
    assert seen == [bug]
