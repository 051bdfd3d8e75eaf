"""ssmtrim's checkpoint folder: ``config.json`` + ``model.safetensors`` (+ ``README.md``), reloadable on its own.

The architecture, eval preprocessing and provenance travel in ``config.json`` and, as a copy, in the safetensors
metadata (``ssmtrim_config``), in the manner of timm's ``save_for_hf``. Folders are written atomically: everything goes
to a temporary sibling folder that is renamed into place, so a crash never leaves a half-written checkpoint, and an
existing folder is replaced only with ``force=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.loading import CONFIG_NAME, WEIGHTS_NAME, ModelSource, build_with_weights, read_checkpoint
from ssmtrim.models.registry import DataConfig, get_family

FORMAT = "ssmtrim"


def _version() -> str:
    from ssmtrim import __version__

    return __version__


def model_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content for a loaded or created model."""
    source: ModelSource | None = getattr(model, "source", None)
    data: DataConfig = getattr(model, "data_config", None) or DataConfig(
        input_size=(model.config.in_chans, model.config.img_size, model.config.img_size)
    )
    config: dict[str, Any] = {
        "format": FORMAT,
        "ssmtrim_version": _version(),
        "family": model.config.family,
        "arch": model.config.to_dict(),
        "data": data.to_dict(),
    }
    if source is not None:
        config["source"] = {"source": source.source, "kind": source.kind, "hub_id": source.hub_id,
                            "filename": source.filename, "revision": source.revision, "spec": source.spec}
    config.update(extra or {})
    return config


def write_folder_atomic(out_dir: str | os.PathLike, force: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move the result to ``out_dir`` in one rename; refuse to replace without force."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise ConfigError(f"output folder {str(out)!r} already exists; pass --force to replace it or choose another -o.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file, not a folder; choose another -o.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    force: bool = False,
    extra_config: dict[str, Any] | None = None,
    readme: str | None = None,
) -> Path:
    """Write ``model`` as an ssmtrim folder that :func:`ssmtrim.load_model` reloads without anything else."""
    from safetensors.torch import save_file

    config = model_config(model, extra_config)
    text = json.dumps(config, indent=2, sort_keys=False)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "ssmtrim_config": text})
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")

    return write_folder_atomic(out_dir, force, write)


def load_folder(resolved: ModelSource, arch: Any = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from an ssmtrim folder (called by :func:`ssmtrim.load_model`)."""
    config = resolved.folder_config
    folder = Path(resolved.path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not an ssmtrim config (no \"format\": \"{FORMAT}\").")
    family = get_family(config.get("family") or config["arch"].get("family", ""))
    arch_config = family.config_cls.from_dict(config["arch"])
    if arch is not None:
        raise ConfigError("an ssmtrim folder carries its own architecture; drop --arch.")
    state_dict, _ = read_checkpoint(folder / WEIGHTS_NAME)
    model = build_with_weights(arch_config, state_dict, str(folder))
    src = config.get("source") or {}
    model.source = ModelSource(resolved.source, "folder", str(folder), resolved.hub_id, None, resolved.revision,
                               src.get("spec"), folder_config=config)
    model.data_config = DataConfig.from_dict(config["data"]) if "data" in config else DataConfig(
        input_size=(arch_config.in_chans, arch_config.img_size, arch_config.img_size))
    return model.to(device)
