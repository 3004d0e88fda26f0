"""Open a collection: its config, every dataset's manifest and the global vocabulary, in one call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mosaicseg.config import CollectionConfig, load_collection
from mosaicseg.data.manifest import DatasetManifest, scan_dataset
from mosaicseg.data.vocabulary import Vocabulary, build_vocabulary
from mosaicseg.errors import MosaicSegError, Problem, raise_if_errors


@dataclass(frozen=True)
class OpenCollection:
    config: CollectionConfig
    manifests: tuple[DatasetManifest, ...]
    vocabulary: Vocabulary
    problems: tuple[Problem, ...]

    def manifest(self, name: str) -> DatasetManifest:
        return next(m for m in self.manifests if m.name == name)


def ensure_synthetic(config: CollectionConfig) -> None:
    """Generate the synthetic collection into ``config.root`` if it declares ``synthetic`` and is absent."""
    if config.synthetic is None or config.root is None:
        return
    if all((d.path / "dataset.json").is_file() for d in config.datasets):
        return
    from mosaicseg.data.synthetic import generate_collection

    generate_collection(config.root, dim=config.synthetic.dim, seed=config.synthetic.seed, write_collection=False)


def open_collection(path: str | Path | CollectionConfig, strict: bool = True) -> OpenCollection:
    """Load ``collection.yaml`` (or a dataset folder) and scan every dataset.

    With ``strict`` any error raises one :class:`~mosaicseg.errors.MosaicSegError` listing them all;
    otherwise problems are returned (``mosaicseg check`` uses this) and unreadable datasets are skipped.
    """
    config = path if isinstance(path, CollectionConfig) else load_collection(path)
    ensure_synthetic(config)
    manifests: list[DatasetManifest] = []
    problems: list[Problem] = []
    for entry in config.datasets:
        manifest, found = scan_dataset(entry.path)
        problems.extend(found)
        if manifest is not None:
            manifests.append(manifest)
    if strict:
        raise_if_errors(problems, f"collection {config.source or config.name}")
    readable = {m.name for m in manifests}
    usable = config if readable == {d.name for d in config.datasets} else _restrict(config, readable)
    try:
        vocabulary = build_vocabulary(usable, manifests)
    except MosaicSegError as exc:
        if strict:
            raise
        # Report the broken shared_labels declaration and go on without it, so every other check still runs.
        problems.extend(
            exc.problems
            or [
                Problem(
                    "error",
                    "shared-labels",
                    config.source or config.name,
                    str(exc),
                    "fix the shared_labels entry of the collection file",
                )
            ]
        )
        usable = replace(usable, shared_labels=())
        vocabulary = build_vocabulary(usable, manifests)
    return OpenCollection(usable, tuple(manifests), vocabulary, tuple(problems))


def _restrict(config: CollectionConfig, names: set[str]) -> CollectionConfig:
    keep = tuple(d for d in config.datasets if d.name in names)
    shared = tuple(g for g in config.shared_labels if all(m.split("/")[0] in names for m in g))
    return replace(config, datasets=keep, shared_labels=shared)
