"""nnU-Net v2 side of ``python -m benchmarks nnunet``; runs in the Python that has ``nnunetv2`` installed.

It imports nothing from mosaicseg, so nnU-Net can live in its own environment. ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` come from the environment, as for nnU-Net's own commands.

    python nnunet_runner.py plan DATASET_ID
    python nnunet_runner.py train DATASET_ID ITERATIONS ITERATIONS_PER_EPOCH TIMING_JSON [PLANS [CHECKPOINT_EVERY]]
    python nnunet_runner.py shrink DATASET_ID FEATURES_JSON PATCH_JSON PLANS  (a smaller 3d_fullres network as PLANS)
    python nnunet_runner.py predict DATASET_ID IMAGES_FOLDER OUTPUT_FOLDER {tta,notta} [PLANS]
    python nnunet_runner.py forward FEATURES_JSON PATCH_JSON CLASSES REPEATS    (prints JSON: ms per tile forward)

``train`` uses nnU-Net's documented extension mechanism: a trainer subclass that only changes the number of
iterations per epoch and of epochs (and runs a single validation batch per epoch instead of 50: the study
scores both tools on the same held-out cases afterwards, with one evaluator). Its learning rate follows the
stock schedule (poly over the stock 1000 epochs, stepped per epoch), so a bench run is the first ITERATIONS
iterations of a stock run: in the first 250 the learning rate is the stock 1e-2 throughout.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch

_CPU = torch.device("cpu")


def _dataset_name(dataset_id: int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset_id)


def plan(dataset_id: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=2, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(2,))


def _bench_trainer(iterations: int, per_epoch: int) -> type:
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBench(nnUNetTrainer):
        # nnU-Net records its init arguments by name: the signature must be the stock one
        def __init__(
            self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = _CPU
        ) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.stock_epochs = self.num_epochs
            self.num_iterations_per_epoch = per_epoch
            self.num_epochs = max(1, iterations // per_epoch)
            self.num_val_iterations_per_epoch = 1
            self.save_every = 10**9

        def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
            optimizer, _ = super().configure_optimizers()
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.stock_epochs)

    return nnUNetTrainerBench


def shrink(dataset_id: int, features: list[int], patch: list[int], plans_name: str) -> None:
    """Write ``PLANS.json`` beside nnU-Net's plans: its 3d_fullres with the first ``len(features)`` stages at
    ``features`` and ``patch`` (nnU-Net's documented plan editing; the preprocessed data is shared, since the data
    identifier is kept), so that a CPU can train it."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed

    folder = Path(nnUNet_preprocessed) / _dataset_name(dataset_id)
    plans = load_json(str(folder / "nnUNetPlans.json"))
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    n = len(features)
    arch["n_stages"] = n
    arch["features_per_stage"] = list(features)
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        arch[key] = arch[key][:n]
    arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][: n - 1]
    config["patch_size"] = list(patch)
    config["batch_size"] = 2
    plans["plans_name"] = plans_name
    save_json(plans, str(folder / f"{plans_name}.json"), sort_keys=False)


def train(
    dataset_id: int,
    iterations: int,
    per_epoch: int,
    timing_json: Path,
    plans_name: str = "nnUNetPlans",
    checkpoint_every: int | None = None,
) -> None:
    """Every ``checkpoint_every`` epochs ``checkpoint_latest.pth`` is written (None: never, the bench trainer's
    setting, as the speed comparison wants); a run whose folder holds one goes on from it, as
    ``nnUNetv2_train --c`` does: a sitting cut short does not lose the epochs it finished."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    torch.set_num_threads(multiprocessing.cpu_count())  # what nnUNetv2_train -device cpu does
    name = _dataset_name(dataset_id)
    folder = Path(nnUNet_preprocessed) / name
    plans = load_json(str(folder / f"{plans_name}.json"))
    plans["continue_training"] = False  # as nnunetv2.run.run_training.get_trainer_from_args sets it
    dataset_json = load_json(str(folder / "dataset.json"))
    trainer = _bench_trainer(iterations, per_epoch)(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    if checkpoint_every is not None:
        trainer.save_every = checkpoint_every
    latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
    if latest.is_file():
        trainer.load_checkpoint(str(latest))
        print(f"resuming {latest} at epoch {trainer.current_epoch}", flush=True)
    t0 = time.perf_counter()
    trainer.run_training()
    wall = time.perf_counter() - t0
    log = trainer.logger.local_logger.my_fantastic_logging
    epochs = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"], strict=False)]
    done = trainer.num_epochs * trainer.num_iterations_per_epoch
    timing_json.write_text(
        json.dumps(
            {
                "iterations": done,
                "epoch_s": epochs,
                "train_s": sum(epochs),
                "s_per_iteration": sum(epochs) / done,
                "wall_s_incl_setup": wall,
                "n_proc_DA": get_allowed_n_proc_DA(),
                "output_folder": str(trainer.output_folder),
                "pseudo_dice_last_epoch": (log["dice_per_class_or_region"] or [None])[-1],
            },
            indent=1,
            default=float,  # numpy scalars in nnU-Net's log
        )
    )


def predict(dataset_id: int, images: Path, output: Path, tta: bool, plans_name: str = "nnUNetPlans") -> None:
    import nnunetv2.inference.predict_from_raw_data as inference
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # nnU-Net looks trainers up by class name inside its own package; the bench trainer only changes the
    # schedule, so the stock trainer rebuilds the identical network
    inference.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer
    torch.set_num_threads(multiprocessing.cpu_count())
    model = Path(nnUNet_results) / _dataset_name(dataset_id) / f"nnUNetTrainerBench__{plans_name}__3d_fullres"
    predictor = inference.nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files(
        str(images),
        str(output),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )


def forward(features: list[int], patch: list[int], classes: int, repeats: int) -> None:
    """Best-of-``repeats`` forward of one tile through nnU-Net's own 3d_fullres network (PlainConvUNet, instance
    norm, contiguous, 2 convolutions per stage), in ``torch.inference_mode`` as its predictor runs it."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    net = PlainConvUNet(
        1,
        n,
        features,
        torch.nn.Conv3d,
        3,
        [1] + [2] * (n - 1),
        [2] * n,
        classes,
        [2] * (n - 1),
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    ).eval()
    x = torch.randn(1, 1, *patch)
    times = []
    with torch.inference_mode():
        net(x)
        net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * min(times), "threads": torch.get_num_threads()}))


def main(argv: list[str]) -> None:
    if argv[0] == "forward":
        forward(json.loads(argv[1]), json.loads(argv[2]), int(argv[3]), int(argv[4]))
        return
    command, dataset_id = argv[0], int(argv[1])
    if command == "plan":
        plan(dataset_id)
    elif command == "train":
        train(dataset_id, int(argv[2]), int(argv[3]), Path(argv[4]), *argv[5:6], *map(int, argv[6:7]))
    elif command == "shrink":
        shrink(dataset_id, json.loads(argv[2]), json.loads(argv[3]), argv[4])
    elif command == "predict":
        predict(dataset_id, Path(argv[2]), Path(argv[3]), argv[4] == "tta", *argv[5:6])
    else:
        raise SystemExit(f"unknown command {command!r}; see the module docstring")


if __name__ == "__main__":
    main(sys.argv[1:])
