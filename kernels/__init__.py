"""Triton kernels of ftattn and their launch configs (shipped as ``ftattn.kernels``).

Nothing torch-facing lives here beyond the launchers; the ops are registered in
the ``ftattn`` package.
"""
