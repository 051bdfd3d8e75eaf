"""ssmtrim's checkpoint folder: ``config.json`` + ``model.safetensors`` (+ ``README.md``), reloadable on its own.

The architecture, eval preprocessing and provenance travel in ``config.json`` and, as a copy, in the safetensors
metadata (``ssmtrim_config``), in the manner of timm's ``save_for_hf``. Folders are written atomically: everything goes
to a temporary sibling folder that is renamed into place, so a crash never leaves a half-written checkpoint, and an
existing folder is replaced only with ``force=True`` and only when ssmtrim wrote it (:mod:`ssmtrim.outputs`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssmtrim.errors import CheckpointError, ConfigError, SsmtrimError
from ssmtrim.models.loading import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelSource,
    build_with_weights,
    check_classes,
    check_data_config,
    check_fields,
    class_names_of,
    data_config_of,
    load_resolved,
    read_checkpoint,
    recorded_classes,
    resolve_source,
)
from ssmtrim.models.registry import DataConfig, get_family
from ssmtrim.models.resize import resize_model
from ssmtrim.models.sizes import ImgSize, size_hw
from ssmtrim.outputs import FORMAT, Inputs, check_output, embedded_os_error, output_error, write_folder_atomic
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.engine import changed_weights

__all__ = ["DENSE_PREFIX", "FORMAT", "check_output", "load_folder", "load_model", "model_card", "model_config",
           "save_model", "save_model_into", "save_pruned", "source_inputs", "write_folder_atomic"]
DENSE_PREFIX = "dense_original."  # tensors of the dense model that a recovery step changed


def _version() -> str:
    from ssmtrim import __version__

    return __version__


def model_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content for a loaded or created model."""
    source: ModelSource | None = getattr(model, "source", None)
    data = data_config_of(model)
    config: dict[str, Any] = {
        "format": FORMAT,
        "ssmtrim_version": _version(),
        "family": model.config.family,
        "arch": model.config.to_dict(),
        "data": data.to_dict(),
    }
    classes = class_names_of(model)
    if classes:  # the class names travel with the weights, so every folder maps image folders by name
        config["classes"] = classes
    plan = getattr(model, "prune_config", None)
    if plan is not None:
        config["pruning"] = plan.to_dict()
        changed = changed_weights(model)
        if changed:  # a recovery step changed these; their dense values are stored beside the weights
            config["dense_weights"] = {"tensors": sorted(changed), "prefix": DENSE_PREFIX,
                                       "note": "model.safetensors holds the reduced model's weights; the dense "
                                               "model's values of the changed tensors are stored under the prefix"}
    if source is not None:
        config["source"] = {"source": recorded_source(source), "kind": source.kind, "hub_id": source.hub_id,
                            "filename": source.filename, "revision": source.revision, "spec": source.spec}
    config.update(extra or {})
    return config


def recorded_source(source) -> str:
    """The source as a later run can find it from any folder: a local file or folder by its absolute path (a
    relative path as typed would name another file, or none, elsewhere); a Hub id or a registered name as given."""
    typed = Path(source.source).expanduser()
    if source.kind in ("file", "folder") and source.hub_id is None and typed.exists():  # a path, not a name
        return str(typed.resolve())
    return source.source


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    force: bool = False,
    extra_config: dict[str, Any] | None = None,
    readme: str | None = None,
    inputs: Inputs | None = None,
) -> Path:
    """Write ``model`` as an ssmtrim folder that :func:`ssmtrim.load_model` reloads without anything else.

    An existing ``out_dir`` is replaced only with ``force`` and only when ssmtrim wrote it (see
    :mod:`ssmtrim.outputs`); never when it is, contains or lies inside the model's own source or ``inputs``
    (label -> path)."""
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_dict"):
        raise ConfigError(f"save_model takes a model made by ssmtrim (create_model, load_model), got "
                          f"{type(model).__name__}.")
    return write_folder_atomic(out_dir, force, lambda tmp: _write_model_files(model, tmp, extra_config, readme),
                               inputs={**source_inputs(model), **(inputs or {})})


def source_inputs(model: nn.Module) -> dict[str, str]:
    """The model's local source (file or folder) as an input that an output must stay clear of."""
    source: ModelSource | None = getattr(model, "source", None)
    return {"the source model": source.path} if source is not None and source.path else {}


def _write_model_files(model: nn.Module, folder: Path, extra_config: dict[str, Any] | None, readme: str | None) -> None:
    from safetensors.torch import save_file

    text = json.dumps(model_config(model, extra_config), indent=2, sort_keys=False)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "prune_config", None) is not None:
        tensors.update({DENSE_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in changed_weights(model).items()})
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "ssmtrim_config": text})
    (folder / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    if readme is not None:
        (folder / "README.md").write_text(readme, encoding="utf-8")


def save_model_into(model: nn.Module, folder: str | os.PathLike, extra_config: dict[str, Any] | None = None,
                    readme: str | None = None) -> Path:
    """Write the model files into an existing run folder (training keeps its state and log beside them); each file
    is written to a temporary name and renamed, so a crash leaves the previous files or the new ones, never half."""
    folder = Path(folder)
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=folder))
        _write_model_files(model, tmp, extra_config, readme)
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmp.iterdir()):
            f.chmod(0o666 & ~umask)  # the permissions of any file made with open(), not the writer's 0600
            os.replace(f, folder / f.name)
    except Exception as exc:
        inner = None if isinstance(exc, SsmtrimError) else embedded_os_error(exc)
        if inner is None:
            raise
        raise output_error(os.fspath(folder), inner, "the model files into") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(
    source: str | os.PathLike,
    arch: str | Any | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    img_size: ImgSize | None = None,
    features_only: bool = False,
) -> nn.Module:
    """Load a model in eval mode from any supported source: a registered name, a Hub id[:file], an official checkpoint
    file, or an ssmtrim folder (which rebuilds its reduction plan too); see :mod:`ssmtrim.models.loading`.

    ``arch`` (a registered name or an architecture config) forces the architecture; by default it is read from the
    folder's config or inferred from the tensors. The model carries ``model.source`` (:class:`ModelSource`) and
    ``model.data_config`` (its eval preprocessing).

    ``img_size`` (``N`` or ``(H, W)``) loads the model for another input size: the position embedding is interpolated
    to the new token grid (:mod:`ssmtrim.models.resize`) and the data config's input size follows (crop fraction
    kept); at the model's own size it changes nothing. A checkpoint file whose position embedding is not a square
    grid does not say its size: ``img_size`` must then be the size it was trained at (an ssmtrim folder records it).

    ``features_only`` returns the model as a :class:`~ssmtrim.pruning.backbone.Backbone`: its forward gives each
    stage's feature map on its full grid (a reduced folder's tokens restored), with ``feature_info``.
    """
    if not isinstance(source, (str, os.PathLike)):
        what = "a model object" if isinstance(source, nn.Module) else f"a {type(source).__name__}"
        raise ConfigError(f"load_model takes a registered name, a Hub id, a checkpoint file or a folder, not {what}; "
                          "use a model you already have as it is (ssmtrim.save_model writes it to a folder).")
    resolved = resolve_source(source, revision)
    if resolved.kind == "folder":
        model = load_folder(resolved, arch=arch, device="cpu" if img_size is not None else device)
    else:
        model = load_resolved(resolved, arch=arch, device="cpu" if img_size is not None else device, img_size=img_size)
    model = model if img_size is None else resize_model(model, img_size).to(device)
    if features_only:
        from ssmtrim.pruning.backbone import Backbone

        return Backbone(model).eval()
    return model


def load_folder(resolved: ModelSource, arch: Any = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from an ssmtrim folder (called by :func:`ssmtrim.load_model`)."""
    config = resolved.folder_config
    folder = Path(resolved.path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not an ssmtrim config (no \"format\": \"{FORMAT}\").")
    arch_config, data_config, plan = _checked_folder_config(config, str(folder / CONFIG_NAME))
    if arch is not None:
        raise ConfigError("an ssmtrim folder carries its own architecture; drop --arch.")
    state_dict, _ = read_checkpoint(folder / WEIGHTS_NAME)
    dense_weights = {k[len(DENSE_PREFIX):]: state_dict.pop(k) for k in [k for k in state_dict
                                                                           if k.startswith(DENSE_PREFIX)]}
    if dense_weights and config.get("pruning") is None:
        raise CheckpointError(f"{folder} stores dense weights for a reduction plan but has no plan; the folder is "
                              "inconsistent, write it again.")
    model = build_with_weights(arch_config, state_dict, str(folder))
    src = config.get("source") or {}
    model.source = ModelSource(resolved.source, "folder", str(folder), resolved.hub_id, None, resolved.revision,
                               src.get("spec"), folder_config=config)
    model.data_config = data_config
    if config.get("pruning") is not None:
        try:
            apply_pruning(model, plan)
        except ConfigError as exc:  # a plan that fits another model (a hand-edited file): name the file, not a flag
            message = re.sub(r"--layers (\S+) out of range", r"layers \1 are out of range", str(exc))
            raise ConfigError(f"{folder / CONFIG_NAME}: the \"pruning\" entry does not fit this model: {message} "
                              "Write the folder again with ssmtrim prune.") from None
        if dense_weights:
            params = dict(model.named_parameters())
            unknown = sorted(set(dense_weights) - set(params))
            if unknown:
                raise CheckpointError(f"{folder} stores dense values for {unknown}, which this model does not have; "
                                      "the folder is inconsistent, write it again.")
            model.dense_tensors = {k: v.to(params[k].dtype) for k, v in dense_weights.items()}
    return model.to(device)


def _checked_folder_config(config: dict[str, Any], where: str) -> tuple[Any, DataConfig, PruneConfig | None]:
    """The architecture and data config of a folder's config.json, every field typed and in range (a wrong type,
    null or an impossible value is one sentence naming the field and the file)."""
    arch = config["arch"]
    family_name = config.get("family") or (arch.get("family", "") if isinstance(arch, dict) else "")
    if not isinstance(family_name, str):
        raise CheckpointError(f"{where}: field family is {json.dumps(family_name)}, not a family name; fix it or "
                              "re-export the model.")
    family = get_family(family_name)
    check_fields(arch, family.config_cls, where, "arch")
    try:
        arch_config = family.config_cls.from_dict(arch)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{where}: {exc}") from None
        raise CheckpointError(f"{where}: the \"arch\" entry cannot build a {family_name} model ({exc}); fix it or "
                              "re-export the model.") from None
    if "data" in config:
        data_config = check_data_config(config["data"], arch_config.in_chans, where)
    else:
        data_config = DataConfig(input_size=(arch_config.in_chans, *size_hw(arch_config.img_size)))
    classes = recorded_classes(config)
    if classes is not None:
        check_classes(classes, arch_config.num_classes, where)
    for record in ("source", "training", "finetune"):
        if config.get(record) is not None and not isinstance(config[record], dict):
            raise CheckpointError(f"{where}: field {record} is {json.dumps(config[record])[:60]}, not an object; fix "
                                  "it or re-export the model.")
    plan = None
    if config.get("pruning") is not None:
        check_fields(config["pruning"], PruneConfig, where, "pruning")
        try:
            plan = PruneConfig.from_dict(config["pruning"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: the \"pruning\" entry is refused: {exc}") from None
    return arch_config, data_config, plan


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, summary: dict[str, Any], force: bool = False,
                inputs: Inputs | None = None) -> Path:
    """Write a pruned model: weights + plan (``config.json`` and safetensors metadata), the calibration statistics,
    the dense source's id and sha256, and a model card (``README.md``) with the FLOPs / agreement summary."""
    source: ModelSource | None = getattr(model, "source", None)
    extra = {
        "calibration": summary.get("calibration"),
        "summary": {k: summary[k] for k in ("comparison", "flops", "tokens_per_block") if k in summary},
    }
    if source is not None:
        extra["source_sha256"] = source.sha256()
    return save_model(model, out_dir, force=force, extra_config=extra, readme=model_card(model, summary),
                      inputs=inputs)


def model_card(model: nn.Module, summary: dict[str, Any]) -> str:
    """A short Markdown model card for a pruned checkpoint folder."""
    plan = summary["plan"]
    cmp = summary["comparison"]
    lines = [
        f"# {model.config.family} pruned with ssmtrim {_version()}",
        "",
        f"Dense source: `{summary['source']}`. Token pruning after blocks {', '.join(map(str, plan['layers']))} "
        "keeping "
        f"{', '.join(f'{k:g}' for k in plan['keep'])} of the patch tokens; score `{plan['score']}`, arrangement "
        f"`{plan['arrangement']}` (gap estimate `{plan['gap']}`, conv neighbours `{plan.get('conv', 'original')}`), "
        f"`{plan['mode']}` mode.",
        "",
    ]
    comp = summary.get("compensation")
    if comp:
        lines += [f"Compensation `{comp['kind']}` (α {comp['alpha']:g}) fitted on {comp['num_images']} calibration "
                  f"images and folded into {', '.join(f'`{n}`' for n in comp['changed'])}; the dense values of those "
                  "tensors are stored beside them, so the dense model can be rebuilt from this folder.", ""]
    lines += [
        "| | dense | pruned |",
        "|---|---|---|",
    ]
    for convention, f in (summary.get("flops") or {}).items():
        lines.append(f"| GFLOPs ({convention} convention) | {f['dense']:.3f} | {f['pruned']:.3f} "
                     f"({100 * (1 - f['ratio']):.1f}% fewer) |")
    if cmp.get("top1") is not None:
        lines.append(f"| top-1 on the calibration images | {100 * cmp['dense_top1']:.2f}% | {100 * cmp['top1']:.2f}% |")
    lines.append(f"| agreement with dense top-1 (calibration images) | 100% | {100 * cmp['agreement']:.2f}% |")
    lines += [
        "",
        f"Measured on the {cmp['num_images']} calibration images (not a held-out set). Tokens entering each block: "
        f"{' '.join(f'{t:g}' for t in summary.get('tokens_per_block', []))}.",
        "",
        "Load it with `ssmtrim.load_model(\"<this folder>\")`; the plan travels in `config.json`.",
        "",
    ]
    return "\n".join(lines)
