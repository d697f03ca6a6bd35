"""What every PSLD teacher shares, exact or a network: the state layout, the prior, the perturbation
kernel and the eps parameterisation of the score.

States z: [B, 2C, ...], the data x = z[:, :C] then the momentum m = z[:, C:] (CIFAR-10: 6 channels).
With L_t the Cholesky factor of the kernel covariance S_t = Phi diag(0, kappa M) Phi^T + Q of z_t given
x0 (per pixel, 2x2; `PSLD.kernel_cholesky`), a network predicts eps and score = -L_t^-T eps. Since
E[z_t | x0] = Phi (x0, 0) and S_t does not depend on x0, Tweedie's formula gives
Phi[:, 0] E[x0 | z_t] = z_t - L_t eps; its data row is E[x0 | z_t] = (x_t - L_00 eps_x) / Phi_00.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsno.processes.psld import PSLD
from dsno.teachers.base import batch_times


class PSLDTeacher(torch.nn.Module):
    """Base of the PSLD teachers: subclasses set `process` (a PSLD) and `shape` ([C, ...] of the data)
    and implement `eps(z, t)` or `score(z, t)`; the other follows from the kernel here.

    z: [B, 2C, ...]; t: scalar or [B] time in (0, 1]. Outputs are float64.
    """

    prediction = "eps"
    augmented = True                 # the Teacher capabilities (dsno.teachers.base.Teacher) a PSLD teacher has
    time_input_spec = "continuous"
    process: PSLD
    shape: tuple[int, ...]

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The shape of one state z: (2C, ...)."""
        return (2 * self.shape[0], *self.shape[1:])

    @property
    def data_channels(self) -> int:
        """The leading channels of a state that are the data (x); the rest are the momentum."""
        return self.shape[0]

    def prior_scale(self) -> torch.Tensor:
        """The prior's std per channel of a state, [2C, 1, ...] float64: z_T = prior_scale * xi, xi ~ N(0, I)
        (x ~ N(0, 1), m ~ N(0, M))."""
        c = self.shape[0]
        scale = torch.ones(2 * c, *([1] * (len(self.shape) - 1)), dtype=torch.float64)
        scale[c:] = math.sqrt(self.process.M)
        return scale

    @property
    def grid_schedule(self) -> PSLD:
        """What time grids and loss weights are computed on (T, t_min, lam): the process."""
        return self.process

    def kernel_cholesky(self, t: Any) -> torch.Tensor:
        """L_t [..., 2, 2]: the Cholesky factor of the perturbation kernel covariance of z_t given x0."""
        return self.process.kernel_cholesky(torch.as_tensor(t, dtype=torch.float64).cpu())

    def _kernel_rows(self, t: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_00, L_10, L_11 of each row's time, shaped to broadcast over z's channels: float64 on z's device."""
        lt = self.kernel_cholesky(batch_times(t, z).to("cpu")).to(z.device)
        bshape = (-1, *([1] * (z.ndim - 1)))
        return lt[:, 0, 0].reshape(bshape), lt[:, 1, 0].reshape(bshape), lt[:, 1, 1].reshape(bshape)

    def eps_from_score(self, score: torch.Tensor, t: Any) -> torch.Tensor:
        """eps = -L_t^T score: [B, 2C, ...] float64."""
        l00, l10, l11 = self._kernel_rows(t, score)
        c = self.shape[0]
        s = score.to(torch.float64)
        return torch.cat([-(l00 * s[:, :c] + l10 * s[:, c:]), -(l11 * s[:, c:])], dim=1)

    def score_from_eps(self, eps: torch.Tensor, t: Any) -> torch.Tensor:
        """score = -L_t^-T eps: [B, 2C, ...] float64 (what a PSLD network's output means)."""
        l00, l10, l11 = self._kernel_rows(t, eps)
        c = self.shape[0]
        e = eps.to(torch.float64)
        sm = -e[:, c:] / l11
        sx = -(e[:, :c] + l10 * sm) / l00
        return torch.cat([sx, sm], dim=1)

    def x0_from_eps(self, z: torch.Tensor, eps: torch.Tensor, t: Any) -> torch.Tensor:
        """E[x0 | z_t] = (x_t - L_00 eps_x) / Phi_00 (Tweedie, see the module doc): [B, C, ...] float64."""
        tb = batch_times(t, z).to("cpu")
        phi, _ = self.process.transition(0.0, tb)
        l00, _, _ = self._kernel_rows(t, z)
        c = self.shape[0]
        phi00 = phi[:, 0, 0].to(z.device).reshape(l00.shape)
        return (z[:, :c].to(torch.float64) - l00 * eps[:, :c].to(torch.float64)) / phi00
