"""nnU-Net v2 raw dataset folders → validated :class:`DatasetManifest`.

Parsing never stops at the first problem: :func:`scan_dataset` returns the manifest it could build plus
every :class:`~mosaicseg.errors.Problem` it found, so ``mosaicseg check`` can list them all at once.
:func:`load_dataset` is the strict form used by planning and training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.data.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image
from mosaicseg.errors import MosaicSegError, Problem, raise_if_errors

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseFiles:
    """One training case: its image files (one per channel, in channel order) and its label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class DatasetManifest:
    """What ``dataset.json`` and the folder say about one dataset.

    ``labels`` maps each foreground label (or nnU-Net region) name to the label-file values it covers;
    ``background`` and ``ignore`` are not in it. ``ignore_value`` is the value of nnU-Net's ``ignore``
    label, if declared. ``regions_class_order`` is set for region datasets.
    """

    name: str
    folder: Path
    channel_names: tuple[str, ...]
    labels: dict[str, tuple[int, ...]]
    file_ending: str
    num_training: int
    cases: tuple[CaseFiles, ...]
    ignore_value: int | None = None
    regions_class_order: tuple[int, ...] | None = None
    raw_json: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def declared_values(self) -> set[int]:
        """Every integer a label file of this dataset may contain."""
        values = {0}
        for v in self.labels.values():
            values.update(v)
        if self.ignore_value is not None:
            values.add(self.ignore_value)
        return values


def _problem(code: str, path: Path | str, message: str, fix: str, severity: str = "error") -> Problem:
    return Problem(severity, code, path, message, fix)  # type: ignore[arg-type]


def inside_folder(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` (links resolved) lies inside ``folder``: dataset files may not escape it."""
    try:
        candidate.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _parse_labels(
    raw: Any, json_path: Path, problems: list[Problem]
) -> tuple[dict[str, tuple[int, ...]], int | None, bool]:
    """Returns (foreground labels → values, ignore value, uses regions)."""
    labels: dict[str, tuple[int, ...]] = {}
    ignore_value: int | None = None
    regions = False
    if not isinstance(raw, dict) or not raw:
        problems.append(
            _problem(
                "json-labels",
                json_path,
                "'labels' must be a non-empty mapping name → value",
                'write e.g. "labels": {"background": 0, "liver": 1}',
            )
        )
        return labels, ignore_value, regions
    seen: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, list)):
            problems.append(
                _problem(
                    "json-label-type",
                    json_path,
                    f"label '{name}' has value {value!r}; expected an integer (or a list of "
                    "integers for an nnU-Net region)",
                    f'write "{name}": <integer>',
                )
            )
            continue
        if isinstance(value, list):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                problems.append(
                    _problem(
                        "json-label-type",
                        json_path,
                        f"region '{name}' must list integers, got {value!r}",
                        f'write "{name}": [1, 2]',
                    )
                )
                continue
            regions = True
            values = tuple(sorted(set(value)))
        else:
            values = (value,)
        if any(v < 0 for v in values):
            problems.append(
                _problem(
                    "json-label-negative",
                    json_path,
                    f"label '{name}' has a negative value",
                    "use non-negative integers",
                )
            )
            continue
        if name == "background":
            if values != (0,):
                problems.append(
                    _problem(
                        "json-background", json_path, f"'background' must be 0, got {value!r}", 'write "background": 0'
                    )
                )
            continue
        if name == "ignore":
            if len(values) != 1:
                problems.append(
                    _problem(
                        "json-ignore",
                        json_path,
                        "'ignore' must be a single integer",
                        'write "ignore": <highest label value>',
                    )
                )
                continue
            ignore_value = values[0]
            continue
        if len(values) == 1 and not isinstance(value, list):
            if values[0] in seen:
                problems.append(
                    _problem(
                        "json-duplicate-label",
                        json_path,
                        f"labels '{seen[values[0]]}' and '{name}' share the value {values[0]}",
                        "give every label its own value (or use a region list)",
                    )
                )
                continue
            seen[values[0]] = name
        labels[name] = values
    if "background" not in raw:
        problems.append(
            _problem("json-background", json_path, "'labels' has no 'background' entry", 'add "background": 0')
        )
    if ignore_value is not None and any(ignore_value <= max(v) for v in labels.values()):
        problems.append(
            _problem(
                "json-ignore",
                json_path,
                f"the ignore label ({ignore_value}) must be the highest label value, as nnU-Net requires",
                "renumber it above every other label",
            )
        )
    if not labels:
        problems.append(
            _problem(
                "json-labels",
                json_path,
                "no foreground label is declared",
                "declare at least one label besides background",
            )
        )
    return labels, ignore_value, regions


def _parse_json(folder: Path, problems: list[Problem]) -> dict[str, Any] | None:
    json_path = folder / "dataset.json"
    if not folder.is_dir():
        problems.append(
            _problem("dataset-missing", folder, "dataset folder not found", "check the path in the collection file")
        )
        return None
    if not json_path.is_file():
        problems.append(
            _problem(
                "json-missing",
                json_path,
                "dataset.json not found",
                "create it as nnU-Net v2 describes (channel_names, labels, numTraining, file_ending)",
            )
        )
        return None
    try:
        text = json_path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except PermissionError:
        problems.append(_problem("unreadable", json_path, "permission denied", "make the file readable"))
        return None
    except UnicodeDecodeError as exc:
        problems.append(_problem("json-invalid", json_path, f"not UTF-8 text ({exc.reason})", "save it as UTF-8"))
        return None
    except json.JSONDecodeError as exc:
        problems.append(
            _problem(
                "json-invalid",
                json_path,
                f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                "fix the JSON syntax",
            )
        )
        return None
    except OSError as exc:
        problems.append(_problem("unreadable", json_path, f"cannot read ({exc.strerror})", "check the file"))
        return None
    if not isinstance(data, dict):
        problems.append(_problem("json-invalid", json_path, "top level must be a JSON object", "wrap it in {...}"))
        return None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        problems.append(
            _problem(
                "json-missing-key",
                json_path,
                f"missing key(s): {', '.join(missing)}",
                "add them (see nnU-Net v2's dataset.json format)",
            )
        )
    return data


def _channel_names(data: dict[str, Any], json_path: Path, problems: list[Problem]) -> tuple[str, ...]:
    raw = data.get("channel_names", data.get("modality"))
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        problems.append(
            _problem(
                "json-channels",
                json_path,
                "'channel_names' must map '0', '1', ... to names",
                'write "channel_names": {"0": "CT"}',
            )
        )
        return ()
    try:
        keys = sorted(int(k) for k in raw)
    except (TypeError, ValueError):
        problems.append(
            _problem(
                "json-channels", json_path, "'channel_names' keys must be '0', '1', ...", "number the channels from 0"
            )
        )
        return ()
    if keys != list(range(len(keys))):
        problems.append(
            _problem(
                "json-channels",
                json_path,
                f"channel numbers {keys} are not 0..{len(keys) - 1}",
                "number the channels consecutively from 0",
            )
        )
        return ()
    names = tuple(str(raw[str(k)] if str(k) in raw else raw[k]) for k in keys)
    for n in names:
        if not n.strip():
            problems.append(_problem("json-channels", json_path, "a channel name is empty", "name every channel"))
    return names


def _explicit_cases(data: dict[str, Any], folder: Path, n_channels: int, problems: list[Problem]) -> list[CaseFiles]:
    json_path = folder / "dataset.json"
    cases = []
    entries = data["dataset"]
    if not isinstance(entries, dict):
        problems.append(
            _problem(
                "json-dataset",
                json_path,
                "'dataset' must map case ids to {images, label}",
                'write "dataset": {"case1": {"images": [...], "label": "..."}}',
            )
        )
        return []
    for case_id, entry in entries.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("images"), list)
            or not isinstance(entry.get("label"), str)
        ):
            problems.append(
                _problem(
                    "json-dataset",
                    json_path,
                    f"case '{case_id}' needs 'images' (list) and 'label'",
                    "give both, paths relative to the dataset folder",
                )
            )
            continue
        paths = [folder / p for p in entry["images"]] + [folder / entry["label"]]
        escaping = [p for p in paths if not inside_folder(folder, p)]
        if escaping:
            problems.append(
                _problem(
                    "path-escape",
                    json_path,
                    f"case '{case_id}' names files outside the dataset folder: {', '.join(str(p) for p in escaping)}",
                    "keep every file inside the dataset folder (no '..' or absolute paths)",
                )
            )
            continue
        png_rgb = len(entry["images"]) == 1 and str(entry["images"][0]).lower().endswith(".png")
        if n_channels and len(entry["images"]) != n_channels and not png_rgb:
            problems.append(
                _problem(
                    "missing-channel",
                    json_path,
                    f"case '{case_id}' lists {len(entry['images'])} image(s) but {n_channels} channel(s) are declared",
                    "list one file per channel",
                )
            )
        cases.append(CaseFiles(str(case_id), tuple(paths[:-1]), paths[-1]))
    return cases


def _unexpected_file(path: Path, ending: str) -> Problem:
    return _problem(
        "unexpected-file",
        path,
        f"does not end with the dataset's file_ending '{ending}'",
        "remove it, or fix file_ending in dataset.json",
        "warning",
    )


def _folder_cases(folder: Path, ending: str, n_channels: int, problems: list[Problem]) -> list[CaseFiles]:
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            problems.append(_problem("folder-missing", d, "folder not found", f"create {d.name}/ with the cases"))
    if not images_dir.is_dir() or not labels_dir.is_dir():
        return []
    channels: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith("."):
            continue
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(_problem("bad-filename", p, "file name is not valid UTF-8", "rename it (ASCII is safest)"))
            continue
        if not p.name.endswith(ending):
            problems.append(_unexpected_file(p, ending))
            continue
        m = _CHANNEL_SUFFIX.match(p.name[: -len(ending)])
        if not m:
            problems.append(
                _problem("bad-filename", p, "image name lacks the _XXXX channel suffix", f"rename to CASE_0000{ending}")
            )
            continue
        channels.setdefault(m["case"], {})[int(m["channel"])] = p
    cases = []
    label_files = {}
    for p in sorted(labels_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if not p.name.endswith(ending):
            problems.append(_unexpected_file(p, ending))
            continue
        label_files[p.name[: -len(ending)]] = p
    for case_id in sorted(set(channels) | set(label_files)):
        if case_id not in label_files:
            problems.append(
                _problem(
                    "missing-label",
                    labels_dir / f"{case_id}{ending}",
                    f"case '{case_id}' has images but no label file",
                    "add the label or remove the case",
                )
            )
            continue
        if case_id not in channels:
            problems.append(
                _problem(
                    "missing-image",
                    label_files[case_id],
                    f"label of case '{case_id}' has no image file",
                    f"add imagesTr/{case_id}_0000{ending} or remove the label",
                )
            )
            continue
        have = channels[case_id]
        expected = range(n_channels) if n_channels else range(max(have) + 1)
        if ending == ".png" and set(have) == {0}:
            expected = range(1)  # one RGB PNG carries all declared channels (nnU-Net's natural-image reader)
        missing = [c for c in expected if c not in have]
        extra = [c for c in have if c not in expected]
        if missing:
            problems.append(
                _problem(
                    "missing-channel",
                    images_dir / f"{case_id}_{missing[0]:04d}{ending}",
                    f"case '{case_id}' lacks channel(s) {missing} of {len(expected)} declared",
                    "add the missing channel file(s) or fix channel_names",
                )
            )
            continue
        if extra:
            problems.append(
                _problem(
                    "extra-channel",
                    have[extra[0]],
                    f"case '{case_id}' has channel file(s) {extra} not declared in channel_names",
                    "declare the channel or remove the file",
                )
            )
        cases.append(CaseFiles(case_id, tuple(have[c] for c in expected), label_files[case_id]))
    return cases


def scan_dataset(folder: str | Path) -> tuple[DatasetManifest | None, list[Problem]]:
    """Parse ``folder/dataset.json`` and list the cases; every problem found is returned, none raised."""
    folder = Path(folder)
    problems: list[Problem] = []
    data = _parse_json(folder, problems)
    if data is None:
        return None, problems
    json_path = folder / "dataset.json"
    channel_names = _channel_names(data, json_path, problems)
    labels, ignore_value, regions = _parse_labels(data.get("labels", {}), json_path, problems)
    ending = data.get("file_ending", "")
    if not isinstance(ending, str) or file_ending("x" + ending) != ending.lower() or not ending:
        problems.append(
            _problem(
                "json-file-ending",
                json_path,
                f"file_ending {ending!r} is not supported",
                f"use one of {', '.join(SUPPORTED_ENDINGS)}",
            )
        )
        ending = ".nii.gz"
    num_training = data.get("numTraining", -1)
    if isinstance(num_training, bool) or not isinstance(num_training, int):
        problems.append(
            _problem(
                "json-num-training",
                json_path,
                f"numTraining must be an integer, got {num_training!r}",
                "write the number of training cases",
            )
        )
        num_training = -1
    regions_order = data.get("regions_class_order")
    if regions and regions_order is None:
        problems.append(
            _problem(
                "json-regions",
                json_path,
                "region labels are used but regions_class_order is missing",
                "add regions_class_order as nnU-Net requires",
            )
        )
    if regions_order is not None and (
        not isinstance(regions_order, list) or not all(isinstance(v, int) for v in regions_order)
    ):
        problems.append(
            _problem(
                "json-regions", json_path, "regions_class_order must be a list of integers", "write e.g. [1, 2, 3]"
            )
        )
        regions_order = None
    if "dataset" in data:
        cases = _explicit_cases(data, folder, len(channel_names), problems)
    else:
        cases = _folder_cases(folder, ending, len(channel_names), problems)
    if num_training >= 0 and len(cases) != num_training:
        problems.append(
            _problem(
                "num-training",
                json_path,
                f"numTraining is {num_training} but {len(cases)} complete case(s) were found",
                f"set numTraining to {len(cases)} or add the missing cases",
            )
        )
    if not cases:
        problems.append(
            _problem(
                "no-cases",
                folder,
                "no complete training case found",
                "put CASE_0000<ending> in imagesTr/ and CASE<ending> in labelsTr/",
            )
        )
    name = folder.name
    manifest = DatasetManifest(
        name=name,
        folder=folder,
        channel_names=channel_names,
        labels=labels,
        file_ending=ending,
        num_training=num_training,
        cases=tuple(cases),
        ignore_value=ignore_value,
        regions_class_order=tuple(regions_order) if regions and regions_order else None,
        raw_json=data,
    )
    return manifest, problems


def load_dataset(folder: str | Path) -> DatasetManifest:
    """Strict :func:`scan_dataset`: raises one error listing every problem."""
    manifest, problems = scan_dataset(folder)
    raise_if_errors(problems, f"dataset {folder}")
    assert manifest is not None  # no errors implies a manifest was built
    return manifest


def read_case(case: CaseFiles) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Read one case: image ``(C, X, Y[, Z])`` float32 (channel files concatenated in order), label map
    ``(X, Y[, Z])`` int16 and the geometry of the first channel file. Raises on unreadable files or on
    channel files whose grids differ (``check`` reports these in detail first)."""
    arrays, geometry = [], None
    for path in case.images:
        arr, geom = read_image(path)
        if geometry is not None and arr.shape[1:] != geometry.shape:
            raise MosaicSegError(
                f"{path}: shape {arr.shape[1:]} differs from the first channel's {geometry.shape}. "
                "Fix: resample all channels of a case onto one grid."
            )
        geometry = geometry or geom
        arrays.append(arr.astype(np.float32, copy=False))
    label, _label_geom = read_image(case.label)
    if label.shape[0] != 1:
        raise MosaicSegError(
            f"{case.label}: a label file must have one channel, found {label.shape[0]}. "
            "Fix: save labels as single-channel integer images."
        )
    assert geometry is not None  # a CaseFiles always has at least one image
    if label.shape[1:] != geometry.shape:
        raise MosaicSegError(
            f"{case.label}: label shape {label.shape[1:]} differs from the image's {geometry.shape}. "
            "Fix: resample the label onto the image grid."
        )
    return np.concatenate(arrays, axis=0), _as_labels(label[0], case.label), geometry


def _as_labels(label: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(label.dtype, np.floating):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise MosaicSegError(f"{path}: label values are not integers. Fix: save labels as integer images.")
        label = rounded
    return label.astype(np.int16, copy=False)
