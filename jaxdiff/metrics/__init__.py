"""Metrics and visual outputs.

* ``grid`` -- sample grids as PNG files; ``writer`` -- metrics.jsonl / TensorBoard.
* ``fid`` -- Frechet distance, reference statistics (.npz: mu, sigma), Inception Score, KID,
  precision / recall, on feature arrays (numpy, float64).
* ``inception`` -- pytorch-fid's FID InceptionV3 in Flax and its weight converter.
* ``digits_classifier`` -- the 8x8 digits CNN (committed weights): digits FD and class accuracy.
* ``likelihood`` -- bits/dim through the probability-flow ODE (Hutchinson, dequantization).

Only ``grid`` is imported here; import the others explicitly (they pull scipy / Flax).
"""

from jaxdiff.metrics.grid import image_grid, save_image_grid, save_samples, save_scatter

__all__ = ["image_grid", "save_image_grid", "save_samples", "save_scatter"]
