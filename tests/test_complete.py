"""Completion rounds (python -m ambient_fast.complete) end to end on the built-in synthetic set, with a
crash injected in a completion and a SIGTERM in a training run, each resumed: the result is that of an
uninterrupted run, bit for bit."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ambient_fast.complete import main as complete_main
from ambient_fast.files.checkpoints import save_network
from ambient_fast.networks import EDMPrecond
from ambient_fast.training.completion import CompletionRounds, WarmStartTrainer
from ambient_fast.training.config import EXIT_INTERRUPTED
from ambient_fast.training.trainer import SYNTHETIC_P

from conftest import TINY_ARCHITECTURES
from test_nn import randomize_

# Two rounds on the first 24 images; 2 Euler steps of posterior sampling; 3 training steps of batch 8.
SMALL = ["--rounds", "2", "--max-images", "24", "--sampling-steps", "2", "--solver", "euler", "--sampling-batch", "8",
         "--samples", "8", "--steps", "3", "--batch", "8"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny ambient network (random weights: the rounds' mechanics do not need a good one) recorded
    as trained on the built-in set, and that set prepared in a cache of the test's own."""
    root = tmp_path_factory.mktemp("complete")
    mp = pytest.MonkeyPatch()
    mp.setenv("AMBIENT_FAST_CACHE", str(root / "cache"))
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = randomize_(EDMPrecond(img_resolution=16, img_channels=6, model_type=model_type, **{**kwargs,
                                                                                          "attn_resolutions": []}))
    path = root / "ambient.safetensors"
    save_network(path, net, {"kind": "dust", "p": SYNTHETIC_P, "delta": 0.1, "shared_channels": True})
    yield path
    mp.undo()


class CrashAfterFirstBatch(CompletionRounds):
    """Round 1's completion fails after its first batch is written (before the second's)."""

    def after_chunk(self, chunk_start):
        if chunk_start == 8 and not (self.out / "round-1" / "completed").exists():
            raise RuntimeError("injected crash")


@pytest.fixture(scope="module")
def reference(start, tmp_path_factory):
    """An uninterrupted run of SMALL (about 10 s on a quiet 2-core machine: two rounds, each a
    completion, a 3-step training with its snapshots and a record), shared by the tests below."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert complete_main(["--net", str(start), "--out", str(out), *SMALL]) == 0
    return out


def test_rounds_resume_after_a_crash_and_a_sigterm(start, reference, tmp_path, monkeypatch, capsys):
    rounds = json.loads((reference / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["frechet_distance"] > 0 and 0 <= r["palette_fraction"] <= 1 for r in rounds)
    assert rounds[1]["completion_images_per_second"] > 0 and (reference / "round-2" / "samples.png").is_file()
    interrupted = tmp_path / "interrupted"

    # A crash in round 1's completion: the first batch stays, the second is lost.
    with pytest.raises(RuntimeError, match="injected crash"):
        complete_main(["--net", str(start), "--out", str(interrupted), *SMALL], rounds_cls=CrashAfterFirstBatch)
    assert [p.name for p in (interrupted / "round-1" / "completion").iterdir()] == ["chunk-000000000.npy"]

    # A SIGTERM in round 2's training, after its second step: the trainer saves its state and stops.
    original = WarmStartTrainer.train_step

    def train_step(self):
        loss = original(self)
        if self.step == 2 and "round-2" in str(self.run_dir) and not (self.run_dir / "training-state-000000002").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(WarmStartTrainer, "train_step", train_step)
    capsys.readouterr()
    assert complete_main(["--out", str(interrupted), "--resume"]) == EXIT_INTERRUPTED
    assert "round 2: training interrupted at step 2 of 3" in capsys.readouterr().out
    assert not (interrupted / "round-2" / "run" / "network-final.safetensors").exists()
    assert complete_main(["--out", str(interrupted), "--resume"]) == 0

    for k in (1, 2):
        completed = [np.load(root / f"round-{k}" / "completed" / "observed.npy") for root in (reference, interrupted)]
        np.testing.assert_array_equal(*completed)
        networks = [load_file(root / f"round-{k}" / "run" / "network-final.safetensors") for root in (reference, interrupted)]
        assert all(torch.equal(networks[0][name], networks[1][name]) for name in networks[0])
    assert json.loads((interrupted / "rounds.json").read_text())[2]["frechet_distance"] == rounds[2]["frechet_distance"]


def test_completions_keep_the_observed_pixels(reference):
    """Every observed value of the training set is in the completed set as stored; nothing is hidden."""
    from ambient_fast.data.format import CorruptedDataset
    from ambient_fast.data.synthetic import synthetic_dataset
    from ambient_fast.training.trainer import synthetic_root

    data = CorruptedDataset(synthetic_dataset(synthetic_root(), p=SYNTHETIC_P, delta=0.1))
    observed, masks, _ = data.get(np.arange(24))
    completed = CorruptedDataset(reference / "round-1" / "completed", verify=True)
    images, full, _ = completed.get(np.arange(24))
    assert full.all() and completed.corruption["kind"] == "none"
    np.testing.assert_array_equal(images[masks], observed[masks])
    assert (images[~masks] != 0).mean() > 0.5  # the missing pixels were filled in


def test_complete_refuses_bad_input(start, reference, tmp_path, capsys):
    assert complete_main(["--out", str(tmp_path / "x")]) == 1
    assert "--net is required" in capsys.readouterr().err
    assert complete_main(["--out", str(tmp_path / "x"), "--resume"]) == 1
    assert "complete.json not found" in capsys.readouterr().err
    assert complete_main(["--net", str(start), "--out", str(reference), *SMALL]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert complete_main(["--out", str(reference), "--resume", "--steps", "5"]) == 1
    assert "['steps']" in capsys.readouterr().err
    assert complete_main(["--net", str(start), "--out", str(tmp_path / "y"), "--max-images", "4", "--batch", "8"]) == 1
    assert "fewer than one --batch (8)" in capsys.readouterr().err
