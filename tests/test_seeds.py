"""The run's random streams (ambient_fast.objective.seeds): the PyTorch Philox is Triton's, bit for bit; the
words become uniforms and normals without rounding questions; streams are pure functions of position."""
import math
import os

import numpy as np
import pytest
import torch

from ambient_fast.objective.seeds import (TWO_PI, Stream, box_muller, derive_seed, open_uniform, permutation, philox, stream_key,
                                uniform)

triton = pytest.importorskip("triton", reason="Triton is not installed: the Philox words are not compared with its own")


@pytest.fixture(scope="module")
def randint4x():
    """Triton's tl.randint4x run by its interpreter: (key, counters int64 (n,)) -> (n, 4) unsigned words."""
    from ambient_fast.kernels._utils import kernel, tl

    @kernel(do_not_specialize=["key"])
    def _words(out_ptr, counter_ptr, key, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(key, tl.load(counter_ptr + i))
        tl.store(out_ptr + i * 4, r0)
        tl.store(out_ptr + i * 4 + 1, r1)
        tl.store(out_ptr + i * 4 + 2, r2)
        tl.store(out_ptr + i * 4 + 3, r3)

    def run(key, counters):
        out = torch.zeros(len(counters) * 4, dtype=torch.int32)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            _words[(1,)](out, counters, key, BLOCK=len(counters))
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        return out.view(-1, 4).to(torch.int64) & 0xFFFFFFFF

    return run


@pytest.mark.parametrize("key", [0, 1, 123456789, 2 ** 62 + 12345, stream_key(7, Stream.ELEMENT)])
def test_philox_is_tritons(randint4x, key):
    counters = torch.cat([torch.arange(64), 2 ** 32 - 32 + torch.arange(64), torch.randint(0, 2 ** 62, (128,))])
    assert torch.equal(torch.stack(philox(key, counters), 1), randint4x(key, counters))


def test_philox_known_answer():
    """Random123's published Philox4x32-10 vector for key (0, 0), counter (0, 0, 0, 0)."""
    words = [int(w) for w in philox(0, torch.zeros(1, dtype=torch.int64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_uniforms_sit_on_the_24_bit_grid():
    words = torch.tensor([0, 255, 256, 2 ** 32 - 1, 2 ** 31])
    assert uniform(words).tolist() == [0.0, 0.0, 2.0 ** -24, 1 - 2.0 ** -24, 0.5]
    assert open_uniform(words).tolist() == [2.0 ** -24, 2.0 ** -24, 2.0 ** -23, 1.0, 0.5 + 2.0 ** -24]
    assert uniform(words).dtype == torch.float32


def test_box_muller_is_the_float64_formula_rounded_once():
    r = philox(5, torch.arange(10_000))
    expected = [np.float32(math.sqrt(-2 * math.log(((int(a) >> 8) + 1) * 2.0 ** -24)) *
                           math.cos(TWO_PI * ((int(b) >> 8) * 2.0 ** -24))) for a, b in zip(r[1][:200], r[0][:200])]
    assert box_muller(r[1], r[0])[:200].tolist() == [float(v) for v in expected]
    z = box_muller(r[1], r[0]).double()
    assert abs(z.mean().item()) < 5 / 100 and abs(z.var().item() - 1) < 5 * (2 / 10_000) ** 0.5
    assert TWO_PI == float(np.float32(2 * math.pi))


def test_streams_are_pure_functions_of_their_parts():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(2 ** 40, 7) < 2 ** 63
    keys = {stream_key(0, stream) for stream in Stream}
    assert len(keys) == len(Stream)
    np.testing.assert_array_equal(permutation(3, 1, 100), permutation(3, 1, 100))
    assert sorted(permutation(3, 1, 100)) == list(range(100))
    assert not np.array_equal(permutation(3, 1, 100), permutation(3, 2, 100))
