"""ambient-fast: Ambient Diffusion (learning clean distributions from corrupted data), fast and
checkpoint-compatible with the authors' published models."""
__version__ = "0.1.0"
