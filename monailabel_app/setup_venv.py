"""Creates the MONAI Label environment of the app next to the project's main environment.

Run it with the Python of the main environment, where ``pip install -r requirements.txt && pip install -e .`` put
torch, MONAI, timm, segment-anything and ``ultrarefiner`` (an activated virtual environment, or a system Python):

    python monailabel_app/setup_venv.py                 # -> .venv-monailabel
    python monailabel_app/setup_venv.py --venv PATH --no-install

1. checks that the main environment has what the app imports, naming what is missing;
2. creates a virtual environment on the same base interpreter (``venv`` run from a virtual environment builds on
   its base interpreter: same Python version, so the main environment's compiled packages load);
3. writes ``ultrarefiner_main_env.pth`` into its site-packages: ``site.addsitedir`` of every site directory the main
   interpreter reads (its virtual environment's, and the system's and the user's when it reads those), processed
   after its own site-packages, so the pins MONAI Label needs there (numpy<2, pydicom<3) win. ``python -m venv
   --system-site-packages`` would not do: from a virtual environment it exposes the base interpreter's packages,
   not the environment's;
4. installs ``monailabel_app/requirements.txt`` into it; pip sees torch and the rest through the ``.pth`` file and
   installs no second copy;
5. checks that the new environment imports MONAI Label, torch and ``ultrarefiner``.

Rerunning it on an existing environment rewrites the ``.pth`` file and reinstalls nothing that is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

APP = Path(__file__).resolve().parent
REPO = APP.parent
PTH_NAME = "ultrarefiner_main_env.pth"
LEGACY_PTH = ("ultrarefiner_ci_venv.pth",)  # written by earlier versions of .ci/run


def main_site_dirs() -> list[str]:
    """Site directories this interpreter reads, in its own order (``.pth`` files are processed in them)."""
    dirs = []
    for p in sys.path:
        if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p) and p not in dirs:
            dirs.append(p)
    return dirs


def check_main_environment() -> None:
    """The app's own dependency check (``lib/environment.py``), run on this interpreter."""
    spec = importlib.util.spec_from_file_location("ultrarefiner_app_environment", APP / "lib" / "environment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = module.missing_modules()
    if missing:
        sys.exit(f"{sys.executable} lacks {', '.join(missing)}: run `pip install -r requirements.txt && pip install "
                 f"-e .` in {REPO} with it first (it is the environment the MONAI Label one will read)")


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str]) -> str:
    print("+", shlex.join(cmd), flush=True)
    res = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    if res.returncode != 0:
        sys.exit(f"failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout[-4000:]}")
    return res.stdout


def setup(path: Path, install: bool = True) -> Path:
    """Creates (or updates) the environment at ``path``; returns its Python."""
    if Path(sys.prefix).resolve() == path.resolve():
        sys.exit(f"run this with the main environment's Python, not with {path}'s own")
    check_main_environment()
    sites = main_site_dirs()
    if not sites:
        sys.exit(f"{sys.executable} reads no site-packages directory: nothing for the MONAI Label environment to use")
    if not (path / "pyvenv.cfg").is_file():
        venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(path)  # as `python -m venv` does
    (path / ".gitignore").write_text("*\n", encoding="utf-8")
    python = venv_python(path)
    own_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    for name in LEGACY_PTH:
        (own_site / name).unlink(missing_ok=True)
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in sites)
    (own_site / PTH_NAME).write_text(lines, encoding="utf-8")
    print(f"{own_site / PTH_NAME}: reads {', '.join(sites)}", flush=True)
    run([str(python), "-c", "import torch, monai, timm, segment_anything, ultrarefiner.zoo.serving"])
    if install:
        run([str(python), "-m", "pip", "install", "-r", str(APP / "requirements.txt")])
        run([str(python), "-c", "import monailabel, torch, ultrarefiner.zoo.serving"])
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(REPO / ".venv-monailabel"), help="where (default: .venv-monailabel)")
    parser.add_argument("--no-install", action="store_true", help="create and link it, skip installing MONAI Label")
    args = parser.parse_args(argv)
    python = setup(Path(args.venv).resolve(), install=not args.no_install)
    print(f"ready: {python} -m monailabel.main start_server --app {APP} --studies /path/to/pngs")


if __name__ == "__main__":
    main()
