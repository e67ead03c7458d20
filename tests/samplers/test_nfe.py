"""``samplers.count_nfe``: the denoiser evaluations of a sampler run, against the network calls
the reference implementations make -- k-diffusion's samplers (a model that counts its calls)
and diffusers' pipelines (one UNet call per entry of ``scheduler.timesteps``)."""

import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from jaxdiff.samplers.api import scheduler_grid
from jaxdiff.samplers.nfe import count_nfe
from tests.samplers.test_vs_kdiffusion import kd  # noqa: F401 -- the k-diffusion fixture

KD_NAMES = {"euler": "sample_euler", "heun": "sample_heun", "dpm2": "sample_dpm_2", "lms": "sample_lms",
            "euler_ancestral": "sample_euler_ancestral", "dpm2_ancestral": "sample_dpm_2_ancestral",
            "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral", "dpmpp_sde": "sample_dpmpp_sde",
            "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}


@pytest.mark.parametrize("n", [4, 9])
def test_counts_equal_k_diffusion_model_calls(kd, n):  # noqa: F811
    import torch

    sigmas = kd.get_sigmas_karras(n, 0.002, 80.0, rho=7.0)
    grid = S.grid_from_sigmas(P.EDM(), np.asarray(sigmas[:-1], np.float64))
    for name, fn_name in KD_NAMES.items():
        calls = [0]

        def model(x, sigma):
            calls[0] += 1
            return x / (1 + sigma.reshape(-1, 1) ** 2)

        extra = {} if name in ("euler", "heun", "dpm2", "lms", "dpmpp_2m") else {
            "noise_sampler": lambda s, s_next: torch.zeros(1, 2)}
        getattr(kd, fn_name)(model, torch.ones(1, 2) * 80.0, sigmas, disable=True, **extra)
        assert count_nfe(name, grid, key=None) == calls[0], (name, n, calls[0])


@pytest.mark.parametrize("name, cls, config", [
    ("ddim", "DDIMScheduler", {}),
    ("ddpm", "DDPMScheduler", {}),
    ("pndm", "PNDMScheduler", {}),
    ("plms", "PNDMScheduler", {"skip_prk_steps": True}),
    ("dpm_solver", "DPMSolverSinglestepScheduler", {}),
    ("dpm_solver", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("deis", "DEISMultistepScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("dpm2", "KDPM2DiscreteScheduler", {}),
])
def test_counts_equal_diffusers_pipeline_calls(name, cls, config):
    diffusers = pytest.importorskip("diffusers")
    schedule = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    for n in (7, 12):
        sched = getattr(diffusers, cls)(**schedule, **config)
        sched.set_timesteps(n)
        options = {"order": config["solver_order"]} if "solver_order" in config else {}
        nfe = count_nfe(name, scheduler_grid(name, schedule, n).grid, **options)
        assert nfe == len(sched.timesteps), (name, n, nfe, len(sched.timesteps))


def test_counts_what_runs_and_refuses_adaptive():
    grid = S.make_grid(P.EDM(), 6)
    assert count_nfe("euler", grid) == 6 and count_nfe("heun", grid) == 11  # EDM's 2N - 1

    def two_per_step(denoise, x, grid, *, key=None):  # any callable with the sampler signature
        for i in range(grid.num_steps):
            x = 0.5 * (denoise(x, grid.t[i]) + denoise(x, grid.t[i]))
        return x

    assert count_nfe(two_per_step, grid) == 12
    with pytest.raises(ValueError, match="return_nfe=True"):
        count_nfe("pf_ode_adaptive", grid)
    assert set(samplers.available()) >= set(KD_NAMES)
