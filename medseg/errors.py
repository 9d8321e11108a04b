"""Errors a user can cause. The CLI prints ``str(error)`` on one line and exits 2.

Every message names the file (or setting) at fault, what is wrong, and what to do.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every failure caused by input, configuration or environment."""


class ReadError(MedsegError):
    """A file cannot be read as a volume (missing, truncated, unknown format)."""


class WriteError(MedsegError):
    """A file cannot be written (missing folder, unsupported suffix, disk full)."""


class DicomError(ReadError):
    """A DICOM file or series cannot be turned into a volume."""


class GeometryError(MedsegError):
    """Two grids that must agree do not, or a geometry is degenerate."""


class ManifestError(MedsegError):
    """A manifest is malformed or names cases that do not validate."""


class PlanError(MedsegError):
    """A plan or pipeline file is missing, malformed or inconsistent."""


class ModelError(MedsegError):
    """A model folder or checkpoint is missing, unsafe or does not fit the data."""


class CohortError(MedsegError):
    """Some cases of a cohort command failed; the others finished."""

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


class LockError(MedsegError):
    """A run or cache folder is being written by another medseg process."""


class DicomSegError(MedsegError):
    """A DICOM Segmentation object cannot be written or read (not a SEG, off-grid label, ...)."""


class RTStructError(MedsegError):
    """An RT Structure Set cannot be written or read (multi-frame source, no reference, ...)."""
