"""MONAI Label app (``monailabel_app/``): serving helpers in-process, its set-up script, then a real server on loopback.

The server runs in MONAI Label's own virtual environment (``.venv-monailabel``, made by ``.ci/run`` with
``monailabel_app/setup_venv.py``, as the app's README tells users; MONAI Label pins numpy < 2 and pydicom < 3).
Without it the server tests skip locally and fail in CI. The server serves its defaults with no weights given: the
shipped refiner (``bundles/sam_refiner/models/model.pt``) and LiteMedSAM zero-shot, on real BUSI images. The
automatic models get tiny weights made here (TransUNet 32x32 with one ViT block; its head bias set so that the
predicted lesion covers about half of these images, so every mask checked is the network's real, non-trivial
output); TransUNet's appear only while the server runs, as a training run's would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import busi_root

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"
STUDIES = [("benign", "benign (1)"), ("benign", "benign (2)"), ("malignant", "malignant (1)")]
TINY_TRANSUNET = {"img_size": 32, "vit_depth": 1}
TINY_SAM = {"img_size": 256}
TINY_ULTRA = {**TINY_TRANSUNET, "sam_model_type": "tiny", **{f"sam_def#{k}": v for k, v in TINY_SAM.items()}}
SERVER_START_S = 300  # builds and warms up two LiteMedSAM refiners; 30-40 s on 2 busy CPU cores
REQUEST_S = 180
DEFAULT_MODELS = {"sam_refiner", "lite_medsam"}  # served with no weights given


def ultrarefiner_configured() -> bool:
    return (REPO / "bundles" / "ultrarefiner" / "configs" / "inference.json").is_file()


def busi_files() -> list[tuple[Path, Path]]:
    busi = busi_root() / "Dataset_BUSI_with_GT"  # skips without the real data ($ULTRAREFINER_BUSI_ROOT)
    return [(busi / c / f"{n}.png", busi / c / f"{n}_mask.png") for c, n in STUDIES]


def centre_transunet(net: torch.nn.Module, images: list[Path]) -> None:
    """Shifts the lesion logit of a random TransUNet so its decision is centred on ``images`` (median margin 0)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()  # the transunet bundle's inference preprocessing
    parser.read_config(str(REPO / "bundles" / "transunet" / "configs" / "inference.json"))
    parser["img_size"] = net.img_size
    tf = parser.get_parsed_content("preprocessing")
    x = torch.stack([tf({"image": str(p)})["image"].as_tensor() for p in images])
    with torch.no_grad():
        logits = net.eval()(x)
        net.segmentation_head[0].bias[1] -= (logits[:, 1] - logits[:, 0]).median()


def save_tiny_transunet(path: Path, images: list[Path]) -> Path:
    from ultrarefiner.networks import TransUNet

    torch.manual_seed(0)
    net = TransUNet(in_channels=1, num_classes=2, **TINY_TRANSUNET)
    centre_transunet(net, images)
    torch.save(net.state_dict(), path)
    return path


def save_tiny_ultrarefiner(path: Path, images: list[Path]) -> Path:
    """The ultrarefiner bundle's own network_def, tiny, TransUNet part centred as above."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "ultrarefiner"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **TINY_ULTRA})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    centre_transunet(net.transunet, images)
    torch.save(net.state_dict(), path)
    return path


def save_tiny_sam(path: Path) -> Path:
    from ultrarefiner.networks import build_tiny_sam

    torch.save(build_tiny_sam(seed=0, **TINY_SAM).state_dict(), path)
    return path


def assert_mask(mask: np.ndarray, image: Path) -> None:
    h, w = Image.open(image).size[::-1]
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert 0.0 < mask.mean() < 1.0, f"trivial mask (lesion fraction {mask.mean()})"


# ------------------------------------------------------------------------------------------- in-process helpers
def test_bundle_predictor_serves_transunet_inference_config(tmp_path):
    from ultrarefiner.zoo.serving import BundlePredictor

    (image, _), *_ = busi_files()
    ckpt = save_tiny_transunet(tmp_path / "tu.pt", [image])
    predictor = BundlePredictor(REPO / "bundles" / "transunet", ckpt, TINY_TRANSUNET, {"lesion": "{stem}_seg.png"})
    mask = predictor.predict(image)["lesion"]
    assert_mask(mask, image)
    missing = BundlePredictor(REPO / "bundles" / "transunet", tmp_path / "none.pt", TINY_TRANSUNET)
    assert not missing.is_ready()
    with pytest.raises(Exception, match="none.pt"):
        missing.predict(image)


def test_interactive_predictor_prompts(tmp_path):
    from ultrarefiner.networks.lite_medsam import packaged_lite_medsam_path
    from ultrarefiner.zoo.serving import InteractivePredictor, read_mask

    (image, label_file), *_ = busi_files()
    # the default interactive model: LiteMedSAM zero-shot, its packaged weights given as the checkpoint file
    predictor = InteractivePredictor(None, packaged_lite_medsam_path(), device="cpu")
    label = read_mask(label_file)
    ys, xs = np.nonzero(label)
    centre = [float(xs.mean()), float(ys.mean())]
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    # refusals come before the image is read and encoded: no encoding counted, nothing cached
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict(image, label=np.zeros_like(label))
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(image, foreground=[[10_000, 5]])
    assert predictor.encoder_calls == 0 and not predictor._embeddings
    for i, prompts in enumerate(({"label": label}, {"box": box, "background": [[5.0, 5.0]]})):
        mask, info = predictor.predict(image, **prompts)
        assert_mask(mask, image)
        assert np.isfinite(info["iou_prediction"])
        assert info["embedding_cached"] is (i > 0) and predictor.encoder_calls == 1
    mask, info = predictor.predict(image, foreground=[centre])  # a lone click: LiteMedSAM was trained on boxes
    assert mask.shape == label.shape and set(np.unique(mask)) <= {0, 1} and np.isfinite(info["iou_prediction"])
    mask, info = predictor.predict(image, box=box)  # a tight box is what LiteMedSAM was trained on
    dice = 2 * np.logical_and(mask > 0, label > 0).sum() / ((mask > 0).sum() + (label > 0).sum())
    assert dice > 0.7 and 0.5 < info["iou_prediction"] < 1.1
    assert len(predictor._embeddings) == 1  # clicks on one image reuse its embedding
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict(image)
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(image, foreground=[[10_000, 5]])
    with pytest.raises(ValueError, match="label has shape"):
        predictor.predict(image, label=label[:-1])



def test_label_prompt_is_read_as_the_train_task_reads_labels(tmp_path):
    """The uploaded label of the interactive task (``serving.read_mask``) is read by the package's rule, the one
    the train task reads the datastore's labels by (``LoadImageMaskd``): a mask drawn in an RGBA image's alpha channel
    (which the task read as lesion everywhere), a 0/1 or 16-bit label map, and MONAI Label's default upload, a 2D
    NIfTI written x first as 3D Slicer and ITK write it (which it could not read)."""
    import nibabel as nib

    from ultrarefiner.transforms.io import LoadImageMaskd
    from ultrarefiner.zoo.serving import read_mask

    h, w = 40, 56
    lesion = np.zeros((h, w), bool)
    lesion[8:30, 12:40] = True
    rgba = np.full((h, w, 4), 255, np.uint8)
    rgba[..., 3] = lesion * 255
    files = {"gray.png": lesion.astype(np.uint8) * 255, "index.png": lesion.astype(np.uint8),
             "wide.png": lesion.astype(np.uint16) * 1000, "drawn.png": rgba}
    for name, values in files.items():
        Image.fromarray(values).save(tmp_path / name)
    nib.save(nib.Nifti1Image(lesion.T.astype(np.uint8)[:, :, None], np.eye(4)), str(tmp_path / "slicer.nii.gz"))
    load = LoadImageMaskd("image", "label")  # the train task's bundles read labels with it
    for name in [*files, "slicer.nii.gz"]:
        mask = read_mask(tmp_path / name)
        assert mask.dtype == np.uint8 and np.array_equal(mask, lesion), name
        trained_on = load({"image": str(tmp_path / "gray.png"), "label": str(tmp_path / name)})["label"]
        assert np.array_equal(trained_on.numpy() > 127, lesion), name


def test_interactive_predictor_encodes_through_the_frozen_encoder():
    """On a CPU the interactive refiner encodes through the TorchScript-frozen LiteMedSAM encoder, traced by
    ``warm_up`` on the one input shape every image has (256x256), with the eager encoder's embeddings and masks."""
    from ultrarefiner.engines.inference.fast_inference import FrozenEncoder
    from ultrarefiner.networks.lite_medsam import packaged_lite_medsam_path
    from ultrarefiner.zoo.serving import InteractivePredictor, read_mask

    (image, label_file), *_ = busi_files()
    ys, xs = np.nonzero(read_mask(label_file))
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    fast = InteractivePredictor(None, packaged_lite_medsam_path(), device="cpu", optimize="jit_freeze")
    fast.warm_up()
    frozen = fast._encode
    assert isinstance(frozen, FrozenEncoder) and len(frozen.frozen) == 1
    eager = InteractivePredictor(None, packaged_lite_medsam_path(), device="cpu", optimize="none")
    (mask, info), (expected, expected_info) = fast.predict(image, box=box), eager.predict(image, box=box)
    assert fast._encode is frozen and len(frozen.frozen) == 1  # no second trace for a real image
    emb, ref = next(iter(fast._embeddings.values())), next(iter(eager._embeddings.values()))
    assert (emb - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (mask != expected).mean() < 1e-3 and abs(info["iou_prediction"] - expected_info["iou_prediction"]) < 1e-3

def test_interactive_predictor_serves_a_plain_sam_weights_file(tmp_path):
    from ultrarefiner.networks import build_tiny_sam
    from ultrarefiner.zoo.serving import InteractivePredictor

    (image, _), *_ = busi_files()
    predictor = InteractivePredictor(None, save_tiny_sam(tmp_path / "sam.pt"), {**TINY_SAM, "seed": 1},
                                     model_type="tiny")
    mask, _ = predictor.predict(image, foreground=[[300.0, 200.0]], box=[250.0, 150.0, 350.0, 250.0])
    assert_mask(mask, image)
    # the file's weights, not the (other-seed) random init of the model built around them
    saved = build_tiny_sam(seed=0, **TINY_SAM).state_dict()
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in predictor.refiner().sam.state_dict().items())


def test_training_datalist_groups_near_duplicates(tmp_path):
    from ultrarefiner.data.datalist import load_split
    from ultrarefiner.zoo.serving import write_training_datalist

    files = busi_files()
    items = [{"image": str(i), "label": str(m)} for i, m in files]
    twin = tmp_path / "copy_of_benign_1.png"
    shutil.copy(files[0][0], twin)
    items.append({"image": str(twin), "label": str(files[0][1])})
    path = write_training_datalist(items, tmp_path / "data", n_splits=5)
    data = json.loads(path.read_text())
    assert data["n_splits"] == 3  # 4 images, 3 groups
    by_image = {Path(d["image"]).name: d for d in data["training"]}
    assert by_image[twin.name]["group"] == by_image[files[0][0].name]["group"]
    assert by_image[twin.name]["fold"] == by_image[files[0][0].name]["fold"]
    assert len(load_split(path, 0, "train")) + len(load_split(path, 0, "val")) == 4
    with pytest.raises(ValueError, match="at least 2"):
        write_training_datalist(items[:1], tmp_path / "one")


# ------------------------------------------------------------------------------------------- set-up
@pytest.mark.slow  # a venv with pip (ensurepip) and torch imported in it: about a minute
def test_setup_venv_links_the_main_environment(tmp_path):
    """The README's set-up, run with this interpreter (a virtual environment in CI, like a user's activated one): the
    new environment reads torch and ultrarefiner from this one, so pip sees them there and installs no second copy."""
    venv = tmp_path / "venv-ml"
    res = subprocess.run([sys.executable, str(REPO / "monailabel_app" / "setup_venv.py"), "--venv", str(venv),
                          "--no-install"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    python = venv / "bin" / "python"
    code = "import json, sys, torch, ultrarefiner as u; print(json.dumps([torch.__file__, u.__file__, sys.prefix]))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    torch_file, ur_file, prefix = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(prefix) == venv.resolve()
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()  # this environment's torch, not the base's
    assert Path(ur_file).resolve().parent.parent == REPO
    pip = subprocess.run([str(python), "-m", "pip", "show", "torch"], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0 and f"Version: {torch.__version__.split('+')[0]}" in pip.stdout


# ------------------------------------------------------------------------------------------- real server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_form(url: str, fields: dict | None = None, files: dict | None = None) -> urllib.request.Request:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, p in (files or {}).items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{Path(p).name}"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + Path(p).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return urllib.request.Request(url, data=body, method="POST",
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.info: dict = {}
        self.started_s = 0.0
        self.files: list[tuple[Path, Path]] = []
        self.tmp = self.tu = self.tu_ready = Path()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.is_file() else ""

    def request(self, method: str, path: str, query: dict | None = None, fields: dict | None = None,
                files: dict | None = None, json_body: dict | None = None) -> tuple[int, bytes, str]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        if json_body is not None:
            req = urllib.request.Request(url, data=json.dumps(json_body).encode(), method=method,
                                         headers={"Content-Type": "application/json"})
        elif fields is not None or files is not None:
            req = _post_form(url, fields, files)
            req.method = method
        else:
            req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), ""

    def infer(self, model: str, image: str, params: dict | None = None, output: str = "json",
              files: dict | None = None) -> tuple[int, bytes]:
        status, body, _ = self.request("POST", f"/infer/{model}", {"image": image, "output": output},
                                       fields={"params": json.dumps(params or {})}, files=files)
        return status, body

    def info_now(self) -> dict:
        status, body, _ = self.request("GET", "/info/")
        assert status == 200, body
        return json.loads(body)


def _detail(status: int, body: bytes, expected_status: int, srv: Server) -> str:
    """The message of an error answer (FastAPI's {"detail": ...})."""
    assert status == expected_status, f"HTTP {status} (expected {expected_status}): {body[:2000]!r}\n{srv.log_tail()}"
    return json.loads(body)["detail"]


def _venv_python() -> Path:
    if not VENV_PYTHON.is_file():
        reason = f"MONAI Label environment {VENV_PYTHON.parent.parent} not found: monailabel_app/setup_venv.py " \
                 "(run by .ci/run) creates it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return VENV_PYTHON


def _copy_app(dest: Path) -> Path:
    """The app in a scratch folder: the server writes model/, logs/ and bin/ into its app folder."""
    shutil.copytree(REPO / "monailabel_app", dest, ignore=shutil.ignore_patterns("__pycache__", "model", "logs"))
    return dest


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = _venv_python()
    files = busi_files()
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    studies.mkdir()
    for image, _ in files:
        shutil.copy(image, studies / image.name)
    # two broken studies: a PNG cut short (the header reads, the pixels do not) and a file that is no image at all
    (studies / "truncated.png").write_bytes(files[0][0].read_bytes()[:3000])
    (studies / "garbage.png").write_bytes(b"not a png at all\n" * 10)
    app = _copy_app(tmp / "app")
    if ultrarefiner_configured():
        conf_ultra = {"ultrarefiner_checkpoint": str(save_tiny_ultrarefiner(tmp / "ultra.pt", [i for i, _ in files])),
                      "ultrarefiner_overrides": json.dumps(TINY_ULTRA)}
    else:
        conf_ultra = {}
    port = _free_port()
    # no weights given for the interactive models: the shipped refiner and LiteMedSAM zero-shot are the defaults.
    # TransUNet's weights file does not exist yet (a test writes it, as a training run would).
    conf = {
        "bundles": str(REPO / "bundles"),
        "transunet_checkpoint": str(tmp / "transunet.pt"),
        "transunet_overrides": json.dumps(TINY_TRANSUNET),
        **conf_ultra,
    }
    cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE",
           "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions")}
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    srv.started_s = time.time()
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                status, body, _ = srv.request("GET", "/info/")
                if status == 200:
                    srv.info = json.loads(body)
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not up after {SERVER_START_S} s:\n{srv.log_tail()}")
            time.sleep(1)
        srv.started_s = time.time() - srv.started_s
        srv.files, srv.tmp, srv.tu = files, tmp, tmp / "transunet.pt"
        srv.tu_ready = save_tiny_transunet(tmp / "transunet_tiny.pt", [i for i, _ in files])
        yield srv
    finally:
        _stop(proc)


def _mask_from(status: int, body: bytes, srv: Server) -> np.ndarray:
    assert status == 200, f"HTTP {status}: {body[:2000]!r}\n{srv.log_tail()}"
    path = srv.tmp / f"result_{uuid.uuid4().hex}.png"
    path.write_bytes(body)
    return np.asarray(Image.open(path))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def _gt(label_file: Path) -> tuple[np.ndarray, list[int]]:
    """The ground-truth mask and its box [x0, y0, x1, y1]."""
    label = np.asarray(Image.open(label_file).convert("L")) > 0
    ys, xs = np.nonzero(label)
    return label, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def test_info_lists_the_default_models(server):
    info = server.info
    assert DEFAULT_MODELS <= set(info["models"]), info["models"]
    for name in DEFAULT_MODELS:
        assert info["models"][name]["type"] == "deepgrow" and info["models"][name]["dimension"] == 2
    assert "bundles/sam_refiner/models/model.pt" in info["models"]["sam_refiner"]["description"]
    assert "transunet" not in info["models"]  # its weights do not exist: not listed
    # activates when its inference config exists
    assert ("ultrarefiner" in info["models"]) == ultrarefiner_configured()
    assert "transunet" in info["trainers"]
    assert info["datastore"]["total"] == len(STUDIES) + 2
    assert server.started_s < SERVER_START_S


def test_shipped_refiner_and_zero_shot_on_a_real_busi_image(server):
    image, label_file = server.files[1]
    label, box = _gt(label_file)
    for model in ("sam_refiner", "lite_medsam"):
        status, body = server.infer(model, image.stem, {"roi": box}, output="image")
        mask = _mask_from(status, body, server)
        assert_mask(mask, image)
        assert _dice(mask, label) > 0.8, (model, _dice(mask, label))
        # the same image again: its embedding comes from the cache (the encoder does not run again)
        status, body = server.infer(model, image.stem, {"roi": box})
        assert status == 200, body
        again = json.loads(body)
        assert again["embedding_cached"] is True and again["box"] == [float(v) for v in box]
    # clicks, box and the current label (uploaded) together; the label is SAM's mask prompt. It goes up as a 2D
    # NIfTI written x first, MONAI Label's default label format (3D Slicer's upload)
    import nibabel as nib

    ys, xs = np.nonzero(label)
    params = {"foreground": [[int(xs.mean()), int(ys.mean())]], "background": [[2, 2]], "roi": box}
    upload = server.tmp / f"{image.stem}_label.nii.gz"
    nib.save(nib.Nifti1Image(label.T.astype(np.uint8)[:, :, None], np.eye(4)), str(upload))
    for label_upload in (label_file, upload):
        status, body = server.infer("sam_refiner", image.stem, params, output="image", files={"label": label_upload})
        assert _dice(_mask_from(status, body, server), label) > 0.8, label_upload
    status, body = server.infer("sam_refiner", image.stem, {"foreground": [[2, 2]]})
    assert status == 200 and json.loads(body)["label_prompt"] is False


def test_bad_requests_get_4xx_naming_the_problem(server):
    image = server.files[0][0].stem
    roi = {"roi": [100, 100, 200, 200]}
    detail = _detail(*server.infer("sam_refiner", "no such image", roi), 404, server)
    assert "'no such image'" in detail and "datastore" in detail
    detail = _detail(*server.infer("no_such_model", image, roi), 404, server)
    assert "'no_such_model'" in detail and "sam_refiner" in detail  # and what is served
    detail = _detail(*server.infer("sam_refiner", "truncated", roi), 422, server)
    assert "truncated.png" in detail and "truncated" in detail.split(":", 1)[1]
    for model in ("sam_refiner", "lite_medsam"):
        detail = _detail(*server.infer(model, "garbage", roi), 422, server)
        assert "garbage.png" in detail and "unreadable image" in detail
    detail = _detail(*server.infer("sam_refiner", image, {}, files={"label": server.tmp / "studies" / "garbage.png"}),
                     422, server)
    assert detail.startswith("label:")
    detail = _detail(*server.infer("sam_refiner", image, {"roi": "[1, 2"}), 400, server)
    assert detail.startswith("roi:")
    # an automatic model whose weights do not exist: not served, and the answer says which file is missing
    detail = _detail(*server.infer("transunet", image), 404, server)
    assert str(server.tu) in detail and "transunet_checkpoint" in detail


def test_refusals_come_before_the_image_is_encoded(server):
    """A prompt-less request, or a click outside the image, is refused without encoding the image: the next
    request on that image is the first to encode it (encoder_calls counts encodings, embedding_cached says so)."""
    status, body = server.infer("sam_refiner", server.files[0][0].stem, {"roi": [100, 100, 200, 200]})
    assert status == 200, body
    calls = json.loads(body)["encoder_calls"]
    fresh = server.files[2][0].stem  # no other test sends this image to sam_refiner
    detail = _detail(*server.infer("sam_refiner", fresh, {}), 400, server)
    assert detail.startswith("no prompt")
    detail = _detail(*server.infer("sam_refiner", fresh, {"foreground": [[10_000, 3]]}), 400, server)
    assert "outside" in detail
    status, body = server.infer("sam_refiner", fresh, {"roi": [100, 100, 200, 200]})
    assert status == 200, body
    result = json.loads(body)
    assert result["embedding_cached"] is False and result["encoder_calls"] == calls + 1
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, server.log_tail()  # refusals are answers, not server errors


def test_transunet_served_once_its_weights_exist(server):
    """Weights written after the start (a training run's, or copied in) are served at once and listed."""
    shutil.copy(server.tu_ready, server.tu)
    info = server.info_now()
    assert info["models"]["transunet"]["type"] == "segmentation"
    image = server.files[0][0]
    status, body = server.infer("transunet", image.stem, output="image")
    assert_mask(_mask_from(status, body, server), image)


def test_infer_ultrarefiner(server):
    if not ultrarefiner_configured():
        pytest.skip("bundles/ultrarefiner/configs/inference.json does not exist yet")
    assert server.info["models"]["ultrarefiner"]["config"]["output_name"] == ["refined", "coarse"]
    image = server.files[2][0]
    for name in ("refined", "coarse"):
        status, body = server.infer("ultrarefiner", image.stem, {"output_name": name}, output="image")
        assert_mask(_mask_from(status, body, server), image)
    detail = _detail(*server.infer("ultrarefiner", image.stem, {"output_name": "nope"}), 400, server)
    assert "'nope'" in detail and "refined" in detail


def test_train_transunet_then_serve_new_weights(server):
    """Training reads the datastore's own files by the package's rules: the first label is saved as annotation tools
    draw it, white on a transparent background (the raw ``PILReader`` gave it 4 channels, and training failed)."""
    for n, (image, mask) in enumerate(server.files):
        if n == 0:
            drawn = np.asarray(Image.open(mask).convert("L")) > 127
            rgba = np.full(drawn.shape + (4,), 255, np.uint8)
            rgba[..., 3] = drawn * 255
            mask = server.tmp / f"{image.stem}_drawn.png"
            Image.fromarray(rgba).save(mask)
        status, body, _ = server.request("PUT", "/datastore/label", {"image": image.stem, "tag": "final"},
                                         files={"label": mask})
        assert status == 200, body
    if not server.tu.is_file():  # run alone: training writes the weights file itself
        shutil.copy(server.tu_ready, server.tu)
    before = server.tu.stat().st_mtime_ns
    params = {"max_epochs": 1, "batch_size": 2, "num_workers": 0, "cache": "none", "epoch_length": 2}
    status, body, _ = server.request("POST", "/train/transunet", {"run_sync": "true"}, json_body=params)
    assert status == 200, f"{body[:3000]!r}\n{server.log_tail()}"
    summary = json.loads(body)
    assert summary["returncode"] == 0 and summary["images"] == len(STUDIES) and summary["model_written"]
    assert server.tu.stat().st_mtime_ns != before  # the served checkpoint was replaced
    image = server.files[0][0]
    status, body = server.infer("transunet", image.stem, output="image")
    mask = _mask_from(status, body, server)
    assert mask.shape == Image.open(image).size[::-1] and mask.dtype == np.uint8


def test_missing_package_is_named_at_start(tmp_path):
    """A main environment without timm: the server stops at start with the package and the pip command, instead of
    answering later with ``module 'ultrarefiner' has no attribute 'networks'``."""
    python = _venv_python()
    studies = tmp_path / "studies"
    studies.mkdir()
    app = _copy_app(tmp_path / "app")
    # sys.modules[name] = None is how Python marks a module as not importable; the rest is the real server start
    code = ("import runpy, sys; sys.modules['timm'] = None; sys.argv = ['monailabel'] + sys.argv[1:]; "
            "runpy.run_module('monailabel.main', run_name='__main__')")
    cmd = [str(python), "-c", code, "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(_free_port())]
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=SERVER_START_S)
    finally:
        _stop(proc)
    assert proc.returncode != 0, out[-3000:]
    assert "timm: pip install 'timm" in out, out[-3000:]
    assert "has no attribute" not in out
