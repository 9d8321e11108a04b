"""Data set manifests: which files make up each case, and what their values mean.

A manifest is a JSON file::

    {"name": "brats2013",
     "channels": ["FLAIR", "T1c"],            # one name per input channel, in order
     "modalities": ["MR", "MR"],              # optional: CT | MR | EM | RGB | other per channel
     "labels": {"0": "background", "1": "necrosis"},   # optional: file value -> name
     "regions": {"whole": [1, 2, 3, 4]},      # optional: named unions of label values
     "data_root": "/data/brats",              # optional, see below
     "description": "free text",              # optional
     "cases": [{"case_id": "pat1", "images": ["pat1/flair.nii.gz", "pat1/t1c.nii.gz"],
                "label": "pat1/seg.nii.gz", "split": "train",
                "extras": {"brainmask": "pat1/mask.nii.gz"},
                "sha256": {"pat1/seg.nii.gz": "9f86d0..."}}]}

**Images and channels.** ``images`` lists files in channel order. Usually each file holds one
channel, but a file may hold several (an RGB TIFF holds R, G, B; a Medical Segmentation
Decathlon 4D NIfTI holds all modalities along its 4th axis, in the order of its ``modality``
keys). The case's channels are the channels of its files concatenated in order, and their total
must equal ``len(channels)``; :meth:`Manifest.validate` checks it.

**Paths** are relative to the data root, chosen in this order: the ``data_root`` argument
(``--data-root`` on the command line); the manifest's own ``"data_root"`` key (absolute, or
relative to the manifest file; the importers write it); the environment variable
``MEDSEG_DATA``; the folder ``../shared/data`` beside the medseg repository, if it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ManifestError, MedsegError
from medseg.io import VOLUME_SUFFIXES, split_suffix
from medseg.volume import GRID_ATOL_MM, describe_nonfinite

if TYPE_CHECKING:
    from medseg.volume import Volume


_TOP_KEYS = {"name", "channels", "modalities", "labels", "regions", "cases", "data_root"}
_TOP_KEYS |= {"description"}
_CASE_KEYS = {"case_id", "images", "label", "split", "extras", "sha256"}


@dataclass(frozen=True)
class Case:
    """One case: absolute paths of its image files (channel order), label and extra files."""

    case_id: str
    images: list[Path]
    label: Path | None = None
    split: str | None = None
    extras: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] | None = None


@dataclass(frozen=True)
class Manifest:
    """A data set: channel names, label meanings and cases, with paths resolved."""

    name: str
    channels: list[str]
    modalities: list[str] | None
    labels: dict[int, str] | None
    regions: dict[str, list[int]] | None
    cases: list[Case]
    path: Path
    data_root: Path

    def case(self, case_id: str) -> Case:
        """The case named ``case_id`` (``ManifestError`` if there is none)."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise ManifestError(f"{self.path}: no case {case_id!r}")

    def split(self, name: str) -> list[Case]:
        """Cases whose split is ``name`` (e.g. ``"train"``, ``"val"``)."""
        return [c for c in self.cases if c.split == name]

    def splits(self) -> list[str]:
        """The split names the cases carry, sorted (cases without one are left out)."""
        return sorted({c.split for c in self.cases if c.split is not None})

    def cases_of_split(self, name: str | None) -> list[Case]:
        """Every case (``name`` None) or those of split ``name``; ``ManifestError`` naming the
        manifest's splits when no case carries ``name`` (a typo must not select nothing)."""
        if name is None:
            return list(self.cases)
        found = self.split(name)
        if not found:
            known = ", ".join(self.splits()) or "none (no case has a split)"
            raise ManifestError(f"{self.path}: no case has split {name!r}; its splits: {known}")
        return found

    def to_json(self) -> dict[str, Any]:
        """The JSON form, with paths relative to ``data_root``."""
        return manifest_json(
            self.name,
            self.channels,
            self.cases,
            self.data_root,
            modalities=self.modalities,
            labels=self.labels,
            regions=self.regions,
        )

    def validate(
        self,
        check_grids: bool = True,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        """Check every case; raise one ``ManifestError`` listing all problems found.

        Checks: unique case ids, every file exists, sha256 digests where given. With
        ``check_grids`` (default) every file is also read in full: unreadable files, the
        channel total against ``channels``, a label with one integer channel, and the image,
        label and extras grids agreeing within ``medseg.volume.GRID_ATOL_MM`` (the message
        gives the difference in mm). ``progress(done, total, case_id)`` is called after each case.
        """
        problems: list[str] = []
        seen: set[str] = set()
        for c in self.cases:
            if c.case_id in seen:
                problems.append(f"{c.case_id}: duplicate case_id")
            seen.add(c.case_id)
        bad_cases: set[str] = set()
        for n, c in enumerate(self.cases, 1):
            found = _check_case(self, c, check_grids)
            if found:
                bad_cases.add(c.case_id)
                problems.extend(f"{c.case_id}: {p}" for p in found)
            if progress is not None:
                progress(n, len(self.cases), c.case_id)
        if problems:
            n_bad = len(bad_cases) or 1
            head = (
                f"{self.path}: {len(problems)} problem(s) in {n_bad} of {len(self.cases)} "
                f"case(s); fix the manifest or the files (data root {self.data_root})"
            )
            raise ManifestError("\n".join([head, *(f"  {p}" for p in problems)]))


def read_case(case: Case) -> tuple[list[Volume], Volume | None]:
    """Read a case: its image volumes (file order; a file may hold several channels) and its
    label map (``is_label=True``), or ``None`` when the case has no label."""
    from medseg.io import read_volume

    images = [read_volume(f) for f in case.images]
    label = None
    if case.label is not None:  # a DICOM-SEG or RTSTRUCT label lands on the first image's grid
        label = read_volume(case.label, label=True, reference=case.images[0])
    return images, label


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_case(m: Manifest, c: Case, check_grids: bool) -> list[str]:
    from medseg.io import read_volume

    problems: list[str] = []
    files = [*c.images, *([c.label] if c.label else []), *c.extras.values()]
    missing = [f for f in files if not f.exists()]
    problems.extend(f"missing file {f}" for f in missing)
    for rel, digest in (c.sha256 or {}).items():
        f = m.data_root / rel
        if not f.is_file():
            if f not in missing:
                problems.append(f"sha256 entry names a missing file {f}")
        elif sha256_file(f) != digest.lower():
            problems.append(f"sha256 mismatch for {f}: the file changed or is corrupt")
    if not check_grids:
        if not missing and len(c.images) > len(m.channels):
            problems.append(f"{len(c.images)} image files but {len(m.channels)} channels")
        return problems
    if missing:
        return problems
    grids = []
    n_channels = 0
    for f in c.images:
        try:
            v = read_volume(f)
        except MedsegError as exc:
            problems.append(f"unreadable: {exc}")
            continue
        n_channels += v.channels
        grids.append((f, v.grid))
        bad = describe_nonfinite(v.array)
        if bad:
            problems.append(f"{f}: {bad}; fix or mask the scan (preprocess refuses it)")
    if len(grids) == len(c.images) and n_channels != len(m.channels):
        problems.append(
            f"images hold {n_channels} channel(s), manifest names {len(m.channels)} "
            f"({', '.join(m.channels)})"
        )
    others: list[tuple[str, Path]] = [("label", c.label)] if c.label else []
    others += [(f"extra {k!r}", p) for k, p in c.extras.items()]
    for what, f in others:
        try:
            v = (
                read_volume(f, label=True, reference=c.images[0])
                if what == "label"
                else read_volume(f)
            )
        except MedsegError as exc:
            problems.append(f"unreadable {what}: {exc}")
            continue
        grids.append((f, v.grid))
    if grids:
        ref_path, ref = grids[0]
        for f, g in grids[1:]:
            if g.shape != ref.shape:
                problems.append(
                    f"grid of {f.name} has shape {g.shape}, {ref_path.name} {ref.shape}"
                )
                continue
            d = ref.max_corner_distance(g)
            if d > GRID_ATOL_MM:
                problems.append(
                    f"grid of {f.name} differs from {ref_path.name} by {d:.4g} mm "
                    f"(tolerance {GRID_ATOL_MM:g} mm)"
                )
    return problems


# -- loading -----------------------------------------------------------------------------------


def default_data_root() -> Path | None:
    """``$MEDSEG_DATA``, else ``../shared/data`` beside the repository if it exists."""
    env = os.environ.get("MEDSEG_DATA")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else None


def _resolve_root(raw: dict[str, Any], path: Path, data_root: Path | str | None) -> Path:
    if data_root is not None:
        return Path(data_root).expanduser().resolve()
    if raw.get("data_root"):
        root = Path(str(raw["data_root"])).expanduser()
        return (root if root.is_absolute() else path.parent / root).resolve()
    found = default_data_root()
    if found is None:
        raise ManifestError(
            f'{path}: no data root; pass --data-root, set MEDSEG_DATA, or add "data_root" '
            f"to the manifest"
        )
    return found.resolve()


def _err(path: Path, msg: str) -> ManifestError:
    return ManifestError(f"{path}: {msg}")


def _str_list(path: Path, raw: Any, what: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise _err(path, f"{what} must be a list of non-empty strings")
    return list(raw)


def _parse_labels(path: Path, raw: Any) -> dict[int, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _err(path, 'labels must be an object {"0": "background", ...}')
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = str(v)
        except ValueError:
            raise _err(path, f"label key {k!r} is not an integer file value") from None
    return out


def _parse_regions(path: Path, raw: Any) -> dict[str, list[int]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and v and all(isinstance(x, int) for x in v) for v in raw.values()
    ):
        raise _err(path, 'regions must be an object {"whole": [1, 2, 3], ...} of value lists')
    return {str(k): list(v) for k, v in raw.items()}


def _parse_case(path: Path, root: Path, i: int, raw: Any) -> Case:
    where = f"cases[{i}]"
    if not isinstance(raw, dict):
        raise _err(path, f"{where} must be an object")
    unknown = set(raw) - _CASE_KEYS
    if unknown:
        raise _err(
            path, f"{where} has unknown key(s) {sorted(unknown)}; allowed {sorted(_CASE_KEYS)}"
        )
    cid = raw.get("case_id")
    if not isinstance(cid, str) or not cid:
        raise _err(path, f"{where} needs a non-empty string case_id")
    images = _str_list(path, raw.get("images"), f"{where} ({cid}) images")
    if not images:
        raise _err(path, f"{where} ({cid}) has no images")
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        raise _err(path, f"{where} ({cid}) label must be a path string or absent")
    split = raw.get("split")
    if split is not None and not isinstance(split, str):
        raise _err(path, f"{where} ({cid}) split must be a string")
    extras = raw.get("extras") or {}
    if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
        raise _err(path, f"{where} ({cid}) extras must map names to path strings")
    sha = raw.get("sha256")
    if sha is not None and (
        not isinstance(sha, dict)
        or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) for v in sha.values())
    ):
        raise _err(path, f"{where} ({cid}) sha256 must map paths to 64-digit hex digests")
    return Case(
        case_id=cid,
        images=[root / p for p in images],
        label=root / label if label else None,
        split=split,
        extras={str(k): root / v for k, v in extras.items()},
        sha256=dict(sha) if sha else None,
    )


def load_manifest(path: str | os.PathLike[str], data_root: Path | str | None = None) -> Manifest:
    """Read and structurally check a manifest JSON; paths become absolute under the data root.

    Files are not touched here; :meth:`Manifest.validate` checks them.
    """
    p = Path(path)
    if p.is_dir():
        raise _err(p, "is a folder; give a manifest JSON file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _err(p, "no such manifest file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _err(p, f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise _err(
            p, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    return parse_manifest(raw, p, data_root)


def parse_manifest(raw: Any, path: Path, data_root: Path | str | None = None) -> Manifest:
    """Structurally check a manifest JSON object read from ``path`` (used in messages)."""
    p = Path(path)
    if not isinstance(raw, dict):
        raise _err(p, "must be a JSON object with name, channels and cases")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _err(p, f"unknown key(s) {sorted(unknown)}; allowed {sorted(_TOP_KEYS)}")
    for key in ("name", "channels", "cases"):
        if key not in raw:
            raise _err(p, f"missing required key {key!r}")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise _err(p, "name must be a non-empty string")
    channels = _str_list(p, raw["channels"], "channels")
    if not channels:
        raise _err(p, "channels must name at least one channel")
    modalities = raw.get("modalities")
    if modalities is not None:
        modalities = _str_list(p, modalities, "modalities")
        if len(modalities) != len(channels):
            raise _err(p, f"{len(modalities)} modalities for {len(channels)} channels")
    if not isinstance(raw["cases"], list):
        raise _err(p, "cases must be a list")
    root = _resolve_root(raw, p.resolve(), data_root)
    cases = [_parse_case(p, root, i, c) for i, c in enumerate(raw["cases"])]
    return Manifest(
        name=raw["name"],
        channels=channels,
        modalities=modalities,
        labels=_parse_labels(p, raw.get("labels")),
        regions=_parse_regions(p, raw.get("regions")),
        cases=cases,
        path=p.resolve(),
        data_root=root,
    )


# -- writing and importing ---------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # different drive on Windows
        return path.as_posix()


def manifest_json(
    name: str,
    channels: Sequence[str],
    cases: Sequence[Case],
    data_root: Path,
    *,
    modalities: Sequence[str] | None = None,
    labels: dict[int, str] | None = None,
    regions: dict[str, list[int]] | None = None,
    write_data_root: bool = False,
) -> dict[str, Any]:
    """Manifest JSON object; case paths are written relative to ``data_root``.

    With ``write_data_root`` the absolute data root is stored in the file too, so the manifest
    works without ``--data-root`` (the importers do this).
    """
    out: dict[str, Any] = {"name": name, "channels": list(channels)}
    if write_data_root:
        out["data_root"] = str(Path(data_root).resolve())
    if modalities is not None:
        out["modalities"] = list(modalities)
    if labels is not None:
        out["labels"] = {str(k): v for k, v in sorted(labels.items())}
    if regions is not None:
        out["regions"] = {k: list(v) for k, v in regions.items()}
    rows = []
    for c in cases:
        row: dict[str, Any] = {
            "case_id": c.case_id,
            "images": [_rel(f, data_root) for f in c.images],
        }
        if c.label is not None:
            row["label"] = _rel(c.label, data_root)
        if c.split is not None:
            row["split"] = c.split
        if c.extras:
            row["extras"] = {k: _rel(v, data_root) for k, v in c.extras.items()}
        if c.sha256:
            row["sha256"] = dict(c.sha256)
        rows.append(row)
    out["cases"] = rows
    return out


def assign_splits(case_ids: Sequence[str], val_fraction: float) -> dict[str, str]:
    """Fixed split: the last ``round(n * val_fraction)`` ids in sorted order are ``"val"``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ManifestError(f"validation fraction {val_fraction} must be in [0, 1)")
    ids = sorted(case_ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1
    return {cid: ("val" if i >= len(ids) - n_val else "train") for i, cid in enumerate(ids)}


def strip_suffix(name: str) -> str:
    """File name without its volume suffix (``case_1.nii.gz`` -> ``case_1``)."""
    return split_suffix(name)[0]


def modality_category(name: str) -> str:
    """``CT`` / ``MR`` / ``EM`` / ``RGB`` / ``other`` for a channel or MSD modality name."""
    n = name.strip().upper()
    if n == "CT" or n.startswith("CT"):
        return "CT"
    mr = ("MR", "MRI", "FLAIR", "T1", "T2", "T1W", "T2W", "T1GD", "T1C", "T1CE", "ADC", "DWI")
    if n in mr or n.startswith(("T1", "T2", "MR", "FLAIR", "DWI", "ADC", "PD")):
        return "MR"
    if n in ("EM", "TEM", "SEM"):
        return "EM"
    if n in ("R", "G", "B", "RGB"):
        return "RGB"
    return "other"


def _load_json(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the JSON file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return obj


def _ordered_names(raw: Any, path: Path, what: str) -> list[str]:
    """Values of ``{"0": "CT", "1": ...}`` in numeric key order."""
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f'{path}: {what} must be a non-empty object {{"0": name, ...}}')
    try:
        return [str(raw[k]) for k in sorted(raw, key=lambda k: int(k))]
    except ValueError:
        raise ManifestError(f"{path}: {what} keys must be channel numbers 0, 1, ...") from None


def import_msd(
    dataset_json: str | os.PathLike[str], *, val_fraction: float = 0.2, name: str | None = None
) -> dict[str, Any]:
    """Manifest JSON from a Medical Segmentation Decathlon ``dataset.json``.

    Each ``training`` entry becomes a case with ONE image path (the MSD 4D NIfTI holding all
    modalities along its 4th axis); channel ``c`` is ``modality[str(c)]``, in key order.
    ``labels`` keep their value -> name map. The data root is the folder of ``dataset.json``.
    """
    p = Path(dataset_json).resolve()
    raw = _load_json(p)
    channels = _ordered_names(raw.get("modality"), p, "modality")
    labels = _parse_labels(p, raw.get("labels"))
    training = raw.get("training")
    if not isinstance(training, list) or not training:
        raise ManifestError(f"{p}: no 'training' list of {{image, label}} entries")
    root = p.parent
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ManifestError(f"{p}: training[{i}] needs an 'image' path")
        image = (root / entry["image"]).resolve()
        label = entry.get("label")
        cases.append(
            Case(strip_suffix(image.name), [image], (root / label).resolve() if label else None)
        )
    splits = assign_splits([c.case_id for c in cases], val_fraction)
    cases = [_with_split(c, splits[c.case_id]) for c in cases]
    return manifest_json(
        name or str(raw.get("name") or p.parent.name),
        channels,
        cases,
        root,
        modalities=[modality_category(c) for c in channels],
        labels=labels,
        write_data_root=True,
    )


def _with_split(c: Case, split: str) -> Case:
    return Case(c.case_id, c.images, c.label, split, c.extras, c.sha256)


def _nnunet_labels(
    raw: Any, path: Path
) -> tuple[dict[int, str] | None, dict[str, list[int]] | None]:
    """nnU-Net v2 ``{"name": value or [values]}`` or v1/MSD ``{"value": "name"}``."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: labels must be an object")
    if all(isinstance(v, str) for v in raw.values()):
        return _parse_labels(path, raw), None
    labels: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    for k, v in raw.items():
        if isinstance(v, int):
            labels[v] = str(k)
        elif isinstance(v, list) and all(isinstance(x, int) for x in v):
            regions[str(k)] = list(v)
        else:
            raise ManifestError(f"{path}: label {k!r} must be an integer value or a list of them")
    return labels, regions or None


def import_nnunet(
    raw_dir: str | os.PathLike[str], *, val_fraction: float = 0.2, name: str | None = None
) -> dict[str, Any]:
    """Manifest JSON from an nnU-Net raw folder (``imagesTr/CASE_0000.ext``, ``labelsTr/CASE.ext``).

    Channel names come from ``dataset.json`` (``channel_names``, or ``modality`` for nnU-Net
    v1) when present, else ``ch0``, ``ch1``, ...; labels from its ``labels`` (v2 name -> value;
    list values become regions). Every case must have the same channels and a label file.
    """
    root = Path(raw_dir).resolve()
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise ManifestError(f"{root}: no imagesTr folder; is this an nnU-Net raw data set folder?")
    info: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        info = _load_json(root / "dataset.json")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
    by_case: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        m = pattern.match(strip_suffix(f.name))
        if m is None:
            raise ManifestError(
                f"{f}: image name must end in _XXXX (channel number), e.g. case_0000.nii.gz"
            )
        by_case.setdefault(m["case"], {})[int(m["ch"])] = f
    if not by_case:
        raise ManifestError(f"{images_dir}: no image files")
    n_ch = max(len(v) for v in by_case.values())
    problems = []
    for cid, chans in by_case.items():
        if sorted(chans) != list(range(n_ch)):
            problems.append(f"{cid}: channels {sorted(chans)}, expected 0..{n_ch - 1}")
    names_raw = info.get("channel_names") or info.get("modality")
    channels = (
        _ordered_names(names_raw, root / "dataset.json", "channel_names")
        if names_raw
        else [f"ch{i}" for i in range(n_ch)]
    )
    if len(channels) != n_ch:
        problems.append(f"dataset.json names {len(channels)} channels, files have {n_ch}")
    labels_by_case = {}
    if labels_dir.is_dir():
        for f in labels_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                labels_by_case[strip_suffix(f.name)] = f
    for cid in by_case:
        if cid not in labels_by_case:
            problems.append(f"{cid}: no label in {labels_dir}")
    if problems:
        raise ManifestError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems))
    labels, regions = _nnunet_labels(info.get("labels"), root / "dataset.json")
    splits = assign_splits(list(by_case), val_fraction)
    cases = [
        Case(cid, [chans[i] for i in range(n_ch)], labels_by_case[cid], splits[cid])
        for cid, chans in sorted(by_case.items())
    ]
    return manifest_json(
        name or str(info.get("name") or root.name),
        channels,
        cases,
        root,
        modalities=[modality_category(c) for c in channels],
        labels=labels,
        regions=regions,
        write_data_root=True,
    )


def import_folders(
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    name: str | None = None,
    channels: Sequence[str] | None = None,
    val_fraction: float = 0.2,
) -> dict[str, Any]:
    """Manifest JSON pairing files of two folders by name without suffix.

    ``images/case1.png`` pairs with ``labels/case1.png`` (suffixes may differ). Each image file
    is one case; unmatched files on either side are an error listing them. Channel names default
    to ``ch0``, ``ch1``, ... for the channel count of the first image (read from the file). The
    data root is the common parent of both folders.
    """
    img_dir, lab_dir = Path(images).resolve(), Path(labels).resolve()
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise ManifestError(f"{d}: not a folder")

    def listing(d: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in sorted(d.iterdir()):
            if (
                f.is_file()
                and not f.name.startswith(".")
                and f.name.lower().endswith(VOLUME_SUFFIXES)
            ):
                stem = strip_suffix(f.name)
                if stem in out:
                    raise ManifestError(
                        f"{d}: two files named {stem!r} ({out[stem].name}, {f.name})"
                    )
                out[stem] = f
        return out

    imgs, labs = listing(img_dir), listing(lab_dir)
    if not imgs:
        raise ManifestError(f"{img_dir}: no image files")
    unmatched = sorted(set(imgs) ^ set(labs))
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        raise ManifestError(
            f"{len(unmatched)} file(s) without a partner in {img_dir} / {lab_dir}: {shown}"
        )
    if channels is None:
        from medseg.io import read_volume

        n = read_volume(next(iter(imgs.values()))).channels
        channels = ["R", "G", "B"] if n == 3 else [f"ch{i}" for i in range(n)]
    root = Path(os.path.commonpath([img_dir, lab_dir]))
    splits = assign_splits(list(imgs), val_fraction)
    cases = [Case(cid, [imgs[cid]], labs[cid], splits[cid]) for cid in sorted(imgs)]
    return manifest_json(
        name or img_dir.parent.name,
        list(channels),
        cases,
        root,
        modalities=[modality_category(c) for c in channels],
        write_data_root=True,
    )
