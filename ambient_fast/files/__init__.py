"""Files: atomic writes and strict JSON, network checkpoints (ours, and the safe import of the
published pickles), and images."""
