"""Property-based tests (issue 22 item 5): whatever numbers a command is given, and however its
data set, record or checkpoint files are damaged, it ends in success or in one `error:` line with
exit status 1: never a traceback, never a hang, never a changed input file.

Each example calls the command's `main` in-process on small real files; the inputs live in a folder
of their own whose every file is hashed before and after, and outputs go to a fresh folder.

Profiles: `ci` (the default: a few hundred examples in all, derandomised so CI is repeatable) and
`long` (twenty times as many, random each run):

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py

What an example may cost is bounded by the strategies, not by the checks under test: options that
only say how long the work runs (sample's `--steps`, `--guidance-masks` and `--batch`, which the fast
path pads to; restore's `--max-images`) are drawn in range only up to a small cap, and otherwise only
outside their range (non-finite, negative, text, ...), never in range above the cap. `train` runs
its whole set-up (parse, config, data checks, network, memory estimate, run folder) with the
training loop itself replaced by a return, since one real step costs seconds here.
`finetune`'s numeric options are all `train`'s own (the same config fields), so train covers them.
"""
import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient_fast import convert, evaluate, prepare, restore, sample, train
from ambient_fast.files.checkpoints import HEADER_DIGEST, header_digest, save_network
from ambient_fast.options import flag_of, numeric_type
from ambient_fast.training.trainer import Trainer

from test_commands import COMMANDS, options_of, run
from test_data import rgb_images, write_pngs
from test_reliability import CORRUPTION, NET, make_set, reseal_set, within
from test_sample import small_model

SCALE = {"ci": 1, "long": 20}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(count: int):
    """`count` examples in CI, twenty times as many under the long profile."""
    return settings(max_examples=count * SCALE)


HANG_S = 60  # far above any example's cost on a loaded CI machine; only a hang gets there


def hashes(root: Path) -> dict:
    """Every file under `root` (name -> sha256), so a changed, removed or added input shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def scratch(root: Path):
    """A fresh folder for one example's outputs, removed after it."""
    path = Path(tempfile.mkdtemp(dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ends_cleanly(inputs: Path, main, *argv):
    """Run the command: success, or exit status 1 with one `error:` line; within HANG_S seconds;
    every file under `inputs` unchanged. Returns the exit status."""
    before = hashes(inputs)
    with within(HANG_S):
        code, _, err = run(main, *argv)
    assert code in (0, 1), (code, argv, err)
    if code == 1:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert hashes(inputs) == before, ("an input changed", argv)
    return code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs (inputs/: a data set of 16 8x8 images, a network for them, a folder of 3 PNGs,
    an image array) and a folder for outputs (out/)."""
    root = tmp_path_factory.mktemp("fuzz")
    inputs = root / "inputs"
    make_set(inputs / "data")
    save_network(inputs / "net.safetensors", small_model(), CORRUPTION)
    write_pngs(inputs / "src", rgb_images(3))
    np.save(inputs / "images.npy", np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8))
    (root / "out").mkdir()
    return dict(inputs=inputs, out=root / "out")


@contextlib.contextmanager
def setup_only():
    """`train` up to its first step: Trainer.train returns at once (the set-up is what is fuzzed)."""
    with mock.patch.object(Trainer, "train", lambda self: 0):
        yield


# ----------------------------------------------------------------------------------------------
# Every command's numeric options.

WILD = ["nan", "NaN", "inf", "-inf", "1e999", "-1e999", "-0", "", " ", "0x10", "1_0", "+3", "1e3", "2.5", "-1",
        "0", str(2 ** 31), str(2 ** 32), str(2 ** 63 - 1), str(2 ** 63), str(2 ** 64), str(-2 ** 63 - 1),
        "9" * 400, "9" * 5000, "1" + "0" * 20 + ".5", "5e-324", "1e-400", "\u0661", "ten"]
# name -> {flag: largest in-range value drawn, for options that only say how long the work runs}
TIME_CAPS = {
    "sample": {"--steps": 2, "--guidance-masks": 2, "--batch": 4},
    "restore": {"--max-images": 2},
}
BASES = {  # name -> (main, command line given an output folder and the inputs, runs under setup_only)
    "train": (train.main, lambda o, i: ["--data", i / "data", "--out", o / "run", "--steps", "1", "--batch", "2",
                                        "--sample-count", "1", "--sample-steps", "2", "--device", "cpu", *NET], True),
    "sample": (sample.main, lambda o, i: ["--net", i / "net.safetensors", "--out", o / "s", "--seeds", "0",
                                          "--steps", "1", "--device", "cpu"], False),
    "restore": (restore.main, lambda o, i: ["--net", i / "net.safetensors", "--input", i / "data", "--out", o / "r",
                                            "--max-images", "1", "--device", "cpu"], False),
    "evaluate": (evaluate.main, lambda o, i: ["--samples", i / "images.npy", "--reference", i / "images.npy",
                                              "--out", o / "report.json"], False),
    "prepare": (prepare.main, lambda o, i: ["--source", i / "src", "--dest", o / "set", "--p", "0.5"], False),
}


def in_range(kind, bounds, cap):
    """Values inside `bounds` (integers up to `cap` when given), as text."""
    if kind is int:
        low = int(bounds.low) + (1 if bounds.low_open else 0) if bounds.low is not None else -2 ** 70
        high = int(bounds.high) - (1 if bounds.high_open else 0) if bounds.high is not None else 2 ** 70
        return st.integers(low, min(high, cap) if cap is not None else high).map(str)
    return st.floats(bounds.low, bounds.high, exclude_min=bounds.low_open and bounds.low is not None,
                     exclude_max=bounds.high_open and bounds.high is not None, allow_nan=False).map(repr)


def values_for(name, field):
    """Text for one numeric option: in its range (capped for time-only options), or anything at all
    that no check may take for a number of its range (for a capped option: nothing in range above
    the cap, since that would be work, not a check)."""
    config_cls, _ = options_of(name)
    kind, bounds, flag = numeric_type(config_cls, field), field.metadata["bounds"], flag_of(field)
    cap = TIME_CAPS.get(name, {}).get(flag)
    anything = st.one_of(st.sampled_from(WILD), st.integers(-2 ** 70, 2 ** 70).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8))
    if cap is not None:
        anything = anything.filter(lambda text: not _in_range_above(text, kind, bounds, cap))
    return st.one_of(in_range(kind, bounds, cap), anything)


def _in_range_above(text, kind, bounds, cap):
    """Whether `text` parses as a number of `kind` in `bounds` above `cap` (work, not a check)."""
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        return False
    return value == value and value in bounds and value > cap


@pytest.mark.parametrize("name", list(BASES))
def test_numeric_options_end_cleanly(name, world):
    main, base, only_setup = BASES[name]
    _, fields = options_of(name)
    numeric = [f for f in fields if numeric_type(options_of(name)[0], f) is not None]
    option_values = st.lists(st.sampled_from(numeric), min_size=1, max_size=3, unique_by=lambda f: f.name).flatmap(
        lambda chosen: st.tuples(*(st.tuples(st.just(flag_of(f)), values_for(name, f)) for f in chosen)))

    @examples({"train": 20, "sample": 20, "restore": 20, "evaluate": 20, "prepare": 50}[name])
    @given(option_values)
    def check(pairs):
        with scratch(world["out"]) as out, (setup_only() if only_setup else contextlib.nullcontext()):
            argv = [*base(out, world["inputs"]), *(part for pair in pairs for part in pair)]
            ends_cleanly(world["inputs"], main, *argv)

    check()


@pytest.mark.parametrize("name", list(BASES))
def test_numbers_beyond_a_float_end_cleanly(name, world):
    """Each numeric option at 10^400 - 1 (an integer no float holds; in range for most): refused by its
    range or by the memory it asks for, never an OverflowError. Hypothesis finds these only now and
    then, so every option is tried."""
    main, base, only_setup = BASES[name]
    config_cls, fields = options_of(name)
    for field in fields:
        if numeric_type(config_cls, field) is None or flag_of(field) in TIME_CAPS.get(name, {}):
            continue
        with scratch(world["out"]) as out, (setup_only() if only_setup else contextlib.nullcontext()):
            ends_cleanly(world["inputs"], main, *base(out, world["inputs"]), flag_of(field), "9" * 400)


# ----------------------------------------------------------------------------------------------
# Malformed data sets.

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 80, 2 ** 80), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _json(value) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def damaged_set(draw):
    """(what was done, how to do it to a copy of the data set): meta.json's fields replaced,
    removed or cut short, an array's bytes flipped or cut, or an array replaced by another of any
    dtype and shape, its checksums made to match again or not."""
    meta_fields = ["format", "version", "count", "shape", "label_dim", "corruption", "observed_fraction", "files",
                   "values", "records", "content_sha256"]
    kind = draw(st.sampled_from(["field", "remove", "cut meta", "flip", "cut array", "array"]))
    reseal = draw(st.booleans())
    if kind in ("field", "remove"):
        field = draw(st.sampled_from(meta_fields))
        value = draw(JSON_VALUES) if kind == "field" else None

        def change(path):
            meta = json.loads((path / "meta.json").read_text())
            if kind == "field":
                meta[field] = value
            else:
                meta.pop(field)
            (path / "meta.json").write_text(_json(meta))
        return (kind, field, value), change, False
    if kind == "cut meta":
        fraction = draw(st.floats(0, 1))

        def change(path):
            text = (path / "meta.json").read_bytes()
            (path / "meta.json").write_bytes(text[:int(len(text) * fraction)])
        return (kind, fraction), change, False
    name = draw(st.sampled_from(["observed.npy", "masks.npy"]))
    if kind in ("flip", "cut array"):
        where = draw(st.floats(0, 1, exclude_max=True))

        def change(path):
            raw = bytearray((path / name).read_bytes())
            at = int(len(raw) * where)
            if kind == "flip":
                raw[at] ^= 0xFF
            else:
                del raw[at:]
            (path / name).write_bytes(bytes(raw))
        return (kind, name, where), change, reseal
    dtype = draw(st.sampled_from(["uint8", "bool", "int64", "float32", "float64", "<U2"]))
    shape = tuple(draw(st.lists(st.integers(0, 17), min_size=0, max_size=5)))
    if int(np.prod(shape)) > 20000:
        shape = shape[:2]

    def change(path):
        array = np.random.default_rng(0).integers(0, 3, shape).astype(dtype)
        np.save(path / name, array)
    return (kind, name, dtype, shape), change, reseal


@examples(25)
@given(damaged_set())
def test_damaged_data_sets_end_cleanly(world, damage):
    what, change, reseal = damage
    with scratch(world["out"]) as out:
        inputs = out / "inputs"
        shutil.copytree(world["inputs"] / "data", inputs / "data")
        change(inputs / "data")
        if reseal:
            with contextlib.suppress(Exception):  # a meta.json this damage left unreadable stays so
                reseal_set(inputs / "data")
        data = inputs / "data"
        ends_cleanly(inputs, prepare.main, "verify", data)
        ends_cleanly(inputs, prepare.main, "mix", "--dest", out / "mix", data)
        with setup_only():
            ends_cleanly(inputs, train.main, "--data", data, "--out", out / "run", "--steps", "1", "--batch", "2",
                         "--device", "cpu", *NET)
        ends_cleanly(inputs, restore.main, "--net", world["inputs"] / "net.safetensors", "--input", data,
                     "--out", out / "restored", "--max-images", "1", "--device", "cpu")


# ----------------------------------------------------------------------------------------------
# Malformed record files: --sigma-min, --masks and a source's dataset.json.

ARRAYS = st.tuples(st.sampled_from(["uint8", "bool", "int64", "float16", "float32", "float64", "<U3", "complex64"]),
                   st.lists(st.integers(0, 9), min_size=0, max_size=4),
                   st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, 1e39, np.nan, np.inf, 7.0]))


def _array(dtype, shape, value):
    with np.errstate(all="ignore"):
        array = np.full(shape, value, np.float64)
        return array.astype(dtype) if dtype != "<U3" else array.astype(str).astype(dtype)


@st.composite
def record_file(draw):
    """(option, file name, bytes or an array) of a --sigma-min file, a --masks file or a dataset.json."""
    which = draw(st.sampled_from(["--sigma-min npy", "--sigma-min json", "--masks", "dataset.json", "bytes"]))
    if which in ("--sigma-min npy", "--masks"):
        return which, _array(*draw(ARRAYS))
    if which == "bytes":
        return draw(st.sampled_from(["--sigma-min npy", "--masks", "--sigma-min json"])), draw(st.binary(max_size=64))
    names = [f"img{i:03d}.png" for i in range(3)]
    keys = st.one_of(st.sampled_from(names), st.text(max_size=6))
    if which == "--sigma-min json":
        return which, _json(draw(st.one_of(st.dictionaries(keys, JSON_VALUES, max_size=4), JSON_VALUES)))
    labels = st.lists(st.one_of(st.tuples(keys, JSON_VALUES).map(list), JSON_VALUES), max_size=4)
    return which, _json(draw(st.one_of(st.fixed_dictionaries({"labels": labels}), JSON_VALUES)))


@examples(100)
@given(record_file())
def test_malformed_record_files_end_cleanly(world, record):
    which, content = record
    with scratch(world["out"]) as out:
        inputs = out / "inputs"
        shutil.copytree(world["inputs"] / "src", inputs / "src")
        argv = ["--source", inputs / "src", "--dest", out / "set"]
        if which == "dataset.json":
            (inputs / "src" / "dataset.json").write_text(content)
            argv += ["--p", "0.5"]
        else:
            path = inputs / ("record.json" if which == "--sigma-min json" else "record.npy")
            if isinstance(content, np.ndarray):
                np.save(path, content)
            else:
                path.write_bytes(content.encode() if isinstance(content, str) else content)
            argv += ["--masks", path] if which == "--masks" else ["--p", "0.5", "--sigma-min", path]
        ends_cleanly(inputs, prepare.main, *argv)


# ----------------------------------------------------------------------------------------------
# Malformed checkpoints.

def _split(raw: bytes):
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def damaged_checkpoint(draw):
    """A function of the network file's bytes: a metadata field (model, corruption, ...) replaced by
    anything, its own field replaced inside, a tensor's entry changed, its header checksum made to
    match again or not; or bytes flipped, cut or the header length made to lie."""
    kind = draw(st.sampled_from(["metadata", "config field", "tensor entry", "flip", "cut", "length"]))
    reseal = draw(st.booleans())
    if kind in ("flip", "cut", "length"):
        where = draw(st.floats(0, 1, exclude_max=True))
        length = draw(st.integers(0, 2 ** 64 - 1))

        def change(raw):
            raw = bytearray(raw)
            if kind == "flip":
                raw[int(len(raw) * where)] ^= 0xFF
                return bytes(raw)
            if kind == "cut":
                return bytes(raw[:int(len(raw) * where)])
            return struct.pack("<Q", length) + bytes(raw[8:])
        return (kind, where, length), change
    value = draw(JSON_VALUES)
    if kind == "metadata":
        field = draw(st.sampled_from(["format", "model", "corruption", "extra", "sha256", HEADER_DIGEST]))
    elif kind == "config field":
        field = draw(st.sampled_from(["model", "corruption"]))
        inner = draw(st.sampled_from(["model_type", "img_resolution", "img_channels", "model_channels",
                                      "channel_mult", "num_blocks", "attn_resolutions", "label_dim", "kind", "p",
                                      "delta", "shared_channels", "survival", "sigma_floor", "sigma_n",
                                      "sigma_min", "sigma_max", "sigma_data", "parts"]))
    else:
        field, entry = None, draw(st.sampled_from(["dtype", "shape", "data_offsets"]))

    def change(raw):
        header, body = _split(raw)
        meta = header["__metadata__"]
        if kind == "metadata":
            meta[field] = value if isinstance(value, str) else _json(value)
        elif kind == "config field":
            config = json.loads(meta[field])
            config[inner] = value
            meta[field] = _json(config)
        else:
            name = sorted(k for k in header if k != "__metadata__")[0]
            header[name][entry] = value
        if reseal:
            meta[HEADER_DIGEST] = header_digest(meta)
        return _join(header, body)
    return (kind, field, inner if kind == "config field" else None, reseal, value), change


@examples(50)
@given(damaged_checkpoint())
def test_damaged_checkpoints_end_cleanly(world, damage):
    what, change = damage
    with scratch(world["out"]) as out:
        inputs = out / "inputs"
        inputs.mkdir()
        net = inputs / "net.safetensors"
        net.write_bytes(change((world["inputs"] / "net.safetensors").read_bytes()))
        ends_cleanly(inputs, sample.main, "--net", net, "--out", out / "s", "--seeds", "0", "--steps", "1",
                     "--device", "cpu")
        ends_cleanly(inputs, convert.main, net, out / "copy.safetensors")
