"""Evaluation: sample-quality and memorisation metrics, and FID's Inception-v3."""
