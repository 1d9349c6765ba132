"""Pixel-space diffusers UNets as ambient EDM denoisers (the paper's section 5.2: fine-tuning DeepFloyd
IF stage I on corrupted data), and the diffusers directories they are read from and written to.

A diffusers UNet is a discrete-time variance-preserving (VP) model: at timestep k it sees
`x_vp = sqrt(alphabar_k) x0 + sqrt(1 - alphabar_k) n` and predicts the noise n (epsilon), the
velocity v, or x0 itself (`prediction_type` of its scheduler). In EDM's terms (x = x0 + sigma n)
the same state is `x_vp = x / sqrt(1 + sigma^2)` with `sigma_k = sqrt((1 - alphabar_k) / alphabar_k)`,
so the UNet becomes an EDM denoiser D(x, sigma) with

    epsilon:       D = x - sigma F
    v_prediction:  D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) F
    sample:        D = F

where F is the UNet's output on `x / sqrt(1 + sigma^2)` at the continuous timestep of sigma: log
sigma interpolated linearly between the schedule's levels (diffusers' UNets take float timesteps),
clamped to [0, T - 1] outside the range the schedule covers. `DiffusersDenoiser` has the call
signature of our preconditioners, `net(cat([A_hat * (y + sigma n), A_hat]), sigma, class_labels)`,
so the ambient loss, the samplers and one-step restoration use it unchanged.

Ambient input. The UNet keeps its own input channels (C: a foundation model has no mask input):
it sees the masked image only, hidden pixels 0, as in the authors' DeepFloyd script. Where the
mask observes, D is recovered from F as above; where it hides, the pixel carries no information
about x0 and F itself is taken as the x0 prediction (the authors' script does this; our mask-aware
preconditioning does the same up to the factor sigma_data).

Conditioning. A `UNet2DConditionModel` (DeepFloyd IF stage I: 6 output channels, noise and
variance, of which D uses the first C) takes text embeddings as `encoder_hidden_states`; no text
encoder is run here. They come from a safetensors file holding `prompt_embeddings` of shape
(K, L, D) (or (L, D) for K = 1), e.g. `IFPipeline.encode_prompt(prompts)[0]` computed elsewhere:
K = 1 (the empty prompt, the authors' setting) conditions every image on it; K > 1 maps prompt k to
class k: an image's one-hot label (the data set's per-image labels while training, `--class` while
sampling) selects its prompt, so the denoiser's `label_dim` is K.

Directories. A model is read from a directory written by `save_pretrained` (config.json and
safetensors weights; pickled `.bin` weights are refused) with its scheduler config beside it
(`scheduler_config.json` in it, or `../scheduler/scheduler_config.json` of a pipeline layout; a
pipeline root with `unet/` and `scheduler/` works too). Fine-tuned UNets are written the same way
(`save_pretrained`, loadable by diffusers as they are), each directory self-contained: the
scheduler config, the prompt embeddings and `ambient.json` (training corruption, step) beside the
weights.

diffusers is an optional extra (`pip install "ambient-fast[diffusers]"`): nothing here imports it
until a model is built, read or written.
"""
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
PROMPTS = "prompt_embeddings.safetensors"   # key PROMPT_KEY: (K, L, D) float
PROMPT_KEY = "prompt_embeddings"
AMBIENT_INFO = "ambient.json"               # what we add beside the weights: corruption, step, ...
EXTRA = 'pip install "ambient-fast[diffusers]"'


def require_diffusers():
    """The diffusers package, or an ImportError that says how to install the extra."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"diffusers models need the optional extra: {EXTRA} (diffusers is not installed: "
                          f"{error})") from error
    return diffusers


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers UNet as an ambient EDM denoiser (see the module docstring for the maths).

    Args:
        unet: a diffusers `UNet2DModel` or `UNet2DConditionModel` with C input channels and C or 2C
            output channels (2C: noise and learned variance; the first C are used).
        alphas_cumprod: (T,) the scheduler's alphabar_k, k = 0..T-1.
        prediction_type: epsilon | v_prediction | sample.
        scheduler_config: the scheduler's config, written beside the weights when saved.
        prompt_embeddings: (K, L, D) for a UNet2DConditionModel, None otherwise.
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                 scheduler_config: dict, prompt_embeddings: Optional[torch.Tensor] = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
        channels, out_channels = unet.config.in_channels, unet.config.out_channels
        if out_channels not in (channels, 2 * channels):
            raise ValueError(f"the UNet maps {channels} channels to {out_channels}; expected {channels} (a prediction) "
                             f"or {2 * channels} (a prediction and its variance)")
        conditional = "encoder_hidden_states" in inspect.signature(unet.forward).parameters
        if conditional != (prompt_embeddings is not None):
            raise ValueError(f"{type(unet).__name__} takes text embeddings: pass prompt embeddings (a safetensors "
                             f"file with {PROMPT_KEY!r})" if conditional else
                             f"{type(unet).__name__} takes no text embeddings, but prompt embeddings were given")
        if prompt_embeddings is not None and prompt_embeddings.ndim != 3:
            raise ValueError(f"prompt embeddings must be (K, L, D), got shape {tuple(prompt_embeddings.shape)}")
        alphas_cumprod = alphas_cumprod.to(torch.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2 or not (alphas_cumprod.diff() < 0).all():
            raise ValueError("the noise schedule's alphas_cumprod must decrease strictly over at least 2 timesteps")
        super().__init__()
        self.model = unet
        self.prediction_type = prediction_type
        self.scheduler_config = dict(scheduler_config)
        self.channels = channels
        self.img_channels = 2 * channels          # image and mask, as our preconditioners take them
        size = unet.config.sample_size
        self.img_resolution = int(size if isinstance(size, int) else size[0])
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        # Buffers, not saved with the weights: they follow the module to its device (CUDA graphs
        # cannot copy from the host), and the schedule comes from the scheduler config.
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.register_buffer("prompt_embeddings", None if prompt_embeddings is None else prompt_embeddings.float(),
                             persistent=False)
        self.label_dim = len(prompt_embeddings) if prompt_embeddings is not None and len(prompt_embeddings) > 1 else 0

    @property
    def train_sigmas(self) -> torch.Tensor:
        """(T,) float32 noise levels of the schedule's timesteps, the levels the UNet was trained on."""
        return self.log_sigmas.exp().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The continuous timestep of each noise level: log sigma interpolated linearly between the
        schedule's levels (k at sigma_k), clamped to [0, T - 1]. Computed in float64."""
        log_sigmas = self.log_sigmas
        log_sigma = sigma.to(log_sigmas.dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
        upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lower = upper - 1
        fraction = (log_sigma - log_sigmas[lower]) / (log_sigmas[upper] - log_sigmas[lower])
        return lower + fraction

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out) on observed pixels, D = c_skip x + c_out F, for sigma (N, 1, 1, 1)."""
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma
        if self.prediction_type == "v_prediction":
            return 1 / (1 + sigma ** 2), -sigma / (1 + sigma ** 2).sqrt()
        return torch.zeros_like(sigma), torch.ones_like(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Denoise.

        Args:
            x: (N, 2C, H, W) masked noisy image and mask, `cat([A_hat * (y + n), A_hat])`.
            sigma: (N,) or scalar noise levels.
            class_labels: (N, K) one-hot prompt choice when the denoiser has K > 1 prompts; else ignored.
            augment_labels: must be None (diffusers UNets have no augmentation conditioning).
        Returns:
            (N, 2C, H, W) float32: the denoised image, then the mask (the preconditioners' layout).
        """
        if augment_labels is not None:
            raise ValueError("a diffusers UNet takes no augmentation labels")
        n, channels = x.shape[0], self.channels
        timesteps = self.timestep(sigma.reshape(-1)).to(torch.float32).expand(n)
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        image, mask = x[:, :channels], x[:, channels:]
        F_x = self.model(image / (1 + sigma ** 2).sqrt(), timesteps, **self._conditioning(class_labels, n),
                         return_dict=False)[0]
        F_x = F_x[:, :channels].to(torch.float32)
        c_skip, c_out = self.coefficients(sigma)
        # Observed pixels: x0 recovered from the prediction. Hidden pixels: the output is x0.
        d_image = mask * (c_skip * image + c_out * F_x) + (1 - mask) * F_x
        return torch.cat([d_image, mask], dim=1)

    def _conditioning(self, class_labels: Optional[torch.Tensor], n: int) -> dict:
        if self.prompt_embeddings is None:
            return {}
        if self.label_dim == 0:
            return {"encoder_hidden_states": self.prompt_embeddings.expand(n, -1, -1)}
        if class_labels is None:
            raise ValueError(f"this model has {self.label_dim} prompts: pass class labels (N, {self.label_dim}), "
                             "one-hot over the prompts")
        labels = class_labels.to(self.prompt_embeddings.dtype).reshape(-1, self.label_dim)
        return {"encoder_hidden_states": torch.einsum("nk,kld->nld", labels, self.prompt_embeddings).expand(n, -1, -1)}

    def blocks(self) -> "list[torch.nn.Module]":
        """The units torch.compile and FSDP treat one by one: the UNet's down, middle and up blocks."""
        middle = [self.model.mid_block] if self.model.mid_block is not None else []
        return [*self.model.down_blocks, *middle, *self.model.up_blocks]

    def describe(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        prompts = "" if self.prompt_embeddings is None else f", {len(self.prompt_embeddings)} prompt embedding(s)"
        return (f"{type(self.model).__name__} ({params / 1e6:.2f} M params, {self.prediction_type} prediction, "
                f"{len(self.log_sigmas)} timesteps, sigma {self.sigma_min:.3g}..{self.sigma_max:.3g}{prompts})")


# ----------------------------------------------------------------------------------------------
# Directories.

def is_diffusers_model(path: Union[str, Path]) -> bool:
    """True when `path` is a diffusers UNet directory (config.json naming a class) or a pipeline
    root holding one in `unet/`."""
    path = Path(path)
    for folder in (path, path / "unet"):
        try:
            if "_class_name" in json.loads((folder / "config.json").read_text()):
                return True
        except (OSError, ValueError):
            continue
    return False


def _locate(path: Path) -> "tuple[Path, Path]":
    """(UNet directory, scheduler config) of a UNet directory or a pipeline root."""
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers UNet directory (no config.json; expected a directory "
                                "written by save_pretrained, or a pipeline with unet/)")
    candidates = [unet_dir / SCHEDULER_CONFIG, unet_dir.parent / "scheduler" / SCHEDULER_CONFIG]
    for candidate in candidates:
        if candidate.is_file():
            return unet_dir, candidate
    raise FileNotFoundError(f"no scheduler config beside the UNet in {unet_dir}: it decides the noise schedule and "
                            f"the prediction type; looked for {' and '.join(map(str, candidates))}")


def read_prompt_embeddings(path: Union[str, Path]) -> torch.Tensor:
    """(K, L, D) float32 from a safetensors file holding `prompt_embeddings` ((L, D) means K = 1)."""
    tensors = load_file(str(path))
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{path} holds no {PROMPT_KEY!r} tensor (it holds {sorted(tensors)})")
    embeddings = tensors[PROMPT_KEY].float()
    embeddings = embeddings[None] if embeddings.ndim == 2 else embeddings
    if embeddings.ndim != 3:
        raise ValueError(f"{path}: {PROMPT_KEY!r} must be (K, L, D) or (L, D), got shape {tuple(embeddings.shape)}")
    return embeddings


def load_denoiser(path: Union[str, Path], prompt_embeddings: Optional[Union[str, Path]] = None) -> DiffusersDenoiser:
    """A DiffusersDenoiser from a UNet directory (or a pipeline root), in eval mode.

    Args:
        path: directory written by `save_pretrained`, its scheduler config beside it (module docstring).
        prompt_embeddings: safetensors file of prompt embeddings for a UNet2DConditionModel; default:
            the one saved beside the weights, if any.
    """
    diffusers = require_diffusers()
    unet_dir, scheduler_path = _locate(Path(path))
    name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{unet_dir} holds a {name}; supported: {', '.join(UNET_CLASSES)}")
    if not any(unet_dir.glob("*.safetensors")) and not any(unet_dir.glob("*.safetensors.index.json")):
        raise ValueError(f"{unet_dir} has no safetensors weights; pickled weights (.bin) are not loaded, since "
                         "unpickling can run code: convert them with diffusers' save_pretrained(safe_serialization=True)")
    from diffusers.utils import is_accelerate_available

    unet = getattr(diffusers, name).from_pretrained(unet_dir, use_safetensors=True,
                                                   low_cpu_mem_usage=is_accelerate_available())
    scheduler_config = json.loads(scheduler_path.read_text())
    schedule = diffusers.DDPMScheduler.from_config(scheduler_config)  # diffusers' own betas for the config
    if prompt_embeddings is None and (unet_dir / PROMPTS).is_file():
        prompt_embeddings = unet_dir / PROMPTS
    embeddings = read_prompt_embeddings(prompt_embeddings) if prompt_embeddings is not None else None
    return DiffusersDenoiser(unet, schedule.alphas_cumprod, scheduler_config.get("prediction_type", "epsilon"),
                             scheduler_config, embeddings).eval()


def read_info(path: Union[str, Path]) -> dict:
    """What we wrote beside fine-tuned weights (`ambient.json`); {} for a model we did not write."""
    unet_dir, _ = _locate(Path(path))
    info = unet_dir / AMBIENT_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def save_denoiser(path: Union[str, Path], denoiser: DiffusersDenoiser, state: dict, info: dict) -> Path:
    """Write `state` (the UNet's weights, keys as `denoiser.model.state_dict()`) as a diffusers
    directory with `save_pretrained`, beside it the scheduler config, the prompt embeddings and
    `info` as ambient.json. Written aside and renamed into place: a crash never leaves a half-written
    directory under `path`. Returns `path`."""
    require_diffusers()
    # Built on the meta device and given the tensors: no second copy of the weights is allocated.
    with torch.device("meta"):
        unet = type(denoiser.model).from_config(denoiser.model.config)
    unet.load_state_dict(state, strict=True, assign=True)

    def write(folder: Path) -> None:
        unet.save_pretrained(folder, safe_serialization=True)
        (folder / SCHEDULER_CONFIG).write_text(json.dumps(denoiser.scheduler_config, indent=1))
        if denoiser.prompt_embeddings is not None:
            save_file({PROMPT_KEY: denoiser.prompt_embeddings.detach().cpu().contiguous()}, str(folder / PROMPTS))
        (folder / AMBIENT_INFO).write_text(json.dumps(info, indent=1))

    return _atomic_directory(Path(path), write)


def _atomic_directory(path: Path, write) -> Path:
    """Fill a temporary directory through `write(folder)`, fsync its files, then swap it in for `path`."""
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
