"""Packaging for ambient-fast.

`kernels/` lives at the top of the repository but installs as `ambient_fast.kernels`: a
top-level module named `kernels` would collide with an existing PyPI package. The mapping
works for `pip install .` and for editable installs (`pip install -e .`).
"""
from setuptools import setup

setup(
    name="ambient-fast",
    version="0.1.0",
    description="Fast, checkpoint-compatible Ambient Diffusion: learn clean image distributions from corrupted data",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ambient_fast", "ambient_fast.networks", "ambient_fast.data", "ambient_fast.objective",
              "ambient_fast.training", "ambient_fast.sampling", "ambient_fast.evaluation", "ambient_fast.files",
              "ambient_fast.kernels"],
    package_dir={"ambient_fast.kernels": "kernels"},
    # torch is pinned in .ci/run and the README (installed first, CPU build); any range here
    # would let pip pull a multi-GB CUDA build on a machine that has none installed yet.
    install_requires=["torch>=2.4", "numpy>=1.24", "safetensors>=0.4", "pillow>=10", "rich>=13", "nvidia-ml-py>=12"],
    extras_require={
        # The tests exercise the Triton kernels (interpreter mode on CPU), the DALI pipeline,
        # fine-tuning diffusers models, and bench/science.py end to end (its histogram needs
        # matplotlib), check the metrics against scipy (the package itself uses neither), and fuzz every
        # command's input with hypothesis (tests/test_fuzz.py). pytest-xdist: the README's test command
        # runs the suite on two workers; tensorboard: the test of train --log tensorboard reads the event
        # files back with tensorboard's own reader.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "triton>=3.6; platform_system == 'Linux'",
                 "nvidia-dali-cuda130>=1.40", "scipy>=1.10", "matplotlib>=3.5", "diffusers>=0.42", "hypothesis>=6.100",
                 "tensorboard>=2.14"],
        "kernels": ["triton>=3.6; platform_system == 'Linux'"],
        "dali": ["nvidia-dali-cuda130>=1.40"],
        # python -m ambient_fast.finetune and diffusers directories in sample / restore. diffusers
        # does not require torch, so it never replaces the pinned CPU build.
        "diffusers": ["diffusers>=0.42"],
        "bench": ["matplotlib>=3.5"],  # the memorization histograms of bench/science.py and bench/finetune.py
        # train --log tensorboard / --log wandb: the run's scalars and sample grids in the
        # ecosystem's trackers (torch's own SummaryWriter writes TensorBoard's event files).
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
    },
)
