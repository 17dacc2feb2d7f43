"""vitctl.train.report: the plain progress lines (driven by a fake clock, no waiting) and metrics.png."""

import json
import math

import numpy as np
import pytest

from vitctl.train.report import PlainProgress, plot


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def rec(step, **extra):
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_s": 500.0, **extra}


def test_plain_progress_every_n_seconds_of_its_clock():
    clock, lines = Clock(), []
    report = PlainProgress(total=10, every_s=30, write=lines.append, clock=clock)
    report(rec(1))  # the first step: always (compiling is over)
    clock.now += 10
    report(rec(2))  # 10 s later: not yet
    clock.now += 25
    report(rec(3, test_accuracy=0.5))  # 35 s after the last line
    clock.now += 29
    report(rec(4))
    clock.now += 1
    report(rec(5))
    report(rec(10))  # the last step: always
    assert [line.split("  ")[0] for line in lines] == ["step 1/10", "step 3/10", "step 5/10", "step 10/10"]
    assert lines[0] == "step 1/10  loss 1.0000  lr 1.00e-03  500 img/s"  # no rate yet, so no eta
    assert "test acc 0.5000" in lines[1] and lines[1].endswith("eta 2:02")  # 2 steps in 35 s, 7 left: 122.5 s
    assert lines[2].endswith("eta 1:21")  # 4 steps in 65 s, 5 left: 81.25 s
    assert lines[3].endswith("done")


def test_plain_progress_zero_seconds_is_every_record():
    clock, lines = Clock(), []
    report = PlainProgress(total=3, every_s=0, write=lines.append, clock=clock)
    for step in (1, 2, 3):
        report(rec(step))
    assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]


def test_plot_has_six_readable_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows = []
    for step in range(1, 21):
        r = {"step": step, "loss": 2.3 / step, "lr": 1e-3 * math.cos(step / 20), "grad_norm": 1.0 + step % 3, "images_per_s": 100.0}
        if step % 5 == 0:
            r.update(attn_logit_max=[step * 0.1, step * 0.2], attn_entropy=[2.0 - step * 0.01, 2.5], test_accuracy=step / 20)
        rows.append(r)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot(tmp_path)
    with Image.open(path) as im:
        image = np.asarray(im.convert("L"))
    height, width = image.shape
    assert width > 1.5 * height and height > 400  # 3 panels wide, 2 high, at a size that reads
    quarter = [image[:, i * width // 3 : (i + 1) * width // 3] for i in range(3)]
    assert all(q.std() > 0 for q in quarter)  # each column holds drawn panels
