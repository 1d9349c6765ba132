"""Safe import of the published reference snapshots: nothing in the pickle is executed.

Two kinds, both pickles written by NVIDIA's "persistence" code:
- Ambient Diffusion runs (giannisdaras/ambient-diffusion, on EDM): `network-snapshot-NNNNNN.pkl` =
  `pickle.dumps(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`, where `ema` is a
  state dict (keys prefixed `_orig_mod.` by torch.compile) or, in older snapshots, the pickled module;
  the network's constructor arguments come from the run's `training_options.json`.
- NVlabs/edm2: `network-snapshot-<kimg>-<std>.pkl` (and the published post-hoc reconstructions) =
  `EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=...)`, `ema` the pickled `Precond` in
  float16, carrying its constructor keywords (`_init_kwargs`, only those passed).

Persistent objects (networks, losses, encoders) carry the source code of their defining module, and
`pickle.load` would execute it. Here a restricted unpickler resolves only a short allow-list of
globals, each to a data-only stand-in: persistent objects become inert records of their data, each
tensor storage is read with `torch.load(weights_only=True)`, numpy values are rebuilt without object
dtypes, and any other global is refused with an error that names it.
"""
import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from ambient_fast.files.atomic import read_json
from ambient_fast.files.loaded import LoadedNetwork
from ambient_fast.networks import edm2_from_reference, from_reference

COMPILE_PREFIX = "_orig_mod."
EDM2_PRECOND = "Precond"  # the class name NVlabs/edm2's persistent records give its preconditioned network


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


class _NdarrayName:
    """What the pickle's `numpy.ndarray` resolves to: only a marker for `_numpy_array`, never called
    (numpy's constructor over a raw buffer is not something a pickle may ask for)."""


class _SafeArray(np.ndarray):
    """A pickled numpy array (an EDM2 encoder's latent statistics): numpy restores it from its state,
    which must not be of an object dtype (whose elements would be pickled objects)."""

    def __setstate__(self, state):
        dtype = next((item for item in state if isinstance(item, np.dtype)), None) if isinstance(state, tuple) else None
        if dtype is None or dtype.hasobject:
            raise UnsafePickleError("refusing a numpy array of object dtype (or without a dtype)")
        super().__setstate__(state)


def _numpy_array(subtype, shape, dtype):
    """numpy's `_reconstruct(ndarray, shape, dtype)`: an empty array that the pickle's state then fills."""
    if subtype is not _NdarrayName:
        raise UnsafePickleError(f"refusing to rebuild a numpy array of type {subtype!r}: only numpy.ndarray is allowed")
    return np.ndarray.__new__(_SafeArray, shape, np.dtype(dtype))


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,  # a dict whose keys are also attributes: the dict is what matters
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,   # numpy < 2 spelling
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals a reference snapshot needs, each to a data-only stand-in."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': not on the allow-list of the safe importer "
                "(a reference snapshot needs only tensors, dicts, numpy values and EDM persistent objects). "
                "The file may be malicious or of an unknown format.") from None

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
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _record_data(record: Any) -> dict:
    """The plain settings a persistent record holds (a loss's P_mean, an encoder's statistics), as JSON
    types; modules, tensors and private fields left out."""
    state = record.state if isinstance(record, PersistentRecord) else {}
    plain = (bool, int, float, str, list, tuple, np.generic, np.ndarray)
    return _json_ready({key: value for key, value in state.items() if not key.startswith("_") and isinstance(value, plain)})


def import_reference(snapshot_pkl: Union[str, Path], training_options_json: Optional[Union[str, Path]] = None) -> LoadedNetwork:
    """Import a published snapshot without executing anything from it.

    Args:
        snapshot_pkl: an Ambient Diffusion run's `network-snapshot-NNNNNN.pkl`, or an NVlabs/edm2 snapshot.
        training_options_json: an Ambient Diffusion run's `training_options.json`; defaults to the one
            beside the snapshot. EDM2 snapshots carry their network's arguments and need none.
    Returns:
        Ambient Diffusion: the EMA network (double-sigmoid gate, reference preconditioning) and the
        corruption settings (kind, p, delta, shared_channels). EDM2: the network in float16 as stored
        (`EDM2Precond`, plain input), no corruption, and the snapshot's loss, encoder and data set
        settings in the metadata. Loaded strictly, in eval mode.
    """
    snapshot_pkl = Path(snapshot_pkl)
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
    if isinstance(ema, PersistentRecord) and ema.class_name.rsplit(".", 1)[-1] == EDM2_PRECOND:
        return _import_edm2(snapshot_pkl, data)
    return _import_ambient(snapshot_pkl, data, training_options_json)


def _import_ambient(snapshot_pkl: Path, data: dict, training_options_json: Optional[Union[str, Path]]) -> LoadedNetwork:
    """An Ambient Diffusion (EDM) snapshot: the network described by the run's training_options.json."""
    options_path = Path(training_options_json) if training_options_json else snapshot_pkl.with_name("training_options.json")
    if not options_path.is_file():
        raise FileNotFoundError(f"{options_path} not found: a reference snapshot needs its run's training_options.json "
                                "(pass it with --training-options or put it beside the snapshot)")
    options = read_json(options_path, "the reference run's training_options.json is damaged; restore it")
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
    return LoadedNetwork(model, corruption, str(snapshot_pkl), _loss_metadata(data))


def _import_edm2(snapshot_pkl: Path, data: dict) -> LoadedNetwork:
    """An NVlabs/edm2 snapshot: the pickled Precond rebuilt from its constructor keywords, with its
    float16 weights as stored (the reference evaluates them so: see EDM2Precond)."""
    ema = data["ema"]
    init_args, init_kwargs = ema.state.get("_init_args") or (), ema.state.get("_init_kwargs")
    if init_args or not isinstance(init_kwargs, Mapping):
        raise ValueError(f"{snapshot_pkl}: the EDM2 network's record holds no constructor keywords (_init_kwargs); "
                         "it is not a snapshot written by NVlabs/edm2")
    model = edm2_from_reference(_json_ready(init_kwargs), _module_state_dict(ema))
    encoder = data.get("encoder")
    metadata = dict(_loss_metadata(data), reference="NVlabs/edm2",
                    dataset_kwargs=_json_ready(data.get("dataset_kwargs") or {}),
                    encoder=encoder.class_name if isinstance(encoder, PersistentRecord) else None,
                    encoder_state=_record_data(encoder))
    return LoadedNetwork(model, {}, str(snapshot_pkl), metadata)


def _loss_metadata(data: dict) -> dict:
    loss = data.get("loss_fn")
    return dict(reference_loss=loss.class_name if isinstance(loss, PersistentRecord) else None,
                loss_state=_record_data(loss))


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
