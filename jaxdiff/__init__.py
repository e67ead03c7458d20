"""jaxdiff: pure-JAX diffusion and flow-matching models.

The math core (``schedules``, ``parameterization``, ``losses``, ``samplers``) imports only
jax and numpy. Networks live in ``jaxdiff.nets`` (Flax), training in ``jaxdiff.train``.
"""

__version__ = "0.1.0"
