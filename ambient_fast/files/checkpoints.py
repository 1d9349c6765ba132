"""Network checkpoints: our safetensors format, and one call path (`load_network`) for ours, the
published reference snapshots and diffusers directories.

Our format: one `.safetensors` file holding the weights, with the model config, the corruption
the model was trained on and a sha256 of the weights in the metadata, and a sha256 of that header
(`header_sha256`). Nothing in it can execute code; a network with non-finite weights is never
written. On load the header is checked against its checksum and by a schema (the config's values,
the corruption's fields and ranges; the network the config describes must have exactly the stored
tensors' shapes, found on the meta device before anything is allocated), then the weights against
theirs; a damaged file is refused. Files written before the header had a checksum still load,
saying so once.

The published `.pkl` snapshots (Ambient Diffusion's DDPM++ runs, NVlabs/edm2's networks) are read
without executing anything by `ambient_fast.files.reference`.
"""
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ambient_fast.files import reading
from ambient_fast.files.atomic import write_bytes
from ambient_fast.files.loaded import LoadedNetwork
from ambient_fast.files.reference import import_reference
from ambient_fast.networks.diffusers import is_diffusers_model
from ambient_fast.networks import AmbientPrecond, build_model

FORMAT = "ambient-fast/1"
HEADER_FIELDS = ("format", "model", "corruption", "extra", "sha256")  # what the header's checksum covers
HEADER_DIGEST = "header_sha256"


# ----------------------------------------------------------------------------------------------
# Our format.

class NonFiniteWeightsError(ValueError):
    """A network whose weights hold NaN or infinite values: unusable, so never written."""


def check_finite(tensors: Mapping[str, torch.Tensor], path: Union[str, Path]) -> None:
    """Raise NonFiniteWeightsError (naming `path`, the file about to be written) when any
    floating-point tensor holds NaN or an infinity."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {path}: {len(bad)} of the network's tensors hold non-finite values (NaN or infinity; "
            f"e.g. {bad[0]}), so the network is unusable; nothing was written. A training run that gets here diverged: "
            "lower --lr (or keep --max-grad-norm on) and resume from an earlier snapshot.")


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_network(path: Union[str, Path], model: AmbientPrecond, corruption: Optional[Mapping] = None,
                 **metadata: Any) -> None:
    """Save weights and config as safetensors (atomically), with a checksum of the weights.
    `corruption` records the training corruption (kind, p, delta, shared_channels); further
    keyword arguments go to the metadata as JSON. Raises NonFiniteWeightsError, writing nothing,
    when a weight is NaN or infinite."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    check_finite(tensors, path)
    header = {"format": FORMAT, "model": json.dumps(model.config), "corruption": json.dumps(dict(corruption or {})),
              "extra": json.dumps(metadata), "sha256": weights_digest(tensors)}
    header[HEADER_DIGEST] = header_digest(header)
    # Serialised here and written by our own atomic writer: its errors are OSErrors naming the file.
    write_bytes(path, save(tensors, metadata=header))


def is_checkpoint(path: Union[str, Path]) -> bool:
    """Whether `path` is one of our checkpoints (by its header; the weights are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (OSError, SafetensorError):
        return False


def header_digest(header: Mapping[str, str]) -> str:
    """sha256 of a checkpoint header's recorded fields (canonical JSON; absent ones as null)."""
    fields = {key: header.get(key) for key in HEADER_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_UNCHECKED_HEADERS: set = set()  # files whose missing header checksum was reported (once each)


def _read_header(path: Path, header: Mapping[str, str]) -> "tuple[dict, dict, dict]":
    """(model config, corruption, extra) of a checkpoint's header, checked against the header's
    checksum and by the schema; ValueError saying what is wrong."""
    if HEADER_DIGEST in header:
        if header_digest(header) != header[HEADER_DIGEST]:
            raise ValueError(f"{path} failed its header checksum: its architecture, corruption or records changed "
                             "after the file was written; write it again or use another snapshot")
    elif str(path) not in _UNCHECKED_HEADERS:
        _UNCHECKED_HEADERS.add(str(path))
        print(f"note: {path} was written before checkpoint headers had a checksum: its architecture and corruption "
              "records are checked by their schema only", file=sys.stderr)
    try:
        parsed = [json.loads(header.get(key, "{}")) for key in ("model", "corruption", "extra")]
        config = reading.json_config(parsed[0], "model")
        _check_noise_range(config)
        corruption = reading.check_corruption(parsed[1], "corruption")
        extra = reading.mapping(parsed[2], "extra")
    except (ValueError, TypeError, RecursionError) as error:
        raise ValueError(f"{path} has an invalid header ({error}); write it again or use another snapshot") from None
    return config, corruption, extra


def _check_noise_range(config: Mapping) -> None:
    """The preconditioner's noise range and data scale, where the config gives them: numbers (a VP
    model's sigma_max may be infinite), 0 <= sigma_min < sigma_max, sigma_data > 0. The network
    builds with any value; the sampler would fail on a wrong one only after the network loaded."""
    for key, strict in (("sigma_min", False), ("sigma_max", True), ("sigma_data", True)):
        value = config.get(key, 1.0)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value > 0 if strict else value >= 0):
            raise ValueError(f"model.{key} must be a number {'>' if strict else '>='} 0, got {value!r}"[:200])
    if not config.get("sigma_min", 0) < config.get("sigma_max", math.inf):
        raise ValueError(f"model.sigma_min ({config['sigma_min']!r}) must be below model.sigma_max "
                         f"({config['sigma_max']!r})")


def _check_shapes(path: Path, config: dict, stored: Mapping[str, list]) -> None:
    """Refuse a header whose model config does not describe the stored tensors (names and shapes),
    built on the meta device: nothing is allocated for a config that a damaged header made huge."""
    try:
        with torch.device("meta"):
            expected = {key: list(value.shape) for key, value in build_model(config).state_dict().items()}
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError, OverflowError,
            ZeroDivisionError) as error:
        raise ValueError(f"{path}: its header's model config does not describe a network ({type(error).__name__}: "
                         f"{error}); write it again or use another snapshot") from None
    if expected != stored:
        differ = sorted(set(expected) ^ set(stored)) + sorted(k for k in set(expected) & set(stored)
                                                              if expected[k] != stored[k])
        raise ValueError(f"{path}: its header's model config does not describe the stored weights ({len(differ)} "
                         f"tensor(s) differ, e.g. {differ[0]}); write it again or use another snapshot")


def _load_safetensors(path: Path) -> LoadedNetwork:
    damaged = "the file is damaged or truncated; write it again or use another snapshot"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is a safetensors file but not an ambient-fast checkpoint "
                                 f"(metadata format {header.get('format')!r}, expected {FORMAT!r})")
            config, corruption, extra = _read_header(path, header)
            _check_shapes(path, config, {key: list(f.get_slice(key).get_shape()) for key in f.keys()})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} cannot be read as an ambient-fast checkpoint ({error}): {damaged}") from None
    # Checkpoints written before the checksum was added have none to check.
    if "sha256" in header and weights_digest(state) != header["sha256"]:
        raise ValueError(f"{path} failed its checksum: the weights changed after the file was written; {damaged}")
    model = build_model(config)
    # assign: each tensor keeps the dtype it was saved in (a converted EDM2 snapshot's float16 weights,
    # whose gains the reference evaluates in float16: see EDM2Precond), so converting changes no output.
    model.load_state_dict(state, strict=True, assign=True)
    return LoadedNetwork(model.eval(), corruption, str(path), extra)


# An EDM2 run's snapshot: network-snapshot-<kimg>-<EMA length>.pkl, one file per tracked EMA length.
EDM2_SNAPSHOT = re.compile(r"^network-snapshot-(\d+)-(\d+\.\d+)\.pkl$")


def run_network(folder: Path) -> Optional[Path]:
    """The network a run folder holds: ours (network-final.safetensors, else the newest
    network-snapshot-*.safetensors), else a reference run's newest network-snapshot-*.pkl; None.
    An EDM2 run's snapshots come in several EMA lengths, none of them the network: ValueError naming
    them when there is more than one, so that the file is given."""
    final = folder / "network-final.safetensors"
    if final.is_file():
        return final
    for pattern in ("network-snapshot-*.safetensors", "network-snapshot-*.pkl"):
        snapshots = sorted(folder.glob(pattern))  # zero-padded step numbers: sorted by step
        if not snapshots:
            continue
        lengths = sorted({match.group(2) for match in map(EDM2_SNAPSHOT.match, (p.name for p in snapshots)) if match})
        if len(lengths) > 1:
            raise ValueError(f"{folder} holds EDM2 snapshots of {len(lengths)} EMA lengths ({', '.join(lengths)}): "
                             f"give the file of the one to use, e.g. {snapshots[-1]}")
        return snapshots[-1]
    return None


def load_network(path: Union[str, Path], training_options: Optional[Union[str, Path]] = None) -> LoadedNetwork:
    """Load one of our `.safetensors` checkpoints or run folders (`run_network`), a reference `.pkl`
    snapshot (Ambient Diffusion's or NVlabs/edm2's; or a reference run folder, its newest snapshot)
    or a diffusers UNet directory (extra `[diffusers]`; `ambient_fast.networks.diffusers`), through
    one call path, in eval mode. `training_options`: a DDPM++ run's training_options.json when not
    beside its snapshot."""
    path = Path(path)
    if path.is_dir() and is_diffusers_model(path):
        from ambient_fast.networks.diffusers import load_denoiser, read_info

        info = read_info(path)
        return LoadedNetwork(load_denoiser(path), info.get("corruption", {}), str(path), info)
    if path.is_dir():
        found = run_network(path)
        if found is None:
            raise FileNotFoundError(f"no network in {path}: a run folder holds network-final.safetensors or "
                                    "network-snapshot-*.safetensors (ours) or network-snapshot-*.pkl (a reference "
                                    "run); give one of those, or the file itself")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix == ".pkl":
        return import_reference(path, training_options)
    raise ValueError(f"unknown checkpoint type {path.name!r}: expected .safetensors (ours) or .pkl (reference)")
