"""Triton kernels of fastctx, installed as ``fastctx.kernels``: one module per op.

``kernels/<op>.py`` holds the op's ``@triton.jit`` kernels and, below them, their
launchers ``<op>_fwd`` / ``<op>_bwd``, autotune configs, ``limits`` and
``compile_cases``; ``_launch.py`` is the machinery they share. A kernel knows
nothing of autograd: the public op in ``fastctx/ops/<op>.py`` calls the launchers.
"""
