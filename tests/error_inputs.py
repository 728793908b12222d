"""Zero inputs for the kernels' bad-argument tests, with one field overridden per case."""

import jax.numpy as jnp


def zero_inputs(shapes: dict, dtypes: dict, over: dict):
    """(arrays, kwargs) for a kernel call: zero arrays in the order of ``shapes`` (one-letter
    names) and ``kwargs`` = dict(is_causal=False, scale=None). ``over`` overrides a shape
    (``q_shape=(...)``), a dtype (``k_dtype=...``) or sets a keyword argument (anything else)."""
    shapes, dtypes = dict(shapes), dict(dtypes)
    kwargs = dict(is_causal=False, scale=None)
    for key, val in over.items():
        if key.endswith("_shape"):
            shapes[key[0]] = val
        elif key.endswith("_dtype"):
            dtypes[key[0]] = val
        else:
            kwargs[key] = val
    return [jnp.zeros(shapes[n], dtypes[n]) for n in shapes], kwargs
