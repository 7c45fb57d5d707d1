"""Gaussian splats: model, rasterizer backends, losses, fitting loop, PLY I/O."""
