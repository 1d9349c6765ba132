"""Sampling from ambient models: EDM's discretisation, the fixed-mask and guidance samplers, churn and
per-seed noise, the fast path (bf16, CUDA graphs); posterior sampling of linear inverse problems and
their measurement operators."""
