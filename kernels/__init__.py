"""Triton kernels of fastctx (installed as ``fastctx.kernels``); launchers live in ``fastctx.ops.triton_launch``."""
