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
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssmtrim.errors import (
    CheckpointError,
    ConfigError,
    HubUnreachableError,
    SourceNotFoundError,
    StateDictMismatchError,
    UnknownModelError,
)
from ssmtrim.models.registry import (
    DataConfig,
    ModelSpec,
    default_data_of,
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


def _check_hub_reachable(repo_id: str, filename: str, revision: str | None, where: str) -> None:
    """Fail at once, in one sentence, when a file that is not in the cache cannot be fetched because the Hub cannot
    be reached (huggingface_hub would retry for about 25 s, logging each retry): one quick request, no retries."""
    import huggingface_hub as hf
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    if constants.HF_HUB_OFFLINE or isinstance(hf.try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return  # offline: huggingface_hub answers at once; cached: it falls back to the cache when unreachable
    try:
        hf.get_hf_file_metadata(hf.hf_hub_url(repo_id, filename, revision=revision), timeout=10)
    except hf_errors.HfHubHTTPError:
        return  # the Hub answered: the download reports what it said (no such repo, file, revision...)
    except Exception as exc:  # noqa: BLE001 - a failed connection, whatever the HTTP library calls it
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubUnreachableError(f"cannot reach the Hugging Face Hub to fetch {where} ({reason}), and it is not in "
                                  "the local cache; connect to the network (or set HF_ENDPOINT to a mirror), or pass "
                                  "a local checkpoint file.") from None


def _hub_download(repo_id: str, filename: str, revision: str | None) -> Path:
    """One file through the huggingface_hub cache (honours HF_HUB_OFFLINE and HF_HOME)."""
    import huggingface_hub as hf  # imported here: slow to import and only needed for Hub sources
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}:{filename}" + (f"@{revision}" if revision else "")
    _check_hub_reachable(repo_id, filename, revision, where)
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
    if not text.strip():
        raise SourceNotFoundError("the model is empty; give a registered name, a Hub id, a checkpoint file or a "
                                  "folder written by ssmtrim.")
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise ConfigError(f"--revision {revision!r} picks a Hub branch, tag or commit, but {text!r} is a local "
                              "path; drop --revision (or name the Hub repository).")
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
            from ssmtrim.bundled import bundled_folder

            bundled = bundled_folder(spec.name)
            if bundled is not None:  # a test bed that ships in the package (vim_cifar, ...)
                return ModelSource(text, "folder", str(bundled), spec=spec.name,
                                   folder_config=_read_folder_config(bundled))
            where = f" ({spec.description.split('weights: ')[1]})" if "weights: " in spec.description else ""
            raise UnknownModelError(
                f"model {spec.name!r} has no weights on the Hub and none ship with ssmtrim{where}; pass a checkpoint "
                "file, or build it with random weights with ssmtrim.create_model."
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
# checking a folder's config.json before anything is built from it


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field's type (int, float, str, bool, None, unions, tuples as lists)."""
    import types
    import typing

    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, h) for v, h in zip(value, args, strict=True))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "null")


def check_fields(values: Any, cls: type, where: str, section: str) -> None:
    """Refuse, in one sentence naming the field and the file, a ``section`` of a config.json whose values do not fit
    the dataclass ``cls`` (wrong type, null where a value is needed); unknown fields are left to ``cls``."""
    import typing

    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: \"{section}\" must be an object of fields, got {json.dumps(values)}; restore "
                              "the file or re-export the model.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and not _matches(values[f.name], hints[f.name]):
            raise CheckpointError(f"{where}: field {section}.{f.name} is {json.dumps(values[f.name])}, not of type "
                                  f"{_type_name(hints[f.name])}; fix it or re-export the model.")


def check_data_config(data: Any, in_chans: int, where: str) -> DataConfig:
    """The ``data`` section of a config.json as a :class:`DataConfig`, or one sentence naming the bad field."""
    check_fields(data, DataConfig, where, "data")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown} in \"data\"; the file is from a newer ssmtrim or "
                              "was edited by hand: remove them.")
    config = DataConfig.from_dict(data)

    def bad(name: str, why: str) -> CheckpointError:
        value = json.dumps(data.get(name, getattr(config, name)))
        return CheckpointError(f"{where}: field data.{name} is {value}, {why}; fix it or re-export the model.")

    if len(config.input_size) != 3 or any(v < 1 for v in config.input_size):
        raise bad("input_size", "but it must be three positive integers (channels, height, width)")
    if config.input_size[0] != in_chans:
        raise bad("input_size", f"but the model takes {in_chans} channels")
    if not 0.0 < config.crop_pct <= 1.0:
        raise bad("crop_pct", "but it must be a fraction in (0, 1] (the center-crop share of the resized image)")
    from ssmtrim.data import resample_filter  # data imports only the registry: no cycle

    try:
        resample_filter(config.interpolation)
    except ConfigError:
        raise bad("interpolation", "which is not one of bicubic, bilinear, nearest, lanczos") from None
    for name in ("mean", "std"):
        if len(getattr(config, name)) != in_chans:
            raise bad(name, f"but it needs one value per input channel ({in_chans})")
    if any(v <= 0 for v in config.std):
        raise bad("std", "but every value must be positive (images are divided by it)")
    return config


def check_classes(classes: Any, num_classes: int, where: str) -> list[str]:
    """The class names a config.json records (index = class index), checked against the model's head."""
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise CheckpointError(f"{where}: field classes must be a list of class names, got {json.dumps(classes)[:80]}; "
                              "fix it or re-export the model.")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{where}: field classes names a class twice; fix it or re-export the model.")
    if num_classes and len(classes) != num_classes:
        raise CheckpointError(f"{where}: field classes lists {len(classes)} names but the model predicts "
                              f"{num_classes} classes; fix it or re-export the model.")
    return list(classes)


def recorded_classes(config: dict[str, Any]) -> Any:
    """The class names a config.json records: ``classes``, else its training record's (None: none)."""
    if config.get("classes") is not None:
        return config["classes"]
    training = config.get("training")
    return training.get("classes") if isinstance(training, dict) else None


def class_names_of(model: nn.Module) -> list[str] | None:
    """The class names of a model (index = class index): set on it (``model.class_names``), or recorded in the
    folder it was loaded from; None when it records none."""
    names = model.__dict__.get("class_names")
    if names is None:
        config = getattr(getattr(model, "source", None), "folder_config", None) or {}
        names = recorded_classes(config)
    return list(names) if names else None


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
    raise CheckpointError(f"{source} is not a checkpoint of a supported family ({', '.join(families())}; keys start "
                          f"{sample}); pass a checkpoint of one of them, or --arch when its keys are renamed.")


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Raise one readable error listing missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        not_float = [k for k, v in expected.items() if v.is_floating_point() and not state_dict[k].is_floating_point()]
        if not_float:
            more = f" and {len(not_float) - 1} more" if len(not_float) > 1 else ""
            raise CheckpointError(f"{source} stores {not_float[0]}{more} as {state_dict[not_float[0]].dtype}, but "
                                  "model weights must be floating point; re-export the checkpoint with float weights.")
        return
    parts = []
    for label, items in (("missing", missing), ("not in the architecture", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise StateDictMismatchError(f"{source} does not match the {type(model).__name__} architecture "
                                 f"({'; '.join(parts)}); pass the right --arch or an unmodified checkpoint.")


def _arch_from(
    arch: str | Any | None, family: str, state_dict: dict[str, Tensor], source: str, size_hint: Any = None
) -> tuple[Any, str | None]:
    if arch is None:
        infer = get_family(family).infer_config
        # the size is only needed where the tensors cannot tell it (a non-square position embedding), and only passed
        # to a family whose infer_config takes it (the argument is optional in the family contract)
        takes_size = size_hint is not None and "img_size" in inspect.signature(infer).parameters
        config = infer(state_dict, img_size=size_hint) if takes_size else infer(state_dict)
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
    return default_data_of(get_family(arch.family), arch)


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


def _arch_in_metadata(metadata: dict[str, str], family: str) -> Any:
    """The architecture recorded in the safetensors metadata ssmtrim writes (a model.safetensors taken out of its
    folder: it knows its input size even where the tensors cannot tell it), else None."""
    try:
        arch = json.loads(metadata["ssmtrim_config"])["arch"]
        return get_family(family).config_cls.from_dict(arch) if arch.get("family") == family else None
    except (KeyError, TypeError, ValueError, AttributeError):  # not ssmtrim's, or unreadable: infer from the tensors
        return None


def load_resolved(resolved: ModelSource, arch: str | Any | None = None, device: str | torch.device = "cpu",
                  img_size: Any = None) -> nn.Module:
    """Load a dense model from a resolved Hub file or local checkpoint file (not an ssmtrim folder: those carry a
    plan, see :func:`ssmtrim.checkpoint.load_model`), converting the official layout, in eval mode. ``img_size``
    (N or (H, W)) is the size the checkpoint was trained at, used only where its tensors cannot tell it (a
    non-square position embedding); the architecture recorded in ssmtrim's safetensors metadata comes first."""
    label = resolved.source
    state_dict, metadata = read_checkpoint(resolved.path)
    family = detect_family(state_dict, label)
    if arch is not None and not isinstance(arch, str) and getattr(arch, "family", family) != family:
        raise CheckpointError(f"{label} is a {family} checkpoint but the architecture asked for is {arch.family}; "
                              "drop --arch or pass a matching one.")
    state_dict = get_family(family).convert_state_dict(state_dict)
    if arch is None and resolved.spec is not None:
        # the official file of a registered model must hold that architecture; inferring another one would pair it
        # with the registered model's name and preprocessing
        arch = resolved.spec
    if arch is None:
        arch = _arch_in_metadata(metadata, family)
    config, spec_name = _arch_from(arch, family, state_dict, label, img_size)
    spec_name = resolved.spec or spec_name
    model = build_with_weights(config, state_dict, label)
    model.source = ModelSource(resolved.source, resolved.kind, resolved.path, resolved.hub_id, resolved.filename,
                               resolved.revision, spec_name)
    model.data_config = _data_config(spec_name, config)
    if spec_name is None:
        from ssmtrim.notices import notice

        data = model.data_config
        notice(f"imagenet-preprocessing:{label}", f"{label} is not a registered architecture, so its images are "
               f"preprocessed as the {family} release's ImageNet models' (mean/std, crop {data.crop_pct:g}, "
               f"{data.interpolation}); if it was trained otherwise, convert it (ssmtrim convert) and edit the "
               "\"data\" entry of its config.json.")
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
