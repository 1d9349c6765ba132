"""bench/finetune.py end to end at a toy size, so that the fine-tuning demonstration cannot rot: it
pre-trains, fine-tunes clean and corrupted, samples, scores and writes its report."""
import json

import numpy as np
import pytest

from conftest import load_bench
from test_science import scipy_frechet, small_samplers

pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed (it is part of [test])")


@pytest.fixture(scope="module")
def bench():
    return load_bench("finetune")


def test_pipeline_writes_its_report(bench, tmp_path, monkeypatch):
    small_samplers(monkeypatch, bench.science)
    results = tmp_path / "results"
    argv = ["--quick", "--pretrain-steps", "2", "--steps", "4", "--images", "8", "--batch", "4", "--samples", "4", "--snapshot-samples", "2",
            "--threads", "1", "--work", str(tmp_path / "work"), "--results", str(results)]
    assert bench.main(argv) == 0
    saved = json.loads((results / "finetune-quick.json").read_text())
    assert [row["model"] for row in saved["rows"]] == ["foundation", "clean", "ambient", "held-out"]
    for row in saved["rows"]:
        assert -1 <= row["median"] <= row["p90"] <= 1 and 0 <= row["above_095"] <= 1
    # The held-out row recomputed independently: scipy's Fréchet distance of 4 held-out images to the
    # next 4, and each one's best pixel correlation with the 8 fine-tuning images.
    held_out = bench.science.held_out_images(tmp_path / "work" / "data", bench.science.GRID_IMAGES)[:8]
    training = bench.clean_images(8, bench.RESOLUTION, bench.FINETUNE_DATA_SEED)
    row = saved["rows"][-1]
    assert row["frechet_distance"] == pytest.approx(scipy_frechet(held_out[:4], held_out[4:]), rel=1e-6)
    centred = [x.reshape(len(x), -1).astype(np.float64) for x in (held_out[:4], training)]
    centred = [x - x.mean(1, keepdims=True) for x in centred]
    correlation = (centred[0] @ centred[1].T) / np.outer(*(np.linalg.norm(x, axis=1) for x in centred))
    assert row["median"] == pytest.approx(float(np.median(correlation.max(1))), rel=1e-9)
    # Snapshots every steps // 4 = 1 step, then the final network.
    assert all(sorted(map(int, by)) == [1, 2, 3, 4] for by in saved["by_step"].values())
    report = (results / "finetune-quick.md").read_text()
    assert "| clean fine-tune (p 0) |" in report and "| 3 |" in report
    assert (results / "finetune-quick-similarity.png").is_file() and (results / "finetune-quick-samples.png").is_file()
    assert bench.main(argv) == 0  # a re-run reuses the trained models


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--samples", "4", "--snapshot-samples", "8"])
