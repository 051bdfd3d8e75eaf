"""Typed errors. Every message is one sentence that says what is wrong and what to do about it.

The CLI turns these into a single line on stderr and exit code 1 (see ``ssmtrim/cli/_errors.py``); set
``SSMTRIM_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations


class SsmtrimError(Exception):
    """Base class of every error ssmtrim raises on purpose."""


class UnknownModelError(SsmtrimError, KeyError):
    """A model name, Hub id or architecture that ssmtrim does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SourceNotFoundError(SsmtrimError, FileNotFoundError):
    """A local path that does not exist, or a Hub file that cannot be fetched."""


class CheckpointError(SsmtrimError, ValueError):
    """A checkpoint that cannot be read: truncated, corrupt, unsafe or of an unknown layout."""


class StateDictMismatchError(CheckpointError):
    """Missing or unexpected keys, or tensors of the wrong shape, for the chosen architecture."""


class BackendUnavailableError(SsmtrimError, RuntimeError):
    """A compute backend was requested that cannot run here."""


class ConfigError(SsmtrimError, ValueError):
    """A bad option or configuration value."""


class OutputError(SsmtrimError, OSError):
    """An output that cannot be written (no space left, no permission, a read-only file system), named as the user
    gave it."""


class DeviceError(SsmtrimError, RuntimeError):
    """A ``--device`` that is not a device name, or that this machine does not have (e.g. CUDA without a GPU)."""


class MissingDependencyError(SsmtrimError, ImportError):
    """An optional package a feature needs (fvcore for FLOPs counts) that is not installed."""


class HubUnreachableError(SourceNotFoundError):
    """A Hub file that is not in the local cache while the Hub cannot be reached (offline, no network)."""


class LoaderFailed(SsmtrimError, RuntimeError):
    """Reading the images stopped: a DataLoader worker died or no batch came within the loader's timeout."""


class ExportError(SsmtrimError, RuntimeError):
    """A model that could not be exported, or whose exported graph does not match PyTorch."""
