"""bench/science.py end to end at a toy size, so that the science benchmark cannot rot: it trains,
samples, scores and writes its report, table and sample grids."""
import importlib.util
import json
from pathlib import Path

import pytest

SCIENCE = Path(__file__).resolve().parents[1] / "bench" / "science.py"


@pytest.fixture(scope="module")
def science():
    spec = importlib.util.spec_from_file_location("science", SCIENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_pipeline_writes_its_report(science, tmp_path):
    results = tmp_path / "results"
    argv = ["--quick", "--variants", "ambient", "--steps", "2", "--samples", "8", "--work", str(tmp_path / "work"),
            "--results", str(results)]
    assert science.main(argv) == 0
    report = (results / "science-quick.md").read_text()
    assert "| 0.8 | ambient |" in report and "Floor:" in report
    rows = json.loads((results / "science-quick.json").read_text())["rows"]
    assert rows[0]["frechet_distance"] > 0 and 0 <= rows[0]["palette_fraction"] <= 1
    assert (results / "science-quick-samples.png").is_file()
    # A re-run reuses the trained model instead of training again.
    assert science.main(argv) == 0


def test_bad_arguments(science):
    with pytest.raises(SystemExit):
        science.main(["--variants", "nonsense"])
    with pytest.raises(SystemExit):
        science.main(["--p", "1.5"])
