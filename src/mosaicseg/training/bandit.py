"""Bandits over auxiliary arms: ASAP's smoothed UCB (Yang et al., Algorithm 1) and the EXP3 sampler of dynamic
auxiliary learning (DAL), with ASAP's reward (eqs. 1–3) and its schedules. Pure arithmetic on floats: the
gradients and losses come from :mod:`mosaicseg.training.auxiliary`.

ASAP, per arm ``a``: ``n_a`` pulls, smoothed reward ``R̂_a``. Initial pass at θ₀: ``n_a = 1``, ``R̂_a = 0.5 R^PM +
0.5 R^PT``. Turn ``t = 1, 2, ...``: pull ``argmax R̂_a + √(2 ln t / n_a)`` (eq. 5; ties broken by a seeded
order), then ``R = α_t R^PM + (1 − α_t) R^PT`` (eq. 3) and ``R̂_a ← (1 − β) R̂_a + β R`` (eq. 4).

``R^PM = −L_a`` (eq. 1) is unbounded while ``R^PT = cos(∇_a, ∇_T)`` (eq. 2) lies in [−1, 1], so a loss scale
would decide the mix. ``reward_loss="normalized"`` (default) maps the loss into [−1, 1] against ``L₀``, the
mean auxiliary loss of the initial pass: ``R^PM = (L₀ − L_a) / (L₀ + L_a)``: 0 at the initial mean, → 1 as the
loss → 0, → −1 as it grows, and monotone in ``−L_a`` like the paper's. ``"raw"`` keeps ``−L_a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ALPHA_SCHEDULES = ("linear", "constant", "exponential")
REWARD_LOSS = ("normalized", "raw")


def alpha_at(turn: int, turns: int, alpha0: float, schedule: str) -> float:
    """α of ``turn`` (1-based) of ``turns``: ``linear`` from α₀ at turn 1 to 0 after the last, ``exponential``
    α₀·0.01^(progress), ``constant`` α₀."""
    progress = min(max((turn - 1) / max(turns, 1), 0.0), 1.0)
    if schedule == "linear":
        return alpha0 * (1.0 - progress)
    if schedule == "exponential":
        return alpha0 * 0.01**progress
    if schedule == "constant":
        return alpha0
    raise ValueError(f"alpha schedule {schedule!r}: use one of {ALPHA_SCHEDULES}")


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """cos(a, b) of two flat vectors (0 when either is zero), in float64. Tensors are compared where they are:
    flattened gradients on a GPU are not copied to the host (and ``.numpy()`` would refuse them)."""
    ta = torch.as_tensor(a).double()
    tb = torch.as_tensor(b).double().to(ta.device)
    na, nb = float(ta.norm()), float(tb.norm())
    return float(ta @ tb) / (na * nb) if na > 0 and nb > 0 else 0.0


def gradient_magnitude_similarity(norm_a: float, norm_t: float) -> float:
    """GMS (Yu et al., 2020): ``2‖g_a‖‖g_T‖ / (‖g_a‖² + ‖g_T‖²)`` ∈ [0, 1], 1 for equal magnitudes."""
    denominator = norm_a**2 + norm_t**2
    return 2 * norm_a * norm_t / denominator if denominator > 0 else 0.0


@dataclass
class UCBBandit:
    """ASAP's policy over ``arms`` (see the module docstring). ``seed`` fixes the tie-breaking order."""

    arms: int
    beta: float = 0.1
    alpha0: float = 0.5
    alpha_schedule: str = "linear"
    reward_loss: str = "normalized"
    seed: int = 0
    counts: list[int] = field(default_factory=list)
    estimates: list[float] = field(default_factory=list)
    reference_loss: float | None = None  # L₀: the initial pass's mean auxiliary loss

    def __post_init__(self) -> None:
        if self.reward_loss not in REWARD_LOSS:
            raise ValueError(f"reward_loss {self.reward_loss!r}: use one of {REWARD_LOSS}")
        # a seeded random order among equal scores: the first of the tied arms in it wins
        self.order = [int(i) for i in np.random.default_rng(self.seed).permutation(self.arms)]
        self.counts = self.counts or [0] * self.arms
        self.estimates = self.estimates or [0.0] * self.arms

    @property
    def initialised(self) -> bool:
        """Whether the initial pass ran (it sets ``L₀``)."""
        return self.reference_loss is not None

    def loss_reward(self, loss: float) -> float:
        """``R^PM`` of an auxiliary loss (see the module docstring)."""
        if self.reward_loss == "raw":
            return -loss
        ref = self.reference_loss if self.reference_loss is not None else loss
        return (ref - loss) / (ref + loss) if ref + loss > 0 else 0.0

    def initialise(self, losses: list[float], cosines: list[float]) -> None:
        """The initial pass at θ₀: every arm pulled once, ``R̂_a = 0.5 R^PM + 0.5 R^PT``."""
        if len(losses) != self.arms or len(cosines) != self.arms:
            raise ValueError(f"the initial pass needs one loss and one cosine per arm ({self.arms})")
        self.reference_loss = float(np.mean(losses))
        self.counts = [1] * self.arms
        self.estimates = [0.5 * self.loss_reward(x) + 0.5 * c for x, c in zip(losses, cosines, strict=True)]

    def ucb(self, turn: int) -> list[float]:
        """``R̂_a + √(2 ln t / n_a)`` of every arm at ``turn`` (∞ for an arm never pulled)."""
        return [
            math.inf if n == 0 else r + math.sqrt(2 * math.log(turn) / n)
            for r, n in zip(self.estimates, self.counts, strict=True)
        ]

    def choose(self, turn: int) -> int:
        """The arm to pull at ``turn`` (eq. 5); equal scores: the first of them in the seeded order."""
        scores = self.ucb(turn)
        best = max(scores)
        return next(a for a in self.order if scores[a] == best)

    def update(self, arm: int, turn: int, turns: int, loss: float, cos: float) -> float:
        """Count the pull of ``arm`` at ``turn`` of ``turns`` and smooth in its reward (eqs. 3, 4); returns it."""
        alpha = alpha_at(turn, turns, self.alpha0, self.alpha_schedule)
        reward = alpha * self.loss_reward(loss) + (1 - alpha) * cos
        self.counts[arm] += 1
        self.estimates[arm] = (1 - self.beta) * self.estimates[arm] + self.beta * reward
        return reward

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "estimates": list(self.estimates), "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = [int(x) for x in state["counts"]]
        self.estimates = [float(x) for x in state["estimates"]]
        self.reference_loss = state["reference_loss"]


@dataclass
class Exp3Sampler:
    """DAL's sampler: EXP3 over ``arms`` with exploration ``gamma``; the pulled arm's weight grows with its
    importance-weighted reward, the gradient alignment with the target mapped to [0, 1]."""

    arms: int
    gamma: float = 0.1
    log_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.log_weights:
            self.log_weights = [0.0] * self.arms

    def probabilities(self) -> np.ndarray:
        w = np.exp(np.asarray(self.log_weights) - max(self.log_weights))
        return (1 - self.gamma) * w / w.sum() + self.gamma / self.arms

    def choose(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.arms, p=self.probabilities()))

    def update(self, arm: int, cos: float) -> float:
        """``w_a ← w_a · exp(γ r̂ / K)`` with ``r̂ = r / p_a``, ``r = (1 + cos) / 2``; returns ``r``."""
        reward = (1.0 + cos) / 2.0
        p = float(self.probabilities()[arm])
        self.log_weights[arm] += self.gamma * (reward / p) / self.arms
        return reward

    def state_dict(self) -> dict[str, Any]:
        return {"log_weights": list(self.log_weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_weights = [float(x) for x in state["log_weights"]]
