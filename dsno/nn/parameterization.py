"""What DSNO's network output means: the per-branch coefficients of its output parameterisation.

DSNO's branch m computes  x_{t_m} = skip_m * x_T + out_m * F_m,  F_m = net(in_m * x_T, tau_m)
(an EDM-style c_skip / c_out / c_in / c_noise preconditioning, one set per branch). Two kinds:

- "state": F_m is the state itself, on top of the Gaussian-optimal skip (in_m = 1, tau_m = t_m,
  out_m = 1, skip_m = S(t_m) / S(T) with S(t)^2 = alpha_t^2 sigma_data^2 + sigma_t^2: the exact
  ODE map for data N(0, sigma_data^2 I)). For a freshly initialised backbone only.
- "denoised": branch m predicts a denoised image D_m, mapped to the state by the DDIM map from x_T,
      x_{t_m} = (s_m / s_T) x_T + (a_m - a_T s_m / s_T) D_m,
  and D_m is read from F_m as the teacher reads its own output (`prediction`: eps, x0 or v) at the
  point (in_m x_T, tau_m). There tau_m = tau_0 + (t_m / T)(T - tau_0) (distinct times in
  [tau_0, T]) and in_m = S(tau_m) / S(T) moves x_T to the marginal scale of time tau_m, so a student
  copied from the teacher starts as "one Gaussian transport step, then one teacher denoising":
  a 1-NFE estimate far better than the teacher's own DDIM step from T, whose x0 = (x_T - s_T eps) / a_T
  amplifies the noise prediction's error by 1 / a_T (about 150 on the linear VP schedule).
  A fresh backbone uses prediction="x0" (F_m is D_m).

All times are schedule times in [0, T]; coefficients are float64 math, returned as lists.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

KINDS = ("state", "denoised")
PREDICTIONS = ("eps", "x0", "v")


def _ab(schedule, t: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.tensor(list(t), dtype=torch.float64)
    return schedule.alpha(tt), schedule.sigma(tt)


def gaussian_scale(schedule, t: Sequence[float], sigma_data: float) -> torch.Tensor:
    """S(t) = sqrt(alpha_t^2 sigma_data^2 + sigma_t^2): the marginal std of x_t for data of std sigma_data."""
    a, s = _ab(schedule, t)
    return torch.sqrt(a**2 * sigma_data**2 + s**2)


def net_times(schedule, times: Sequence[float], denoise_time: float) -> list[float]:
    """tau_m = tau_0 + (t_m / T)(T - tau_0): the time inputs of the "denoised" branches."""
    big_t = float(schedule.T)
    return [denoise_time + (float(t) / big_t) * (big_t - denoise_time) for t in times]


def coefficients(schedule, times: Sequence[float], kind: str = "state", prediction: str = "x0",
                 sigma_data: float = 0.5, denoise_time: float = 0.5) -> dict[str, Any]:
    """{"skip", "out_scale", "in_scale", "net_times"}: [M] lists each, for `DSNO` and its build config.

    schedule: a VPSchedule; times: t_1 > ... > t_M; kind: "state" | "denoised"; prediction: what
    the network's output is (the copied teacher's kind, or "x0" for a fresh backbone).
    """
    if kind not in KINDS:
        raise ValueError(f"parameterization kind must be one of {KINDS}, got {kind!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    times = [float(t) for t in times]
    big_t = float(schedule.T)
    scale = gaussian_scale(schedule, [big_t, *times], sigma_data)
    if kind == "state":
        return {"skip": (scale[1:] / scale[0]).tolist(), "out_scale": [1.0] * len(times),
                "in_scale": [1.0] * len(times), "net_times": times}
    if not 0.0 < denoise_time <= big_t:
        raise ValueError(f"denoise_time must lie in (0, T = {big_t:g}], got {denoise_time}")
    taus = net_times(schedule, times, denoise_time)
    in_scale = gaussian_scale(schedule, taus, sigma_data) / scale[0]
    a_tau, s_tau = _ab(schedule, taus)
    if prediction == "eps":          # D = (x - s eps) / a at the input point
        cx, cf = 1.0 / a_tau, -s_tau / a_tau
    elif prediction == "v":          # D = a x - s v
        cx, cf = a_tau, -s_tau
    else:                            # D = F
        cx, cf = torch.zeros_like(a_tau), torch.ones_like(a_tau)
    (a_big, s_big), (a_m, s_m) = _ab(schedule, [big_t]), _ab(schedule, times)
    k = s_m / s_big                  # DDIM map: x_t = k x_T + l D
    ell = a_m - a_big * k
    return {"skip": (k + ell * cx * in_scale).tolist(), "out_scale": (ell * cf).tolist(),
            "in_scale": in_scale.tolist(), "net_times": taus}
