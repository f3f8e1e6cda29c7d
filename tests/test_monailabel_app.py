"""MONAI Label app (``monailabel_app/``): serving helpers in-process, then a real server on loopback.

The server runs in MONAI Label's own virtual environment (``.venv-monailabel``, made by ``.ci/run``; MONAI Label pins
numpy < 2 and pydicom < 3). Without it the server tests skip locally and fail in CI. Weights are tiny and made
here (TransUNet 32x32 with one ViT block, a tiny SAM); the TransUNet head bias is set so that the predicted lesion
covers about half of these images, so every mask checked is the network's real, non-trivial output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
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
TINY_ULTRA = {**TINY_TRANSUNET, "sam_kwargs": {"model_type": "tiny", **TINY_SAM}}
SERVER_START_S = 120
REQUEST_S = 180


def ultrarefiner_configured() -> bool:
    return (REPO / "bundles" / "ultrarefiner" / "configs" / "inference.json").is_file()


def busi_files() -> list[tuple[Path, Path]]:
    busi = busi_root() / "Dataset_BUSI_with_GT"  # skips without the real data ($ULTRAREFINER_BUSI_ROOT)
    return [(busi / c / f"{n}.png", busi / c / f"{n}_mask.png") for c, n in STUDIES]


def centre_transunet(net: torch.nn.Module, images: list[Path]) -> None:
    """Shifts the lesion logit of a random TransUNet so its decision is centred on ``images`` (median margin 0)."""
    from ultrarefiner.data.pipeline import get_transforms

    tf = get_transforms("transunet", train=False, keys=["image"], img_size=net.img_size)
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
    for prompts in ({"label": label}, {"box": box, "background": [[5.0, 5.0]]}):
        mask, info = predictor.predict(image, **prompts)
        assert_mask(mask, image)
        assert np.isfinite(info["iou_prediction"])
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


def test_interactive_predictor_from_sam_refiner_bundle_config(tmp_path):
    from ultrarefiner.zoo.serving import InteractivePredictor

    bundle = REPO / "bundles" / "sam_refiner"
    if not (bundle / "configs" / "inference.json").is_file():
        pytest.skip("bundles/sam_refiner/configs/inference.json does not exist yet")
    (image, _), *_ = busi_files()
    tiny = {"sam_def": f"$ultrarefiner.networks.build_tiny_sam(img_size={TINY_SAM['img_size']}, seed=0)"}
    predictor = InteractivePredictor(bundle, save_tiny_sam(tmp_path / "sam.pt"), tiny)
    assert predictor.config_file is not None
    mask, _ = predictor.predict(image, foreground=[[300.0, 200.0]], box=[250.0, 150.0, 350.0, 250.0])
    assert_mask(mask, image)


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


# ------------------------------------------------------------------------------------------- real server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.info: dict = {}
        self.started_s = 0.0
        self.files: list[tuple[Path, Path]] = []
        self.tmp = self.tu = Path()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.is_file() else ""

    def request(self, method: str, path: str, query: dict | None = None, fields: dict | None = None,
                files: dict | None = None, json_body: dict | None = None) -> tuple[int, bytes, str]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers, body = {}, None
        if json_body is not None:
            body, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        elif fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            parts = []
            for k, v in (fields or {}).items():
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
            for k, p in (files or {}).items():
                head = f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{Path(p).name}"\r\n'
                parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + Path(p).read_bytes() + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not VENV_PYTHON.is_file():
        reason = f"MONAI Label environment {VENV_PYTHON.parent.parent} not found: .ci/run creates it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    files = busi_files()
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    studies.mkdir()
    for image, _ in files:
        shutil.copy(image, studies / image.name)
    app = tmp / "app"  # the server writes model/, logs/ and bin/ into its app folder
    shutil.copytree(REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs"))
    tu = save_tiny_transunet(tmp / "transunet.pt", [i for i, _ in files])
    sam = save_tiny_sam(tmp / "sam.pt")
    if ultrarefiner_configured():
        conf_ultra = {"ultrarefiner_checkpoint": str(save_tiny_ultrarefiner(tmp / "ultra.pt", [i for i, _ in files])),
                      "ultrarefiner_overrides": json.dumps(TINY_ULTRA)}
    else:
        conf_ultra = {}
    port = _free_port()
    conf = {
        "bundles": str(REPO / "bundles"),
        "transunet_checkpoint": str(tu),
        "transunet_overrides": json.dumps(TINY_TRANSUNET),
        "sam_refiner_checkpoint": str(sam),
        "sam_refiner_network": "direct",  # the bundle path is covered in-process
        "sam_refiner_model_type": "tiny",
        "sam_refiner_overrides": json.dumps(TINY_SAM),
        **conf_ultra,
    }
    cmd = [str(VENV_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
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
        srv.files, srv.tmp, srv.tu = files, tmp, tu
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _mask_from(status: int, body: bytes, srv: Server) -> np.ndarray:
    assert status == 200, f"HTTP {status}: {body[:2000]!r}\n{srv.log_tail()}"
    path = srv.tmp / f"result_{uuid.uuid4().hex}.png"
    path.write_bytes(body)
    return np.asarray(Image.open(path))


def test_info_lists_models_and_trainers(server):
    info = server.info
    assert {"transunet", "sam_refiner"} <= set(info["models"])
    # activates when its inference config exists
    assert ("ultrarefiner" in info["models"]) == ultrarefiner_configured()
    assert info["models"]["transunet"]["type"] == "segmentation"
    assert info["models"]["sam_refiner"]["type"] == "deepgrow"
    assert info["models"]["transunet"]["dimension"] == 2
    assert "transunet" in info["trainers"]
    assert info["datastore"]["total"] == len(STUDIES)
    assert server.started_s < SERVER_START_S


def test_infer_transunet(server):
    image = server.files[0][0]
    status, body, _ = server.request("POST", "/infer/transunet", {"image": image.stem, "output": "image"},
                                     fields={"params": "{}"})
    assert_mask(_mask_from(status, body, server), image)


def test_infer_sam_refiner_with_clicks_box_and_label(server):
    image, label_file = server.files[1]
    label = np.asarray(Image.open(label_file).convert("L")) > 0
    ys, xs = np.nonzero(label)
    params = {"foreground": [[int(xs.mean()), int(ys.mean())]], "background": [[2, 2]],
              "roi": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]}
    status, body, _ = server.request("POST", "/infer/sam_refiner", {"image": image.stem, "output": "image"},
                                     fields={"params": json.dumps(params)}, files={"label": label_file})
    assert_mask(_mask_from(status, body, server), image)
    status, body, _ = server.request("POST", "/infer/sam_refiner", {"image": image.stem, "output": "json"},
                                     fields={"params": json.dumps({"foreground": [[2, 2]]})})
    assert status == 200 and json.loads(body)["label_prompt"] is False
    status, body, _ = server.request("POST", "/infer/sam_refiner", {"image": image.stem, "output": "image"},
                                     fields={"params": "{}"})
    assert status >= 400  # no prompt at all


def test_infer_ultrarefiner(server):
    if not ultrarefiner_configured():
        pytest.skip("bundles/ultrarefiner/configs/inference.json does not exist yet")
    assert server.info["models"]["ultrarefiner"]["config"]["output_name"] == ["refined", "coarse"]
    image = server.files[2][0]
    for name in ("refined", "coarse"):
        status, body, _ = server.request("POST", "/infer/ultrarefiner", {"image": image.stem, "output": "image"},
                                         fields={"params": json.dumps({"output_name": name})})
        assert_mask(_mask_from(status, body, server), image)


def test_train_transunet_then_serve_new_weights(server):
    for image, mask in server.files:
        status, body, _ = server.request("PUT", "/datastore/label", {"image": image.stem, "tag": "final"},
                                         files={"label": mask})
        assert status == 200, body
    before = server.tu.stat().st_mtime_ns
    params = {"max_epochs": 1, "batch_size": 2, "num_workers": 0, "cache": "none", "epoch_length": 2}
    status, body, _ = server.request("POST", "/train/transunet", {"run_sync": "true"}, json_body=params)
    assert status == 200, f"{body[:3000]!r}\n{server.log_tail()}"
    summary = json.loads(body)
    assert summary["returncode"] == 0 and summary["images"] == len(STUDIES) and summary["model_written"]
    assert server.tu.stat().st_mtime_ns != before  # the served checkpoint was replaced
    image = server.files[0][0]
    status, body, _ = server.request("POST", "/infer/transunet", {"image": image.stem, "output": "image"},
                                     fields={"params": "{}"})
    mask = _mask_from(status, body, server)
    assert mask.shape == Image.open(image).size[::-1] and mask.dtype == np.uint8
