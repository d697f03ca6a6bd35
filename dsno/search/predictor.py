"""The performance predictor of S^3: a small MLP ensemble from solver schedule features to log RMSE,
trained on the candidates scored so far, used to rank unscored ones."""

from __future__ import annotations

import numpy as np
import torch


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two score lists (1: same order, 0: chance)."""
    from scipy.stats import kendalltau  # deferred: loads scipy only when used
    tau = kendalltau(np.asarray(a), np.asarray(b)).statistic
    return float(tau) if np.isfinite(tau) else 0.0


class Predictor:
    """fit(features [n, d], targets [n]) then predict(features [m, d]) -> [m]; an ensemble of
    `members` MLPs d -> hidden -> hidden -> 1 on standardised inputs and targets. Deterministic
    for a given seed."""

    def __init__(self, hidden: int = 64, members: int = 3, epochs: int = 200, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int = 0):
        self.hidden, self.members, self.epochs, self.lr, self.wd, self.seed = hidden, members, epochs, lr, weight_decay, seed
        self.nets: list[torch.nn.Module] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Predictor":
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        y = torch.as_tensor(np.asarray(y, dtype=np.float32))
        self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-3)
        self.y_mu, self.y_sd = y.mean(), y.std().clamp_min(1e-6)
        xs, ys = (x - self.mu) / self.sd, (y - self.y_mu) / self.y_sd
        self.nets = []
        for m in range(self.members):
            g = torch.Generator().manual_seed(self.seed * 101 + m)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.SiLU(),
                                      torch.nn.Linear(self.hidden, self.hidden), torch.nn.SiLU(),
                                      torch.nn.Linear(self.hidden, 1))
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1])) ** 0.5 if p.ndim > 1
                            else torch.zeros_like(p))
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.wd)
            for _ in range(self.epochs):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(xs).squeeze(-1), ys)
                loss.backward()
                opt.step()
            self.nets.append(net.eval())
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        xs = (torch.as_tensor(np.asarray(x, dtype=np.float32)) - self.mu) / self.sd
        out = torch.stack([net(xs).squeeze(-1) for net in self.nets]).mean(0)
        return (out * self.y_sd + self.y_mu).numpy().astype(np.float64)
