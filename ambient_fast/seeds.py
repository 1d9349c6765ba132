"""Seeds derived from integers (run seed, rank, step, epoch, ...): every random draw of a run is a
pure function of its position, which is what makes resumption exact without saving RNG states."""
import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: stable across platforms)."""
    low, high = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)
