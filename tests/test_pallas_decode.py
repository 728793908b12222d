"""The split-K Mosaic GPU decode-attention kernel against its jnp twin, on the CPU.

The kernel runs under ``plgpu.force_gpu_interpret_mode`` with the race detector on (TMA, barriers
and wgmma simulated). The reference is `decode_attention_reference` in float32 on the same 16-bit
inputs, so the tolerances cover the kernel's own rounding (P cast to the input dtype before the
PV product, the output cast). Lengths are ragged and not multiples of the chunk or the tile;
caches stay at one or two tiles per split to keep the interpreter fast.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.decode import decode_attention, decode_attention_reference
from ccajax.pallas.decode_sm90 import decode_attention_sm90, default_splits

# Measured worst max-abs errors in interpret mode over these cases x 3 seeds (inputs ~N(0, 1),
# outputs up to ~1.1): bf16 2.9e-3, fp16 2.1e-4. The bounds leave 3.5x and 5x headroom.
TOL = {"bfloat16": 1e-2, "float16": 1e-3}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """An exception inside an interpreted kernel leaves global interpreter state behind."""
    yield
    gpu_interpret.reset_gpu_interpret_mode_state()


def _inputs(rng, dtype, batch, max_len, hq, hkv, d):
    shapes = [(batch, hq, d), (batch, max_len, hkv, d), (batch, max_len, hkv, d)]
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


CASES = {
    # id: (dtype, batch, T, Hq, Hkv, d, lengths, kernel options)
    "ccgqa-4:1-ragged-2splits": ("bfloat16", 2, 256, 8, 2, 64, [200, 37],
                                 dict(block_kv=64, splits=2)),
    "mha-empty-and-full-4splits": ("float16", 3, 256, 2, 2, 64, [0, 256, 65],
                                   dict(block_kv=64, splits=4)),
    "d128-3stages-one-split": ("bfloat16", 2, 256, 4, 1, 128, [255, 129],
                               dict(block_kv=128, stages=3, splits=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, rng):
    dtype, batch, max_len, hq, hkv, d, lengths, options = CASES[case]
    q, k, v = _inputs(rng, dtype, batch, max_len, hq, hkv, d)
    lengths = jnp.asarray(lengths, jnp.int32)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        out = np.asarray(decode_attention_sm90(q, k, v, lengths, **options).astype(jnp.float32))
    assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    ref = np.asarray(decode_attention_reference(*(a.astype(jnp.float32) for a in (q, k, v)),
                                                lengths))
    assert out.shape == q.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    empty = np.asarray(lengths) == 0
    assert not out[empty].any()  # a sequence with no key gives exactly 0


def test_dispatch(rng):
    q, k, v = _inputs(rng, "bfloat16", 1, 128, 4, 2, 64)
    lengths = jnp.asarray([77], jnp.int32)
    ref = np.asarray(decode_attention(q, k, v, lengths).astype(jnp.float32))  # CPU: xla
    np.testing.assert_array_equal(
        ref, np.asarray(decode_attention_reference(q, k, v, lengths).astype(jnp.float32)))
    out = decode_attention(q, k, v, lengths, interpret=True)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=TOL["bfloat16"],
                               rtol=TOL["bfloat16"])
    q_wide, k_wide, _ = _inputs(rng, "bfloat16", 1, 128, 4, 1, 576)
    with pytest.raises(ValueError, match="implementation='mosaic' needs .* use implementation='xla'"):
        decode_attention(q_wide, k_wide, k_wide, lengths, implementation="mosaic")
    with pytest.raises(ValueError, match=r"lengths must be integer of shape \(B,\) = \(1,\)"):
        decode_attention(q, k, v, jnp.asarray([1, 2]))


def test_kernel_argument_errors(rng):
    q, k, v = _inputs(rng, "bfloat16", 1, 192, 4, 2, 64)
    lengths = jnp.asarray([5], jnp.int32)
    with pytest.raises(ValueError, match=r"block_kv must be one of \(64, 128\) and divide the cache "
                                         r"length T=192; got block_kv=128"):
        decode_attention_sm90(q, k, v, lengths, block_kv=128)
    with pytest.raises(ValueError, match=r"splits must be a positive int dividing T/block_kv = 3; "
                                         r"got splits=2"):
        decode_attention_sm90(q, k, v, lengths, block_kv=64, splits=2)
    with pytest.raises(ValueError, match="q.dtype must be bfloat16 or float16"):
        decode_attention_sm90(q.astype(jnp.float32), k, v, lengths, block_kv=64)


@pytest.mark.parametrize("batch, hkv, max_len", [(16, 2, 32768), (1, 2, 131072), (64, 16, 4096),
                                                 (1, 1, 128), (3, 2, 384 * 128)])
def test_default_splits_fill_the_gpu(batch, hkv, max_len):
    tiles = max_len // 128
    splits = default_splits(batch, hkv, max_len, 128, num_sms=132)
    assert tiles % splits == 0
    ctas = batch * hkv * splits
    # The first wave keeps >= 90% of the SMs busy whenever there are enough tiles for that.
    assert ctas >= min(0.9 * 132, batch * hkv * tiles)
