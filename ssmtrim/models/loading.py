"""Loading models from a registered name, a Hugging Face Hub repo, a local checkpoint file or an ssmtrim folder.

Source forms accepted by :func:`load_model`:
- a registered name or official model name (``vim_tiny``, ``vim_small_patch16_224_bimambav2_...``): its official Hub
  file;
- ``owner/repo`` (the official repo's default file, or an ssmtrim folder on the Hub: ``config.json`` +
  ``model.safetensors``) or ``owner/repo:filename``; ``revision`` picks a branch, tag or commit;
- a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file;
- a local folder holding ``config.json`` + ``model.safetensors`` (what ssmtrim writes).

Downloads go through huggingface_hub and its cache, so ``HF_HUB_OFFLINE=1`` with a filled cache needs no network.
Pickled checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only (plus the
``argparse.Namespace`` of training arguments that the official Vim checkpoints carry); anything else is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, SourceNotFoundError, StateDictMismatchError, UnknownModelError
from ssmtrim.models.registry import (
    DataConfig,
    ModelSpec,
    families,
    find_spec,
    get_family,
    get_spec,
    list_models,
    spec_for_hub_file,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights came from (kept on the model as ``model.source``)."""

    source: str
    kind: str  # "hub", "file" or "folder"
    path: str  # local file or folder that was read
    hub_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    spec: str | None = None  # registered model name, when known
    folder_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def sha256(self) -> str:
        target = Path(self.path) / WEIGHTS_NAME if self.kind == "folder" else Path(self.path)
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# resolving a source string to a local path


def _hub_download(repo_id: str, filename: str, revision: str | None) -> Path:
    """One file through the huggingface_hub cache (honours HF_HUB_OFFLINE and HF_HOME)."""
    import huggingface_hub as hf  # imported here: slow to import and only needed for Hub sources
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}:{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision))
    except hf_errors.LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{where} is not in the Hugging Face cache and the Hub cannot be reached (offline or HF_HUB_OFFLINE=1); "
            "download it once with network access, or pass a local checkpoint file."
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"the Hub repository {repo_id!r} does not exist or is private; check the id (or log in with "
            "`hf auth login`)."
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise SourceNotFoundError(f"revision {revision!r} does not exist in {repo_id}; pass an existing branch, tag or "
                                  "commit to --revision.") from None
    except hf_errors.EntryNotFoundError:
        raise SourceNotFoundError(f"{repo_id} has no file {filename!r}; name an existing file as {repo_id}:FILENAME.") \
            from None
    except (OSError, ValueError, hf_errors.HfHubHTTPError) as exc:
        raise SourceNotFoundError(f"could not fetch {where} ({type(exc).__name__}: {exc}); check the network or pass a "
                                  "local file.") from None


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """Turn a source string into a local file or folder (downloading through the Hub cache when needed)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
                raise SourceNotFoundError(
                    f"folder {text!r} does not hold {CONFIG_NAME} and {WEIGHTS_NAME}; point to a checkpoint file or to "
                    "a folder written by ssmtrim."
                )
            return ModelSource(text, "folder", str(path), folder_config=_read_folder_config(path))
        return ModelSource(text, "file", str(path))

    spec = find_spec(text)
    if spec is not None:
        if not spec.pretrained:
            raise UnknownModelError(
                f"model {spec.name!r} has no official weights on the Hub; build it with ssmtrim.create_model or pass a "
                "checkpoint file."
            )
        cfg = spec.pretrained[0]
        local = _hub_download(cfg.hub_id, cfg.filename, revision)
        return ModelSource(text, "hub", str(local), cfg.hub_id, cfg.filename, revision, spec.name)

    repo_id, _, filename = text.partition(":")
    # `owner/repo:file.pth` names a Hub file even though it ends like a checkpoint path; without a ':' part, a
    # missing `dir/model.pth` is a mistyped local path, not a Hub repo
    if _HUB_ID.match(repo_id) and not text.startswith((".", "/", "~")) and (
        filename or not text.endswith((*_PICKLE_SUFFIXES, ".safetensors"))
    ):
        known = spec_for_hub_file(repo_id, filename or None)
        if known is not None:
            spec, cfg = known
            local = _hub_download(cfg.hub_id, cfg.filename, revision)
            return ModelSource(text, "hub", str(local), cfg.hub_id, cfg.filename, revision, spec.name)
        if filename:
            local = _hub_download(repo_id, filename, revision)
            return ModelSource(text, "hub", str(local), repo_id, filename, revision)
        # an ssmtrim folder published on the Hub
        config = _hub_download(repo_id, CONFIG_NAME, revision)
        _hub_download(repo_id, WEIGHTS_NAME, revision)
        folder = config.parent
        return ModelSource(text, "folder", str(folder), repo_id, None, revision,
                           folder_config=_read_folder_config(folder))

    if any(sep in text for sep in ("/", "\\")) or text.endswith((*_PICKLE_SUFFIXES, ".safetensors")):
        raise SourceNotFoundError(f"no such file or folder: {text!r}; check the path.")
    names = ", ".join(s.name for s in list_models())
    raise UnknownModelError(f"unknown model {text!r}; give a registered name ({names}), a Hub id owner/repo[:file], "
                            "or a checkpoint path.")


def _read_folder_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON ({exc}); restore it or re-export the model.") \
            from None
    if not isinstance(config, dict) or "arch" not in config:
        raise CheckpointError(f"{folder / CONFIG_NAME} has no 'arch' entry; it was not written by ssmtrim.")
    return config


# ---------------------------------------------------------------------------------------------------------------
# reading tensors


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated: download or "
                              "write it again.") from None


def _safe_globals() -> list:
    allowed: list = [argparse.Namespace]  # training arguments stored by the official Vim checkpoints
    try:
        import numpy as np

        # numpy scalars pickle as `numpy.core.multiarray.scalar` (numpy 1, e.g. the 2024 official files) or
        # `numpy._core.multiarray.scalar` (numpy 2); name both, and avoid `np.core`, deprecated in numpy 2
        core = getattr(np, "_core", None) or np.core
        scalar = core.multiarray.scalar
        allowed += [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                    (scalar, "numpy._core.multiarray.scalar")]
        allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    except (ImportError, AttributeError):
        pass
    return allowed


def _load_pickle(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        # torch's zip format is what every torch >= 1.6 writes; a non-zip file is truncated, legacy or not a checkpoint
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (or it is truncated); download it again.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors come in many types
        message = str(exc)
        unsafe = re.search(r"(?:Unsupported global|GLOBAL) ?:? ?(?:GLOBAL )?([\w.]+)", message)
        # an opcode the restricted unpickler does not know is what random or cut bytes look like, not an object
        garbage = re.search(r"Unsupported operand \S+", message)
        if unsafe or ("weights_only" in message.lower() and not garbage):
            what = unsafe.group(1) if unsafe else "an arbitrary Python object"
            raise CheckpointError(
                f"{path} contains a pickled Python object ({what}) that ssmtrim refuses to load for safety; re-save "
                "only the weights (torch.save(model.state_dict())) or convert the file to safetensors."
            ) from None
        detail = garbage.group(0) if garbage else type(exc).__name__
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({detail}); it is probably truncated "
                              "or corrupt: download it again.") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the state dict inside a checkpoint container (``model``, ``state_dict``, ``module``...)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
                return _unwrap(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no tensors under 'model', 'state_dict' or at the top level; it is not a model "
                          "checkpoint.")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of a checkpoint file (containers unwrapped) and its safetensors metadata (empty for pickles)."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"no such checkpoint file: {str(path)!r}.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; download or write it again.")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _unwrap(_load_pickle(path), path), {}


# ---------------------------------------------------------------------------------------------------------------
# matching tensors to an architecture


def detect_family(state_dict: dict[str, Tensor], source: str) -> str:
    for name, fam in families().items():
        if fam.detect(state_dict):
            return name
    sample = ", ".join(list(state_dict)[:4])
    raise CheckpointError(f"{source} is neither a Vim nor a PlainMamba checkpoint (keys start {sample}); pass a "
                          "checkpoint of a supported model.")


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Raise one readable error listing missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise StateDictMismatchError(f"{source} does not match the {type(model).__name__} architecture "
                                 f"({'; '.join(parts)}); pass the right --arch or an unmodified checkpoint.")


def _arch_from(
    arch: str | Any | None, family: str, state_dict: dict[str, Tensor], source: str
) -> tuple[Any, str | None]:
    if arch is None:
        config = get_family(family).infer_config(state_dict)
        spec = next((s for s in list_models(include_test=True) if s.arch == config), None)
        return config, spec.name if spec else None
    if isinstance(arch, str):
        spec = get_spec(arch)
        config, name = spec.arch, spec.name
    else:
        config, name = arch, None
    if config.family != family:
        raise CheckpointError(f"{source} is a {family} checkpoint but the architecture asked for is {config.family}; "
                              "drop --arch or pass a matching one.")
    return config, name


def _data_config(spec_name: str | None, arch: Any) -> DataConfig:
    spec: ModelSpec | None = find_spec(spec_name) if spec_name else None
    if spec is not None:
        return spec.data
    size = arch.img_size
    return DataConfig(input_size=(arch.in_chans, size, size))


def data_config_of(model: nn.Module) -> DataConfig:
    """The eval preprocessing of a model: what it was loaded with, else its registered spec's, else its input size."""
    found = getattr(model, "data_config", None)
    if found is not None:
        return found
    return _data_config(getattr(getattr(model, "source", None), "spec", None), model.config)


def _finite_check(state_dict: dict[str, Tensor], source: str) -> None:
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source} has non-finite values in {key}; the checkpoint is corrupt.")


def load_resolved(resolved: ModelSource, arch: str | Any | None = None, device: str | torch.device = "cpu",
                  ) -> nn.Module:
    """Load a dense model from a resolved Hub file or local checkpoint file (not an ssmtrim folder: those carry a
    plan, see :func:`ssmtrim.checkpoint.load_model`), converting the official layout, in eval mode."""
    label = resolved.source
    state_dict, _ = read_checkpoint(resolved.path)
    family = detect_family(state_dict, label)
    if arch is not None and not isinstance(arch, str) and getattr(arch, "family", family) != family:
        raise CheckpointError(f"{label} is a {family} checkpoint but the architecture asked for is {arch.family}; "
                              "drop --arch or pass a matching one.")
    state_dict = get_family(family).convert_state_dict(state_dict)
    if arch is None and resolved.spec is not None:
        # the official file of a registered model must hold that architecture; inferring another one would pair it
        # with the registered model's name and preprocessing
        arch = resolved.spec
    config, spec_name = _arch_from(arch, family, state_dict, label)
    spec_name = resolved.spec or spec_name
    model = build_with_weights(config, state_dict, label)
    model.source = ModelSource(resolved.source, resolved.kind, resolved.path, resolved.hub_id, resolved.filename,
                               resolved.revision, spec_name)
    model.data_config = _data_config(spec_name, config)
    return model.to(device)


def build_with_weights(config: Any, state_dict: dict[str, Tensor], label: str) -> nn.Module:
    """Build the family's model for ``config`` and load ``state_dict`` strictly, in eval mode."""
    model = get_family(config.family).build(config)
    check_state_dict(model, state_dict, label)
    _finite_check(state_dict, label)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_tokens(config: Any) -> int:
    """Tokens the mixers see for a full image: patches (+1 class token for Vim)."""
    return get_family(config.family).num_tokens(config)
