"""Scalars of one diffusers `LCMScheduler.step`, for the fused `blend_lcm_step` op.

The scheduler is stateful (its step index advances in `step`); these helpers only read its state, so a sampler
that calls the fused op instead of `scheduler.step` must advance the scheduler itself (`advance`).
"""
from __future__ import annotations

import weakref

import torch


PREDICTIONS = ("epsilon", "v_prediction")  # the model outputs one fused LCM step can take


def lcm_coefficients(scheduler, step_index: int) -> dict:
    """The scalars `blend_lcm_step` takes for step `step_index` of `scheduler.timesteps` (set_timesteps done).

    Mirrors LCMScheduler.step without thresholding/clipping:
    returns {"timestep", "sqrt_alpha_t", "sqrt_beta_t", "c_skip", "c_out", "sqrt_alpha_prev", "sqrt_beta_prev",
    "last"}; "last" = the final step, where the op gets noise=None (prev_sample = denoised).
    The op's x0 is (sample − sqrt_beta_t·out) / sqrt_alpha_t, ε-prediction's. A v-prediction model's x0 is
    √ᾱ·sample − √(1−ᾱ)·v, the same formula with sqrt_alpha_t = 1/√ᾱ and sqrt_beta_t = √(1−ᾱ)/√ᾱ: those are
    returned for it, so one fused op serves both (the lab's v-model, `lab.train --prediction`).
    """
    cfg = scheduler.config
    if cfg.prediction_type not in PREDICTIONS:
        raise ValueError(f"lcm_coefficients: prediction_type must be one of {PREDICTIONS}, got {cfg.prediction_type!r}")
    if cfg.thresholding or cfg.clip_sample:
        raise ValueError("lcm_coefficients: thresholding/clip_sample are not fused; disable them in the scheduler")
    timesteps = scheduler.timesteps
    if timesteps is None or scheduler.num_inference_steps is None:
        raise ValueError("lcm_coefficients: call scheduler.set_timesteps(...) first")
    if not 0 <= step_index < len(timesteps):
        raise ValueError(f"lcm_coefficients: step_index {step_index} outside [0, {len(timesteps)})")
    host = _host_values(timesteps)
    t = host[step_index]
    prev_t = host[step_index + 1] if step_index + 1 < len(host) else t
    ac = scheduler.alphas_cumprod  # fp32, as the scheduler computes with it
    a_t = ac[t]
    a_prev = ac[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    div, k = a_t.sqrt(), (1 - a_t).sqrt()
    if cfg.prediction_type == "v_prediction":
        div, k = 1 / a_t.sqrt(), (1 - a_t).sqrt() / a_t.sqrt()
    return {
        "timestep": t,
        "sqrt_alpha_t": float(div),
        "sqrt_beta_t": float(k),
        "c_skip": float(c_skip),
        "c_out": float(c_out),
        "sqrt_alpha_prev": float(torch.as_tensor(a_prev).sqrt()),
        "sqrt_beta_prev": float((1 - torch.as_tensor(a_prev)).sqrt()),
        "last": step_index == scheduler.num_inference_steps - 1,
    }


_HOST_TIMESTEPS: dict = {}  # id -> (weakref, version, list of ints)


def _host_values(timesteps: torch.Tensor) -> list:
    """The schedule as Python ints, read from the device once per timesteps tensor (diffusers keeps it on the
    pipeline's device): one sync per run instead of two per step."""
    if timesteps.device.type == "cpu":
        return [int(t) for t in timesteps.tolist()]
    hit = _HOST_TIMESTEPS.get(id(timesteps))
    if hit is None or hit[0]() is not timesteps or hit[1] != timesteps._version:
        if len(_HOST_TIMESTEPS) > 16:
            _HOST_TIMESTEPS.clear()
        hit = (weakref.ref(timesteps), timesteps._version, [int(t) for t in timesteps.tolist()])
        _HOST_TIMESTEPS[id(timesteps)] = hit
    return hit[2]


STEP_ARGS = ("sqrt_alpha_t", "sqrt_beta_t", "c_skip", "c_out", "sqrt_alpha_prev", "sqrt_beta_prev")


def step_args(coeffs: dict) -> tuple[float, ...]:
    """The six float arguments of `blend_lcm_step`, in schema order."""
    return tuple(coeffs[k] for k in STEP_ARGS)


def advance(scheduler) -> None:
    """Advance the scheduler's step index as its own `step` would have (after a fused step)."""
    if scheduler.step_index is None:
        scheduler._init_step_index(scheduler.timesteps[0])
    scheduler._step_index += 1
