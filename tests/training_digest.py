"""Train a tiny run through `Trainer.train()` and print a digest of everything it ends with: the
weights, the EMA, the optimizer's state, the counters and the stats lines (without their times).

Run in a fresh process at one thread count (`python tests/training_digest.py CASE WORKDIR`): the
thread count, and an allocator's history, can change a CPU reduction's last bits. tests/test_train.py
compares the digests with the ones this script printed for the code before the step stopped reading
the device (recorded there), so a change to the step, the loop, the objective or the roll-back that
moves a single bit shows.

Cases: plain (the built-in synthetic set, two micro-batches a step, dropout, x-flips, the unit
hidden-pixel weight); faults (plain with non-finite outputs injected: one skipped step, two in a row
that roll back to the last state, one more skipped after the roll-back); records (a mixture of masked
and noisy images: Tweedie targets, weights by the share of eligible images).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

# (step, roll-backs so far) at which the network's output is made non-finite.
POISONED = {"faults": {(2, 0), (6, 0), (7, 0), (9, 1)}, "late-faults": {(5, 0), (13, 0), (14, 0), (21, 1)}}
TINY = dict(steps=12, batch=4, batch_gpu=2, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
            dropout=0.1, xflip=True, hidden_weight="unit", snapshot_every=4, sample_count=4, sample_steps=2,
            bad_steps=2, max_rollbacks=1, seed=3)


class Poisoned:
    """The trainer's model, whose output is NaN at the (step, roll-backs) pairs given."""

    def __init__(self, trainer, model, at):
        self.trainer, self.model, self.at = trainer, model, at

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if (self.trainer.step, self.trainer.rollbacks) in self.at:
            out = out * float("nan")
        return out


def records_data(work: Path) -> str:
    """A mixture of masked images and noisy ones (noise level 0.2), 12 of each, 16x16."""
    from ambient_fast.prepare import main as prepare
    from ambient_fast.files.images import save_png

    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    parts = []
    for name, extra in (("masked", ["--corruption", "dust", "--p", "0.4"]),
                        ("noisy", ["--corruption", "none", "--noise", "0.2"])):
        source = work / f"src-{name}"
        source.mkdir()
        for index, image in enumerate(images[:12] if name == "masked" else images[12:]):
            save_png(image, source / f"{index:03d}.png")
        assert prepare(["--source", str(source), "--dest", str(work / name), *extra]) == 0
        parts.append(str(work / name))
    assert prepare(["mix", "--dest", str(work / "mix"), *parts]) == 0
    return str(work / "mix")


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, value in sorted(tensors.items()):
        h.update(name.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main(case: str, work: str) -> None:
    from ambient_fast.training.config import TrainConfig
    from ambient_fast.training.trainer import Trainer

    torch.set_num_threads(1)
    work = Path(work)
    os.environ["AMBIENT_FAST_CACHE"] = str(work / "cache")
    data = records_data(work) if case == "records" else None
    # 40 steps log every second step (Trainer.train): the roll-back of late-faults is seen a step late.
    tiny = TINY | (dict(steps=40, snapshot_every=8) if case == "late-faults" else {})
    trainer = Trainer(TrainConfig(out=str(work / "run"), data=data, **tiny))
    trainer.model = Poisoned(trainer, trainer.model, POISONED.get(case, set()))
    try:
        trainer.train()
    finally:
        trainer.close()
    optimizer = {f"{index}.{key}": value for index, state in trainer.optimizer.state_dict()["state"].items()
                 for key, value in state.items()}
    stats = [{key: value for key, value in json.loads(line).items() if key not in ("timestamp", "Timing/images_per_sec")}
             for line in (work / "run" / "stats.jsonl").read_text().splitlines()]
    print(json.dumps({"params": digest(trainer.params), "ema": digest(trainer.ema), "optimizer": digest(optimizer),
                      "counters": [trainer.step, trainer.images_seen, int(trainer.skipped), trainer.rollbacks,
                                   trainer.lr_factor],
                      "stats": hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
