"""``python -m ultrarefiner <command>``: one fire command per module in ``ultrarefiner.commands``.

Commands import torch and friends inside their bodies so that ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

# command name -> "module:function"; each function's docstring is its --help text.
COMMANDS: dict[str, str] = {
    "demo": "ultrarefiner.commands.demo:demo",
    "preprocess": "ultrarefiner.commands.preprocess:preprocess",
    "predict_transunet": "ultrarefiner.commands.predict_transunet:predict_transunet",
    "augment": "ultrarefiner.commands.augment:augment",
    "predict": "ultrarefiner.commands.predict:predict",
    "refine": "ultrarefiner.commands.refine:refine",
    "evaluate": "ultrarefiner.commands.evaluate:evaluate",
    "export_bundle": "ultrarefiner.commands.export_bundle:export_bundle",
    "export_onnx": "ultrarefiner.commands.export_onnx:export_onnx",
}


def _load(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def os_error_message(e: OSError) -> str:
    """``<path>: <cause>`` (``/out/masks/a.png: No space left on device``) for a failed file operation."""
    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def main(argv: list[str] | None = None) -> None:
    """Entry point; user errors and failed file operations (read-only folder, full disk) are printed as one line
    (no traceback) and exit with status 2."""
    import fire

    from ultrarefiner.errors import UltraRefinerError

    argv = sys.argv[1:] if argv is None else argv
    commands = {name.replace("_", "-"): _load(spec) for name, spec in COMMANDS.items()}
    try:
        fire.Fire(commands, command=argv, name="ultrarefiner")
    except (UltraRefinerError, ValueError) as e:
        print(f"ultrarefiner: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"ultrarefiner: error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)
