"""Network checkpoints: our safetensors format, and safe import of the published reference runs.

Our format: one `.safetensors` file holding the weights, with the model config, the corruption
the model was trained on and a sha256 of the weights in the metadata. Nothing in it can execute
code; a network with non-finite weights is never written, and a damaged file is refused on load.

A reference run (giannisdaras/ambient-diffusion, on EDM) stores `network-snapshot-NNNNNN.pkl`:
`pickle.dumps(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`, where `ema`
is a state dict (keys prefixed `_orig_mod.` by torch.compile) or, in older snapshots, the
pickled module, and `loss_fn` / `augment_pipe` are EDM "persistent objects" that carry the
source code of their defining module. Loading such a file with `pickle.load` executes that
source. `import_reference` reads it with a restricted unpickler instead: persistent objects
become inert records of their data, each tensor storage is read with
`torch.load(weights_only=True)`, and any global outside a short allow-list is refused with an
error that names it.
"""
import hashlib
import io
import json
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ambient_fast.networks.diffusers import is_diffusers_model
from ambient_fast.files.atomic import read_json, write_bytes
from ambient_fast.networks import AmbientPrecond, build_model, from_reference

FORMAT = "ambient-fast/1"
COMPILE_PREFIX = "_orig_mod."


@dataclass
class LoadedNetwork:
    """A network ready to sample or restore with, and what it was trained on."""

    model: torch.nn.Module                            # an AmbientPrecond or a DiffusersDenoiser
    corruption: dict = field(default_factory=dict)   # kind, p, delta, shared_channels, ...
    source: str = ""                                  # path it came from
    metadata: dict = field(default_factory=dict)      # anything else the file recorded

    @property
    def survival(self) -> Optional[float]:
        """The sampling mask's default survival: the training survival (1 - p)(1 - delta) if known,
        or the one the trainer recorded (1 when the model also trained on images A hides nothing of)."""
        if "survival" in self.corruption:
            return float(self.corruption["survival"])
        p, delta = self.corruption.get("p"), self.corruption.get("delta")
        return None if p is None or delta is None else (1 - p) * (1 - delta)

    def sampling_sigmas(self) -> dict:
        """`ambient_fast.sampling.samplers.sampling_sigmas` of this model and the lowest level it trained at."""
        from ambient_fast.sampling.samplers import sampling_sigmas

        return sampling_sigmas(self.model, sigma_floor=float(self.corruption.get("sigma_floor", 0.0)))


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
    # Serialised here and written by our own atomic writer: its errors are OSErrors naming the file.
    write_bytes(path, save(tensors, metadata=header))


def is_checkpoint(path: Union[str, Path]) -> bool:
    """Whether `path` is one of our checkpoints (by its header; the weights are not read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (OSError, SafetensorError):
        return False


def _load_safetensors(path: Path) -> LoadedNetwork:
    damaged = "the file is damaged or truncated; write it again or use another snapshot"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is a safetensors file but not an ambient-fast checkpoint "
                                 f"(metadata format {header.get('format')!r}, expected {FORMAT!r})")
            state = {key: f.get_tensor(key) for key in f.keys()}
        config, corruption, extra = (json.loads(header.get(key, "{}")) for key in ("model", "corruption", "extra"))
    except (SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as an ambient-fast checkpoint ({error}): {damaged}") from None
    # Checkpoints written before the checksum was added have none to check.
    if "sha256" in header and weights_digest(state) != header["sha256"]:
        raise ValueError(f"{path} failed its checksum: the weights changed after the file was written; {damaged}")
    model = build_model(config)
    model.load_state_dict(state, strict=True)
    return LoadedNetwork(model.eval(), corruption, str(path), extra)


def run_network(folder: Path) -> Optional[Path]:
    """The network a run folder holds: ours (network-final.safetensors, else the newest
    network-snapshot-*.safetensors), else a reference run's newest network-snapshot-*.pkl; None."""
    final = folder / "network-final.safetensors"
    if final.is_file():
        return final
    for pattern in ("network-snapshot-*.safetensors", "network-snapshot-*.pkl"):
        snapshots = sorted(folder.glob(pattern))  # zero-padded step numbers: sorted by step
        if snapshots:
            return snapshots[-1]
    return None


def load_network(path: Union[str, Path], training_options: Optional[Union[str, Path]] = None) -> LoadedNetwork:
    """Load one of our `.safetensors` checkpoints or run folders (`run_network`), a reference `.pkl`
    snapshot or run folder (its newest snapshot) or a diffusers UNet directory (extra `[diffusers]`;
    `ambient_fast.networks.diffusers`), through one call path, in eval mode."""
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


# ----------------------------------------------------------------------------------------------
# Safe import of reference snapshots.

class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asked for something the safe importer does not allow (a ValueError too: bad input)."""


@dataclass
class PersistentRecord:
    """What an EDM persistent object holds, as data: its class name, its source (never executed)
    and its state (`__dict__`)."""

    class_name: str
    module_src: str
    state: dict


class ModuleRecord:
    """A plain torch container module (ModuleDict) from the pickle, as its state only."""

    def __setstate__(self, state):
        self.state = state


def _persistent_record(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError(f"unexpected persistent-object record: {type(meta).__name__}")
    return PersistentRecord(str(meta.get("class_name")), str(meta.get("module_src", "")), dict(meta.get("state") or {}))


def _load_storage(data: bytes):
    """A tensor storage, saved by torch.save inside the pickle; loaded without executing code."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, i.e. running the file's code: keep only its reason.
        lines = [line.strip() for line in str(error).splitlines()]
        reason = next((line for line in lines if line and "weights_only" not in line
                       and not line.startswith("Check the documentation")), "it holds more than tensor data")
        raise UnsafePickleError(f"refusing a tensor-storage record of the snapshot: {reason} The file may be "
                                "malicious or of an unknown format; nothing from it was run.") from None


def _numpy_scalar(dtype: np.dtype, data: bytes):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("refusing a numpy scalar of object dtype")
    return np.frombuffer(data, dtype=dtype)[0].item()


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals a reference snapshot needs, each to a data-only stand-in."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': not on the allow-list of the safe importer "
                "(a reference snapshot needs only tensors, OrderedDict, numpy scalars and EDM persistent "
                "objects). The file may be malicious or of an unknown format.") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: not used by reference snapshots")


def safe_unpickle(data: bytes) -> Any:
    """`pickle.loads` restricted to reference-snapshot content; executes nothing from the data."""
    return SafeUnpickler(io.BytesIO(data)).load()


def _module_state_dict(node: Any, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Flatten a pickled module (persistent records and ModuleDicts) into a state dict."""
    state = node.state if isinstance(node, (PersistentRecord, ModuleRecord)) else None
    if not isinstance(state, dict):
        raise UnsafePickleError(f"unexpected object in a pickled network at {prefix or 'the root'!r}: {type(node).__name__}")
    out = OrderedDict()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skip:
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_state_dict(child, f"{prefix}{name}."))
    return out


def _strip_compile_prefix(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((key[len(COMPILE_PREFIX):] if key.startswith(COMPILE_PREFIX) else key, value)
                       for key, value in state.items())


def _json_ready(value: Any) -> Any:
    """Convert what the snapshot's plain data may hold (numpy scalars, tuples) into JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def import_reference(snapshot_pkl: Union[str, Path], training_options_json: Optional[Union[str, Path]] = None) -> LoadedNetwork:
    """Import a published Ambient Diffusion snapshot without executing anything from it.

    Args:
        snapshot_pkl: `network-snapshot-NNNNNN.pkl` of a reference run.
        training_options_json: its `training_options.json`; defaults to the one beside the snapshot.
    Returns:
        The EMA network (double-sigmoid gate, reference preconditioning, loaded strictly, eval
        mode) and the corruption settings: kind, p, delta, shared_channels.
    """
    snapshot_pkl = Path(snapshot_pkl)
    options_path = Path(training_options_json) if training_options_json else snapshot_pkl.with_name("training_options.json")
    if not options_path.is_file():
        raise FileNotFoundError(f"{options_path} not found: a reference snapshot needs its run's training_options.json "
                                "(pass it with --training-options or put it beside the snapshot)")
    options = read_json(options_path, "the reference run's training_options.json is damaged; restore it")
    try:
        data = safe_unpickle(snapshot_pkl.read_bytes())
    except UnsafePickleError:
        raise
    except Exception as error:  # whatever a truncated or garbled pickle makes the unpickler raise
        raise ValueError(f"{snapshot_pkl} cannot be read ({type(error).__name__}: {error}): the snapshot is "
                         "damaged or truncated, or not a reference snapshot") from None
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{snapshot_pkl} is not a reference network snapshot (no 'ema' entry)")

    ema = data["ema"]
    state = ema if isinstance(ema, Mapping) else _module_state_dict(ema)
    state = _strip_compile_prefix(state)
    network_kwargs = dict(options.get("network_kwargs") or {})
    dataset_kwargs = {**_json_ready(options.get("dataset_kwargs") or {}), **_json_ready(data.get("dataset_kwargs") or {})}
    config = {**network_kwargs, **_interface_from_weights(state, dataset_kwargs)}
    model = from_reference(config, state)

    corruption = dict(
        kind=dataset_kwargs.get("corruption_pattern", "dust"),
        p=dataset_kwargs.get("corruption_probability"),
        delta=dataset_kwargs.get("delta_probability"),
        shared_channels=bool(dataset_kwargs.get("mask_full_rgb", False)),
    )
    loss = data.get("loss_fn")
    metadata = dict(reference_loss=loss.class_name if isinstance(loss, PersistentRecord) else None,
                    loss_state=_json_ready({k: v for k, v in (loss.state if isinstance(loss, PersistentRecord) else {}).items()
                                            if isinstance(v, (int, float, str, bool, np.generic))}))
    return LoadedNetwork(model, corruption, str(snapshot_pkl), metadata)


def _interface_from_weights(state: Mapping[str, torch.Tensor], dataset_kwargs: Mapping) -> dict:
    """img_resolution, img_channels (2C) and label_dim, which the reference took from its data set
    rather than from training_options: read them off the weights where they are unambiguous."""
    first_conv = [key for key in state if key.startswith("model.enc.") and key.endswith("_conv.weight")]
    if not first_conv:
        raise ValueError("the snapshot's weights have no 'model.enc.*_conv.weight': not an EDM U-Net")
    resolution = int(first_conv[0][len("model.enc."):].split("x", 1)[0])
    label = state.get("model.map_label.weight")
    return dict(img_resolution=int(dataset_kwargs.get("resolution") or resolution),
                img_channels=int(state[first_conv[0]].shape[1]),
                label_dim=int(label.shape[1]) if label is not None else 0)
