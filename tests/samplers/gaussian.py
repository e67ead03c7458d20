"""The exact denoiser of Gaussian data, shared by the sampler tests.

For x0 ~ N(0, c^2 I) and x_t = alpha x0 + sigma eps, E[x0 | x_t] = alpha c^2 / (alpha^2 c^2 +
sigma^2) x_t, so every probability-flow ODE has a closed-form solution to compare against.
"""

C = 0.5  # data standard deviation used by the sampler tests


def gaussian_denoiser(proc, c=C):
    """``denoise(x, t) -> E[x0 | x_t]`` for data N(0, c^2 I) under ``proc``."""

    def denoise(x, t):
        a, s = proc.alpha(t), proc.sigma(t)
        return (a * c**2 / (a**2 * c**2 + s**2)) * x

    return denoise
