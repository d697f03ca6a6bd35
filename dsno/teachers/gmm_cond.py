"""The exact denoiser of a class-conditional diagonal Gaussian mixture.

Component k belongs to class c_k. With global weights w_k (sum 1), class y has prior
P(y) = sum_{c_k = y} w_k and density p(x0 | y) = sum_{c_k = y} (w_k / P(y)) N(mu_k, diag(v_k)); the
null label's (unconditional) density is p(x0) = sum_y P(y) p(x0 | y) = sum_k w_k N(mu_k, diag(v_k)),
the `GaussianMixture` of all components. E[x0 | x_t, y] is that mixture's closed form with the
other classes' components left out, so guided and unguided solves have float64 references.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from dsno.schedules import Schedule
from dsno.teachers.conditional import check_guidance, row_labels
from dsno.teachers.gmm import GaussianMixture


class ConditionalGaussianMixture(GaussianMixture):
    """means: [K, *shape]; variances: [K, *shape] or [K]; component_labels: [K] integers, the class of
    each component, in [0, num_classes) (None: max + 1), every class with at least one component;
    weights: [K] global (normalised here; None equal); guidance: the scale w of
    (1 + w) f(x, t, y) - w f(x, t, null) that `conditioned` and `dsno.solve(..., cond=)` use.

    forward(x, t, labels=None): labels [B] in [0, num_classes], num_classes (or None) the null label.
    What takes no labels (eps / x0 unbound, score, log_prob, sample_data, data_mean) is the
    unconditional mixture p(x0); `class_mixture(y)` is p(x0 | y)."""

    supports_guidance = True

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, component_labels: torch.Tensor,
                 weights: torch.Tensor | None = None, num_classes: int | None = None,
                 schedule: Schedule | None = None, guidance: float = 0.0, name: str = "gmm_cond"):
        super().__init__(means, variances, weights, schedule=schedule, name=name)
        labels = torch.as_tensor(component_labels)
        k = self.num_components
        if labels.shape != (k,) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"component_labels must be {k} integers (one class per component), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"component_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        empty = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no component; every class in [0, {num_classes}) needs one")
        self.num_classes = num_classes
        self.register_buffer("component_labels", labels)
        self.guidance = check_guidance(self, guidance)

    @property
    def class_weights(self) -> torch.Tensor:
        """P(y) for y in [0, num_classes): [num_classes] float64, sum 1."""
        w = self.log_weights.exp()
        return torch.zeros(self.num_classes, dtype=w.dtype, device=w.device).index_add_(0, self.component_labels, w)

    def class_mixture(self, label: int) -> GaussianMixture:
        """p(x0 | y = label) as an unconditional GaussianMixture (its components, weights renormalised)."""
        keep = self.component_labels == int(label)
        return GaussianMixture(self.means[keep].reshape(-1, *self.shape), self.variances[keep].reshape(-1, *self.shape),
                               self.log_weights[keep].exp(), schedule=self.schedule, name=f"{self.name}_class{label}")

    def marginal(self) -> GaussianMixture:
        """p(x0), the null label's density: the GaussianMixture of all components with their weights."""
        return GaussianMixture(self.means.reshape(-1, *self.shape), self.variances.reshape(-1, *self.shape),
                               self.log_weights.exp(), schedule=self.schedule, name=f"{self.name}_marginal")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t = x, y = labels]; x: [B, *shape], t: [B] float64, labels: [B] (null rows: E[x0 | x_t])."""
        labels = row_labels(self, labels, x).to(self.component_labels.device)
        member = (labels[:, None] == self.component_labels[None]) | (labels == self.num_classes)[:, None]
        log_weights = self.log_weights.masked_fill(~member, float("-inf"))      # [B, K]
        return self.denoise(x, t, log_weights)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        h = hashlib.sha256(fp["params_sha256"].encode())
        h.update(self.component_labels.cpu().numpy().tobytes())
        fp.update(num_classes=self.num_classes, guidance=self.guidance, params_sha256=h.hexdigest()[:16])
        return fp
