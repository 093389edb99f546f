"""Torch-facing launchers of the Triton kernels (ftattn.kernels holds the device code
and its launch configs only). Imported on first use: importing one imports triton."""
