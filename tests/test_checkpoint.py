"""Checkpoints: our safetensors format, and safe import of reference snapshots built here in the
published structure (no reference code needed), including malicious ones."""
import json
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast.files.reference import UnsafePickleError, import_reference
from ambient_fast.networks import EDMPrecond, build_reference_model

from conftest import installed_modules
from test_nn import ambient_input, randomize_

REFERENCE_NETWORK_KWARGS = {
    "class_name": "training.networks.EDMPrecond", "model_type": "SongUNet", "embedding_type": "positional",
    "encoder_type": "standard", "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
    "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.13,
    "use_fp16": False, "gated": True, "augment_dim": 9,
}
DATASET_KWARGS = {"class_name": "training.dataset.ImageFolderDataset", "path": "celeba.zip", "resolution": 8,
                  "use_labels": False, "corruption_probability": 0.8, "delta_probability": 0.1,
                  "mask_full_rgb": True, "corruption_pattern": "dust"}


# ----------------------------------------------------------------------------------------------
# Building pickles with the structure of the published snapshots.

@contextmanager
def fake_persistence():
    """Make `torch_utils.persistence._reconstruct_persistent_obj` importable while pickling, so the
    pickle names that global exactly as EDM's snapshots do."""
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the safe importer
        raise AssertionError("the safe importer must not call the original reconstruction")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    with installed_modules({"torch_utils": package, "torch_utils.persistence": module}):
        yield module


class Persistent:
    """Pickles as EDM's persistent objects do: a call to _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, state, module_src="class Placeholder: pass\n"):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def as_persistent_tree(module: torch.nn.Module):
    """Our module as the reference pickles its network: persistent objects for its own classes,
    torch's ModuleDict for the dictionaries."""
    children = OrderedDict((name, as_persistent_tree(child)) for name, child in module._modules.items())
    if isinstance(module, torch.nn.ModuleDict):
        shell = torch.nn.ModuleDict()
        shell._modules = children
        return shell
    state = dict(module.__dict__, _modules=children)
    return Persistent(f"training.networks.{type(module).__name__}", state)


def reference_model():
    config = dict(REFERENCE_NETWORK_KWARGS, img_resolution=8, img_channels=6, label_dim=0)
    return randomize_(build_reference_model(config)).eval()


def write_reference_run(tmp_path, ema, extra=None):
    loss = Persistent("training.loss.AmbientLoss",
                      dict(P_mean=-1.2, P_std=np.float64(1.2), sigma_data=0.5, norm=2),
                      module_src="import os\nos.system('echo pwned')\n")
    payload = dict(ema=ema, loss_fn=loss, augment_pipe=None,
                   dataset_kwargs=dict(DATASET_KWARGS, corruption_probability=np.float64(0.8)), **(extra or {}))
    with fake_persistence():
        (tmp_path / "network-snapshot-000100.pkl").write_bytes(pickle.dumps(payload))
    options = dict(network_kwargs=REFERENCE_NETWORK_KWARGS, dataset_kwargs=DATASET_KWARGS, batch_size=256)
    (tmp_path / "training_options.json").write_text(json.dumps(options))
    return tmp_path / "network-snapshot-000100.pkl"


def same_outputs(a, b):
    x, sigma, aug = ambient_input(2), torch.tensor([0.05, 3.0]), torch.randn(2, 9)
    with torch.no_grad():
        return torch.equal(a(x, sigma, augment_labels=aug), b(x, sigma, augment_labels=aug))


# ----------------------------------------------------------------------------------------------

def test_import_state_dict_snapshot_with_compile_prefix(tmp_path):
    model = reference_model()
    ema = OrderedDict(("_orig_mod." + k, v.clone()) for k, v in model.state_dict().items())
    loaded = import_reference(write_reference_run(tmp_path, ema))
    assert loaded.model.gate == "double_sigmoid" and not loaded.model.mask_aware
    assert not loaded.model.training
    assert same_outputs(model, loaded.model)
    assert loaded.corruption == dict(kind="dust", p=0.8, delta=0.1, shared_channels=True)
    assert loaded.survival == pytest.approx(0.2 * 0.9)
    assert loaded.metadata["reference_loss"] == "training.loss.AmbientLoss"


def test_import_pickled_module_snapshot(tmp_path):
    model = reference_model()
    loaded = import_reference(write_reference_run(tmp_path, as_persistent_tree(model)))
    assert same_outputs(model, loaded.model)


def test_run_directory_and_our_format_share_one_call_path(tmp_path):
    model = reference_model()
    write_reference_run(tmp_path, OrderedDict(model.state_dict()))
    from_dir = load_network(tmp_path)
    assert same_outputs(model, from_dir.model)
    out = tmp_path / "converted.safetensors"
    save_network(out, from_dir.model, from_dir.corruption, source="test")
    ours = load_network(out)
    assert same_outputs(model, ours.model)
    assert ours.corruption == from_dir.corruption and ours.metadata == {"source": "test"}


def test_convert_cli(tmp_path):
    model = reference_model()
    (tmp_path / "published").mkdir()
    write_reference_run(tmp_path / "published", OrderedDict(model.state_dict()))
    out = tmp_path / "out" / "net.safetensors"
    result = subprocess.run([sys.executable, "-m", "ambient_fast.convert", str(tmp_path / "published"), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert same_outputs(model, load_network(out).model)


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = reference_model()
    snapshot = write_reference_run(tmp_path, OrderedDict(model.state_dict()), extra=dict(evil=RunsShell(marker)))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        import_reference(snapshot)
    assert not marker.exists()


def test_persistent_object_source_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    model = reference_model()
    tree = as_persistent_tree(model)
    tree.meta["module_src"] = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    loaded = import_reference(write_reference_run(tmp_path, tree))
    assert same_outputs(model, loaded.model)
    assert not marker.exists()


def test_object_numpy_scalar_is_refused(tmp_path):
    class ObjectScalar:
        def __reduce__(self):
            return (np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar,
                    (np.dtype("O"), ["payload"]))

    model = reference_model()
    snapshot = write_reference_run(tmp_path, OrderedDict(model.state_dict()), extra=dict(bad=ObjectScalar()))
    with pytest.raises(UnsafePickleError, match="object dtype"):
        import_reference(snapshot)


def test_missing_training_options(tmp_path):
    snapshot = write_reference_run(tmp_path, OrderedDict(reference_model().state_dict()))
    (tmp_path / "training_options.json").unlink()
    with pytest.raises(FileNotFoundError, match="training_options.json"):
        import_reference(snapshot)


def test_foreign_safetensors_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ambient-fast checkpoint"):
        load_network(tmp_path / "other.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = EDMPrecond(img_resolution=8, img_channels=6, model_type="SongUNet", model_channels=16,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    path = tmp_path / "net.safetensors"
    save_network(path, model)
    before = path.read_bytes()

    import ambient_fast.files.atomic as files

    def crash(*args, **kwargs):  # killed after writing the temporary file, before renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "fsync_path", crash)
    with pytest.raises(KeyboardInterrupt):
        save_network(path, randomize_(model))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]
