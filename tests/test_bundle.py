"""One-file model bundles (``mosaicseg export``/``info``, ``Predictor.from_bundle``) and the in-memory Python API
(``Predictor.predict``): identical predictions to the run folder, no pickle, the model card, refusals, and the
README's example. One tiny 3D run of two folds, trained for two iterations (output biases start at p = 0.55, so
the label maps are not empty), serves every test."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.data.workdir import list_cases
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.bundle import export_bundle, load_bundle, read_metadata
from mosaicseg.inference.predictor import Predictor
from mosaicseg.models import MODEL_KINDS, build_from_config, use_device_layout
from mosaicseg.runtime import load_checkpoint, save_checkpoint
from mosaicseg.training.loop import Trainer

README = Path(__file__).resolve().parent.parent / "README.md"
MULTI = "Dataset903_SynthMulti"  # two channels, files in PIR orientation
CT = "Dataset901_SynthCT"  # regions (Liver = {1, 2} includes Tumor = {2}), files in RAS orientation


@pytest.fixture(scope="module")
def exported(tiny_workdir_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder with fold_0 and fold_1, its bundle exported by the CLI)."""
    run = tiny_workdir_3d / "runs" / "bundle_test"  # inside the work folder, where export finds it
    for fold in (0, 1):
        cfg = TrainConfig(
            recipe="universal",
            iterations=2,
            iterations_per_epoch=2,
            device="cpu",
            fold=fold,
            val_max_cases=1,
            recipe_options={"head_prior": 0.55},
        )
        Trainer(tiny_workdir_3d, cfg, run / f"fold_{fold}", progress=False).fit()
    bundle = tmp_path_factory.mktemp("bundle") / "model.mosaic"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "2 fold(s), 6 task(s) of 3 dataset(s)" in result.output
    return run, bundle


def _case_files(workdir: Path, dataset: str, case: str) -> list[Path]:
    return sorted((workdir.parent / "data" / dataset / "imagesTr").glob(f"{case}_*.nii.gz"))


def _voxels(path: Path) -> np.ndarray:
    """A file's voxels in its own index order (X, Y, Z)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T


def test_bundle_predicts_identically_to_the_run_folder(exported, tiny_workdir_3d, tmp_path):
    run, bundle = exported
    files = _case_files(tiny_workdir_3d, MULTI, "synmulti_000")
    outputs = {}
    for name, model in (("run", run), ("bundle", bundle)):
        out = tmp_path / name
        args = ["predict", "-m", str(model), "-o", str(out), "--dataset", MULTI, "--tasks", "all"]
        # eager float32: a frozen graph is kept only where it timed faster, and rounds differently
        args += [a for f in files for a in ("-i", str(f))] + ["--save-probabilities", "--precision", "fp32", "--no-jit"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs[name] = {p.relative_to(out): _voxels(p) for p in out.rglob("*.nii.gz")}
    # one label map and one probability map per task, in each source dataset's folder
    assert len(outputs["run"]) == 3 + 6 and outputs["run"].keys() == outputs["bundle"].keys()
    for key, want in outputs["run"].items():
        assert np.array_equal(outputs["bundle"][key], want), key
    labels = outputs["run"][Path(MULTI, "synmulti_000.nii.gz")]
    assert set(np.unique(labels)) == {0, 1, 2}  # a real label map, not an empty one
    # both folds are ensembled; --folds picks by name as in a run folder
    assert len(Predictor.from_checkpoint(bundle).models) == 2
    one = Predictor.from_bundle(bundle, folds=["1"], jit=False)
    ref = Predictor.from_checkpoint(run, folds=["1"], jit=False)
    assert len(one.models) == 1
    for a, b in zip(one.models[0].state_dict().values(), ref.models[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_bundle_is_a_safetensors_file_and_holds_no_pickle(exported):
    run, bundle = exported
    data = bundle.read_bytes()
    # the whole file is the 8-byte header length, the JSON header and the tensors' byte ranges: no room for more
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    ranges = sorted(tuple(t["data_offsets"]) for t in header.values())
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert 8 + n + ranges[-1][1] == len(data)
    assert not data.startswith(b"PK")  # torch.save writes a zip holding data.pkl; this is not one
    assert {t["dtype"] for t in header.values()} <= {"F32", "F16", "BF16", "I64", "BOOL"}
    tensors = load_safetensors(data)
    card = json.loads(meta["mosaicseg"])
    assert meta["format"] == "mosaicseg/bundle" and [f["name"] for f in card["folds"]] == ["0", "1"]
    for fold in ("0", "1"):
        ckpt = load_checkpoint(run / f"fold_{fold}" / "checkpoint_final.pt")
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"fold_{fold}/")}
        assert state.keys() == ckpt["model"].keys()
        assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
        config = card["folds"][int(fold)]["model_config"]
        assert config == json.loads(json.dumps(ckpt["model_config"]))
        build_from_config(config).load_state_dict(state)  # strict: the config rebuilds this network


@pytest.mark.parametrize("kind", MODEL_KINDS.names())
def test_every_model_kind_round_trips_through_a_bundle(kind, exported, tmp_path):
    from test_model_kinds import _inputs, build  # tests/ is on sys.path under pytest's default import mode

    run, _ = exported
    model = build(kind).eval()
    ckpt = load_checkpoint(run / "fold_0" / "checkpoint_final.pt")
    ckpt.update(model=model.state_dict(), model_config=model.config)
    save_checkpoint(tmp_path / "checkpoint_final.pt", ckpt)
    export_bundle(tmp_path / "checkpoint_final.pt", tmp_path / "k.mosaic")
    (loaded,) = Predictor.from_bundle(tmp_path / "k.mosaic", jit=False).models
    # a kind's training-only parts (KA²ER's amalgamation layer) are dropped for prediction; everything else loads
    dropped = model.prediction_only() if hasattr(model, "prediction_only") else None
    kept = model.state_dict()
    assert kept.keys() == loaded.state_dict().keys() and (
        dropped is None or not any(k.startswith(dropped) for k in kept)
    )
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in kept.items())
    use_device_layout(model, torch.device("cpu"))  # as the predictor does: the same kernels, the same rounding
    image, modality = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(image, modality).logits[0], model(image, modality).logits[0])


def test_info_prints_tasks_licences_split_and_versions(exported, tiny_workdir_3d):
    run, bundle = exported
    text = CliRunner().invoke(app, ["info", str(bundle)])
    assert text.exit_code == 0, text.output
    assert f"{CT}: modality CT" in text.output and "licence CC0-1.0" in text.output
    assert "Liver (labels 1, 2), Tumor (label 2)" in text.output and "Edema (label 1), Lesion (label 2)" in text.output
    assert "folds: 2" in text.output and f"torch {torch.__version__}" in text.output
    raw = CliRunner().invoke(app, ["info", str(bundle), "--json"])
    card = json.loads(raw.output)
    assert card == read_metadata(bundle) and card["versions"]["torch"] == torch.__version__
    sources = {d["name"]: d for d in card["provenance"]["datasets"]}
    assert [d["licence"] for d in sources.values()] == ["CC0-1.0"] * 3
    folder = tiny_workdir_3d.parent / "data" / MULTI
    sums = sources[MULTI]["checksums"]
    assert sums["dataset_json_sha256"] == hashlib.sha256((folder / "dataset.json").read_bytes()).hexdigest()
    files = sorted(p for sub in ("imagesTr", "labelsTr") for p in (folder / sub).iterdir())
    manifest = "".join(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}\n" for p in files)
    assert sums["manifest_sha256"] == hashlib.sha256(manifest.encode()).hexdigest() and sums["files"] == 9
    # the split: every preprocessed case once, training and validation disjoint, as many as the run recorded
    cases = list_cases(tiny_workdir_3d)
    for fold in card["folds"]:
        split, recorded = fold["split"], json.loads((run / f"fold_{fold['name']}" / "config.json").read_text())
        assert split["fold"] == int(fold["name"]) and split["folds"] == 2
        for d, ids in cases.items():
            assert sorted(split["train"][d] + split["validation"][d]) == ids
            assert not set(split["train"][d]) & set(split["validation"][d])
        assert (split["train_cases"], split["val_cases"]) == (recorded["train_cases"], recorded["val_cases"])
    folds = [set(f["split"]["validation"][MULTI]) for f in card["folds"]]
    assert folds[0] and folds[1] and not folds[0] & folds[1]


def test_export_refuses_to_overwrite_and_checks_its_options(exported, tmp_path):
    run, _ = exported
    target = tmp_path / "again.mosaic"
    assert CliRunner().invoke(app, ["export", str(run), "-o", str(target), "--folds", "0"]).exit_code == 0
    before = target.read_bytes()
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(target)])
    assert result.exit_code == 2 and f"{target}: exists already" in result.output and "--overwrite" in result.output
    assert target.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(target), "--overwrite", "--checksums", "content"])
    assert result.exit_code == 0, result.output
    card = read_metadata(target)
    assert len(card["folds"]) == 2 and card["provenance"]["datasets"][0]["checksums"]["method"] == "content"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "x.mosaic"), "--checksums", "md5"])
    assert result.exit_code == 2 and "--checksums 'md5' is unknown" in result.output


def test_damaged_and_foreign_files_are_refused_with_the_file_and_the_fix(exported, tmp_path):
    _, bundle = exported
    data = bundle.read_bytes()
    truncated = tmp_path / "truncated.mosaic"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.mosaic"
    text.write_text("not a model")
    empty = tmp_path / "empty.mosaic"
    empty.write_bytes(b"")
    for bad in (truncated, text, empty):
        with pytest.raises(MosaicSegError, match=rf"{re.escape(str(bad))}: not a readable MosaicSeg model bundle"):
            Predictor.from_checkpoint(bad)
    foreign = tmp_path / "weights.mosaic"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(MosaicSegError, match=rf"{re.escape(str(foreign))}: .*not a MosaicSeg model bundle.*Fix:"):
        load_bundle(foreign)
    # one flipped byte in the weights: the checksum notices
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    damaged = tmp_path / "flipped.mosaic"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(MosaicSegError, match=rf"{re.escape(str(damaged))}: the weights of fold [01] do not match"):
        Predictor.from_bundle(damaged)
    with pytest.raises(MosaicSegError, match=re.escape("holds no fold ['7']. Fix: use --folds among ['0', '1']")):
        Predictor.from_bundle(bundle, folds=["7"])
    info = CliRunner().invoke(app, ["info", str(truncated)])
    predict = CliRunner().invoke(app, ["predict", "-m", str(text), "-i", str(text), "-o", str(tmp_path / "o")])
    for result, culprit in ((info, truncated), (predict, text)):
        assert result.exit_code == 2 and f"{culprit}: not a readable" in result.output and "Fix:" in result.output


def test_python_api_returns_the_cli_label_maps_masks_and_probabilities(exported, tiny_workdir_3d, tmp_path):
    _, bundle = exported
    predictor = Predictor.from_bundle(bundle, jit=False, precision="fp32")
    files = _case_files(tiny_workdir_3d, CT, "synct_001")
    out = tmp_path / "cli"
    args = ["predict", "-m", str(bundle), "-i", str(files[0]), "-o", str(out), "--dataset", CT]
    result = CliRunner().invoke(app, [*args, "--save-probabilities", "--precision", "fp32", "--no-jit"])
    assert result.exit_code == 0, result.output
    got = predictor.predict(files[0], dataset=CT)
    labels = _voxels(out / "synct_001.nii.gz")
    assert got.dataset == CT and list(got.label_maps) == [CT] and np.array_equal(got.label_maps[CT], labels)
    assert list(got.masks) == [f"{CT}/Liver", f"{CT}/Tumor"]
    for task, mask in got.masks.items():
        prob = got.probabilities[task]
        assert mask.dtype == bool and prob.dtype == np.float32 and mask.shape == prob.shape == labels.shape
        assert np.array_equal(prob, _voxels(out / f"synct_001_prob_{task.split('/')[1]}.nii.gz"))
        assert np.array_equal(mask, prob > 0.5)
    # CT's regions: Liver (painted 1) then Tumor (painted 2 on top)
    liver, tumor = got.masks[f"{CT}/Liver"], got.masks[f"{CT}/Tumor"]
    assert np.array_equal(labels, np.where(tumor, 2, np.where(liver, 1, 0)))
    assert 0 < tumor.sum() < labels.size and (liver & ~tumor).any()
    # the same voxels as an array with the file's geometry (RAS, so reoriented on the way in and out)
    image = sitk.ReadImage(str(files[0]))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "RAS"
    geometry = {"spacing": image.GetSpacing(), "origin": image.GetOrigin(), "direction": image.GetDirection()}
    same = predictor.predict(_voxels(files[0]), dataset=CT, tasks=["Tumor"], **geometry)
    from_file = predictor.predict(files[0], dataset=CT, tasks=["Tumor"])
    tumor_task = f"{CT}/Tumor"
    assert list(same.masks) == [tumor_task] and np.array_equal(same.masks[tumor_task], from_file.masks[tumor_task])
    assert np.array_equal(same.probabilities[f"{CT}/Tumor"], from_file.probabilities[f"{CT}/Tumor"])
    # one task's head is a narrower 1x1 convolution than all of them, which the CPU kernels may sum in another
    # order: the same probabilities up to float32 rounding, not bit for bit
    np.testing.assert_allclose(same.probabilities[f"{CT}/Tumor"], got.probabilities[f"{CT}/Tumor"], atol=1e-6, rtol=0)
    decided = np.abs(got.probabilities[f"{CT}/Tumor"] - 0.5) > 1e-6
    assert np.array_equal(same.masks[f"{CT}/Tumor"][decided], tumor[decided])
    with pytest.raises(MosaicSegError, match=r"without spacing\. Fix: pass spacing"):
        predictor.predict(_voxels(files[0]), dataset=CT)
    with pytest.raises(MosaicSegError, match=re.escape("1 channel(s); dataset Dataset903_SynthMulti's plan expects 2")):
        predictor.predict(_voxels(files[0]), dataset=MULTI, **geometry)
    with pytest.raises(MosaicSegError, match="spacing, origin and direction are read from the file"):
        predictor.predict(files[0], dataset=CT, spacing=(1, 1, 1))


def test_the_readme_example_runs(exported, tiny_workdir_3d, tmp_path, monkeypatch, capsys):
    _, bundle = exported
    text = README.read_text(encoding="utf-8")
    marker = text.index("<!-- bundle-example -->")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block is not None and block.start() < 40  # the fenced block right below the marker
    shutil.copy(bundle, tmp_path / "model.mosaic")
    (tmp_path / "data").symlink_to(tiny_workdir_3d.parent / "data")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    from_file, liver, labels = namespace["from_file"], namespace["liver"], namespace["labels"]
    assert set(from_file.masks) == {f"{CT}/Liver", f"{CT}/Tumor"}  # type: ignore[attr-defined]
    file_liver = from_file.masks[f"{CT}/Liver"]  # type: ignore[attr-defined]
    assert printed[0].startswith(f"{CT}/Liver {file_liver.shape} {int(file_liver.sum())} voxels, max p 0.")
    assert printed[-1] == f"{liver.shape} uint8 {np.unique(labels)}"
    # the frozen graphs the README's predictor may pick between the two calls round differently: near 0.5 only
    assert (liver == file_liver).mean() > 0.999
    assert set(np.unique(labels)) <= {0, 1, 2} and labels.shape == liver.shape
