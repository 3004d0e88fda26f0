"""Few-shot adaptation with auxiliary data: the recipe ``adapt`` and its strategies (ASAP and its baselines).

The model is the plan's network over the work folder's vocabulary (the target's tasks and every auxiliary
dataset's), usually started from a pre-trained run (``init_from``: auxiliary tasks keep their heads, the target
gets new ones); the backbone is shared. Each training step is one *turn*:

- ``finetune``: a target batch only;
- ``asap`` (Yang et al., Algorithm 1): an initial pass at θ₀ gives every arm its loss, its gradient's cosine
  with the target gradient and ``R̂``; each turn pulls the UCB arm (:class:`~mosaicseg.training.bandit.UCBBandit`),
  computes the target gradient, then the arm's loss and gradient, steps on their sum and updates the arm's
  reward from the loss and the cosine over the shared (non-head) parameters;
- ``gms``: before training, the arm whose gradient magnitude is most similar to the target's
  (``2‖g_a‖‖g_T‖/(‖g_a‖²+‖g_T‖²)``) is chosen once, then every turn adds a batch of it;
- ``mtl``: every turn adds a batch mixing all auxiliary data: each sample draws an auxiliary dataset uniformly,
  then one of that dataset's arms uniformly (so with ``--aux-split-by-label`` a dataset with many labels is not
  drawn more often than one with a single label; a sample of a label arm is centred on that label and
  supervised on that label's task, as a pulled arm's batch is. Supervising all its dataset's labels instead
  summed 4-8 tasks' losses against the target's 2, and the target did not learn: Dataset001, 3 shots, 300
  turns, one fold, 10 evaluation cases: target loss 2.15 → 2.03, Dice 0.001; per label 2.14 → 1.80, Dice 0.38;
  finetune 2.04 → 1.32, Dice 0.63);
- ``dal``: an EXP3 sampler over arms whose pulled arm is rewarded by its gradient alignment with the target.

An arm is an auxiliary dataset, or one (dataset, label) pair (``--aux-split-by-label``): its batches are
centred on that label and its loss covers that label's task only. Target batches come from the Trainer's
loader (the target's training cases); arm batches from a second seeded stream indexed by turn, so a run
resumed mid-way draws the same arms and samples. The gradients are summed in ``.grad``: the target's is copied
out (shared parameters only) for the cosine, the arm's is the difference after its backward, so at most one
auxiliary gradient is alive. Every turn is logged to ``RUN/arms.jsonl`` (turn, arm, losses, cosine, reward and
the UCB of every arm, or DAL's probabilities) and ``RUN/arms.png`` shows the choices and the final estimates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaicseg.atomic import atomic_write, write_json_atomic
from mosaicseg.data.augment import AugmentConfig
from mosaicseg.data.sampling import CaseSampler, PatchDataset, cached_loader, draw_sample
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import parameter_parts
from mosaicseg.training.bandit import (
    ALPHA_SCHEDULES,
    REWARD_LOSS,
    Exp3Sampler,
    UCBBandit,
    cosine,
    gradient_magnitude_similarity,
)
from mosaicseg.training.recipes import (
    NETWORK_OPTIONS,
    Recipe,
    RecipeContext,
    StepResult,
    network,
    partial_label_objective,
    register_recipe,
)
from mosaicseg.types import Batch

STRATEGIES = ("asap", "finetune", "gms", "mtl", "dal")
ADAPT_OPTIONS: dict[str, Any] = {
    **NETWORK_OPTIONS,
    "strategy": "asap",
    "target": None,  # the target dataset's name
    "arms": [],  # [[dataset, label or null], ...]
    "alpha": 0.5,  # α at turn 1 of ASAP's reward (eq. 3), decaying by alpha_schedule
    "alpha_schedule": "linear",
    "beta": 0.1,  # ASAP's smoothing (eq. 4)
    "reward_loss": "normalized",  # R^PM: normalized into [-1, 1] or raw -L (see mosaicseg.training.bandit)
    "dal_gamma": 0.1,  # DAL's EXP3 exploration
}
ARM_STREAM = 7919  # the arm batches' seed offset: a stream apart from the target batches'
INITIAL = 2**40  # sample indices of the initial pass, apart from the turns'


@dataclass(frozen=True)
class Arm:
    dataset: str
    label: str | None  # None: the whole dataset
    task: int | None  # the label's global task (label arms)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.label}" if self.label else self.dataset


class _ArmPolicy:
    """Draws samples of the selected arm (uniform over its cases), or, ``mixed``, of a dataset of ``arms`` drawn
    uniformly and then one of its arms drawn uniformly: every auxiliary dataset gets an even share of a mixed
    batch however many label arms it was split into (MTL mixes datasets, not labels)."""

    def __init__(self, by_dataset: dict[str, list[str]], arms: Sequence[Arm]) -> None:
        self.by_dataset = by_dataset
        self.arms = list(arms)  # replaced for a moment by Auxiliary._target_batch: grouped at each draw
        self.selected: Arm | None = None
        self.mixed = False

    def choose(self, index: int, rng: np.random.Generator) -> tuple[str, str, str | None]:
        arm = self.selected
        if self.mixed:
            groups: dict[str, list[Arm]] = {}
            for a in self.arms:
                groups.setdefault(a.dataset, []).append(a)
            datasets = list(groups)
            group = groups[datasets[int(rng.integers(len(datasets)))]]
            arm = group[int(rng.integers(len(group)))]
        if arm is None:
            raise RuntimeError("adapt: an arm batch was asked for with no arm selected (a strategy bug)")
        cases = self.by_dataset[arm.dataset]
        return arm.dataset, cases[int(rng.integers(len(cases)))], arm.label


class Auxiliary:
    """The strategy's state, step and hooks (see the module docstring)."""

    def __init__(self, ctx: RecipeContext, arms: list[Arm], target: str) -> None:
        options = ctx.options
        self.strategy: str = options["strategy"]
        self.target = target
        self.arms = arms
        self._task_of = {(a.dataset, a.label): a.task for a in arms}  # a sample's arm → its task (label arms)
        self.seed = ctx.config.seed
        self.bandit = UCBBandit(
            len(arms),
            beta=float(options["beta"]),
            alpha0=float(options["alpha"]),
            alpha_schedule=options["alpha_schedule"],
            reward_loss=options["reward_loss"],
            seed=ctx.config.seed,
        )
        self.exp3 = Exp3Sampler(len(arms), gamma=float(options["dal_gamma"])) if arms else None
        self.next_arm: int | None = None  # ASAP's choice for the coming turn
        self.gms_arm: int | None = None
        self.gms_scores: list[float] = []
        self._policy: _ArmPolicy | None = None
        self._stream: PatchDataset | None = None

    # ------------------------------------------------------------------------------------------ batches
    def policy(self, cases: Sequence[tuple[str, str]]) -> CaseSampler:
        """Target batches: the target's training cases, uniformly."""
        own = [c for c in cases if c[0] == self.target]
        if not own:
            raise MosaicSegError(f"adapt: no training cases of the target {self.target}. Fix: give it shots.")
        by_dataset: dict[str, list[str]] = {}
        for d, c in cases:
            by_dataset.setdefault(d, []).append(c)
        missing = sorted({a.dataset for a in self.arms} - set(by_dataset))
        if missing:
            raise MosaicSegError(
                f"adapt: the auxiliary datasets {missing} have no training cases. Fix: preprocess them."
            )
        self._policy = _ArmPolicy(by_dataset, self.arms)
        return CaseSampler.build(own, "uniform")

    def _arm_batch(self, trainer: Any, arm: int | None, index: int, mixed: bool = False) -> Batch:
        """A batch of ``arm`` (or of mixed arms) for sample indices ``index·b ...``, from the arm stream."""
        assert self._policy is not None
        if self._stream is None:
            cfg = trainer.config
            self._stream = PatchDataset(
                cached_loader(trainer.workdir), self._policy, trainer.vocabulary, trainer.patch_size,
                seed=cfg.seed + ARM_STREAM, length=2**62,
                augment=AugmentConfig() if cfg.augment else AugmentConfig.off(),
                oversample_foreground=cfg.oversample_foreground,
            )  # fmt: skip
        self._policy.mixed = mixed
        self._policy.selected = self.arms[arm] if arm is not None else None
        b = trainer.batch_size
        draws = [draw_sample(self._policy, self._stream.seed, index * b + j) for j in range(b)]
        batch = trainer.collate([self._stream[d] for d in draws])
        # a sample of a label arm trains that label's task only, pulled (asap, gms, dal) or mixed (mtl): every
        # strategy learns from the same auxiliary tasks and differs only in which it picks
        tasks = [self._task_of.get((d.dataset, d.label)) for d in draws]
        if any(t is not None for t in tasks):
            only = torch.zeros_like(batch["label_mask"])
            for j, t in enumerate(tasks):
                if t is None:  # a dataset arm (or the target): all its labels
                    only[j] = batch["label_mask"][j]
                else:
                    only[j, t] = batch["label_mask"][j, t]
            batch["label_mask"] = only
        return trainer.to_device(batch)

    def _target_batch(self, trainer: Any, index: int) -> Batch:
        """A batch of the target's training cases from the arm stream (the initial pass's ∇_T)."""
        assert self._policy is not None
        arms, self._policy.arms = self._policy.arms, [Arm(self.target, None, None)]
        try:
            return self._arm_batch(trainer, None, index, mixed=True)
        finally:
            self._policy.arms = arms

    # ------------------------------------------------------------------------------------------ gradients
    def _shared(self, trainer: Any) -> list[torch.nn.Parameter]:
        parts = parameter_parts(trainer.model)
        trained = {id(p) for p in trainer.trained_parameters}
        return [p for n, p in trainer.model.named_parameters() if parts[n] != "head" and id(p) in trained]

    @staticmethod
    def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in params])  # fmt: skip

    def _backward(self, trainer: Any, batch: Batch) -> float:
        _, _, total = trainer.forward_loss(batch)
        trainer.scaler.scale(total).backward()
        return float(total.detach())

    def _probe(
        self, trainer: Any, target: Batch, arms: Sequence[int]
    ) -> tuple[list[float], list[float], list[float], float]:
        """At the current weights: each arm's loss, gradient cosine with the target's and gradient norm (shared
        parameters), and the target gradient's norm; the weights and ``.grad`` are left as they were (zero)."""
        shared = self._shared(trainer)
        trainer.model.zero_grad(set_to_none=True)
        self._backward(trainer, target)
        g_t = self._flat(shared)
        losses, cosines, norms = [], [], []
        for a in arms:
            trainer.model.zero_grad(set_to_none=True)
            losses.append(self._backward(trainer, self._arm_batch(trainer, a, INITIAL + a)))
            g_a = self._flat(shared)
            cosines.append(cosine(g_a, g_t))
            norms.append(float(g_a.norm()))
            del g_a  # one auxiliary gradient at a time
        trainer.model.zero_grad(set_to_none=True)
        return losses, cosines, norms, float(g_t.norm())

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any) -> None:
        if trainer.world_size > 1:
            raise MosaicSegError(
                "adapt runs in one process (its bandit steps on one gradient). Fix: run it without torchrun."
            )
        if trainer.is_main:
            _truncate(trainer.run_dir / "arms.jsonl", trainer.iteration)
        if self.strategy not in ("asap", "gms") or self.bandit.initialised or self.gms_arm is not None:
            return
        target = self._target_batch(trainer, INITIAL)
        losses, cosines, norms, target_norm = self._probe(trainer, target, range(len(self.arms)))
        if self.strategy == "asap":
            self.bandit.initialise(losses, cosines)
            self.next_arm = self.bandit.choose(1)
        else:
            self.gms_scores = [gradient_magnitude_similarity(n, target_norm) for n in norms]
            self.gms_arm = int(np.argmax(self.gms_scores))
        if trainer.is_main:  # the evidence of the initial pass, next to the run's log of turns
            write_json_atomic(
                trainer.run_dir / "arms_initial.json",
                {
                    "strategy": self.strategy,
                    "arms": [a.name for a in self.arms],
                    "loss": losses,
                    "cosine": cosines,
                    "gradient_norm": norms,
                    "target_gradient_norm": target_norm,
                    "estimate": list(self.bandit.estimates) if self.strategy == "asap" else None,
                    "gms": list(self.gms_scores) or None,
                    "gms_choice": None if self.gms_arm is None else self.arms[self.gms_arm].name,
                },
            )

    def step(self, trainer: Any, batch: Batch) -> StepResult:
        """One turn (see the module docstring)."""
        turn = trainer.iteration + 1
        total_turns = trainer.total_iterations or turn
        shared = self._shared(trainer) if self.strategy in ("asap", "dal", "gms") else []
        outputs, losses, total = trainer.forward_loss(batch)
        trainer.scaler.scale(total).backward()
        loss_t = float(total.detach())
        row: dict[str, Any] = {"turn": turn, "loss_target": loss_t}
        if self.strategy == "finetune":
            trainer.apply_gradients(None)
            self._log(trainer, row)
            return StepResult(loss_t, {k: v.detach() for k, v in losses.items()}, outputs)
        g_t = self._flat(shared) if shared else None
        arm: int | None
        if self.strategy == "asap":
            arm = self.next_arm
        elif self.strategy == "gms":
            arm = self.gms_arm
        elif self.strategy == "dal":
            assert self.exp3 is not None
            row["probabilities"] = [round(float(p), 5) for p in self.exp3.probabilities()]
            arm = self.exp3.choose(np.random.default_rng((self.seed, ARM_STREAM, turn)))
        else:
            arm = None
        aux = self._arm_batch(trainer, arm, turn, mixed=self.strategy == "mtl")
        loss_a = self._backward(trainer, aux)
        cos = None
        if g_t is not None:
            g_a = self._flat(shared) - g_t  # .grad holds ∇_T + ∇_a
            cos = cosine(g_a, g_t)
            del g_a, g_t
        trainer.apply_gradients(None)  # on ∇_T + ∇_a (ASAP, line 11)
        row.update(arm=arm, arm_name="mixed" if arm is None else self.arms[arm].name, loss_arm=loss_a, cosine=cos)
        if self.strategy == "asap":
            assert arm is not None and cos is not None
            row["reward"] = self.bandit.update(arm, turn, total_turns, loss_a, cos)
            row["ucb"] = [round(u, 5) for u in self.bandit.ucb(turn + 1)]
            self.next_arm = self.bandit.choose(turn + 1)
        elif self.strategy == "dal":
            assert arm is not None and cos is not None and self.exp3 is not None
            row["reward"] = self.exp3.update(arm, cos)
        self._log(trainer, row)
        terms = {k: v.detach() for k, v in losses.items()}
        terms["auxiliary"] = torch.tensor(loss_a)
        return StepResult(loss_t + loss_a, terms, outputs)

    def _log(self, trainer: Any, row: dict[str, Any]) -> None:
        """One line per turn in ``arms.jsonl``, appended at once (a resumed run first drops the turns after its
        checkpoint, then draws them again)."""
        if trainer.is_main:
            with (trainer.run_dir / "arms.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        """Redraw ``arms.png``."""
        if trainer.is_main and self.arms and self.strategy != "finetune":
            rows = _read(trainer.run_dir / "arms.jsonl")
            plot_arms(rows, [a.name for a in self.arms], self.final_scores(), trainer.run_dir / "arms.png")

    def final_scores(self) -> tuple[str, list[float]]:
        """What the strategy ended up believing of each arm, for the plot."""
        if self.strategy == "asap" and self.bandit.initialised:
            return "R̂ (smoothed reward)", list(self.bandit.estimates)
        if self.strategy == "dal" and self.exp3 is not None:
            return "EXP3 probability", [float(p) for p in self.exp3.probabilities()]
        if self.strategy == "gms" and self.gms_scores:
            return "gradient-magnitude similarity", list(self.gms_scores)
        return "", []

    def state_dict(self) -> dict[str, Any]:
        return {
            "bandit": self.bandit.state_dict(),
            "exp3": self.exp3.state_dict() if self.exp3 is not None else None,
            "next_arm": self.next_arm,
            "gms_arm": self.gms_arm,
            "gms_scores": list(self.gms_scores),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.bandit.load_state_dict(state["bandit"])
        if self.exp3 is not None and state.get("exp3"):
            self.exp3.load_state_dict(state["exp3"])
        self.next_arm, self.gms_arm = state["next_arm"], state["gms_arm"]
        self.gms_scores = list(state["gms_scores"])


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _truncate(path: Path, turns: int) -> None:
    """Keep the rows of ``arms.jsonl`` up to turn ``turns`` (what the checkpoint being resumed had seen)."""
    if path.is_file():
        kept = [r for r in _read(path) if r["turn"] <= turns]
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")


def plot_arms(rows: list[dict[str, Any]], names: list[str], scores: tuple[str, list[float]], path: Path) -> None:
    """``arms.png``: the arm pulled at every turn, and the strategy's final score of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, values = scores
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.28 * len(names) + 1.5)), width_ratios=[3, 1.4])
    turns = [r["turn"] for r in rows if r.get("arm") is not None]
    pulled = [r["arm"] for r in rows if r.get("arm") is not None]
    axes[0].scatter(turns, pulled, s=6, color="tab:blue")
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].set_ylim(-0.5, len(names) - 0.5)
    axes[0].set_xlabel("turn")
    axes[0].set_title("arm pulled")
    if values:
        axes[1].barh(range(len(names)), values, color="tab:orange")
        axes[1].set_yticks(range(len(names)), [""] * len(names))
        axes[1].set_ylim(-0.5, len(names) - 0.5)
        axes[1].set_title(label)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def arms_of(ctx: RecipeContext) -> list[Arm]:
    """The recipe option ``arms`` checked against the vocabulary."""
    out = []
    vocabulary = ctx.vocabulary
    for item in ctx.options["arms"] or []:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise MosaicSegError(
                f'adapt: arm {item!r} is not [dataset, label or null]. Fix: e.g. ["Dataset003_IXILimbic", null].'
            )
        dataset, label = item
        vocabulary.dataset_index(dataset)  # raises, naming the known datasets
        task = None
        if label is not None:
            rows = {lbl: k for k, lbl, _ in vocabulary.dataset_tasks(dataset)}
            if label not in rows:
                raise MosaicSegError(
                    f"adapt: dataset {dataset} has no label {label!r}. Fix: use one of {sorted(rows)}."
                )
            task = rows[label]
        out.append(Arm(dataset, label, task))
    return out


@register_recipe("adapt", options=ADAPT_OPTIONS)
def adapt(ctx: RecipeContext) -> Recipe:
    """Few-shot adaptation of the target with auxiliary arms (see the module docstring)."""
    o = ctx.options
    if o["strategy"] not in STRATEGIES:
        raise MosaicSegError(f"adapt: strategy {o['strategy']!r} is unknown. Fix: use one of {', '.join(STRATEGIES)}.")
    if o["alpha_schedule"] not in ALPHA_SCHEDULES or o["reward_loss"] not in REWARD_LOSS:
        raise MosaicSegError(
            f"adapt: alpha_schedule must be one of {ALPHA_SCHEDULES} and reward_loss one of {REWARD_LOSS}. Fix it."
        )
    if not (0 < float(o["beta"]) <= 1 and 0 <= float(o["alpha"]) <= 1 and 0 < float(o["dal_gamma"]) <= 1):
        raise MosaicSegError("adapt: beta and dal_gamma must be in (0, 1], alpha in [0, 1]. Fix them.")
    target = o["target"]
    if target is None:
        raise MosaicSegError("adapt: no target dataset. Fix: set the recipe option target (mosaicseg adapt does).")
    ctx.vocabulary.dataset_index(target)
    arms = arms_of(ctx)
    if o["strategy"] != "finetune" and not arms:
        raise MosaicSegError(f"adapt: strategy {o['strategy']} needs auxiliary arms. Fix: give --aux datasets.")
    if any(a.dataset == target for a in arms):
        raise MosaicSegError(f"adapt: the target {target} is also in the auxiliary pool. Fix: leave it out of --aux.")
    state = Auxiliary(ctx, arms if o["strategy"] != "finetune" else [], target)
    vocabulary = ctx.vocabulary
    return Recipe(
        model=network(ctx, vocabulary),
        loss=partial_label_objective(False, float(o.get("bce_pos_weight", 1.0))),
        vocabulary=vocabulary,
        datasets=(target, *dict.fromkeys(a.dataset for a in state.arms)),
        policy=state.policy,
        state_dict=state.state_dict,
        load_state_dict=state.load_state_dict,
        hooks=[state],
        step=state.step,
    )
