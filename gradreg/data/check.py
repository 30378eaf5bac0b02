"""Up-front data check: is every dataset a config reads where it should be?

``python -m gradreg.data check CONFIG`` prints one line per dataset (ID, outliers, OOD test and OOD validation
sets) saying where it was found or exactly where to put it, and exits with 1 if anything is missing. Training
and evaluation call :func:`require_datasets` first, so a missing set stops a run before any work starts. A mistake
in the config's dataset specs themselves (:func:`check_specs`) is no such listing but one error line, raised
before any file is looked at.

The check reads the same splits the datamodule will: the ID set's ``train`` / ``val`` / ``test`` (a ``val`` that
the set lacks is fine: the datamodule holds out part of ``train``), the outliers' ``train``, the OOD sets'
``test``, and the OOD validation sets' ``val`` (``ood_val_sets`` unset = the OOD sets with ``split="val"``). A
spec's own ``split`` key wins. Sets with a ``locate`` function (every benchmark reader) are checked without
reading their images (torchvision's files against their MD5 sums, idx files against their headers); the others are
built. ``--read-images`` (:func:`unreadable_images`) then reads every image the way the datamodule will, to find
the empty, truncated or foreign files that would stop a run when its loader reaches them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from torch.utils.data import DataLoader, Dataset

from gradreg.data import benchmarks  # noqa: F401  (registers the benchmark readers)
from gradreg.data.datasets import (
    DATASETS,
    DEFAULT_OOD_SETS,
    ID_SPECS,
    SPEC_KEYS,
    DatasetNotFoundError,
    DatasetSpecError,
    UnreadableImageError,
    build_dataset,
    check_spec,
    dataset_name,
)

DatasetSpec = str | Mapping[str, Any]
Stage = Literal["fit", "test"]

ROLE_SPLITS: dict[str, tuple[str, ...]] = {
    "id": ("train", "val", "test"),
    "outliers": ("train",),
    "ood": ("test",),
    "ood_val": ("val",),
}
CONFIG_KEYS = {"id": "id_dataset", "outliers": "outliers", "ood": "ood_sets", "ood_val": "ood_val_sets"}  # by role


class DatasetCheck(NamedTuple):
    """The outcome for one dataset of a config."""

    role: str
    """``id``, ``outliers``, ``ood`` or ``ood_val``."""
    name: str
    """Display name (the spec's ``alias`` or its registry name)."""
    found: bool
    """True if the data is there (or will be downloaded because the spec says ``download: true``)."""
    message: str
    """Where it was found, or what is missing, where to put it and how to get it."""


class MissingDatasetsError(DatasetNotFoundError):
    """Raised by :func:`require_datasets`; the message is the whole report of :func:`format_checks`."""

    def __init__(self, checks: Sequence[DatasetCheck], data_root: Path | str) -> None:
        FileNotFoundError.__init__(self, format_checks(checks, data_root, only_missing=True))
        self.checks = list(checks)
        self.name = ", ".join(c.name for c in checks if not c.found)
        self.expected = str(data_root)


def data_section(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The ``data`` arguments of a config (a mapping, a jsonargparse ``Namespace`` or the data section itself)."""
    if hasattr(config, "as_dict"):  # jsonargparse Namespace
        config = config.as_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a config mapping, got {type(config).__name__}")
    data = config.get("data", config)
    if data is None:
        data = {}
    if hasattr(data, "as_dict"):
        data = data.as_dict()
    if isinstance(data, Mapping) and "init_args" in data:
        data = data["init_args"] or {}
    return dict(data)


def planned_reads(data: Mapping[str, Any], stage: Stage = "fit") -> list[tuple[str, DatasetSpec, tuple[str, ...]]]:
    """``(role, spec, splits)`` for every dataset the datamodule of this data section reads in ``stage``.

    ``fit`` (training) reads everything; ``test`` (evaluating a checkpoint) only the ID and OOD test sets.
    """
    ood_sets = _ood_sets(data)
    id_spec = data.get("id_dataset", "digits")
    if stage == "test":
        return [("id", id_spec, ("test",)), *(("ood", s, ROLE_SPLITS["ood"]) for s in ood_sets)]
    reads: list[tuple[str, DatasetSpec, tuple[str, ...]]] = [("id", id_spec, ROLE_SPLITS["id"])]
    outliers = data.get("outliers", "digits_outliers")
    if outliers is not None:
        reads.append(("outliers", outliers, ROLE_SPLITS["outliers"]))
    reads += [("ood", s, ROLE_SPLITS["ood"]) for s in ood_sets]
    val_sets = data.get("ood_val_sets")
    reads += [("ood_val", s, ROLE_SPLITS["ood_val"]) for s in (ood_sets if val_sets is None else val_sets)]
    return reads


def _ood_sets(data: Mapping[str, Any]) -> list[DatasetSpec]:
    """The OOD test sets of a data section (the datamodule's default when ``ood_sets`` is unset)."""
    ood_sets = data.get("ood_sets")
    return list(ood_sets if ood_sets is not None else DEFAULT_OOD_SETS)


def _as_dict(spec: DatasetSpec) -> dict[str, Any]:
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def check_dataset(
    spec: DatasetSpec, data_root: Path | str, splits: Sequence[str], role: str = "ood", **extra: Any
) -> tuple[bool, str]:
    """Check one dataset spec for the given splits.

    Args:
        spec: a registry name or ``{"name": ..., "alias"?, "split"?, **settings}``.
        data_root: the folder holding one sub-folder per dataset.
        splits: the splits to check (a ``split`` key in the spec replaces them).
        role: ``id`` tolerates a missing ``val`` split (the datamodule holds out part of ``train``).
        extra: settings passed to factories without ``locate`` if they accept them (e.g. ``size``).

    Returns:
        ``(found, message)``.

    Raises:
        DatasetSpecError: the spec itself is wrong (:func:`~gradreg.data.datasets.check_spec`).
    """
    check_spec(spec, role)
    spec = _as_dict(spec)
    name = spec["name"]
    if "split" in spec:
        splits = (spec["split"],)
    settings = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    locate = getattr(DATASETS.get(name), "locate", None)
    places: list[str] = []
    sizes: list[str] = []
    for split in splits:
        try:
            if locate is not None:
                loc = locate(root=Path(data_root), split=split, **settings)
                place = f"{loc.path}" + (f" ({loc.note})" if loc.note else "")
                if place not in places:
                    places.append(place)
            else:
                dataset = build_dataset({"name": name, **settings}, data_root, split, **extra)
                sizes.append(f"{split} {len(dataset)}")  # type: ignore[arg-type]
        except DatasetNotFoundError as err:
            return False, str(err).replace(f"dataset '{err.name}' ", "", 1)
        except ValueError as err:
            if role == "id" and split == "val":
                continue  # no val split: the datamodule holds out val_fraction of train
            return False, str(err)
        except (KeyError, TypeError, OSError) as err:
            return False, f"cannot read it: {err}"
    if sizes:
        places.append(f"built in ({', '.join(sizes)} images)")
    return True, "; ".join(places)


def load_config(config: Mapping[str, Any] | str | Path | Any) -> Any:
    """A config mapping from a YAML path, or ``config`` itself."""
    if isinstance(config, str | Path):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        return yaml.safe_load(path.read_text()) or {}
    return config


def check_datasets(
    config: Mapping[str, Any] | str | Path | Any, data_root: str | Path | None = None, stage: Stage = "fit"
) -> list[DatasetCheck]:
    """Check every dataset of a config: ID, outliers, OOD test sets, OOD validation sets (see the module docs).

    Args:
        config: a YAML path, a config mapping / jsonargparse ``Namespace``, or its ``data`` section.
        data_root: overrides ``data.data_root`` (default ``data``, relative to the working directory).
        stage: ``fit`` checks everything training reads; ``test`` only the ID and OOD test sets (evaluation).

    Returns:
        One :class:`DatasetCheck` per dataset and role, in config order.

    Raises:
        DatasetSpecError: a dataset spec of the config is wrong (:func:`check_specs`).
    """
    data = data_section(load_config(config))
    check_specs(data)
    root = Path(data_root if data_root is not None else data.get("data_root", "data"))
    image_spec = ID_SPECS[_as_dict(data.get("id_dataset", "digits"))["name"]]
    extra = {"size": image_spec.size, "channels": image_spec.channels}
    checks: list[DatasetCheck] = []
    for role, spec, splits in planned_reads(data, stage):
        found, message = check_dataset(spec, root, splits, role, **extra)
        checks.append(DatasetCheck(role, dataset_name(spec), found, message))
    return checks


class _ReadEach(Dataset):
    """Item ``i``: ``""`` if item ``i`` of ``dataset`` can be read, else why not (so the loader goes on)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> str:
        try:
            self.dataset[i]
        except UnreadableImageError as err:
            return str(err).removesuffix(UnreadableImageError.FIX)
        return ""


def unreadable_images(
    config: Mapping[str, Any] | str | Path | Any,
    data_root: str | Path | None = None,
    stage: Stage = "fit",
    num_workers: int = 0,
) -> list[tuple[str, int, list[str]]]:
    """Read every item of every dataset a config reads (as the datamodule does, before its transforms).

    Meant to run after :func:`check_datasets` found every set. Returns ``(name and split, number of items, why each
    unreadable one cannot be read)`` per dataset split, each split once (``ood`` and ``ood_val`` may share one).
    """
    data = data_section(load_config(config))
    root = Path(data_root if data_root is not None else data.get("data_root", "data"))
    image_spec = ID_SPECS[_as_dict(data.get("id_dataset", "digits"))["name"]]
    extra = {"size": image_spec.size, "channels": image_spec.channels}
    results: list[tuple[str, int, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for role, spec, splits in planned_reads(data, stage):
        spec = _as_dict(spec)
        for split in (spec["split"],) if "split" in spec else splits:
            key = (yaml.safe_dump(spec, sort_keys=True), split)
            if key in seen:
                continue
            seen.add(key)
            try:
                dataset = build_dataset(spec, root, split, **extra)
            except ValueError:
                if role == "id" and split == "val":
                    continue  # no val split: the datamodule holds out part of train (as check_dataset)
                raise
            loader = DataLoader(_ReadEach(dataset), batch_size=64, num_workers=num_workers, collate_fn=list)
            failed = [reason for batch in loader for reason in batch if reason]
            results.append((f"{dataset_name(spec)} {split}", len(dataset), failed))  # type: ignore[arg-type]
    return results


def check_specs(data: Mapping[str, Any]) -> None:
    """Raise :class:`DatasetSpecError` at the first mistake in the dataset specs of a ``data`` section.

    A mistake of the config itself (an unknown dataset or setting, two sets of one name, a ``near_ood`` name that no
    OOD set has) is one line naming the value and the valid choices; every spec is checked, whatever the stage.
    What is missing on disk is :func:`check_datasets`' report instead.
    """
    for key in ("ood_sets", "ood_val_sets", "near_ood"):  # a bare name would be read letter by letter
        value = data.get(key)
        if value is not None and not isinstance(value, list | tuple):
            item = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
            raise DatasetSpecError(f"data.{key}={value!r} is not a list; write it as one: [{item}]")
    reads = planned_reads(data)
    for role, spec, _ in reads:
        try:
            check_spec(spec, role)
        except DatasetSpecError as err:
            raise DatasetSpecError(f"data.{CONFIG_KEYS[role]}: {err}") from None
    names = {role: [dataset_name(s) for r, s, _ in reads if r == role] for role in ("ood", "ood_val")}
    for role, listed in names.items():
        twice = [name for name in dict.fromkeys(listed) if listed.count(name) > 1]
        if twice:  # sets are keyed by their display name: one would hide the other
            raise DatasetSpecError(
                f"data.{CONFIG_KEYS[role]}: two sets are named '{twice[0]}'; give one of them an alias "
                f"(alias: {twice[0]}_2)"
            )
    for name in data.get("near_ood") or []:
        if name not in names["ood"]:
            known = ", ".join(names["ood"]) or "(none)"
            raise DatasetSpecError(
                f"data.near_ood: '{name}' is not the name of an OOD set; choose from {known}, or leave it out of "
                "data.near_ood (evaluate.py: --data near_ood=[...])"
            )


def format_checks(checks: Sequence[DatasetCheck], data_root: Path | str, only_missing: bool = False) -> str:
    """A readable report: a header, one line per dataset (``ok`` / ``MISSING``), and a summary line.

    A set read in two roles with the same result (``ood`` and ``ood_val`` when ``ood_val_sets`` is unset) is one
    line naming both roles.
    """
    merged: dict[tuple[str, bool, str], list[str]] = {}
    for c in checks:
        merged.setdefault((c.name, c.found, c.message), []).append(c.role)
    checks = [DatasetCheck(",".join(roles), *key) for key, roles in merged.items()]
    missing = [c for c in checks if not c.found]
    shown = missing if only_missing else list(checks)
    width_role = max((len(c.role) for c in shown), default=0)
    width_name = max((len(c.name) for c in shown), default=0)
    root = Path(data_root).absolute()
    if missing:
        head = f"{len(missing)} of {len(checks)} datasets are missing or invalid (data_root: {root}):"
        tail = "put each set where its line says (docs/data.md shows every layout), or set 'path:' in its spec"
    else:
        head = f"all {len(checks)} datasets found (data_root: {root}):"
        tail = ""
    lines = [head]
    for c in shown:
        status = "ok     " if c.found else "MISSING"
        lines.append(f"  {status}  {c.role:<{width_role}}  {c.name:<{width_name}}  {c.message}")
    return "\n".join([*lines, tail] if tail else lines)


def require_datasets(
    config: Mapping[str, Any] | str | Path | Any, data_root: str | Path | None = None, stage: Stage = "fit"
) -> list[DatasetCheck]:
    """Run :func:`check_datasets` and raise :class:`MissingDatasetsError` (the report) if anything is missing."""
    checks = check_datasets(config, data_root, stage)
    if any(not c.found for c in checks):
        if data_root is None:
            data_root = data_section(load_config(config)).get("data_root", "data")
        raise MissingDatasetsError(checks, data_root)
    return checks
