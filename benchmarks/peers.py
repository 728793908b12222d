"""The attention implementations the benchmarks time side by side (no flags: importable anywhere)."""

from __future__ import annotations

from ccajax.attention import dot_product_attention


def _tokamax():
    try:
        import tokamax  # noqa: F401  (not on the GPU image: needs carried wheels)
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return None, f"tokamax not importable ({type(e).__name__}: {e})"
    return (lambda q, k, v, causal: tokamax.dot_product_attention(
        q, k, v, is_causal=causal, implementation="mosaic")), None


def peers():
    """name -> attention(q, k, v, causal), and name -> why it is missing."""
    fns = {impl: (lambda impl: lambda q, k, v, causal: dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl))(impl)
           for impl in ("mosaic", "mosaic_fwd_cudnn_bwd", "cudnn", "xla")}
    tokamax_fn, why = _tokamax()
    missing = {}
    if tokamax_fn is None:
        missing["tokamax"] = why
    else:
        fns["tokamax"] = tokamax_fn
    return fns, missing
