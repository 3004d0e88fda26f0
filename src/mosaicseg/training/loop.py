"""The one training loop. Recipes (:mod:`mosaicseg.training.recipes`) plug model, loss, inputs, parameter
groups, batch policy, state and hooks into it; nothing here knows a method.

A step: the policy's draws become a batch (:mod:`mosaicseg.data.sampling`), ``model(image, modality,
**recipe.inputs(batch))`` gives a :class:`~mosaicseg.types.ModelOutput`, ``recipe.loss`` its terms, and
:meth:`Trainer.apply_gradients` the update (per-group learning rates, clipping, loss scaling). A recipe may
replace the step (``recipe.step``) and reuse :meth:`Trainer.forward_loss` and :meth:`Trainer.apply_gradients`.

Reproducibility: the model is initialised from ``torch.manual_seed(seed)``, sample ``i`` of the run is a pure
function of ``(seed, i)`` (see :mod:`mosaicseg.data.sampling`), and the learning rate is a function of the
iteration. A run with an iteration budget therefore gives identical weights on CPU whether it ran in one go
or was stopped and ``--resume``d at any iteration. A wall-clock budget (``time_budget_s``) makes the length
of the run, and so the learning-rate schedule, depend on the machine: such runs are not reproducible.

Run folder::

    RUN/config.json               training settings (TrainConfig) + recipe summary
    RUN/checkpoint_latest.pt      written at every epoch end (or every ``checkpoint_every`` iterations)
    RUN/checkpoint_final.pt       the end of training; reported numbers use this one
    RUN/checkpoint_best.pt        best validation mean pseudo-Dice (a convenience, not for reporting)
    RUN/metrics.jsonl             one record per epoch
    RUN/postprocessing.json       per task: keep the largest connected component? (decided at the final validation)
    RUN/init_report.json          with ``init_from``: what was loaded, what is new, what was dropped
    RUN/train_cases.json          the ``(dataset, case)`` pairs it trains on (``--cases``/``--fraction`` draw them)
    RUN/progress.png              loss, per-dataset validation Dice, learning rate, epoch time

Checkpoints are plain dicts of tensors and primitives written atomically with :func:`torch.save` and read
with ``weights_only=True``: loading never executes code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mosaicseg.atomic import write_json_atomic
from mosaicseg.config import WIDTHS, TrainConfig
from mosaicseg.data.augment import AugmentConfig, sample_patch
from mosaicseg.data.preprocess import load_case
from mosaicseg.data.sampling import BatchPolicy, DrawSampler, PatchDataset, cached_loader, choose_center, collate
from mosaicseg.data.splits import fold_cases
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.data.workdir import (
    list_cases,
    load_case_meta,
    load_collection_config,
    load_plans,
    load_vocabulary,
    task_frequencies,
)
from mosaicseg.errors import MosaicSegError
from mosaicseg.evaluation.metrics import dice_from_counts
from mosaicseg.inference.postprocess import decide_largest_component, keep_largest_component
from mosaicseg.inference.sliding_window import TileModel, bind_modality, predict_logits
from mosaicseg.models import use_device_layout
from mosaicseg.progress import progress_bar
from mosaicseg.runtime import load_checkpoint, native_bf16, resolve_device, save_checkpoint
from mosaicseg.training import auxiliary, ka2er  # noqa: F401 - register the recipes "adapt" and "ka2er"
from mosaicseg.training.logging import append_record, plot_progress, read_records, truncate_records
from mosaicseg.training.optim import build_optimizer, learning_rate
from mosaicseg.training.procedures import adapted_groups, extended_plans
from mosaicseg.training.recipes import RECIPES, Losses, Recipe, RecipeContext, StepResult
from mosaicseg.training.transfer import load_matching, read_source
from mosaicseg.types import Batch, ModelOutput


def subset_cases(
    train: Sequence[tuple[str, str]], cases: int | None, fraction: float | None, seed: int
) -> list[tuple[str, str]]:
    """``cases`` (or ``ceil(fraction × n)``, at least 1) of each dataset's ``n`` training cases, drawn without
    replacement by a generator seeded with ``seed``; sorted."""
    by_dataset: dict[str, list[str]] = {}
    for d, c in train:
        by_dataset.setdefault(d, []).append(c)
    rng = np.random.default_rng(seed)
    out = []
    for d, ids in sorted(by_dataset.items()):
        n = cases if cases is not None else max(1, math.ceil((fraction or 1.0) * len(ids)))
        if n > len(ids):
            raise MosaicSegError(
                f"--cases {n}: dataset {d} has only {len(ids)} training cases in this fold. Fix: give --cases "
                f"{len(ids)} or fewer, or --fraction."
            )
        out += [(d, ids[i]) for i in rng.choice(len(ids), size=n, replace=False)]
    return sorted(out)


def chosen_cases(chosen: dict[str, list[str]], cases: dict[str, list[str]], workdir: Path) -> list[tuple[str, str]]:
    """``TrainConfig.train_case_ids`` as sorted ``(dataset, case)`` pairs, each checked against the preprocessed
    ``cases`` (dataset → ids) of ``workdir``."""
    out = []
    for d, ids in chosen.items():
        missing = sorted(set(ids) - set(cases.get(d, [])))
        if missing:
            raise MosaicSegError(
                f"{workdir}: the chosen training cases {missing[:5]} of {d} are not preprocessed there. Fix: "
                f"choose among its {len(cases.get(d, []))} cases, or run mosaicseg preprocess {workdir}."
            )
        out += [(d, c) for c in ids]
    return sorted(set(out))


def run_folder_for(workdir: str | Path, config: TrainConfig) -> Path:
    """Default run folder: ``WORKDIR/runs/RECIPE_ARCH[_DATASET]/fold_F``."""
    name = f"{config.recipe}_{config.architecture}" + (f"_{config.dataset}" if config.dataset else "")
    return Path(workdir) / "runs" / name / f"fold_{config.fold}"


def changed_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ between ``a`` and ``b`` (missing on one side counts), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Trainer:
    """Trains the recipe's model on the preprocessed collection in ``workdir`` into ``run_dir``.

    ``resume``: continue from ``checkpoint_latest.pt``; ``overwrite``: start again in a run folder that
    holds a run. Without either, an existing run is never touched. ``source``: the model ``config.init_from``
    names, already read (how the command line passes a bundle, which this stage does not read).
    """

    def __init__(
        self,
        workdir: str | Path,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else run_folder_for(workdir, config)
        self.progress = progress
        self.stop_requested = False
        self._prepare_distributed()
        self.device = resolve_device(config.device)
        # mixed precision: fp16 with loss scaling on CUDA; bf16 on the CPU, whose float32 exponent range needs none.
        # By default on CUDA, and on CPUs with native bf16: 0.65x the float32 time, same Dice (BENCHMARKS.md, precision)
        auto_amp = self.device.type == "cuda" or (self.device.type == "cpu" and native_bf16())
        self.amp = bool(config.amp if config.amp is not None else auto_amp)
        if self.amp and self.device.type not in ("cuda", "cpu"):
            raise MosaicSegError(
                f"mixed precision was requested on device '{self.device.type}', which has no autocast path here. "
                "Fix: use --precision fp32."
            )
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self._check_run_folder(resume, overwrite)

        self.plans = load_plans(self.workdir)
        self.collection = load_collection_config(self.workdir)
        full_vocab = load_vocabulary(self.workdir)
        resuming = resume and (self.run_dir / "checkpoint_latest.pt").is_file()
        if source is None and config.init_from is not None:
            source = read_source(config.init_from)
        trained_datasets: tuple[str, ...] | None = None
        if config.extend:
            assert source is not None  # TrainConfig requires init_from with extend
            new_vocab = full_vocab.restrict(list(config.datasets)) if config.datasets else full_vocab
            trained_datasets = new_vocab.datasets
            full_vocab = Vocabulary.from_dict(source["vocabulary"]).extended_by(new_vocab, config.init_from)
            width = WIDTHS[config.width]
            plans = extended_plans(source, self.plans, width, config.init_from, self.workdir)
            self.plans = {**plans, "datasets": {d: plans["datasets"][d] for d in full_vocab.datasets}}
        spec = RECIPES.get(config.recipe)
        torch.manual_seed(config.seed)  # model initialisation is part of the seeded run
        ctx = RecipeContext(
            # extend: the datasets chosen are the new ones; the model's vocabulary is all of full_vocab
            config=dataclasses.replace(config, datasets=None) if config.extend else config,
            plans=self.plans,
            vocabulary=full_vocab,
            sampling=self.collection.sampling,
            weights={d.name: d.weight for d in self.collection.datasets},
            options=spec.resolve(config.recipe_options),
            distributed=self.world_size > 1,
            task_frequencies=self._task_frequencies,
        )
        self.recipe: Recipe = spec.build(ctx)
        self.vocabulary = self.recipe.vocabulary
        self.model = self.recipe.model.to(self.device)
        if trained_datasets is not None:
            self.recipe.datasets = trained_datasets  # extend trains and validates on the new datasets only
            if hasattr(self.model, "set_task_blocks"):  # the old tasks' logits from a conv of their old shape
                old = source["model_config"].get("task_blocks") or [source["model_config"]["num_tasks"]]
                self.model.set_task_blocks([*old, self.vocabulary.num_tasks - sum(old)])
        self.init_report = None
        if source is not None and not resuming:
            self.init_report = load_matching(self.model, self.vocabulary, source, config.init_from or "")
        use_device_layout(self.model, self.device, mixed_precision=self.amp)
        self.patch_size = tuple(int(p) for p in (config.patch_size or self.plans["network"]["patch_size"]))
        self.batch_size = int(config.batch_size or self.plans["network"]["batch_size"])
        self.param_groups = self.recipe.param_groups(self.model)
        if config.extend or config.freeze != "none" or config.head_epochs or config.warmup_epochs:
            old_vocab = Vocabulary.from_dict(source["vocabulary"]) if source is not None else None
            self.param_groups = adapted_groups(
                self.model,
                self.param_groups,
                config,
                new_tasks=list(range(old_vocab.num_tasks, self.vocabulary.num_tasks)) if old_vocab else None,
                new_modalities=[
                    i for i, m in enumerate(self.vocabulary.modalities) if old_vocab and m not in old_vocab.modalities
                ],
            )
        # a source's post-processing decisions hold for its tasks until this run's final validation decides anew
        names = {t.name for t in self.vocabulary.tasks}
        self.postprocessing: dict[str, dict[str, Any]] = {
            n: d for n, d in ((source or {}).get("postprocessing") or {}).items() if n in names
        }
        del source  # the source's weights are in the model now
        self._freeze_outside_groups()
        self.optimizer = build_optimizer(
            [
                {"params": g.params, "name": g.name, **({"weight_decay": 0.0} if g.rows is not None else {})}
                for g in self.param_groups
                if g.params
            ],
            config,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")
        self.train_cases, self.val_cases, self.notes = self._split()
        if self.init_report is not None:
            self.notes.append(self.init_report.summary())
        self.policy: BatchPolicy = self.recipe.policy(self.train_cases)
        if self.amp and self.device.type == "cpu" and not native_bf16():
            self.notes.append(
                "this CPU has no native bf16 (AVX512-BF16 or AMX): mixed precision is emulated, slower than "
                "--precision fp32"
            )
        self._check_patch_fits()
        self._prepare_run_folder(resume, overwrite)  # nothing is written or removed before this point
        if self.init_report is not None and self.is_main:
            write_json_atomic(self.run_dir / "init_report.json", self.init_report.to_dict())
        if self.is_main:
            write_json_atomic(self.run_dir / "train_cases.json", [list(c) for c in self.train_cases])
        self.iteration = 0
        self.epoch = 0
        self.elapsed_s = 0.0
        self.val_s = 0.0  # seconds spent validating (part of elapsed_s)
        self.val_tile_s: float | None = None  # measured seconds per forward tile of the last validation
        self.val_reserve_s = 0.0  # the end of a time budget kept free for the final validation
        self._val_tile_count: int | None = None
        self._tile_probe_s: float | None = None
        self.epoch_losses: list[float] = []
        self.epoch_terms: dict[str, list[float]] = {}  # the recipe's named loss terms, per step of the epoch
        self.best: dict[str, Any] = {"val_mean": -math.inf, "iteration": None}
        if resume and (ckpt := self._resume_checkpoint()) is not None:
            self._restore(ckpt)
        self.ddp_model = self._wrap_distributed(self.model)

    # ----------------------------------------------------------------------------------------- set-up
    def _prepare_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.config.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def _freeze_outside_groups(self) -> None:
        """Parameters in no group get no gradient: they stay out of the optimiser, the clipping and DDP."""
        seen: set[int] = set()
        for g in self.param_groups:
            if any(id(p) in seen for p in g.params):
                raise ValueError(f"recipe '{self.config.recipe}': a parameter is in two groups (group {g.name})")
            seen.update(id(p) for p in g.params)
        for p in self.model.parameters():
            if id(p) not in seen:
                p.requires_grad_(False)
        for g in self.param_groups:
            for p in g.params if g.rows is not None else []:
                frozen = sorted(set(range(p.shape[0])) - set(g.rows))
                if frozen:
                    index = torch.tensor(frozen, device=p.device)
                    # index_fill, not a multiplication: a frozen row stays exactly still even if its gradient is nan
                    p.register_hook(lambda grad, index=index: grad.index_fill(0, index, 0))
        self.trained_parameters = [p for g in self.param_groups for p in g.params]

    def _wrap_distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Stems of modalities absent from a rank's batch get no gradient: DDP must tolerate unused parameters.
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _check_run_folder(self, resume: bool, overwrite: bool) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise MosaicSegError(f"{self.run_dir}: is a file, not a folder. Fix: choose another run folder (-o).")
        has_run = any(
            (self.run_dir / n).exists() for n in ("checkpoint_latest.pt", "checkpoint_final.pt", "metrics.jsonl")
        )
        if has_run and not resume and not overwrite:
            raise MosaicSegError(
                f"{self.run_dir}: holds a run already. Fix: --resume to continue it, --overwrite "
                "to start again, or -o for another folder."
            )

    def _prepare_run_folder(self, resume: bool, overwrite: bool) -> None:
        """Once every setting is validated: clear an overwritten run, create the folder, drop stale temporaries."""
        has_run = any(
            (self.run_dir / n).exists() for n in ("checkpoint_latest.pt", "checkpoint_final.pt", "metrics.jsonl")
        )
        if has_run and overwrite and not resume and self.is_main:
            for n in (
                "checkpoint_latest.pt",
                "checkpoint_final.pt",
                "checkpoint_best.pt",
                "metrics.jsonl",
                "progress.png",
            ):
                (self.run_dir / n).unlink(missing_ok=True)
        if self.is_main:  # on several nodes the other ranks' run folders may be other disks: they write nothing
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # temporary files of writes that a killed run never renamed; the files they were to replace are intact
            for stale in self.run_dir.glob(".*.tmp*"):
                stale.unlink(missing_ok=True)

    def _task_frequencies(self, vocabulary: Vocabulary) -> np.ndarray:
        """``(K,)`` share of voxels per task of ``vocabulary`` over this fold's training cases."""
        cases = {d: ids for d, ids in list_cases(self.workdir).items() if d in vocabulary.datasets}
        train, _, _ = fold_cases(self.collection, cases, self.config.fold)
        # the prior sees only what trains (the vocabulary may cover fewer datasets than the chosen cases)
        return task_frequencies(self.workdir, vocabulary, self._trained(train, cases, only_these=True))

    def _trained(
        self, train: list[tuple[str, str]], cases: dict[str, list[str]], only_these: bool = False
    ) -> list[tuple[str, str]]:
        """The fold's ``train`` cases as the config narrows them: ``train_case_ids`` (with ``only_these``: of the
        datasets in ``cases`` only), then the seeded ``cases``/``fraction`` subset."""
        cfg = self.config
        if cfg.train_case_ids is not None:
            chosen = {d: ids for d, ids in cfg.train_case_ids.items() if d in cases or not only_these}
            train = chosen_cases(chosen, cases, self.workdir)
        if cfg.cases is not None or cfg.fraction is not None:
            train = subset_cases(train, cfg.cases, cfg.fraction, cfg.seed)
        return train

    def _split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
        cases = list_cases(self.workdir)
        wanted = set(self.recipe.datasets)
        missing = sorted(d for d in wanted if not cases.get(d))
        if missing:
            raise MosaicSegError(
                f"{self.workdir}: no preprocessed cases for {missing}. Fix: run mosaicseg preprocess {self.workdir}."
            )
        cases = {d: ids for d, ids in cases.items() if d in wanted}
        train, val, notes = fold_cases(self.collection, cases, self.config.fold)
        train = self._trained(train, cases)
        if self.config.train_case_ids is not None:  # a chosen case is never validated on, subset or not
            chosen = set(chosen_cases(self.config.train_case_ids, cases, self.workdir))
            val = [v for v in val if v not in chosen]
        if self.config.cases is not None or self.config.fraction is not None:
            counts = {d: sum(1 for x, _ in train if x == d) for d in sorted({x for x, _ in train})}
            notes.append(f"training on a seeded subset of the training cases (seed {self.config.seed}): {counts}")
        return train, val, notes

    def _check_patch_fits(self) -> None:
        """Refuse a patch larger than every training image: it would be mostly padding (a mis-edited plan). A run
        started from another (``init_from``: finetune, adapt) keeps its source's patch and pads, with a note."""
        largest = np.zeros(len(self.patch_size), dtype=int)
        for dataset, case_id in self.train_cases:
            try:
                shape = load_case_meta(self.workdir, dataset, case_id)["shape_resampled"]
            except (MosaicSegError, KeyError):
                return  # load_case reports a damaged cache with its own message
            largest = np.maximum(largest, shape[-len(self.patch_size) :])
        strides = np.asarray(self.plans["network"]["strides"]).reshape(-1, len(self.patch_size))
        divisor = np.prod(strides, axis=0)
        cover = (np.ceil(largest / divisor) * divisor).astype(int)
        patch = np.asarray(self.patch_size)
        if (patch >= cover).all() and (patch > cover).any():
            if self.config.init_from:  # the network and its patch are the source's: a few small cases are padded
                self.notes.append(
                    f"patch {patch.tolist()} is larger than every training image (largest {largest.tolist()}): "
                    f"padded, as the network comes from {self.config.init_from}"
                )
                return
            where = "--patch-size" if self.config.patch_size else str(self.workdir / "plans.json")
            raise MosaicSegError(
                f"{where}: patch size {patch.tolist()} is larger than every training image (largest "
                f"{largest.tolist()} voxels after preprocessing), so most of each patch would be padding. Fix: "
                f"use a patch of at most {cover.tolist()} (re-run mosaicseg plan, or edit network.patch_size)."
            )

    # ----------------------------------------------------------------------------------------- state
    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_config": self.model.config,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "elapsed_s": self.elapsed_s,
            "val_s": self.val_s,
            "val_tile_s": self.val_tile_s,
            "epoch_losses": list(self.epoch_losses),  # a resumed epoch logs the mean over all its iterations
            "epoch_terms": {k: list(v) for k, v in self.epoch_terms.items()},
            "train_config": self.config.to_dict(),
            "plans": self.plans,
            "vocabulary": self.vocabulary.to_dict(),
            "datasets": list(self.recipe.datasets),
            "best": dict(self.best),
            "patch_size": list(self.patch_size),
            "recipe": self.recipe.state_dict(),
            "postprocessing": self.postprocessing,
        }

    def save(self, name: str) -> Path:
        path = self.run_dir / f"checkpoint_{name}.pt"
        if self.is_main:
            state = self.checkpoint()
            save_checkpoint(path, state)
        return path

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        """``checkpoint_latest.pt`` as rank 0 reads it, sent to every rank: only rank 0 writes the run folder, and
        on several nodes the others may not see it (a rank resuming from nothing would train out of step)."""
        path = self.run_dir / "checkpoint_latest.pt"
        ckpt = load_checkpoint(path, "cpu") if self.is_main and path.is_file() else None
        if self.world_size > 1:
            box = [ckpt]
            torch.distributed.broadcast_object_list(box, src=0)
            ckpt = box[0]
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("vocabulary") != self.vocabulary.to_dict():
            raise MosaicSegError(
                f"{self.run_dir}: the checkpoint was trained with another task vocabulary. Fix: "
                "resume with the work folder it was trained on, or start a new run folder."
            )
        saved = TrainConfig.from_dict(ckpt["train_config"])
        if diff := changed_keys(saved.to_dict(), self.config.to_dict()):
            raise MosaicSegError(
                f"{self.run_dir}: --resume with settings that differ from the run's ({diff}). Fix: "
                "resume with the same settings (see config.json) or start a new run folder."
            )
        # same settings, another model: an input read at start-up changed (e.g. clip's task-embeddings file)
        if ckpt.get("model_config") is not None and (changed := changed_keys(ckpt["model_config"], self.model.config)):
            raise MosaicSegError(
                f"{self.run_dir}: the model the settings build now differs from the checkpoint's (changed: "
                f"{changed}), so its weights do not fit. Fix: resume with the files the run started with (e.g. the "
                "same --task-embeddings file), or start a new run folder."
            )
        self.model.load_state_dict(ckpt["model"])
        self.postprocessing = dict(ckpt.get("postprocessing") or {})
        self.recipe.load_state_dict(ckpt.get("recipe") or {})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.epoch = int(ckpt["epoch"])
        self.elapsed_s = float(ckpt["elapsed_s"])
        self.val_s = float(ckpt.get("val_s", 0.0))
        self.val_tile_s = ckpt.get("val_tile_s")
        self.epoch_losses = [float(v) for v in ckpt.get("epoch_losses", [])]
        self.epoch_terms = {k: [float(x) for x in v] for k, v in ckpt.get("epoch_terms", {}).items()}
        self.best = dict(ckpt.get("best") or self.best)
        if self.is_main:
            truncate_records(self.run_dir / "metrics.jsonl", self.iteration)

    # ----------------------------------------------------------------------------------------- budget
    @property
    def total_iterations(self) -> int | None:
        totals = [
            t
            for t in (
                self.config.iterations,
                self.config.epochs * self.config.iterations_per_epoch if self.config.epochs else None,
            )
            if t is not None
        ]
        return min(totals) if totals else None

    def progress_fraction(self) -> float:
        parts = []
        if self.total_iterations:
            parts.append(self.iteration / self.total_iterations)
        if self.config.time_budget_s:
            # training ends early enough for the final validation to fit in the budget (at most half of it)
            budget = self.config.time_budget_s
            parts.append(self.elapsed_s / max(budget - self.val_reserve_s, 0.5 * budget))
        return max(parts)

    def finished(self) -> bool:
        return self.progress_fraction() >= 1.0

    def _agree(self) -> None:
        """Every rank takes the largest elapsed time and any rank's stop request. The learning rate of a time budget
        follows the elapsed time, and the budget's end and a Ctrl-C on one node end the loop: ranks that measured
        their own would step with different rates (different weights) and leave at different iterations (a hang)."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors only
        state = torch.tensor(
            [self.elapsed_s, float(self.stop_requested), self.val_reserve_s], dtype=torch.float64, device=device
        )
        torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX)
        self.elapsed_s = float(state[0])
        self.stop_requested = bool(state[1] > 0)
        self.val_reserve_s = float(state[2])  # only rank 0 validates, so only it has measured the cost

    def request_stop(self) -> None:
        """Stop after the current step, saving ``checkpoint_latest.pt`` (SIGINT/SIGTERM call this too)."""
        self.stop_requested = True

    # ----------------------------------------------------------------------------------------- data
    def _loader(self) -> DataLoader:
        cfg = self.config
        augment = AugmentConfig() if cfg.augment else AugmentConfig.off()
        global_batch = self.batch_size * self.world_size
        dataset = PatchDataset(
            cached_loader(self.workdir),
            self.policy,
            self.vocabulary,
            self.patch_size,
            seed=cfg.seed,
            length=2**62,
            augment=augment,
            oversample_foreground=cfg.oversample_foreground,
        )
        end = (self.total_iterations or 2**40) * global_batch
        draws = DrawSampler(
            self.policy, cfg.seed, self.iteration * global_batch, end, self.batch_size, self.rank, self.world_size
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=draws,
            num_workers=cfg.num_workers,
            collate_fn=_Collate(self.input_channels),
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=2 if cfg.num_workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    @property
    def input_channels(self) -> int:
        """Channels of a batch: the most any trained dataset has (fewer are zero-padded)."""
        return max(len(d["normalization"]) for n, d in self.plans["datasets"].items() if n in self.recipe.datasets)

    def collate(self, samples: Sequence[Any]) -> Batch:
        """Samples of :class:`~mosaicseg.data.sampling.PatchDataset` → a batch, as the loader makes them (for
        recipes that draw batches of their own, e.g. few-shot adaptation's auxiliary arms)."""
        return _Collate(self.input_channels)(samples)

    # ----------------------------------------------------------------------------------------- steps
    def to_device(self, batch: Batch) -> Batch:
        """The batch's tensors on the training device (non-tensors as they are)."""
        return {  # type: ignore[return-value]
            k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }

    def forward_loss(self, batch: Batch) -> tuple[ModelOutput, Losses, torch.Tensor]:
        """The model's outputs on an on-device ``batch`` (through DDP when distributed), the recipe's loss terms
        and their sum, under the run's precision. Raises if the sum is not finite."""
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            outputs = self.ddp_model(batch["image"], batch["modality"], **self.recipe.inputs(batch))
            value = self.recipe.loss(outputs, batch)
        losses = value if isinstance(value, dict) else {"loss": value}
        total = sum(losses.values(), torch.zeros((), device=self.device))
        if not torch.isfinite(total):
            raise MosaicSegError(
                f"training diverged at iteration {self.iteration}: the loss is {total.item()} "
                f"({ {k: float(v) for k, v in losses.items()} }). Fix: lower the learning rate (--lr) or check the "
                "data with mosaicseg check."
            )
        return outputs, losses, total

    def set_learning_rates(self) -> None:
        """Each group's rate for the step about to run: the schedule at the current progress × the group's
        factor (:meth:`~mosaicseg.training.recipes.ParamGroup.factor`)."""
        lr = learning_rate(self.config, self.progress_fraction())
        factors = {g.name: g.factor(self.iteration) for g in self.param_groups}
        for group in self.optimizer.param_groups:
            group["lr"] = lr * factors[group["name"]]

    def apply_gradients(self, total: torch.Tensor | None) -> None:
        """Backward of ``total`` (None: the gradients are already in ``.grad``), clip, optimiser step."""
        if total is not None:
            self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def standard_step(self, batch: Batch) -> StepResult:
        """One forward, one backward, one update."""
        outputs, losses, total = self.forward_loss(batch)
        self.apply_gradients(total)
        return StepResult(float(total.detach()), {k: v.detach() for k, v in losses.items()}, outputs)

    def train_step(self, batch: Batch) -> StepResult:
        """The recipe's step (or :meth:`standard_step`) on ``batch``; advances the iteration."""
        batch = self.to_device(batch)
        self.set_learning_rates()
        self.optimizer.zero_grad(set_to_none=True)
        step = self.recipe.step or Trainer.standard_step
        result = step(self, batch)
        self.iteration += 1
        for hook in self.recipe.hooks:
            getattr(hook, "on_step_end", _skip)(self, batch, result.outputs, result.losses)
        return result

    def tile_forward(self, dataset: str, tasks: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``tiles (N, C, *P) -> logits (N, K, *P)`` of the model for images of ``dataset`` asking for ``tasks``
        (global indices): what the sliding window calls, bound as the predictor binds it (:class:`TileModel`)."""
        tile = TileModel.asking(self.model, self.vocabulary.num_tasks, tasks, self.vocabulary.dataset_index(dataset))
        return bind_modality(tile, self.vocabulary.modality_index(dataset))

    def _val_selection(self) -> dict[str, list[str]]:
        """The held-out cases each validation uses: per dataset the first ``val_max_cases`` in sorted order."""
        per_dataset: dict[str, list[str]] = {}
        for d, c in self.val_cases:
            per_dataset.setdefault(d, []).append(c)
        n = self.config.val_max_cases
        return {d: sorted(cases)[:n] if n is not None else sorted(cases) for d, cases in per_dataset.items()}

    @torch.no_grad()
    def validate(self, largest_component: bool = False) -> dict[str, Any]:
        """Per-dataset pseudo-Dice on the fold's held-out cases (preprocessed space, threshold 0.5).

        ``val_mode`` "cases": each case predicted whole by the sliding window; "patches": ``val_patches``
        patches per case at centres drawn once from the run's seed (the same patches every time, so passes
        compare), the first of each case on a foreground voxel when it has one. Counts are summed over cases
        per task (nnU-Net's pseudo-Dice; the evaluator's Dice of the summed counts), then averaged over each
        dataset's tasks. ``largest_component`` (whole cases only): also each task's Dice when its mask keeps only
        its largest connected component (``val_dice_tasks_largest_component``), what the run's post-processing
        decision is made from.
        """
        self.model.eval()
        counts: dict[tuple[str, int], np.ndarray] = {}
        kept_counts: dict[tuple[str, int], np.ndarray] = {}
        largest_component = largest_component and self.config.val_mode == "cases"
        selection = self._val_selection()
        for d, cases in selection.items():
            tasks = self.vocabulary.dataset_tasks(d)
            task_ids = [k for k, _, _ in tasks]
            forward = self.tile_forward(d, task_ids)
            # (tasks, *spatial) logits with the (*spatial) label map they are scored against
            scored = (
                self._case_logits(d, cases, forward, task_ids)
                if self.config.val_mode == "cases"
                else self._patch_logits(d, cases, forward, task_ids)
            )
            for logits, seg in scored:
                valid = ~self.vocabulary.ignore_mask(d, seg)
                for j, (k, _, values) in enumerate(tasks):
                    mask = logits[j].numpy() > 0
                    ref = np.isin(seg, values) & valid
                    scored_masks = [(counts, mask)]
                    if largest_component:  # filtered as the predictor would, before the ignore mask
                        scored_masks.append((kept_counts, keep_largest_component(mask)))
                    for into, m in scored_masks:
                        pred = m & valid
                        tp = np.count_nonzero(pred & ref)
                        c = into.setdefault((d, k), np.zeros(3, dtype=np.int64))
                        c += (tp, np.count_nonzero(pred) - tp, np.count_nonzero(ref) - tp)
        task_dice: dict[str, float] = {}
        dataset_dice: dict[str, float] = {}
        for d in selection:
            values = []
            for k, _, _ in self.vocabulary.dataset_tasks(d):
                tp, fp, fn = counts.get((d, k), np.zeros(3, dtype=np.int64))
                dice = dice_from_counts(int(tp), int(fp), int(fn))
                task_dice[self.vocabulary.tasks[k].name] = float(dice)
                values.append(dice)
            finite = [v for v in values if not math.isnan(v)]
            dataset_dice[d] = float(np.mean(finite)) if finite else math.nan
        finite = [v for v in dataset_dice.values() if not math.isnan(v)]
        result: dict[str, Any] = {
            "val_dice": dataset_dice,
            "val_dice_tasks": task_dice,
            "val_mean": float(np.mean(finite)) if finite else math.nan,
        }
        if largest_component:
            zero = np.zeros(3, dtype=np.int64)
            result["val_dice_tasks_largest_component"] = {
                self.vocabulary.tasks[k].name: float(dice_from_counts(*(int(x) for x in kept_counts.get((d, k), zero))))
                for d in selection
                for k, _, _ in self.vocabulary.dataset_tasks(d)
            }
        return result

    def _eval_autocast(self) -> torch.autocast:
        """Mixed precision of a validation forward, as the sliding window runs it (bf16 on the CPU, fp16 on CUDA)."""
        return torch.autocast(self.device.type, enabled=self.amp and self.device.type in ("cpu", "cuda"))

    def _case_logits(
        self, dataset: str, cases: list[str], forward: Callable[[torch.Tensor], torch.Tensor], task_ids: list[int]
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Each whole case's sliding-window logits ``(K, *S)`` and label map ``(*S)``."""
        for case_id in cases:
            case = load_case(self.workdir, dataset, case_id, mmap=True)
            image = torch.from_numpy(np.array(case.image, dtype=np.float32))  # mmap is read-only
            logits = predict_logits(
                forward, image, self.patch_size, tile_batch=self.batch_size, tasks=task_ids, device=self.device,
                amp=self.amp,
            )  # fmt: skip
            yield logits, np.asarray(case.seg)

    def _patch_logits(
        self, dataset: str, cases: list[str], forward: Callable[[torch.Tensor], torch.Tensor], task_ids: list[int]
    ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Logits ``(T, *P)`` of the dataset's tasks ``task_ids`` (global indices, in that order, as the sliding
        window keeps them) and label map ``(*P)`` of the validation patches of ``cases``, batched."""
        index = self.vocabulary.dataset_index(dataset)
        patches: list[tuple[np.ndarray, np.ndarray]] = []
        for case_id in cases:
            case = load_case(self.workdir, dataset, case_id, mmap=True)
            image, seg = np.asarray(case.image), np.asarray(case.seg)
            # one generator per case from the seed and the case's name: the same centres at every validation,
            # after a resume, and whichever other cases are held out
            rng = np.random.default_rng([self.config.seed, index, *case_id.encode()])
            for p in range(self.config.val_patches):
                centre = choose_center(seg.shape, self.patch_size, case.fg_locations, p % 2 == 0, rng)
                patches.append(sample_patch(image, seg, centre, self.patch_size, AugmentConfig.off(), rng))
        for start in range(0, len(patches), self.batch_size):
            chunk = patches[start : start + self.batch_size]
            x = torch.from_numpy(np.stack([im for im, _ in chunk])).to(self.device)
            with self._eval_autocast():
                # the tile forward gives all K tasks: keep the dataset's, so that row j is its j-th task
                logits = forward(x)[:, task_ids].float().cpu()
            for j, (_, seg) in enumerate(chunk):
                yield logits[j], seg

    # ----------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train until the budget is spent or a stop is requested; returns the last epoch record."""
        cfg = self.config
        if self.is_main:
            write_json_atomic(
                self.run_dir / "config.json",
                {
                    "train_config": cfg.to_dict(),
                    "datasets": list(self.recipe.datasets),
                    "tasks": [t.name for t in self.vocabulary.tasks],
                    "patch_size": list(self.patch_size),
                    "batch_size": self.batch_size,
                    "world_size": self.world_size,
                    "notes": self.notes,
                    "train_cases": len(self.train_cases),
                    "val_cases": len(self.val_cases),
                },
            )
        for hook in self.recipe.hooks:
            getattr(hook, "on_train_start", _skip)(self)
        record: dict[str, Any] = {}
        if self.finished():
            return self._finish(record)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, lambda *_: self.request_stop())
        bar = progress_bar(
            total=self.total_iterations,
            initial=self.iteration,
            disable=not (self.progress and self.is_main),
            desc=f"train {cfg.recipe}",
            unit="it",
        )
        losses = self.epoch_losses
        epoch_start = time.perf_counter()
        tick = time.perf_counter()
        try:
            for batch in self._loader():
                step = self.train_step(batch)
                loss = step.loss
                for name, term in step.losses.items():
                    self.epoch_terms.setdefault(name, []).append(float(term))
                now = time.perf_counter()
                self.elapsed_s += now - tick
                tick = now
                if cfg.time_budget_s is not None and self.val_cases:
                    self.val_reserve_s = self.expected_validation_s()
                if self.world_size > 1:
                    self._agree()
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", epoch=self.epoch, refresh=False)
                done = self.finished()
                epoch_end = self.iteration % cfg.iterations_per_epoch == 0
                if epoch_end or done:
                    record = self._end_epoch(losses, time.perf_counter() - epoch_start, validate=epoch_end or done)
                    epoch_start = time.perf_counter()
                    if done:  # no step follows to count the final validation in the run's time; ranks may differ
                        self.elapsed_s += epoch_start - tick
                elif cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save("latest")
                if done:
                    break
                if self.stop_requested:
                    self.save("latest")
                    bar.close()
                    return record
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        return self._finish(record)

    def _end_epoch(self, losses: list[float], seconds: float, validate: bool) -> dict[str, Any]:
        cfg = self.config
        self.epoch = self.iteration // cfg.iterations_per_epoch
        # a final partial epoch is logged under its own number
        record: dict[str, Any] = {
            "epoch": math.ceil(self.iteration / cfg.iterations_per_epoch),
            "iteration": self.iteration,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "lr": learning_rate(cfg, self.progress_fraction()),
            "epoch_time_s": seconds,
            "elapsed_s": self.elapsed_s,
        }
        if len(self.epoch_terms) > 1:  # a recipe with several named terms: each one's epoch mean
            record["loss_terms"] = {k: float(np.mean(v)) for k, v in self.epoch_terms.items()}
        losses.clear()  # before this epoch's checkpoint: a run resumed from it starts a fresh epoch
        self.epoch_terms.clear()
        due = record["epoch"] % cfg.val_every == 0 and self._validation_affordable()
        do_val = validate and self.val_cases and (self.finished() or due)
        if do_val and self.is_main:
            t0 = time.perf_counter()
            record.update(self.validate(largest_component=self.finished()))
            if "val_dice_tasks_largest_component" in record:
                self._decide_postprocessing(record)
            record["val_time_s"] = time.perf_counter() - t0
            self.val_s += record["val_time_s"]
            if self.finished():  # the record of the last epoch says when the run ended
                record["elapsed_s"] = self.elapsed_s + record["val_time_s"]
            self.val_tile_s = record["val_time_s"] / max(1, self.validation_tiles())
            if not math.isnan(record["val_mean"]) and record["val_mean"] > self.best["val_mean"]:
                self.best = {"val_mean": record["val_mean"], "iteration": self.iteration}
                self.save("best")
        for hook in self.recipe.hooks:
            getattr(hook, "on_epoch_end", _skip)(self, record)
        if self.is_main:
            append_record(self.run_dir / "metrics.jsonl", record)
            plot_progress(read_records(self.run_dir / "metrics.jsonl"), self.run_dir / "progress.png")
            if self.progress:
                dice = " ".join(f"{d.split('_', 1)[-1]}={v:.3f}" for d, v in record.get("val_dice", {}).items())
                tqdm.write(
                    f"epoch {self.epoch} it {self.iteration}: loss {record['train_loss']:.4f} "
                    f"lr {record['lr']:.2e} {record['epoch_time_s']:.1f}s {dice}"
                )
        self.save("latest")
        return record

    def _decide_postprocessing(self, record: dict[str, Any]) -> None:
        """The final validation decides, per validated task, whether predictions keep only their largest component
        (:func:`~mosaicseg.inference.postprocess.decide_largest_component`); kept in the checkpoint (so bundles and
        ensembles carry it) and in ``postprocessing.json``. Tasks not validated keep the source model's decision."""
        selection = self._val_selection()
        cases = {self.vocabulary.tasks[k].name: len(c) for d, c in selection.items() for k, _, _ in
                 self.vocabulary.dataset_tasks(d)}  # fmt: skip
        plain = {name: record["val_dice_tasks"][name] for name in cases}
        decided = decide_largest_component(plain, record["val_dice_tasks_largest_component"], cases)
        self.postprocessing = {**self.postprocessing, **decided}
        write_json_atomic(
            self.run_dir / "postprocessing.json",
            {
                "rule": "keep a task's largest connected component where that raised its pseudo-Dice on the final "
                "validation (whole held-out cases, preprocessed grid); predict --no-largest-component turns it off",
                "iteration": self.iteration,
                "tasks": self.postprocessing,
            },
        )

    def _validation_affordable(self) -> bool:
        """Whether a due validation, at its predicted cost, keeps validation within ``val_share`` of the elapsed
        time of a time budget (always, without either)."""
        cfg = self.config
        if cfg.val_share is None or cfg.time_budget_s is None:
            return True
        return self.val_s + self.expected_validation_s() <= cfg.val_share * self.elapsed_s

    def expected_validation_s(self) -> float:
        """Predicted seconds of one validation pass: its forward tiles times the seconds per tile of the last
        pass or, before any, of a timed forward of one batch of validation tiles (:meth:`probe_tile_s`)."""
        if not self.val_cases:
            return 0.0
        per_tile = self.val_tile_s if self.val_tile_s is not None else self.probe_tile_s()
        return per_tile * self.validation_tiles()

    @torch.no_grad()
    def probe_tile_s(self) -> float:
        """Seconds per tile of an evaluation forward, timed once on a batch of the first validation case's centre
        patch (the second of two calls: the first pays one-off allocations). A forward in eval mode without
        gradients changes no weight, statistic or random stream, so a seeded run stays what it was."""
        if self._tile_probe_s is None:
            dataset, cases = next(iter(self._val_selection().items()))
            case = load_case(self.workdir, dataset, cases[0], mmap=True)
            centre = (np.asarray(case.seg.shape, dtype=np.float64) - 1) / 2
            image, _ = sample_patch(
                np.asarray(case.image), np.asarray(case.seg), centre, self.patch_size, AugmentConfig.off(),
                np.random.default_rng(0),
            )  # fmt: skip
            x = torch.from_numpy(np.stack([image] * self.batch_size)).to(self.device)
            forward = self.tile_forward(dataset, [k for k, _, _ in self.vocabulary.dataset_tasks(dataset)])
            self.model.eval()
            for _ in range(2):
                t0 = time.perf_counter()
                with self._eval_autocast():
                    forward(x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - t0
            self._tile_probe_s = seconds / self.batch_size
        return self._tile_probe_s

    def validation_tiles(self) -> int:
        """Forward tiles of one validation pass: ``val_patches`` per case, or each case's sliding windows."""
        if self._val_tile_count is None:
            selection = self._val_selection()
            if self.config.val_mode == "patches":
                count = self.config.val_patches * sum(len(c) for c in selection.values())
            else:
                count = sum(
                    _window_count(load_case(self.workdir, d, c, mmap=True).seg.shape, self.patch_size)
                    for d, cases in selection.items()
                    for c in cases
                )
            self._val_tile_count = count
        return self._val_tile_count

    def _finish(self, record: dict[str, Any]) -> dict[str, Any]:
        self.save("final")
        self.save("latest")
        if self.world_size > 1:
            torch.distributed.barrier()
        return record


def _window_count(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> int:
    """Sliding windows of ``patch`` over ``shape`` at ``overlap`` (MONAI's tiling; smaller axes are padded)."""
    n = 1
    for s, p in zip(shape, patch, strict=True):
        step = max(1, int(p * (1 - overlap)))
        n *= 1 if s <= p else math.ceil((s - p) / step) + 1
    return n


def _skip(*_: Any) -> None:
    """A hook method a recipe's hook does not implement."""


class _Collate:
    """Picklable collate (loader workers) padding every batch to the run's channel count."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, samples: Sequence[Any]) -> Any:
        return collate(list(samples), channels=self.channels)
