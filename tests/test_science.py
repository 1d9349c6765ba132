"""bench/science.py end to end at a toy size, so that the science benchmark cannot rot: it trains,
samples, scores and writes its report, table and sample grids."""
import json

import numpy as np
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def science():
    return load_bench("science")


def small_samplers(monkeypatch, science) -> None:
    """bench/science.py's pipelines at their smallest: one image in each run's own final grid (not
    scored) and 2 Heun steps in the scored samples (the samplers are tested in tests/test_sample.py);
    sampling was 40% of these tests' time."""
    monkeypatch.setattr(science, "RUN_GRID_IMAGES", 1)
    monkeypatch.setattr(science, "SAMPLER_STEPS", 2)


def test_quick_pipeline_writes_its_report(science, tmp_path, monkeypatch):
    small_samplers(monkeypatch, science)
    results = tmp_path / "results"
    argv = ["--quick", "--variants", "ambient", "--steps", "2", "--samples", "8", "--classifier-steps", "3",
            "--work", str(tmp_path / "work"), "--results", str(results)]
    assert science.main(argv) == 0
    report = (results / "science-quick.md").read_text()
    assert "| 0.8 | ambient |" in report and "Floor:" in report
    rows = json.loads((results / "science-quick.json").read_text())["rows"]
    # The recorded distance, recomputed from the saved samples and held-out images with scipy's sqrtm.
    (samples_file,) = (tmp_path / "work").rglob("science-samples-8-seed0.npy")
    samples = np.load(samples_file)
    held_out = science.held_out_images(tmp_path / "work" / "data", science.GRID_IMAGES)
    assert rows[0]["frechet_distance"] == pytest.approx(scipy_frechet(samples, held_out), rel=1e-6)
    palette = science.palette_fraction(samples)
    assert rows[0]["palette_fraction"] == pytest.approx(palette) and 0 <= palette <= 1
    assert (results / "science-quick-samples.png").is_file()
    # A re-run reuses the trained model instead of training again.
    assert science.main(argv) == 0


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the pixel features (values on [-1, 1], flattened) of two uint8 image sets."""
    linalg = pytest.importorskip("scipy.linalg", reason="scipy (part of [test]) recomputes the distance")
    x, y = (images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1 for images in (a, b))
    mu, nu = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu - nu) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_bad_arguments(science):
    with pytest.raises(SystemExit):
        science.main(["--variants", "nonsense"])
    with pytest.raises(SystemExit):
        science.main(["--p", "1.5"])


def test_memorization_reports_every_snapshot(science, tmp_path, monkeypatch):
    small_samplers(monkeypatch, science)
    results = tmp_path / "results"
    argv = ["--memorization", "--memorization-images", "16", "--memorization-steps", "4", "--memorization-samples", "4",
            "--work", str(tmp_path / "work"), "--results", str(results)]
    assert science.main(argv) == 0
    saved = json.loads((results / "science-memorization.json").read_text())
    assert set(saved["memorization"]) == {"clean (p 0)", "ambient (p 0.8)", "held-out clean images"}
    # Snapshots every steps // 4 = 1 step, then the final network: steps 1..4 for both models.
    for label in ("clean (p 0)", "ambient (p 0.8)"):
        by_step = saved["memorization_by_step"][label]
        assert sorted(map(int, by_step)) == [1, 2, 3, 4]
        assert by_step["4"] == saved["memorization"][label]
        assert all(-1 <= s <= 1 for values in by_step.values() for s in values)
    report = (results / "science-memorization.md").read_text()
    assert "| 3 |" in report and (results / "science-memorization-memorization.png").is_file()


def test_noisy_pipeline_writes_its_report(science, tmp_path, monkeypatch):
    """--noisy at a toy size: every row trains, samples and scores; the mixtures hold what they say.
    Then --edm2 on one row (--rows) in the same --work: the DDPM++ model and its scores are reused, and an EDM2
    network of about DDPM++'s parameter count trains with EDM2's recipe beside it, scored with the
    trainer's EMA and with the post-hoc EMA reconstructed from its profiles."""
    small_samplers(monkeypatch, science)
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--noisy", "--quick", "--steps", "2", "--samples", "8", "--classifier-steps", "3",
            "--work", str(work), "--results", str(results)]
    assert science.main(argv) == 0
    saved = json.loads((results / "science-noisy-quick.json").read_text())
    assert [row["model"] for row in saved["rows"]] == list(science.MIXTURE_ROWS)
    report = (results / "science-noisy-quick.md").read_text()
    assert "| 100% noisy, ambient | DDPM++ (1.41 M) | 4096 |" in report
    assert (results / "science-noisy-quick-samples.png").is_file()
    from ambient_fast.data.format import CorruptedDataset

    mixture = CorruptedDataset(science.mixture_set(work / "data", 0.1, 0.9, 0.0, 4096), verify=True)
    assert {k: mixture.meta.records[k] for k in ("clean", "noisy", "masked")} == {"clean": 410, "noisy": 3686, "masked": 0}

    row = "10% clean + 90% masked (p 0.8), ambient"
    assert list(science.MIXTURE_ROWS)[5] == row
    assert science.main([*argv, "--edm2", "--rows", "6"]) == 0
    edm2 = json.loads((results / "science-noisy-edm2-quick.json").read_text())["rows"]
    posthoc = f"EDM2, post-hoc EMA {science.POSTHOC_STD:g}"
    assert [(r["model"], r["network"]) for r in edm2] == [(row, "DDPM++"), (row, "EDM2"), (row, posthoc)]
    assert edm2[0] == next(r for r in saved["rows"] if r["model"] == row)  # reused, not retrained
    # The EDM2 run's recipe: EDM2's decay at its ImageNet-64 share of this run's 2 x 16 images.
    (run,) = work.glob("mixture-*-edm2-steps2-*")
    config = json.loads((run / "config.json").read_text())
    assert (config["arch"], config["model_channels"]) == ("edm2", 44)
    assert config["lr_decay_kimg"] == pytest.approx(2 * 16 / 1000 * 35000 / 524288)
    # Its size, counted on a network built here: within 5% of DDPM++'s recorded count.
    from ambient_fast.networks import EDM2Precond

    built = EDM2Precond(img_resolution=16, img_channels=6, ambient=True, model_channels=44, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[8])
    assert edm2[1]["parameters"] == edm2[2]["parameters"] == sum(p.numel() for p in built.parameters())
    assert abs(edm2[1]["parameters"] / edm2[0]["parameters"] - 1) < 0.05
    # The post-hoc row samples the reconstruction of that length; its distance, recomputed with scipy.
    from safetensors import safe_open

    reconstructed = run / f"posthoc-ema-{science.POSTHOC_STD:g}" / science.FINAL_NETWORK
    with safe_open(str(reconstructed), framework="pt") as file:
        assert f'"std": {science.POSTHOC_STD}' in "".join(file.metadata().values())
    samples = np.load(reconstructed.parent / "science-samples-8-seed0.npy")
    held_out = science.held_out_images(work / "data", science.GRID_IMAGES)
    assert edm2[2]["frechet_distance"] == pytest.approx(scipy_frechet(samples, held_out), rel=1e-6)
    report = (results / "science-noisy-edm2-quick.md").read_text()
    assert f"| {row} | {edm2[0]['frechet_distance']:.2f} / {edm2[0]['feature_frechet']:.1f} |" in report
    assert "- EDM2 scores lower than DDPM++ on" in report


def test_edm2_and_rows_belong_to_noisy(science):
    with pytest.raises(SystemExit):
        science.main(["--quick", "--edm2"])
    with pytest.raises(SystemExit):
        science.main(["--noisy", "--rows", "9"])


def test_annotation_reports_the_levels_prepare_annotate_found(science, tmp_path):
    """--annotation at a toy size: every poor image's sigma_min is the one `prepare annotate` wrote
    into its data set, and the table's medians and rank correlations are those of these levels
    (recomputed here, the correlation with scipy). The corruptions grow as their strengths say (the
    PSNR of each strength below the weaker one's)."""
    stats = pytest.importorskip("scipy.stats", reason="scipy (part of [test]) recomputes the rank correlation")
    from ambient_fast.data.format import CorruptedDataset

    n, work, results = 6, tmp_path / "work", tmp_path / "results"
    assert science.main(["--annotation", "--annotation-images", str(n), "--annotation-steps", "5",
                         "--annotation-seeds", "1", "--work", str(work), "--results", str(results)]) == 0
    saved = json.loads((results / "science-annotation.json").read_text())
    assert list(saved["sigma_min"]) == list(science.CORRUPTIONS)
    for kind, (_, strengths, _) in science.CORRUPTIONS.items():
        levels = np.array([np.inf if v is None else v for v in saved["sigma_min"][kind]["0"]])
        assert levels.shape == (4 * n,)
        (dest,) = work.glob(f"annotation/{kind.replace(' ', '-').replace(':', '')}-n{4 * n}-steps5-seed0")
        np.testing.assert_array_equal(CorruptedDataset(dest).records()["sigma_min"], levels[np.isfinite(levels)])
        rows = [row for row in saved["rows"] if row["kind"] == kind]
        assert [row["strength"] for row in rows] == ["none (control)", *strengths]
        for k, row in enumerate(rows):
            assert row["median"] == [pytest.approx(float(np.median(levels[k * n:(k + 1) * n])))]
        strength = np.repeat(np.arange(4), n)
        expected = stats.spearmanr(strength, np.where(np.isinf(levels), 1e9, levels)).statistic
        assert saved["rank_correlation"][kind] == [pytest.approx(expected)]
        psnrs = [row["psnr"] for row in rows[1:]]
        assert rows[0]["psnr"] is None and psnrs == sorted(psnrs, reverse=True) and psnrs[-1] < 30
    assert "| jpeg 4:4:4 | 10 |" in (results / "science-annotation.md").read_text()


def test_rank_correlation_against_scipy(science):
    """Spearman's with ties (a few strengths, levels on a grid) and inf, as scipy computes it."""
    stats = pytest.importorskip("scipy.stats", reason="scipy (part of [test]) is the reference")
    rng = np.random.default_rng(0)
    strength = np.repeat(np.arange(4), 25)
    levels = rng.choice([0.01, 0.3, 1.0, 2.2, np.inf], size=100) * (1 + (strength > 1))
    finite = np.where(np.isinf(levels), 1e9, levels)  # scipy ranks inf as the largest too; kept finite for clarity
    assert science.rank_correlation(strength, levels) == pytest.approx(stats.spearmanr(strength, finite).statistic)
    assert np.isnan(science.rank_correlation(strength, np.ones(100)))


def test_posterior_experiments_write_their_reports(science, tmp_path, monkeypatch):
    """--restoration and --completion at a toy size, with tiny random networks in place of the grid's
    trained ones (what is tested is the experiments' definitions, not the trainer's): every method
    and round is scored, and the recorded scores are those of the saved restorations and samples,
    recomputed here."""
    from ambient_fast.files.checkpoints import save_network
    from ambient_fast.networks import EDMPrecond

    from conftest import TINY_ARCHITECTURES
    from test_nn import randomize_

    work, results = tmp_path / "work", tmp_path / "results"
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = randomize_(EDMPrecond(img_resolution=16, img_channels=6, model_type=model_type,
                                **{**kwargs, "attn_resolutions": []}))
    ambient = work / "ambient" / "network-final.safetensors"
    ambient.parent.mkdir(parents=True)
    save_network(ambient, net, {"kind": "dust", "p": 0.8, "delta": 0.1, "shared_channels": True})
    monkeypatch.setattr(science, "train", lambda work, root, variant, p, settings: {"ambient": ambient}[variant.name])
    # 512 held-out images rather than 4,096: the scores' definitions, at a tenth of the cost.
    held_out_images = science.held_out_images
    monkeypatch.setattr(science, "held_out_images", lambda root, n: held_out_images(root, n)[:512])
    tiny = ["--quick", "--steps", "2", "--samples", "8", "--classifier-steps", "3", "--posterior-steps", "1",
            "--cg-iterations", "1", "--work", str(work), "--results", str(results)]
    assert science.main(["--restoration", "--restoration-images", "4", *tiny]) == 0
    saved = json.loads((results / "science-restoration-quick.json").read_text())
    assert [(r["problem"], r["method"]) for r in saved["rows"]][::3] == [
        ("masks", "observed pixels only"), ("masks", "posterior: Tweedie moments"), ("Gaussian CS", "posterior: DPS")]
    (one_step,) = work.glob("restoration-*-masks-one-step-*.npy")
    restored = np.load(one_step)
    held_out = science.held_out_images(work / "data", science.GRID_IMAGES)
    scorer = science.feature_scorer(work, 3)
    expected = science.FeatureScores(scorer, held_out[4:])(restored)
    assert {k: saved["rows"][1][k] for k in expected} == pytest.approx(expected)
    assert saved["rows"][1]["psnr"] == pytest.approx(science.psnr(restored, held_out[:4]).mean())

    # Without the clean model's row: its samples come from cached_samples, as the grid's do (test_quick_pipeline_...);
    # sampling it here took a third of this test's time.
    assert science.main(["--completion", "--completion-images", "16", "--round-steps", "1", "--rounds", "1",
                         "--no-clean-model", *tiny]) == 0
    saved = json.loads((results / "science-completion-quick.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["round 0", "round 1", "new clean images (floor)"]
    fresh = science.clean_images(8, science.RESOLUTION, science.FRESH_SEED)
    assert saved["rows"][2] == pytest.approx({**saved["rows"][2], **science.FeatureScores(scorer, held_out)(fresh)})
    (rounds,) = work.glob("completion-*")
    samples = np.load(rounds / "round-1" / "samples.npy")
    assert saved["rows"][1] == pytest.approx({**saved["rows"][1], **science.FeatureScores(scorer, held_out)(samples)})
    assert "| round 1 |" in (results / "science-completion-quick.md").read_text()
