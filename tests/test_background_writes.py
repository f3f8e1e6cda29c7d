"""``BackgroundWrites``: files written by threads while the next batch is predicted. Results come back in submission
order, the backlog is bounded, a failed write is raised (naming the file) and the writes after it still finish; in
``predict`` a failed write stops the run before predictions.json is written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultrarefiner.utils.background_writes import BackgroundWrites, default_writers
from ultrarefiner.utils.io import write_png


def test_results_in_order_bounded_backlog_and_threads_in_parallel():
    writes = BackgroundWrites(workers=2, backlog=1)
    gate, inside = threading.Event(), []

    def slow(i: int) -> int:
        inside.append(i)
        gate.wait(5)
        return i

    for i in range(4):
        writes.submit(slow, i)
    deadline = time.monotonic() + 5
    while len(inside) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(inside) == [0, 1]  # two threads run two writes at once
    gate.set()
    assert writes.wait() == [0, 1, 2]  # down to the backlog (1), oldest first
    assert len(writes) == 1
    assert writes.wait(0) == [3] and len(writes) == 0
    assert writes._pool is None  # wait(0) released the threads
    writes.submit(slow, 5)  # a new pool after wait(0)
    assert writes.wait(0) == [5]


def test_inline_mode_and_defaults():
    writes = BackgroundWrites(workers=0)
    where = []
    writes.submit(lambda: where.append(threading.current_thread()) or 7)
    assert where == [threading.current_thread()] and writes.wait(0) == [7]
    assert 1 <= default_writers() <= 8
    assert BackgroundWrites(workers=3).backlog == 6
    assert BackgroundWrites(workers=3, round_size=8).backlog == 16  # two batches in flight
    assert BackgroundWrites(workers=3, backlog=1, round_size=8).backlog == 1
    with pytest.raises(ValueError, match="workers must be >= 0"):
        BackgroundWrites(workers=-1)


def test_a_failed_write_is_raised_with_its_file_and_later_writes_finish(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    writes = BackgroundWrites(workers=2)
    image = np.zeros((4, 5), np.uint8)
    writes.submit(write_png, blocker / "a.png", image)
    writes.submit(write_png, tmp_path / "b.png", image)
    with pytest.raises(OSError) as e:
        writes.wait(0)
    assert str(blocker) in str(e.value)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), image)
    assert len(writes) == 0 and writes._pool is None


@pytest.fixture(scope="module")
def model():
    import torch
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    return build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()


def test_predict_stops_on_a_failed_write_without_a_report(model, tmp_path, monkeypatch):
    """A write that fails on a writer thread (disk full) stops ``run_inference`` with that OSError; predictions.json,
    which would list the missing file, is not written; the other files are whole PNGs."""
    from test_predict import _scene
    from test_ultrarefiner_inference import BUNDLE

    from conftest import save
    from ultrarefiner.data import image_writers
    from ultrarefiner.engines.inference import ultra_predict

    src = tmp_path / "in"
    for i in range(3):
        save(src / f"s{i}.png", _scene(seed=i))
    real = image_writers.write_atomically

    def full_disk(write, filename):
        if Path(filename).name == "s1.png" and Path(filename).parent.name == "overlays":
            raise OSError(28, "No space left on device", str(filename))
        real(write, filename)

    monkeypatch.setattr(image_writers, "write_atomically", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left") as e:
        ultra_predict.run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(src),
                                             "output_dir": str(out), "num_workers": 0, "optimize": "none",
                                             "writers": 2})
    assert e.value.filename == str(out / "overlays" / "s1.png")
    assert not (out / "predictions.json").exists()
    written = [p for p in out.rglob("*.png")]
    assert written and not (out / "overlays" / "s1.png").exists()
    for p in written:
        Image.open(p).load()  # whole files only
    assert not list(out.rglob("*.tmp"))


def test_predict_config_keeps_two_batches_of_writes_in_flight(model):
    """The bundle's ``writes``: three files per image (coarse, refined, overlay), two batches pending at most, so
    that a batch's writes run while the next batch is predicted."""
    from monai.bundle import ConfigParser
    from test_ultrarefiner_inference import BUNDLE

    from ultrarefiner.engines.inference.ultra_predict import PredictionReport

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "network": model, "device": "cpu", "batch_size": 8, "writers": 2})
    writes = parser.get_parsed_content("writes")
    assert (writes.workers, writes.backlog) == (2, 48)
    report = parser.get_parsed_content("report")
    assert isinstance(report, PredictionReport) and report.writes is writes
    assert all(w.keywords["writes"] is writes for w in (parser.get_parsed_content("png_writer"),
                                                         parser.get_parsed_content("nifti_writer")))
