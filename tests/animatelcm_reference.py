"""A PyTorch reference of AnimateLCM-SVD's sampler, written for these tests from the authors' scheduler
(``AnimateLCMSVDStochasticIterativeScheduler`` in github.com/G-U-N/AnimateLCM, ``animatelcm_svd/``) with the
settings of their demo (40 training levels, sigma 0.002 .. 700, sigma_data 1, rho 7, s_noise 1, no clipping).

It has the diffusers scheduler interface the ``StableVideoDiffusionPipeline`` drives (``set_timesteps``,
``timesteps``, ``init_noise_sigma``, ``order``, ``scale_model_input``, ``step``); the noise each step adds is taken
from ``noises`` in order instead of the global torch generator, so a test can inject the same draws on both sides.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


class AnimateLCMReferenceScheduler:
    order = 1

    def __init__(self, noises=(), train_steps=40, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, s_noise=1.0,
                 rho=7.0):
        self.noises = list(noises)
        self.train_steps, self.sigma_min, self.sigma_max = train_steps, sigma_min, sigma_max
        self.sigma_data, self.s_noise, self.rho = sigma_data, s_noise, rho
        self.init_noise_sigma = (sigma_max ** 2 + 1) ** 0.5
        self.config = SimpleNamespace(num_train_timesteps=train_steps)

    def _karras(self, ramp):
        min_inv_rho, max_inv_rho = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho

    def set_timesteps(self, num_inference_steps, device=None):
        step_ratio = self.train_steps // num_inference_steps
        # the authors' spacing: training indices 0, r, 2r, ... from the largest sigma, as a ramp over 0 .. 1
        indices = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        sigmas = self._karras(indices[::-1].copy() / (self.train_steps - 1))
        self.timesteps = torch.from_numpy(0.25 * np.log(sigmas + 1e-44))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
        self.index = 0

    def scale_model_input(self, sample, timestep):
        sigma = self.sigmas[self.index]
        return sample / ((sigma ** 2 + self.sigma_data ** 2) ** 0.5)

    def step(self, model_output, timestep, sample, return_dict=True):
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = -sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        denoised = c_out * model_output + c_skip * sample
        noise = self.noises.pop(0) if len(self.timesteps) > 1 else torch.zeros_like(model_output)
        prev_sample = denoised + noise * self.s_noise * sigma_next.clamp(min=0, max=self.sigma_max)
        self.index += 1
        return SimpleNamespace(prev_sample=prev_sample)
