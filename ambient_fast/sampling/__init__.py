"""Sampling from ambient models: EDM's discretisation, the fixed-mask and guidance samplers, churn,
and the fast path (bf16, CUDA graphs)."""
