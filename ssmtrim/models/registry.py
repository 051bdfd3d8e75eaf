"""ssmtrim's own model registry: short names, typed architecture configs, and Hub metadata kept apart.

Modelled on timm's ``_registry.py`` / ``_pretrained.py`` split (architecture arguments vs. where the weights live and
how to preprocess for them), but private: nothing is registered into another library.

A *family* (``vim``, ``plainmamba``) knows how to build a model from its config, convert an official state dict into
ours, recognise its own tensors and infer a config from them. A *spec* is one named architecture of a family with the
Hub files that hold its official weights.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from ssmtrim.errors import ConfigError, UnknownModelError
from ssmtrim.models.sizes import size_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Eval preprocessing: resize the short side to size / crop_pct, center-crop ``size``, normalise."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class PretrainedCfg:
    """One official weight file on the Hugging Face Hub."""

    hub_id: str
    filename: str
    top1: float | None = None
    note: str = ""


class ArchConfig:
    """Mixin for the architecture dataclasses: dict round trip with validation."""

    family: ClassVar[str]

    def width_text(self) -> str:
        """The model's width as a table shows it (a flat model's embedding dim; a hierarchical one's first and last
        stage's, ``96-768``)."""
        return str(getattr(self, "embed_dim", "?"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = {k: v for k, v in d.items() if k != "family"}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.family} architecture field(s) {unknown}; the config.json is from a newer "
                              "ssmtrim or was edited by hand.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class Family(Protocol):
    """The family adapter: everything family-specific, asked by shared code, which never names a family.

    A family module (``vim.py``, ``plainmamba.py``) defines one and registers it with :func:`register_family`.
    Shapes: B batch, L current tokens, E d_inner.
    """

    name: str
    config_cls: type

    # building and checkpoints
    def build(self, config: Any) -> nn.Module: ...

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def detect(self, state_dict: dict[str, Tensor]) -> bool: ...

    def infer_config(self, state_dict: dict[str, Tensor]) -> Any:
        """The architecture of a (converted) state dict. A family may accept ``img_size=`` (N or (H, W)), the size
        the weights were trained at, for what the tensors cannot tell (a non-square position embedding); the loader
        passes it only when the user gave a size."""
        ...

    # token layout
    def depth(self, config: Any) -> int:
        """Number of blocks (reduction can follow blocks 1 .. depth - 1)."""
        ...

    def num_tokens(self, config: Any) -> int:
        """Tokens entering the first block (patches plus any class token)."""
        ...

    def has_class_token(self, config: Any) -> bool:
        """A protected token that is never reduced (counts are then made even to centre it)."""
        ...

    def block_name(self, config: Any, index: int) -> str:
        """Qualified module name of block ``index`` (0-based), as FLOP counters see it (``layers.3``; in a
        hierarchical model ``layers.1.blocks.0``)."""
        ...

    # running with a token state (see ssmtrim.pruning.engine)
    def embed(self, model: nn.Module, x: Tensor, keeps_positions: bool) -> tuple[tuple, Any]:
        """Images -> (streams, TokenState) before the first block."""
        ...

    def run_block(self, model: nn.Module, index: int, streams: tuple, state: Any, geometry: Any,
                  needs: frozenset[str] = frozenset()) -> Any:
        """One block on the current tokens -> BlockOutput (streams, y (B L E) for the scores, and what ``needs``
        asks for: "delta" softplus(Δ) (B L E), "mixer_input" the normed mixer input (B L D), "bc" the SSM's B and C
        of every scan direction (B L F); a family that gives none may omit the argument, and scores or strategies
        that need them then say so)."""
        ...

    def geometry(self, model: nn.Module, state: Any, plan: Any) -> Any:
        """Where a reduced token set sits, for the blocks (computed once per token state); None: a full sequence."""
        ...

    def features(self, model: nn.Module, streams: tuple, state: Any) -> Tensor:
        """Streams after the last block -> the feature the classifier reads (B D): the normed class token, or the
        pooled tokens (a pooling head weights tokens by ``state.sizes`` when merging set them)."""
        ...

    def classifier(self, model: nn.Module) -> nn.Module:
        """The final linear layer, features -> logits (compensation folds its corrections into it)."""
        ...

    # optional (each with a default in its *_of helper below):
    # recommended_plan(config) -> PruneConfig fields used where the user names no strategy option (chosen by
    #   measurement, see the README's method table) and ``layers``, the hand-set schedule a FLOPs-target search always
    #   considers; default: the plan's defaults, and where no layers are named after 1/4, 1/2, 3/4 of the blocks
    #   (recommended_plan_of). Its optional
    #   key "dense" holds the fields that change when the reduced model serves dense outputs (feature maps for a
    #   detection or segmentation head; PruneConfig.recommended(model, task="dense"), prune --task dense)
    # provides(config) -> what run_block hands over when ``needs`` asks: "delta", "mixer_input", "bc"; default: nothing
    #   beyond y (provides_of); a plan whose score or strategy needs more is refused when applied
    # num_protected(config) -> tokens never reduced (registers); default: one if has_class_token (num_protected_of)
    # data_config(config) -> the release's eval preprocessing for an unregistered size; default ImageNet's
    #   (default_data_of)
    # resize_state_dict(config, state_dict, img_size) -> (config, state_dict), to load at another input size
    # optional: after_block(model, index, streams, state) -> (streams, state), what follows block ``index`` outside
    #   the blocks: a hierarchical family's downsample at a stage change puts the tokens on the next stage's grid
    #   (a new TokenState); default: nothing (see after_block_of)

    def check_plan(self, plan: Any) -> None:
        """Raise ConfigError naming an option this family cannot honour."""
        ...

    # FLOPs, the paper convention
    def mixer_dims(self, module: nn.Module) -> Any:
        """The paper convention's mixer terms (``ssmtrim.flops.MixerDims``) when ``module`` is this family's mixer,
        else None."""
        ...


def _no_stage_change(model: nn.Module, index: int, streams: tuple, state: Any) -> tuple[tuple, Any]:
    return streams, state


def num_protected_of(family: Family, config: Any) -> int:
    """Tokens never reduced: the family's optional ``num_protected(config)`` (e.g. Mamba®'s registers), else one
    for a class token (``has_class_token``), else none."""
    count = getattr(family, "num_protected", None)
    if count is not None:
        return int(count(config))
    return 1 if family.has_class_token(config) else 0


def default_data_of(family: Family, config: Any) -> DataConfig:
    """Eval preprocessing of an architecture no registered model has: the family's optional
    ``data_config(config)`` (its release's own, e.g. no centre crop), else ImageNet's (crop 0.875, bicubic), at the
    config's input size."""
    own = getattr(family, "data_config", None)
    if own is not None:
        return own(config)
    return DataConfig(input_size=(config.in_chans, *size_hw(config.img_size)))


def provides_of(family: Family, config: Any) -> frozenset[str]:
    """What the family gives a plan besides y: its optional ``provides(config)`` ("delta" softplus(Δ),
    "mixer_input" the normed mixer input and "bc" the SSM's B and C, handed over by ``run_block`` when asked;
    "condensed": its blocks run kept tokens as a new sequence without their positions), else "condensed" alone; a plan
    whose score or strategy needs more is refused when it is applied."""
    provides = getattr(family, "provides", None)
    return frozenset(provides(config)) if provides is not None else frozenset({"condensed"})


TASKS = ("classify", "dense")


def check_task(task: str) -> None:
    """``task`` is one of :data:`TASKS`; one sentence if not."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not one of {', '.join(TASKS)}; use classify (the default) or dense "
                          "(feature maps for a detection or segmentation head).")


def recommended_plan_of(family: Family, config: Any, task: str = "classify") -> dict[str, Any]:
    """The family's optional ``recommended_plan(config)``, else the plan's defaults; reducing after a quarter, half
    and three quarters of the blocks where it names no layers; for ``task`` "dense" (the reduced model's feature maps
    feed a dense head) with the plan's "dense" fields on top."""
    check_task(task)
    own = getattr(family, "recommended_plan", None)
    plan = dict(own(config)) if own is not None else {}
    dense = plan.pop("dense", {})
    plan = {**plan, **dense} if task == "dense" else plan
    if "layers" not in plan:
        depth = family.depth(config)
        plan["layers"] = tuple(sorted({max(1, min(depth - 1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))
    return plan


def stages_of(family: Family, config: Any) -> list[tuple[int, int]]:
    """(first block, tokens entering it) of each stage: the family's optional ``stages(config)`` (a hierarchical
    family's token grid changes between stages, and reduced tokens start afresh on each new grid), else one stage of
    ``num_tokens`` from block 0."""
    own = getattr(family, "stages", None)
    return list(own(config)) if own is not None else [(0, family.num_tokens(config))]


def reducible_blocks_of(family: Family, config: Any) -> frozenset[int] | None:
    """The blocks (0-based) after which tokens may be reduced: the family's optional ``reducible_blocks(config)``
    (MambaVision: its Mamba-mixer blocks), else every block (None)."""
    own = getattr(family, "reducible_blocks", None)
    return frozenset(own(config)) if own is not None else None


# what every family defines (see Family); the optional ones have defaults in the *_of helpers above
REQUIRED_FAMILY_ATTRIBUTES = (
    "name", "config_cls", "build", "convert_state_dict", "detect", "infer_config", "depth", "num_tokens",
    "has_class_token", "block_name", "embed", "run_block", "geometry", "features", "classifier", "check_plan",
    "mixer_dims",
)  # fmt: skip


def after_block_of(family: Family):
    """The family's ``after_block`` (a stage change after a block), or the default of a flat family: nothing."""
    return getattr(family, "after_block", _no_stage_change)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: Any  # an ArchConfig dataclass
    data: DataConfig = field(default_factory=DataConfig)
    pretrained: tuple[PretrainedCfg, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    test_only: bool = False

    @property
    def family(self) -> str:
        return self.arch.family


_FAMILIES: dict[str, Family] = {}
_SPECS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_family(family: Family) -> Family:
    """Register a family; one that lacks a required method is refused here, naming what it lacks."""
    missing = [a for a in REQUIRED_FAMILY_ATTRIBUTES if not hasattr(family, a)]
    if missing:
        raise TypeError(f"family {getattr(family, 'name', type(family).__name__)!r} lacks {', '.join(missing)}; "
                        "see ssmtrim.models.registry.Family for what each does.")
    _FAMILIES[family.name] = family
    return family


def register_model(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        if key in _ALIASES and _ALIASES[key] != spec.name:
            raise ValueError(f"model name {key!r} registered twice")
        _ALIASES[key] = spec.name
    _SPECS[spec.name] = spec
    return spec


# the built-in family modules, imported by name on first use (the way entry points are): the registry needs no
# import of them, they import the registry
BUILTIN_FAMILY_MODULES = ("ssmtrim.models.vim", "ssmtrim.models.plainmamba", "ssmtrim.models.vmamba",
                          "ssmtrim.models.mambavision", "ssmtrim.models.mambar")


_LOADED: list[bool] = []  # set once every built-in family module was imported


def _ensure_loaded() -> None:
    # every family module, not "any": importing one family directly must not hide the others
    if _LOADED:
        return  # (and nothing for a tracer to follow: torch.compile does not trace imports)
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
    _LOADED.append(True)


def families() -> dict[str, Family]:
    _ensure_loaded()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        raise UnknownModelError(f"unknown model family {name!r}; known families: {', '.join(sorted(_FAMILIES))}.")
    return _FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    """The adapter of a model built by a registered family."""
    config = getattr(model, "config", None)
    name = getattr(config, "family", None)
    _ensure_loaded()
    if name not in _FAMILIES:
        raise ConfigError(f"cannot reduce tokens of a {type(model).__name__}; load a model of a registered family "
                          f"({', '.join(sorted(_FAMILIES))}) with ssmtrim.load_model.")
    return _FAMILIES[name]


def unregister_family(name: str) -> None:
    """Remove a family and its models (tests register toy families)."""
    _FAMILIES.pop(name, None)
    for spec_name in [n for n, s in _SPECS.items() if s.arch.family == name]:
        spec = _SPECS.pop(spec_name)
        for key in (spec.name, *spec.aliases):
            _ALIASES.pop(key, None)


def list_models(include_test: bool = False) -> list[ModelSpec]:
    _ensure_loaded()
    return [s for s in _SPECS.values() if include_test or not s.test_only]


def find_spec(name: str) -> ModelSpec | None:
    _ensure_loaded()
    key = _ALIASES.get(name) or _ALIASES.get(name.lower())
    return _SPECS[key] if key else None


def get_spec(name: str) -> ModelSpec:
    spec = find_spec(name)
    if spec is None:
        known = ", ".join(s.name for s in list_models())
        raise UnknownModelError(f"unknown model {name!r}; run `ssmtrim models` to list them (known: {known}).")
    return spec


def spec_for_hub_file(hub_id: str, filename: str | None) -> tuple[ModelSpec, PretrainedCfg] | None:
    """The registered spec that owns an official Hub file (``filename=None``: the repo's first listed file)."""
    _ensure_loaded()
    for spec in _SPECS.values():
        for cfg in spec.pretrained:
            if cfg.hub_id.lower() == hub_id.lower() and (filename is None or cfg.filename == filename):
                return spec, cfg
    return None


def registered_img_size(config: Any, default: Any = 224) -> Any:
    """The input size of the registered model whose architecture is ``config`` but for its size, else ``default``: what
    a family without a position embedding (nothing in its tensors tells the size) loads a checkpoint at."""
    _ensure_loaded()
    for spec in _SPECS.values():
        if spec.family == config.family and dataclasses.replace(spec.arch, img_size=config.img_size) == config:
            return spec.arch.img_size
    return default


def create_model(name_or_config: str | Any, **overrides: Any) -> nn.Module:
    """A randomly initialised model from a registered name or an architecture config; ``overrides`` replace
    config fields (e.g. ``num_classes=10``)."""
    if isinstance(name_or_config, str):
        arch = get_spec(name_or_config).arch
    else:
        arch = name_or_config
    if overrides:
        fields = {f.name for f in dataclasses.fields(arch)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"{type(arch).__name__} has no field {unknown[0]!r}; the fields are "
                              f"{', '.join(sorted(fields))}.")
        arch = dataclasses.replace(arch, **overrides)
    return get_family(arch.family).build(arch)
