"""Adaptive clipping: the threshold follows a quantile of the per-sample gradient norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021). After each step, with b the number of the batch's samples whose norm was <= C,

    b~ = (b + N(0, sigma_b^2)) / expected batch size,      C <- C * exp(-lr * (b~ - quantile)).

The count is a release of the batch too: it gets its own Gaussian noise (sensitivity 1), and the
gradient's noise multiplier is lowered so that the two together spend what the gradient alone
would at the configured noise multiplier z: 1/z^2 = 1/z_grad^2 + 1/sigma_b^2. The accountant
records that composition. Thresholds are runtime values in fxclip: no recompile as C moves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdaptiveClipping:
    """Pass to fxclip.make_private(..., adaptive_clipping=AdaptiveClipping()) or DPOptimizer.

    target_quantile: the fraction of samples that should end up unclipped (paper: 0.5).
    learning_rate: step of the geometric update of C (paper: 0.2).
    count_noise_multiplier: sigma_b, the noise std of the unclipped count; default
        expected_batch_size / 20 (the paper's choice). Must exceed the noise multiplier z.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None

    def __post_init__(self):
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")

    def attach(self, optimizer) -> None:
        """Split the optimizer's noise multiplier z between the gradient and the count."""
        if len(optimizer._parts) != 1:
            raise ValueError("adaptive clipping needs one privatized module (not privatize_blocks)")
        if self.count_noise_multiplier is None:
            self.count_noise_multiplier = optimizer.expected_batch_size / 20
        z, sigma_b = optimizer.noise_multiplier, float(self.count_noise_multiplier)
        self.total_noise_multiplier = z
        if z == 0:
            return  # no privacy claimed: nothing to split
        if not sigma_b > z:
            raise ValueError(
                f"adaptive clipping's count noise multiplier ({sigma_b}) must exceed the noise "
                f"multiplier ({z}) so that the gradient keeps some of the privacy budget: use a "
                "larger expected batch size or pass count_noise_multiplier=")
        optimizer.noise_multiplier = (z ** -2 - sigma_b ** -2) ** -0.5

    def update(self, optimizer, unclipped: float) -> None:
        """C <- C exp(-lr (noised unclipped fraction - target)), on every privatized part.
        `unclipped` is the count over all ranks; its noise is drawn once (the same on every rank)."""
        noise = optimizer._shared_normal(self.count_noise_multiplier)  # one draw, every rank
        fraction = (unclipped + noise) / optimizer.expected_batch_size
        factor = math.exp(-self.learning_rate * (fraction - self.target_quantile))
        for part in optimizer._parts:
            part.max_grad_norm = part.max_grad_norm * factor
