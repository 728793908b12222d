"""Pallas Mosaic GPU (Hopper) kernels; each kernel family sits in its own file beside its reference."""
