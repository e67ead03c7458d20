"""Metrics and visual outputs."""

from jaxdiff.metrics.grid import image_grid, save_image_grid, save_samples, save_scatter

__all__ = ["image_grid", "save_image_grid", "save_samples", "save_scatter"]
