"""Refuse the options of ``python -m monai.bundle run`` that no config of the run declares, before any work.

``monai.bundle run`` turns every ``--name value`` it does not know into a config override, and an override that names
no existing id becomes a new, unused key: ``--max_epochs 5`` (the original UltraRefiner scripts' flag) would train
the default 150 epochs. ``check_bundle_options()`` is the first entry of each bundle config's ``initialize`` list: when
the process is ``python -m monai.bundle run`` (or ``run_workflow``) it reads the run's options from ``sys.argv``
(and ``--args_file``) and stops with exit status 2 and one line per unknown option, with close matches and the
original scripts' names mapped to ours (``--max_epochs: did you mean --epochs?``). Runs started from Python
(``monai.bundle.run(...)``, ``ConfigWorkflow``, the ``ultrarefiner`` commands) are left alone.

Declared options: the top-level ids of the bundle's own config files (those in the directory of the first
``--config_file``, monai's config root), ``_meta_``, the arguments of ``monai.bundle run`` itself and, with
``--tracking``, the tracking settings' ids. A nested id (``--train#trainer#max_epochs 1``) is accepted when its first
component is declared (on the command line monai itself refuses one whose path does not exist, before
``initialize``: ``KeyError: 'query key: trian'``). Config files from elsewhere (the demo's
``ultrarefiner/demo_configs/*.json``, a user's override file) are checked like the command line: their top-level ids
must be declared too. A new id that the configs or the other options reference (``@name``) is accepted: it defines a
component the run uses.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ultrarefiner.errors import UltraRefinerError, UnknownOptionError

RUN_COMMANDS = ("run", "run_workflow")  # the monai.bundle commands that run a config's initialize

# The original UltraRefiner scripts' flags -> this project's options; the declared ones of a run are suggested.
ORIGINAL_FLAGS: dict[str, tuple[str, ...]] = {
    "max_epochs": ("epochs",),
    "num_epochs": ("epochs",),
    "lr": ("learning_rate", "transunet_lr", "sam_lr"),
    "base_lr": ("learning_rate", "transunet_lr"),
    "vit_pretrained": ("pretrained_npz",),
    "sam_model_type": ("model_type",),
    "model_type": ("sam_model_type",),
    "dataset": ("dataset_name",),
    "datasets": ("dataset_name",),
    "root_path": ("data_root",),
    "data_dir": ("data_root",),
    "medsam_checkpoint": ("sam_checkpoint",),
    "transunet_checkpoint": ("transunet_ckpt",),
    "refiner_checkpoint": ("refiner_ckpt",),
    "checkpoint_root": ("ckpt_root",),
    "checkpoint": ("ckpt_path",),
    "pred_root": ("predictions_dir",),
}
# flags with no option of the same role: what to do instead
ORIGINAL_NOTES: dict[str, str] = {
    "n_gpu": "several GPUs: python -m torch.distributed.run --nproc_per_node N -m monai.bundle run with "
    "configs/multi_gpu_train.json added to --config_file",
}

_REF = re.compile(r"@(\w+)")  # monai's id reference: "@name", "@name#sub", "$@name.attr"


def _first(key: str) -> str:
    """The top-level id of an override key (monai accepts ``#`` and ``::`` as separators, ``+`` to merge)."""
    return key.lstrip("+").replace("::", "#").split("#", 1)[0]


def _reserved() -> set[str]:
    """Arguments that ``monai.bundle run``/``run_workflow`` consume instead of passing them on as overrides."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run, run_workflow

    names: set[str] = set()
    for fn in (run, run_workflow, create_workflow, ConfigWorkflow.__init__):
        names.update(n for n, p in inspect.signature(fn).parameters.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return names


def _is_flag(arg: str) -> bool:  # fire.core._IsFlag: "--x", "-x", "-x=v"; "-1" is a value
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def fire_kwargs(args: Sequence[str]) -> dict[str, str]:
    """The keyword arguments that fire makes of ``args`` for a function taking ``**kwargs`` (``--name value``,
    ``--name=value``, a bare ``--name`` is ``"True"`` and a bare ``--noname`` is ``name`` ``"False"``; ``-`` in names
    becomes ``_``; after the last lone ``--`` come fire's own flags), as unparsed strings."""
    args = list(args)
    if "--" in args:
        args = args[: len(args) - 1 - args[::-1].index("--")]
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _is_flag(arg):
            continue  # positional: run_id of `run`
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            if i < len(args) and not _is_flag(args[i]):
                value, i = args[i], i + 1
            elif key.startswith("no"):  # fire: a bare --noname is name=False
                key, value = key[2:], "False"
            else:
                value = "True"
        out[key.replace("-", "_")] = value
    return out


def bundle_run_args(argv: Sequence[str] | None = None) -> list[str] | None:
    """The arguments after the command when this process is ``python -m monai.bundle run`` (or ``run_workflow``),
    else None (a run started from Python, e.g. by pytest or an ``ultrarefiner`` command)."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] not in RUN_COMMANDS:
        return None
    return list(argv[2:])


def _parse_value(value: Any) -> Any:
    """A command-line value as fire passes it on (Python literals parsed, anything else a string)."""
    if not isinstance(value, str):
        return value
    from fire.parser import DefaultParseValue

    return DefaultParseValue(value)


def run_options(args: Sequence[str]) -> tuple[dict[str, Any], list[str], Any]:
    """``(overrides, config files, tracking)`` of a ``monai.bundle run`` command line (arguments after ``run``),
    with ``--args_file``'s entries under the command line's, as ``monai.bundle`` merges them."""
    from monai.bundle import ConfigParser

    given: dict[str, Any] = {k: _parse_value(v) for k, v in fire_kwargs(args).items()}
    merged: dict[str, Any] = {}
    if given.get("args_file"):
        merged.update(ConfigParser.load_config_file(str(given["args_file"])))
    merged.update(given)
    files = merged.get("config_file") or []
    if isinstance(files, str):
        files = files.split(",") if not Path(files).is_file() and "," in files else [files]
    reserved = _reserved()
    overrides = {k: v for k, v in merged.items() if k not in reserved}
    return overrides, [str(f) for f in files], merged.get("tracking")


def _tracking_ids(tracking: Any) -> set[str]:
    if not tracking:
        return set()
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    else:
        settings = tracking if isinstance(tracking, dict) else ConfigParser.load_config_files(tracking)
    return set(settings.get("configs", {}))


def _suggestions(name: str, declared: set[str]) -> list[str]:
    """Declared options that ``name`` may mean: the original scripts' equivalent first, then close spellings."""
    if name in ORIGINAL_FLAGS:  # an original flag whose equivalent this bundle lacks gets no look-alike
        return [c for c in ORIGINAL_FLAGS[name] if _first(c) in declared][:3]
    scored = sorted((-difflib.SequenceMatcher(None, name, d).ratio(), d) for d in declared)
    # close spellings, only those about as close as the closest ("trian": train, not variant)
    return [d for r, d in scored[:3] if -r >= max(0.6, -scored[0][0] - 0.1)] if scored else []


def _problem(key: str, declared: set[str], where: str) -> str:
    """One line about the undeclared ``key`` (a command-line option, or a top-level id of the file ``where``)."""
    first = _first(key)
    dash = "" if where else "--"
    label = f"{dash}{key}" + (f" (in {where})" if where else "")
    rest = key.lstrip("+").replace("::", "#")[len(first):]
    hints = [f"{dash}{s}{rest}" for s in _suggestions(first, declared)]
    if rest:
        label += f": no config id {first!r}"
    if first in ORIGINAL_NOTES:
        return f"{label}: {ORIGINAL_NOTES[first]}"
    if not hints:
        return f"{label}: no such option" + (" in this bundle" if first in ORIGINAL_FLAGS else "")
    choices = hints[0] if len(hints) == 1 else ", ".join(hints[:-1]) + " or " + hints[-1]
    return f"{label}: did you mean {choices}?"


def unknown_options(
    overrides: Mapping[str, Any] | Iterable[str],
    config_files: Sequence[str],
    tracking: Any = None,
) -> list[str]:
    """One line per option of ``overrides`` (command-line names, or their mapping) and per top-level id of the
    config files outside the bundle's configs directory that the bundle does not declare (module docstring);
    empty when all are declared."""
    from monai.bundle import ConfigParser

    files = [Path(f) for f in config_files]
    if not files:
        return []
    root = files[0].resolve().parent
    contents = [(f, ConfigParser.load_config_file(str(f))) for f in files]
    declared = {"_meta_"} | _reserved() | _tracking_ids(tracking)
    extra: list[tuple[str, str]] = []
    for f, content in contents:
        if f.resolve().parent == root:
            declared.update(_first(k) for k in content)
        else:
            extra += [(k, str(f)) for k in content]
    values = dict(overrides) if isinstance(overrides, Mapping) else dict.fromkeys(overrides, "")
    text = json.dumps([c for _, c in contents] + [str(v) for v in values.values()], default=str)
    referenced = set(_REF.findall(text))
    pending = [(k, "") for k in values] + extra
    return [_problem(k, declared, where) for k, where in pending if _first(k) not in declared | referenced]


def check_options(
    overrides: Mapping[str, Any] | Iterable[str],
    config_files: Sequence[str],
    tracking: Any = None,
) -> None:
    """Raise ``UnknownOptionError`` naming every option of ``overrides`` (and id of an extra config file) that the
    bundle of ``config_files`` does not declare, with suggestions."""
    problems = unknown_options(overrides, config_files, tracking)
    if problems:
        raise UnknownOptionError(problems, context=f"--config_file {', '.join(map(str, config_files))}")


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), outermost first, each once."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def user_error(exc: BaseException | None) -> UltraRefinerError | None:
    """The project's own error (bad input or configuration) in ``exc``'s chain of causes, if any: monai wraps an
    error raised in a config expression or a transform in its own RuntimeError."""
    return next((e for e in exception_chain(exc) if isinstance(e, UltraRefinerError)), None)


# A DataLoader worker's exception comes back rebuilt from its formatted traceback, as the type of the worker's last
# exception: an error of ours behind MONAI's "applying transform" RuntimeError survives only as a line of that text.
_WORKER_LINE = re.compile(r"^ultrarefiner\.errors\.\w+: (.+)$", re.MULTILINE)


def user_error_message(exc: BaseException | None) -> str | None:
    """The message of the project's own error behind ``exc`` (:func:`user_error`), also when a DataLoader worker
    raised it behind another exception (a transform's, wrapped by MONAI's ``Compose``); None when there is none (a
    bug)."""
    chain = exception_chain(exc)
    for e in chain:
        if isinstance(e, UltraRefinerError) and "Original Traceback" not in str(e):
            return str(e)
    for e in chain:
        found = _WORKER_LINE.search(str(e))
        if found:
            return found.group(1)
    return None


def install_error_hook() -> None:
    """Under ``python -m monai.bundle run``: an uncaught exception caused by bad input or configuration prints its
    message in one block instead of monai's nested tracebacks (exit status 1, as any uncaught error);
    ``ULTRAREFINER_TRACEBACK=1`` shows the traceback. Other exceptions (bugs) keep their full traceback."""
    previous = sys.excepthook
    if getattr(previous, "_ultrarefiner", False):
        return

    def hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        message = user_error_message(value)
        if message is None or os.environ.get("ULTRAREFINER_TRACEBACK", "").lower() in ("1", "true", "yes"):
            previous(tp, value, tb)
            return
        print(f"monai.bundle run: error: {message}\n(the traceback: ULTRAREFINER_TRACEBACK=1)", file=sys.stderr,
              flush=True)

    hook._ultrarefiner = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def check_bundle_options(argv: Sequence[str] | None = None) -> None:
    """First entry of the bundles' ``initialize``: under ``python -m monai.bundle run``, print the unknown options
    and exit with status 2 before anything is built or read, and install :func:`install_error_hook`; otherwise (a
    run started from Python) do nothing."""
    args = bundle_run_args(argv)
    if args is None:
        return
    install_error_hook()
    overrides, files, tracking = run_options(args)
    try:
        check_options(overrides, files, tracking)
    except UnknownOptionError as e:
        # SystemExit passes through monai's expression evaluation (which wraps Exceptions): no traceback
        print(f"monai.bundle run: error: {e}\nNothing was run. The options are the top-level ids of the bundle's "
              "configs (its docs/README.md); a nested id such as --train#trainer#max_epochs must start with one.",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None
