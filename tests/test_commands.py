"""Every command's command line: one typed config each (ambient_fast.options), fast --help that imports
nothing heavy, numbers checked at parse, one output guard, and the options that mean one thing."""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient_fast import convert, ema, evaluate, finetune, prepare, restore, sample, train
from ambient_fast.data.format import write_dataset
from ambient_fast.evaluation.metrics import frechet_distance, pixel_features
from ambient_fast.files.atomic import write_json
from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast.options import Options, default_help, flag_of, numeric_type
from ambient_fast.training.config import FinetuneConfig, TrainConfig
from ambient_fast.training.run_dir import RunDirectory

from test_data import DUST, random_set, write_pngs
from test_sample import small_model

ROOT = Path(__file__).resolve().parents[1]
CORRUPTION = dict(kind="dust", p=0.5, delta=0.1, shared_channels=True)

# name -> (main, parser, config class, the least command line that parses)
COMMANDS = {
    "train": (train.main, train.parser, TrainConfig, []),
    "finetune": (finetune.main, finetune.parser, FinetuneConfig, ["--unet", "unet", "--data", "data"]),
    "sample": (sample.main, sample.parser, sample.SampleConfig, ["--net", "net.safetensors"]),
    "restore": (restore.main, restore.parser, restore.RestoreConfig, ["--net", "net.safetensors", "--input", "data"]),
    "evaluate": (evaluate.main, evaluate.parser, evaluate.EvaluateConfig, ["--samples", "s", "--reference", "r"]),
    "convert": (convert.main, convert.parser, convert.ConvertConfig, ["run", "out.safetensors"]),
    "prepare": (prepare.main, prepare.parser, prepare.PrepareConfig, ["--source", "src", "--dest", "set", "--p", "0.5"]),
    "prepare mix": (prepare.main, lambda: prepare.parser("mix"), prepare.MixConfig, ["mix", "--dest", "set", "a"]),
    "prepare verify": (prepare.main, lambda: prepare.parser("verify"), prepare.VerifyConfig, ["verify", "set"]),
    "prepare latents": (prepare.main, lambda: prepare.parser("latents"), prepare.LatentsConfig,
                        ["latents", "--source", "src", "--dest", "set", "--autoencoder", "vae"]),
    "prepare crops": (prepare.main, lambda: prepare.parser("crops"), prepare.CropsConfig,
                      ["crops", "--source", "src", "--dest", "set", "--crop", "4"]),
    "prepare annotate": (prepare.main, lambda: prepare.parser("annotate"), prepare.AnnotateConfig,
                         ["annotate", "--clean", "good", "--poor", "poor", "--dest", "set"]),
    "ema": (ema.main, ema.parser, ema.EmaConfig, ["--run", "run", "--std", "0.1", "--out", "net.safetensors"]),
}


def run(main, *argv):
    """(exit status, stdout, stderr) of a command's main()."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, err, *words):
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert str(word) in err, (word, err)


def options_of(name):
    """The config fields that are options of the command (finetune leaves the architecture out)."""
    _, parser, config_cls, _ = COMMANDS[name]
    shown = {action.dest for action in parser()._actions}
    return config_cls, [field for field in dataclasses.fields(config_cls) if field.name in shown]


# ----------------------------------------------------------------------------------------------
# --help: fast, complete, light.

HELP_PROBE = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
    code = None
except SystemExit as exit:
    code = exit.code
print("\\n" + json.dumps(dict(code=code, modules=sorted(sys.modules))))
"""
HEAVY = ("torch", "triton", "nvidia.dali", "numpy", "ambient_fast.data", "ambient_fast.networks",
         "ambient_fast.kernels", "ambient_fast.sampling", "ambient_fast.objective")


@pytest.mark.parametrize("name", COMMANDS)
def test_help_exits_0_and_imports_nothing_heavy(name):
    module, *sub = name.split()
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, f"ambient_fast.{module}", *sub, "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    text, record = result.stdout, json.loads(result.stdout.splitlines()[-1])
    assert record["code"] == 0
    heavy = [m for m in record["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"--help imported {heavy[:8]}"
    assert "examples:" in text and f"python -m ambient_fast.{module}" in text.split("examples:")[1]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_declared_completely(name):
    """Help on every option; a default that reads as what it does (None needs its words); every
    number with a range; choices as a tuple."""
    config_cls, fields = options_of(name)
    assert issubclass(config_cls, Options)
    helps = {}
    for action in COMMANDS[name][1]()._actions:
        helps.setdefault(action.dest, action.help)  # --name before --no-name
    for field in fields:
        meta = field.metadata
        assert meta["help"] and helps[field.name].endswith(default_help(field)), field.name
        if field.default is None and not meta["required"]:
            assert meta["default_text"] or meta["per_device"], f"{field.name}: say what its default None means"
        if numeric_type(config_cls, field):
            assert meta["bounds"] is not None, f"{field.name}: every number has a range"
        assert meta["choices"] is None or isinstance(meta["choices"], tuple)


def outside(bounds, integer):
    """Values just outside `bounds`."""
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else (bounds.low - 1 if integer else math.nextafter(bounds.low, -math.inf)))
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else (bounds.high + 1 if integer else math.nextafter(bounds.high, math.inf)))
    return values


@pytest.mark.parametrize("name", COMMANDS)
def test_numbers_are_checked_at_parse(name, tmp_path, monkeypatch):
    """Every numeric option of every command refuses NaN, infinities and values just outside its
    range with one `error:` line naming it, before anything is written."""
    monkeypatch.chdir(tmp_path)
    main, _, _, least = COMMANDS[name]
    config_cls, fields = options_of(name)
    checked = 0
    for field in fields:
        kind = numeric_type(config_cls, field)
        if kind is None:
            continue
        bad = [*(["nan", "inf", "-inf"] if kind is float else ["nan", "1.5"]),
               *(repr(value) for value in outside(field.metadata["bounds"], kind is int))]
        for value in bad:
            code, _, err = run(main, *least, flag_of(field), value)
            one_line_error(code, err, flag_of(field))
            checked += 1
        # The same values through the config itself, as a saved config.json or code would give them.
        for value in [*([math.nan, math.inf] if kind is float else []), *outside(field.metadata["bounds"], kind is int)]:
            with pytest.raises(ValueError, match=flag_of(field)):
                config_cls(**{**{f.name: f.default for f in dataclasses.fields(config_cls)},
                              **_required_values(config_cls), field.name: value})
    assert list(tmp_path.iterdir()) == []
    assert checked or name in ("convert", "prepare mix", "prepare verify")  # no numeric options
    if name == "prepare mix":  # its numbers are the COUNTs of SET:COUNT
        for text in ("a:0", "a:-1", "a:nan", "a:inf", "a:1.5"):
            one_line_error(*run(main, "mix", "--dest", "set", text)[::2], text, "COUNT")


def _required_values(config_cls):
    numbers = {int: 1, float: 0.1}  # inside every required number's range (prepare crops --crop, ema --std)
    values = {f.name: "x.safetensors" if f.name == "out" else ["x"] if f.metadata.get("nargs") else
              numbers.get(numeric_type(config_cls, f), "x")
              for f in dataclasses.fields(config_cls) if f.metadata.get("required")}
    return {**values, "data": "x"} if config_cls is FinetuneConfig else values


def test_a_new_float_field_is_finite_without_saying_so():
    from ambient_fast.options import option

    @dataclasses.dataclass
    class Config(Options):
        level: float = option(1.0, "a level with no range given")

    assert Config(level=-3.0).level == -3.0
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="--level must be a finite number"):
            Config(level=value)


def test_usage_errors_are_one_line_with_status_1():
    for main, argv, word in ((sample.main, ["--net", "n", "--bogus"], "--bogus"),
                             (train.main, ["--steps", "ten"], "--steps"),
                             (prepare.main, ["--source", "s", "--dest", "d", "--corruption", "averaging"], "averaging"),
                             (sample.main, [], "--net is required")):
        one_line_error(*run(main, *argv)[::2], word)


# ----------------------------------------------------------------------------------------------
# One output guard.

def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A network, a data set, images, a report, and a run folder made by the run directory's own code."""
    monkeypatch.chdir(tmp_path)
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), CORRUPTION)
    observed, masks, _ = random_set(n=4, shape=(3, 8, 8))
    write_dataset(tmp_path / "data", observed, masks, DUST, source="test")
    write_pngs(tmp_path / "images", list(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)))
    np.save(tmp_path / "images.npy", np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    (tmp_path / "run").mkdir()
    RunDirectory(tmp_path / "run", resume=False, overwrite=False).close()
    write_json(tmp_path / "run" / "config.json", {"steps": 1})
    return tmp_path


def writers(world):
    """(name, main, command line without its output, how the output is given, kind of output)."""
    net, data, images, npy = world / "net.safetensors", world / "data", world / "images", world / "images.npy"
    return [
        ("train", train.main, ["--data", data, "--steps", "1"], lambda o: ["--out", o], "folder"),
        ("finetune", finetune.main, ["--unet", world / "unet", "--data", data], lambda o: ["--out", o], "folder"),
        ("sample", sample.main, ["--net", net, "--seeds", "0", "--steps", "1"], lambda o: ["--out", o], "folder"),
        ("restore", restore.main, ["--net", net, "--input", data], lambda o: ["--out", o], "folder"),
        ("evaluate", evaluate.main, ["--samples", npy, "--reference", npy], lambda o: ["--out", o], "file"),
        ("convert", convert.main, [net], lambda o: [o], "file"),
        ("prepare", prepare.main, ["--source", images, "--p", "0.5"], lambda o: ["--dest", o], "folder"),
        ("prepare mix", prepare.main, ["mix", data], lambda o: ["--dest", o], "folder"),
    ]


def test_no_command_changes_what_it_did_not_make(world):
    """Each writing command, pointed at an occupied output, inside a data set, inside a run, or at
    its own input, refuses with one line and changes no file (hashes before and after); with
    --overwrite it still refuses a folder holding what it does not make."""
    occupied = world / "occupied"
    occupied.mkdir()
    (occupied / "000000.png").write_bytes(b"a file of someone else")
    (occupied / "config.json").write_text("{}")
    (occupied / "meta.json").write_text("{}")
    (world / "report.json").write_text(json.dumps({"frechet_distance": 1.0}))
    shutil.copy(world / "net.safetensors", world / "other.safetensors")
    for name, main, argv, given, kind in writers(world):
        outputs = {"occupied": (occupied if kind == "folder" else world / ("other.safetensors" if name == "convert"
                                                                           else "report.json"), "--overwrite"),
                   "in a data set": (world / "data" / "out.safetensors", "a prepared data set"),
                   "in a run": (world / "run" / "out.safetensors", "a training run")}
        own_input = {"sample": world / "net.safetensors", "restore": world / "data", "evaluate": world / "images.npy",
                     "prepare": world / "images", "prepare mix": world / "data", "train": world / "data",
                     "finetune": world / "unet"}.get(name)
        if own_input is not None:
            outputs["on its input"] = (own_input, "")
        for case, (out, word) in outputs.items():
            before = tree_hashes(world)
            code, _, err = run(main, *argv, *given(out))
            one_line_error(code, err, word)
            assert tree_hashes(world) == before, (name, case)
        if kind == "folder":
            before = tree_hashes(world)
            code, _, err = run(main, *argv, *given(occupied), "--overwrite")
            one_line_error(code, err, "refusing to overwrite")
            assert tree_hashes(world) == before, (name, "--overwrite")


def test_overwrite_replaces_only_the_commands_own_output(world):
    report, out = world / "report.json", world / "net2.safetensors"
    npy = world / "images.npy"
    report.write_text(json.dumps({"frechet_distance": 1.0}))
    assert run(evaluate.main, "--samples", npy, "--reference", npy, "--out", report, "--overwrite")[0] == 0
    assert json.loads(report.read_text())["samples"]["count"] == 4
    notes = world / "notes.json"
    notes.write_text("{}")
    one_line_error(*run(evaluate.main, "--samples", npy, "--reference", npy, "--out", notes, "--overwrite")[::2],
                   "is not an evaluation report")
    assert notes.read_text() == "{}"
    shutil.copy(world / "net.safetensors", out)
    one_line_error(*run(convert.main, world / "net.safetensors", out)[::2], "--overwrite")
    assert run(convert.main, world / "net.safetensors", out, "--overwrite")[0] == 0  # an earlier conversion
    one_line_error(*run(convert.main, world / "net.safetensors", notes, "--overwrite")[::2], "a .safetensors path")
    notes_checkpoint = world / "notes.safetensors"
    notes_checkpoint.write_text("mine")
    one_line_error(*run(convert.main, world / "net.safetensors", notes_checkpoint, "--overwrite")[::2],
                   "is not an ambient-fast checkpoint")
    assert notes.read_text() == "{}" and notes_checkpoint.read_text() == "mine"


def test_resume_elsewhere_is_refused_with_both_readings(tmp_path, capsys):
    code, _, err = run(train.main, "--resume", tmp_path / "a", "--out", tmp_path / "b")
    one_line_error(code, err, f"--resume {tmp_path / 'a'}", "drop --out", f"start a new run in {tmp_path / 'b'}",
                   "drop --resume")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# One meaning per option; our run folders; evaluate's honesty about small counts.

def test_sample_takes_our_run_folders(tmp_path):
    models = {name: small_model() for name in ("snapshot-1", "snapshot-2", "final")}
    run_dir = tmp_path / "run"
    for step, name in ((100, "snapshot-1"), (200, "snapshot-2")):
        save_network(run_dir / f"network-snapshot-{step:09d}.safetensors", models[name], CORRUPTION)
    x = torch.randn(2, 6, 8, 8)
    sigma = torch.full((2,), 0.5)

    def same(a, b):
        with torch.no_grad():
            return torch.equal(a(x, sigma), b(x, sigma))

    assert same(load_network(run_dir).model, models["snapshot-2"])  # the newest snapshot
    save_network(run_dir / "network-final.safetensors", models["final"], CORRUPTION)
    assert same(load_network(run_dir).model, models["final"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="network-final.safetensors"):
        load_network(tmp_path / "empty")


def test_guidance_masks_is_the_samplers_count_and_masks_is_gone(tmp_path):
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), CORRUPTION)
    base = ["--net", net, "--seeds", "0", "--steps", "1", "--device", "cpu"]
    one_line_error(*run(sample.main, *base, "--out", tmp_path / "a", "--masks", "2")[::2], "--masks")
    code, _, err = run(sample.main, *base, "--out", tmp_path / "b", "--guidance-masks", "2", "--guidance", "0.1")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "sampling.json").read_text())["guidance_masks"] == 2
    masks_flags = {name: [a.option_strings for a in COMMANDS[name][1]()._actions if "--masks" in a.option_strings]
                   for name in COMMANDS}
    assert [name for name, found in masks_flags.items() if found] == ["restore", "prepare"]  # a folder of masks


def test_default_outputs_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: .gitignore does not apply")
    defaults = [field.default for name in COMMANDS for field in options_of(name)[1]
                if field.metadata["role"] == "output" and isinstance(field.default, str)]
    defaults.append("data/celeba-p08")  # prepare --dest has no default: the README's
    assert {"runs/ambient", "runs/finetune", "samples", "restored"} <= set(defaults)
    for path in defaults:
        result = subprocess.run(["git", "check-ignore", "-q", f"{path}/x.png"], cwd=ROOT)
        assert result.returncode == 0, f"{path} is not ignored by .gitignore"


def test_evaluate_warns_on_small_counts_and_prints_the_reference_floor(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (40, 1, 2, 2), dtype=np.uint8)  # 4-d pixel features
    few, many = rng.integers(0, 256, (4, 1, 2, 2), dtype=np.uint8), rng.integers(0, 256, (30, 1, 2, 2), dtype=np.uint8)
    for name, array in (("reference", reference), ("few", few), ("many", many)):
        np.save(tmp_path / f"{name}.npy", array)
    code, out, err = run(evaluate.main, "--samples", tmp_path / "few.npy", "--reference", tmp_path / "reference.npy",
                         "--out", tmp_path / "report.json")
    assert code == 0, err
    assert "warning: --samples has 4 images for 4-dimensional features" in err and "covariance" in err
    assert "--reference" not in err
    floor = frechet_distance(pixel_features(reference[0::2]), pixel_features(reference[1::2]))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference_floor"] == {"value": pytest.approx(floor), "count_per_half": 20}
    assert f"{floor:.4f}" in out and "reference floor" in out
    code, out, err = run(evaluate.main, "--samples", tmp_path / "many.npy", "--reference", tmp_path / "reference.npy")
    assert code == 0 and err == "", err


def test_choice_names_match_what_implements_them():
    """The names spelled on the light side (ambient_fast.options) are those the torch modules know."""
    from ambient_fast.objective.corruption import OPERATORS, MaskOperator
    from ambient_fast.options import CORRUPTIONS, FURTHER_KINDS, MASK_KINDS

    assert MASK_KINDS == tuple(sorted(name for name, cls in OPERATORS.items() if issubclass(cls, MaskOperator)))
    assert sorted(FURTHER_KINDS) == list(MASK_KINDS) and CORRUPTIONS == ("none", *MASK_KINDS)
