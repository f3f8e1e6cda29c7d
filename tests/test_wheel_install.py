"""The package as users install it: built with ``python -m build``, installed from the wheel into a fresh virtual
environment without the repository, running an exported bundle.

``test_wheel_runs_the_exported_bundle_in_a_fresh_venv`` (slow, about 3-4 minutes on 2 cores, most of it pip):

1. ``python -m build`` writes the sdist and the wheel (the wheel built from the sdist); both pass ``twine check
   --strict``; the wheel carries the package data (demo configs, the metadata schema) and the licence.
2. ``bundles/sam_refiner`` is exported (it ships real weights, ``models/model.pt``, and needs no user file).
3. ``python -m venv`` makes a fresh environment (no system site-packages).
4. Disk is tight (the torch 2.14.1 CUDA build is about 5.5 GB), so torch, torchvision, triton and the CUDA stack
   (``nvidia-*``, ``cuda-*`` distributions) are NOT reinstalled: their top-level package folders and their
   ``.dist-info`` folders are symlinked from this environment's site-packages into the fresh one's, so pip sees them
   as installed and keeps them. Nothing else is linked: their pure-Python dependencies (sympy, networkx, jinja2,
   fsspec, ...) and everything else come from pip.
5. pip installs exactly the lines the Model Zoo's ``ci/get_bundle_requirements.py`` writes from the exported
   ``configs/metadata.json`` (``monai==``, ``torch==``, ``numpy==`` and ``name==version`` of
   ``required_packages_version``) plus the built wheel, which provides the listed ``ultrarefiner``.
6. ``python -m monai.bundle run --config_file configs/inference.json`` runs from the exported folder with the fresh
   environment's Python on a folder of phantom PNGs and their coarse masks (the ground truth dilated).
7. Each mask exists, has its image's size, is binary (0/255) and is a lesion: not empty, not the whole image, and
   overlapping the phantom's lesion (Dice > 0.5).

The fresh environment is removed at the end. Outside CI a missing ``build``/``twine`` skips the test; with
``CI=true`` it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DEV_TOOLS = {"pytest", "ruff", "build", "twine"}  # requirements.txt entries that are not runtime dependencies
LINKED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")  # reused, never reinstalled (disk)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def test_pyproject_dependencies_mirror_requirements_txt():
    """pyproject's ``dependencies`` plus its optional extras are requirements.txt minus the development tools, with
    the same ranges; torch keeps its cap (never a newer build than the machine's)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {canonicalize_name(r.name): r for r in map(Requirement, requirement_lines(REPO / "requirements.txt"))}
    runtime = {k: v for k, v in runtime.items() if k not in DEV_TOOLS}
    extras = [x for group in project.get("optional-dependencies", {}).values() for x in group]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, [*project["dependencies"], *extras])}
    assert sorted(declared) == sorted(runtime)
    for name, req in declared.items():
        assert req.specifier == runtime[name].specifier, (name, str(req.specifier), str(runtime[name].specifier))
    assert declared["torch"].specifier == Requirement("torch>=2.4,<=2.14.1").specifier
    assert declared["torchvision"].specifier.contains("0.29.1") and not declared["torchvision"].specifier.contains(
        "0.29.2")
    assert "torch" in {canonicalize_name(Requirement(x).name) for x in project["dependencies"]}
    texts = [project["description"], *project.get("urls", {}).values(), *(a["name"] for a in project["authors"])]
    for text in texts:  # no placeholder left in what PyPI shows
        assert not re.search(r"example\.com|todo|your[-_ ]?(org|name)|<[^>]*>", text, re.IGNORECASE), text
    assert project["license"] == "Apache-2.0" and (REPO / "LICENSE").is_file()


def _tool_or_fail(module: str) -> None:
    try:
        __import__(module)
    except ModuleNotFoundError:
        if IN_CI:
            pytest.fail(f"{module} is not installed (pip install {module}); required in CI")
        pytest.skip(f"{module} is not installed")


def _run(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert res.returncode == 0, f"{cmd[:6]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def link_torch_stack(site: Path) -> list[str]:
    """Symlink torch, torchvision, triton and the CUDA distributions (package folders + .dist-info) into ``site``."""
    here = Path(sysconfig.get_paths()["purelib"])
    linked = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if not LINKED.match(name) or Path(dist.locate_file("")) != here:
            continue
        # RECORD lists the package folders and the .dist-info folder; ".." entries are scripts outside site-packages
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in sorted(tops):
            src, dst = here / top, site / top
            if src.exists() and not dst.exists():  # nvidia/ is shared by the nvidia-* distributions
                dst.symlink_to(src, target_is_directory=src.is_dir())
        linked.append(name)
    return linked


def bundle_requirements(meta: dict) -> list[str]:
    """What the Zoo's ci/get_bundle_requirements.py writes (ALLOW_MONAI_RC unset)."""
    lines = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    return lines + [f"{k}=={v}" for k, v in meta["required_packages_version"].items()]


def write_inputs(root: Path, n: int = 3) -> tuple[Path, Path, dict[str, np.ndarray]]:
    from PIL import Image
    from scipy import ndimage

    from ultrarefiner.data.synthetic import make_phantom

    images, coarse = root / "images", root / "coarse"
    images.mkdir(parents=True)
    coarse.mkdir()
    truth = {}
    rng = np.random.default_rng(0)
    for i in range(n):
        image, masks = make_phantom(rng, "benign" if i % 2 else "malignant", size=(180 + 20 * i, 240))
        Image.fromarray(image).save(images / f"case{i}.png")
        Image.fromarray((ndimage.binary_dilation(masks[0], iterations=3) * 255).astype(np.uint8)).save(
            coarse / f"case{i}.png")
        truth[f"case{i}"] = masks[0]
    return images, coarse, truth


@pytest.mark.slow
def test_wheel_runs_the_exported_bundle_in_a_fresh_venv(tmp_path):
    _tool_or_fail("build")
    _tool_or_fail("twine")
    from PIL import Image

    from ultrarefiner.zoo.export import export_bundle

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], timeout=600)
    wheel, sdist = next(dist.glob("ultrarefiner-*.whl")), next(dist.glob("ultrarefiner-*.tar.gz"))
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], timeout=120)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    version = metadata.version("ultrarefiner")
    for rel in ("ultrarefiner/zoo/meta_schema_20240725.json", "ultrarefiner/demo_configs/transunet.json",
                "ultrarefiner/demo_configs/sam_refiner.json", "ultrarefiner/demo_configs/ultrarefiner.json",
                f"ultrarefiner-{version}.dist-info/licenses/LICENSE"):
        assert rel in names, rel

    bundle = export_bundle(REPO / "bundles" / "sam_refiner", tmp_path / "export", verify=False, make_zip=False).folder
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["required_packages_version"]["ultrarefiner"] == version  # the wheel is what the metadata lists

    venv = tmp_path / "venv"
    try:
        _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        py = venv / "bin" / "python"
        site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         timeout=60).stdout.strip())
        linked = link_torch_stack(site)
        assert {"torch", "torchvision"} <= set(linked), linked
        for line in bundle_requirements(meta):  # a mismatch would make pip download another (multi-GB) build
            req = Requirement(line)
            have = metadata.version(req.name) if canonicalize_name(req.name) in linked else None
            assert have is None or req.specifier.contains(have), f"{line}: this environment has {have}"
        reqs = tmp_path / f"requirements_{bundle.name}.txt"
        reqs.write_text("\n".join(bundle_requirements(meta)) + "\n", encoding="utf-8")
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]
        _run([*pip, "-r", str(reqs), str(wheel)], timeout=900)
        freeze = _run([str(py), "-m", "pip", "list", "--format=json"], timeout=120).stdout
        installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(freeze)}
        for line in bundle_requirements(meta):
            req = Requirement(line)
            assert req.specifier.contains(installed[canonicalize_name(req.name)], prereleases=True), line

        images, coarse, truth = write_inputs(tmp_path / "inputs")
        out = tmp_path / "pred"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(OMP_NUM_THREADS="2", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        where = _run([str(py), "-c", "import ultrarefiner; print(ultrarefiner.__file__)"], timeout=120,
                     cwd=bundle, env=env).stdout.strip()
        assert Path(where).is_relative_to(site), f"ultrarefiner imported from {where}, not the installed wheel"
        _run([str(py), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_dir",
              str(images), "--coarse_dir", str(coarse), "--output_dir", str(out)], timeout=600, cwd=bundle, env=env)
    finally:
        shutil.rmtree(venv, ignore_errors=True)

    for stem, lesion in truth.items():
        path = out / f"{stem}_seg.png"
        assert path.is_file(), sorted(p.name for p in out.rglob("*"))
        mask = np.asarray(Image.open(path))
        assert mask.shape == lesion.shape, (stem, mask.shape, lesion.shape)
        assert set(np.unique(mask)) <= {0, 255}, np.unique(mask)
        fg = mask > 0
        assert 0 < fg.sum() < fg.size, stem
        dice = 2 * (fg & lesion).sum() / (fg.sum() + lesion.sum())
        assert dice > 0.5, (stem, dice)
