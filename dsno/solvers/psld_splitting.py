"""Splitting integrators for PSLD (x data, m momentum), after Pandey, Rudolph & Mandt (ICLR 2024):
naive and reduced velocity Verlet (nvv, rvv) for the probability-flow ODE, naive and reduced OBA
(noba, roba) for the reverse SDE, and the hybrids csps_d, sps_s, csps_s.

With S = diag(1, M) the stationary covariance and r = score + S^-1 z (the score relative to the
prior's), the PSLD drift splits exactly into a Hamiltonian part H z, H = F + 1/2 D S^-1 =
1/2 [[0, M^-1], [-1, 0]] (zero diagonal), friction-with-noise (SDE only) and a score correction:

    PF-ODE       dz/dt = beta (H z - 1/2 D r)
    reverse SDE  dz    = beta (H z - D r) dt + beta/2 D S^-1 z dt + sqrt(beta) G dW      (t decreasing)

so, with c = 1/2 (ODE) or 1 (SDE), the sub-flows are
    A (x, m frozen):  dx/dt = beta (1/2 M^-1 m - c gamma r_x)
    B (m, x frozen):  dm/dt = beta (-1/2 x - c M nu r_m)
    O (SDE only):     the two independent Ornstein-Uhlenbeck processes of the friction and the noise,
                      solved exactly: y -> e^(-d b / 2) y + sqrt(S_jj (1 - e^(-d b))) xi, d = D_jj / S_jj.
A and B take Euler steps with r frozen ("naive" schemes evaluate the score afresh for every sub-step,
"reduced" ones once per step, where the integrator's state is at the step's midpoint, and reuse it;
r is always rebuilt from the reused score and the current state). The conjugate ("c") hybrids replace
the Euler sub-steps by conjugate-integrator steps of the 1-D sub-flow (B_t = lam, exact coefficient
integrals by Gauss-Legendre): with precondition=False the network output eps is held over the sub-step
and the linear self-term -c d y is integrated exactly (eps-preconditioning, as lambda-DDIM); with
precondition=True the prior-relative score r is held, so at lam = 0 the step equals the Euler one.

Per step s -> t (mid = (s + t) / 2; "fresh@u": a new score evaluation at time u and the current state):
    nvv     B[s, mid] fresh@s,  A[s, t] fresh@mid,  B[mid, t] fresh@t                       3 NFE
    rvv     B[s, mid] reused,   eval@mid,  A[s, t],  B[mid, t]                              1 NFE (+1 first)
    noba    O[s, t],  B[s, t] fresh@s,  A[s, t] fresh@s                                     2 NFE
    roba    O[s, t],  eval@mid,  B[s, t],  A[s, t]                                          1 NFE
    csps_d  rvv with conjugate sub-steps                                                    1 NFE (+1 first)
    sps_s   O[s, mid], B[s, mid] reused, eval@mid, A[s, t], B[mid, t], O[mid, t]           1 NFE (+1 first)
    csps_s  sps_s with conjugate sub-steps                                                  1 NFE (+1 first)
The exact orders are measured in tests/test_psld_splitting.py (all first order on PSLD's PF-ODE: the
sub-steps freeze a score that depends on the whole state).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsno.errors import UserError
from dsno.solvers.coefficients import GAUSS_LEGENDRE_NODES
from dsno.solvers.core import NoiseSampler, Trajectory, noise_source
from dsno.solvers.psld import finite_option, lower_inverse_t, stationary_parts
from dsno.solvers.registry import register

SCHEMES = {
    "nvv": [("B", 0.0, 0.5, "fresh@s"), ("A", 0.0, 1.0, "fresh@mid"), ("B", 0.5, 1.0, "fresh@t")],
    "rvv": [("B", 0.0, 0.5, "reuse"), ("eval", 0.5), ("A", 0.0, 1.0, "reuse"), ("B", 0.5, 1.0, "reuse")],
    "noba": [("O", 0.0, 1.0), ("B", 0.0, 1.0, "fresh@s"), ("A", 0.0, 1.0, "fresh@s")],
    "roba": [("O", 0.0, 1.0), ("eval", 0.5), ("B", 0.0, 1.0, "reuse"), ("A", 0.0, 1.0, "reuse")],
    "sps": [("O", 0.0, 0.5), ("B", 0.0, 0.5, "reuse"), ("eval", 0.5), ("A", 0.0, 1.0, "reuse"),
            ("B", 0.5, 1.0, "reuse"), ("O", 0.5, 1.0)],
}


class Split:
    """The PSLD coefficients the splitting uses (float64 scalars) and the 1-D sub-step maps."""

    def __init__(self, process: Any, solver: str):
        f, d, sig = stationary_parts(process, solver)
        h = f + 0.5 * d @ torch.linalg.inv(sig)
        if process.k != 2 or float(h[0, 0].abs() + h[1, 1].abs()) > 1e-12 or float(d[0, 1].abs()) > 0 or \
                float(sig[0, 1].abs()) > 0:
            raise UserError(f"solver {solver!r} splits z = (x, m) of a PSLD-like process (Hamiltonian part with "
                            f"zero diagonal, diagonal D and stationary covariance); {process!r} is not one")
        self.process = process
        self.h = (float(h[0, 1]), float(h[1, 0]))          # x' gets h[0] m, m' gets h[1] x
        self.d = (float(d[0, 0]), float(d[1, 1]))
        self.s = (float(sig[0, 0]), float(sig[1, 1]))

    def db(self, a: float, b: float) -> float:
        """int_a^b beta (negative when b < a)."""
        return float(self.process.B(b) - self.process.B(a))

    def euler(self, j: int, y, w, score_j, a: float, b: float, c: float):
        """Component j (0: x, 1: m) over [a, b] with the score component frozen."""
        r = score_j + y / self.s[j]
        return y + self.db(a, b) * (self.h[j] * w - c * self.d[j] * r)

    def conjugate(self, j: int, y, w, score_j, eps, a: float, b: float, c: float, lam: float, precondition: bool):
        """The conjugate (B_t = lam) step of sub-flow j over [a, b] (module doc)."""
        lo, hi = (b, a) if b < a else (a, b)
        u, wq = self.process.quadrature(lo, hi, GAUSS_LEGENDRE_NODES)
        sign = -1.0 if b < a else 1.0                                  # int_a^b = sign * int_lo^hi
        beta = self.process.beta(u)
        self_rate = 0.0 if precondition else -c * self.d[j] / self.s[j]
        bu = self.process.B(u)
        kern = torch.exp(lam * (u - b) + self_rate * (float(self.process.B(b)) - bu)) * beta
        c_y = (1.0 + lam * (b - a)) * math.exp(lam * (a - b) + self_rate * self.db(a, b))
        k_w = sign * float((wq * kern).sum())
        if precondition:
            r = score_j + y / self.s[j]
            return c_y * y + k_w * (self.h[j] * w - c * self.d[j] * r)
        p = lower_inverse_t(self.process.kernel_cholesky(u))          # [n, 2, 2]; score = -P eps
        e_x, e_m = eps
        if j == 0:
            k0 = sign * float((wq * kern * p[:, 0, 0]).sum())
            k1 = sign * float((wq * kern * p[:, 0, 1]).sum())
            forcing = k0 * e_x + k1 * e_m
        else:
            forcing = sign * float((wq * kern * p[:, 1, 1]).sum()) * e_m
        return c_y * y + k_w * self.h[j] * w + c * self.d[j] * forcing

    def ou(self, j: int, y, a: float, b: float, xi):
        """The exact friction-and-noise flow of component j over [a, b] (b < a: reverse time)."""
        rate = self.d[j] / self.s[j] * -self.db(a, b)
        return math.exp(-0.5 * rate) * y + math.sqrt(self.s[j] * -math.expm1(-rate)) * xi


def _run(scheme: str, teacher, z: torch.Tensor, ts: torch.Tensor, return_trajectory, *, stochastic: bool,
         conjugate: bool = False, lam: float = 0.0, precondition: bool = False, generator=None,
         noise_sampler=None, name: str = "") -> torch.Tensor:
    split = Split(teacher.process, name)
    if z.ndim < 2 or z.shape[1] % 2:
        raise UserError(f"solver {name!r} needs a state z = (x, m) stacked on dim 1 ([B, 2C, ...]), got shape "
                        f"{tuple(z.shape)}")
    lam = finite_option("lam", lam)
    if not isinstance(precondition, bool):
        raise UserError(f"option precondition={precondition!r} must be True or False")
    c = 1.0 if stochastic else 0.5
    ch = z.shape[1] // 2
    noise = noise_source(z, generator, noise_sampler) if stochastic else None
    ops = SCHEMES[scheme]
    traj = Trajectory(z, return_trajectory)
    state = [z[:, :ch], z[:, ch:]]
    held: dict[str, Any] = {}

    def evaluate(u: float) -> None:
        full = torch.cat(state, dim=1)
        eps = teacher.eps(full, u).to(z.dtype)
        p = lower_inverse_t(teacher.process.kernel_cholesky(u)).reshape(2, 2)
        e_x, e_m = eps[:, :ch], eps[:, ch:]
        held["eps"] = (e_x, e_m)
        held["score"] = (-(float(p[0, 0]) * e_x + float(p[0, 1]) * e_m), -float(p[1, 1]) * e_m)

    times = ts.tolist()
    for s, t in zip(times[:-1], times[1:]):
        at = lambda f: s + f * (t - s)                                          # noqa: E731
        for op in ops:
            if op[0] == "eval":
                evaluate(at(op[1]))
                continue
            a, b = at(op[1]), at(op[2])
            if op[0] == "O":
                xi = noise(a, b)
                for j in (0, 1):
                    state[j] = split.ou(j, state[j], a, b, xi[:, j * ch:(j + 1) * ch])
                continue
            j = 0 if op[0] == "A" else 1
            mode = op[3]
            if mode.startswith("fresh@"):
                evaluate({"fresh@s": s, "fresh@mid": at(0.5), "fresh@t": t}[mode])
            elif "score" not in held:
                evaluate(a)                                                     # the first step's one extra
            y, w = state[j], state[1 - j]
            if conjugate:
                state[j] = split.conjugate(j, y, w, held["score"][j], held["eps"], a, b, c, lam, precondition)
            else:
                state[j] = split.euler(j, y, w, held["score"][j], a, b, c)
        traj.add(torch.cat(state, dim=1))
    return traj.result(torch.cat(state, dim=1))


def _per_step(n: int):
    return lambda steps, order, o: n * steps


def _reduced(steps: int, order: int, o: dict) -> int:
    return steps + 1


@register("nvv", orders=(1,), cost=_per_step(3), cost_rule="3 per step", process="augmented")
def nvv(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False
        ) -> torch.Tensor:
    """Naive velocity Verlet on PSLD's PF-ODE (module doc). x: z_T [B, 2C, ...]."""
    return _run("nvv", teacher, x, ts, return_trajectory, stochastic=False, name="nvv")


@register("rvv", orders=(1,), cost=_reduced, cost_rule="1 per step + 1", process="augmented")
def rvv(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False
        ) -> torch.Tensor:
    """Reduced velocity Verlet on PSLD's PF-ODE: one score per step, at the midpoint (module doc)."""
    return _run("rvv", teacher, x, ts, return_trajectory, stochastic=False, name="rvv")


@register("csps_d", orders=(1,), cost=_reduced, cost_rule="1 per step + 1", process="augmented")
def csps_d(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
           lam: float = 0.0, precondition: bool = False) -> torch.Tensor:
    """Conjugate splitting (deterministic): rvv with conjugate sub-steps B_t = lam (module doc)."""
    return _run("rvv", teacher, x, ts, return_trajectory, stochastic=False, conjugate=True, lam=lam,
                precondition=precondition, name="csps_d")


@register("noba", orders=(1,), cost=_per_step(2), cost_rule="2 per step", stochastic=True, process="augmented")
def noba(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
         generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Naive OBA on PSLD's reverse SDE (module doc)."""
    return _run("noba", teacher, x, ts, return_trajectory, stochastic=True, generator=generator,
                noise_sampler=noise_sampler, name="noba")


@register("roba", orders=(1,), cost=_per_step(1), cost_rule="1 per step", stochastic=True, process="augmented")
def roba(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
         generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Reduced OBA on PSLD's reverse SDE: one score per step, after the O step, at the midpoint."""
    return _run("roba", teacher, x, ts, return_trajectory, stochastic=True, generator=generator,
                noise_sampler=noise_sampler, name="roba")


@register("sps_s", orders=(1,), cost=_reduced, cost_rule="1 per step + 1", stochastic=True, process="augmented")
def sps_s(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
          generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Symmetric reduced splitting (O B A B O, one score per step) on PSLD's reverse SDE (module doc)."""
    return _run("sps", teacher, x, ts, return_trajectory, stochastic=True, generator=generator,
                noise_sampler=noise_sampler, name="sps_s")


@register("csps_s", orders=(1,), cost=_reduced, cost_rule="1 per step + 1", stochastic=True, process="augmented")
def csps_s(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
           generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
           lam: float = 0.0, precondition: bool = False) -> torch.Tensor:
    """Conjugate symmetric splitting (stochastic): sps_s with conjugate A / B sub-steps (module doc)."""
    return _run("sps", teacher, x, ts, return_trajectory, stochastic=True, conjugate=True, lam=lam,
                precondition=precondition, generator=generator, noise_sampler=noise_sampler, name="csps_s")
