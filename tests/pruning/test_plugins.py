"""A third model family and a new strategy and score, registered from this test file alone (nothing in ``ssmtrim/``
names them): token reduction, calibration, FLOPs and save/reload work through the family adapter and the registries.

The toy family is a one-direction Mamba over a row-major patch grid with mean pooling: the smallest honest SSM
classifier. Its adapter is the whole of what a family must tell the engine (docs/ARCHITECTURE.md, "Add a family").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.registry import (
    ArchConfig,
    DataConfig,
    ModelSpec,
    register_family,
    register_model,
    unregister_family,
)
from ssmtrim.models.tokens import BlockOutput, TokenState, gaps_from_positions, gather_tokens, topk_sorted
from ssmtrim.ops import selective_scan
from ssmtrim.pruning import PruneConfig, apply_pruning, is_pruned, reduced_forward, remove_pruning
from ssmtrim.pruning.calibrate import calibrate
from ssmtrim.pruning.options import Option
from ssmtrim.pruning.scores import Score, register_score, unregister_score
from ssmtrim.pruning.strategies import Strategy, gather_streams, register_strategy, unregister_strategy

# ---------------------------------------------------------------------------------------------------------------
# the toy family


@dataclass(frozen=True)
class ToyConfig(ArchConfig):
    family: ClassVar[str] = "toymamba"

    embed_dim: int = 16
    depth: int = 3
    img_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    num_classes: int = 5
    d_state: int = 4

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ToyGeometry:
    gap_counts: Tensor | None  # B L skipped positions before each token


class ToyMixer(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        d, n = cfg.embed_dim, cfg.d_state
        self.d_inner, self.d_state = 2 * d, n
        self.in_proj = nn.Linear(d, 2 * self.d_inner, bias=False)
        self.x_proj = nn.Linear(self.d_inner, 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.d_inner, self.d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    def ssm_output(self, h: Tensor, geometry: ToyGeometry | None = None) -> Tensor:
        x, z = self.in_proj(h).chunk(2, dim=-1)  # B L E
        b, c = self.x_proj(x).chunk(2, dim=-1)  # B L N
        dt = self.dt_proj(x)
        gap = gap_scale = None
        if geometry is not None and geometry.gap_counts is not None:
            gap, gap_scale = geometry.gap_counts, F.softplus(self.dt_proj.bias.float())[None].expand(h.shape[0], -1)
        y = selective_scan(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), -torch.exp(self.A_log),
                           b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(), self.D,
                           z=z.transpose(1, 2).contiguous(), delta_softplus=True, gap=gap, gap_scale=gap_scale)
        return y.transpose(1, 2)


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.mixer = ToyMixer(cfg)

    def forward(self, x: Tensor, geometry: ToyGeometry | None = None) -> tuple[Tensor, Tensor]:
        y = self.mixer.ssm_output(self.norm(x), geometry)
        return x + self.mixer.out_proj(y), y


class ToyMamba(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, config.embed_dim) * 0.02)
        self.layers = nn.ModuleList(ToyBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.layers:
            h, _ = block(h)
        return self.head(self.norm(h).mean(1))


class ToyFamily:
    name = "toymamba"
    config_cls = ToyConfig

    def build(self, config: ToyConfig) -> ToyMamba:
        return ToyMamba(config)

    def convert_state_dict(self, state_dict):
        return dict(state_dict)

    def detect(self, state_dict) -> bool:
        return "layers.0.mixer.x_proj.weight" in state_dict and "pos_embed" in state_dict and not any(
            k.endswith(("A_b_log", "direction_Bs")) for k in state_dict)

    def infer_config(self, state_dict) -> ToyConfig:
        d = state_dict["pos_embed"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
        return ToyConfig(embed_dim=d, depth=depth)

    def depth(self, config):
        return config.depth

    def num_tokens(self, config):
        return config.num_patches

    def has_class_token(self, config):
        return False

    def block_name(self, config, index):
        return f"layers.{index}"

    def embed(self, model, x, keeps_positions):
        h = model.embed(x)
        bsz, length, _ = h.shape
        side = int(math.isqrt(length))
        positions = torch.arange(length).expand(bsz, -1)
        return (h,), TokenState(positions, None, length, (side, side), keeps_positions)

    def run_block(self, model, index, streams, state, geometry):
        h, y = model.layers[index](streams[0], geometry)
        return BlockOutput((h,), y)

    def geometry(self, model, state, plan):
        if not (state.keeps_positions and state.reduced) or plan.gap == "zero":
            return None
        return ToyGeometry(gaps_from_positions(state.positions, state.length)[0].float())

    def features(self, model, streams, state):
        return model.norm(streams[0]).mean(1)

    def classifier(self, model):
        return model.head

    def check_plan(self, plan):
        if plan.conv != "original":
            raise ConfigError(f"--conv {plan.conv}: the toy family has no conv.")

    def mixer_dims(self, module):
        if not isinstance(module, ToyMixer):
            return None
        d, e, n = module.in_proj.in_features, module.d_inner, module.d_state
        return MixerDims(d, e, n, e, 0, 0, 1, True)


# ---------------------------------------------------------------------------------------------------------------
# a toy strategy and a toy score


# an option declared by the toy strategy in this file alone: the plan validates it by asking this declaration
SKIP = Option("toy_skip", 0, "tokens passed over before the first kept one", low=0, high=4)


class KeepFirst(Strategy):
    """Keeps the first k unprotected tokens whatever the scores (after ``toy_skip`` of them), at their original
    positions."""

    name = "toy-keep-first"
    keeps_positions = True
    options = (SKIP,)

    def reduce(self, step):
        state = step.state
        bsz, length = step.scores.shape
        order = torch.arange(length, device=step.scores.device).expand(bsz, -1).float()
        order = (order - step.plan.option("toy_skip")) % length  # the skipped ones rank last
        kept = topk_sorted(-order, step.k, state.protected())  # the lowest indices
        if state.cls_index is not None:
            index = torch.cat([kept, state.cls_index[:, None]], 1).sort(1).values
            cls = (index == state.cls_index[:, None]).long().argmax(1)
        else:
            index, cls = kept, None
        positions = gather_tokens(state.positions, index)
        return gather_streams(step.streams, index), state.replace(positions=positions, cls_index=cls, reduced=True)


class NegNorm(Score):
    name = "toy-neg-norm"

    def __call__(self, output, generator=None):
        return -output.y.float().norm(dim=-1)


@pytest.fixture(scope="module", autouse=True)
def plugins():
    register_family(ToyFamily())
    register_model(ModelSpec(name="toymamba_test", arch=ToyConfig(), data=DataConfig(input_size=(3, 32, 32)),
                             test_only=True, description="toy one-direction Mamba"))
    register_strategy(KeepFirst())
    register_score(NegNorm())
    yield
    unregister_family("toymamba")
    unregister_strategy("toy-keep-first")
    unregister_score("toy-neg-norm")


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ssmtrim.create_model("toymamba_test").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_toy_family_reduces_like_a_builtin(toy, images):
    with torch.no_grad():
        dense = toy(images)
        for arrangement in ("align", "keep-order", "reorder"):
            apply_pruning(toy, PruneConfig(layers=(1,), keep=(1.0,), arrangement=arrangement))
            assert torch.equal(toy(images), dense)  # nothing reduced is exactly the dense model
            remove_pruning(toy)
        out = reduced_forward(toy, images, PruneConfig(layers=(1, 2), keep=(0.5,)))
    assert type(toy) is ToyMamba and not is_pruned(toy)
    assert out.stats.tokens_per_block == [16.0, 8.0, 4.0]
    assert (out.state.positions.diff(dim=1) > 0).all()  # align keeps original order
    assert torch.isfinite(out.logits).all() and not torch.allclose(out.logits, dense)
    with pytest.raises(ConfigError, match="toy family has no conv"):
        apply_pruning(toy, PruneConfig(layers=(1,), keep=(0.5,), conv="kept"))


def test_toy_strategy_and_score_on_the_toy_and_a_builtin_family(toy, images):
    out = reduced_forward(toy, images, PruneConfig(layers=(1,), keep=(0.5,), arrangement="toy-keep-first"))
    assert torch.equal(out.state.positions, torch.arange(8).expand(3, -1))
    vim = ssmtrim.create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    out = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="toy-keep-first",
                                              score="toy-neg-norm"))
    assert out.state.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 2  # 8 patches + the class token at 8
    assert (out.state.cls_index == 8).all()


def test_toy_family_calibrates_counts_flops_and_reloads(toy, images, tmp_path):
    config = PruneConfig(layers=(1,), keep=(0.5,), score="toy-neg-norm")
    thresholds = calibrate(toy, config, images).thresholds
    dense_paper = ssmtrim.count_flops(toy, convention="paper").total
    dense_full = ssmtrim.count_flops(toy, convention="full").total
    apply_pruning(toy, dataclasses.replace(config, thresholds=thresholds))
    try:
        pruned_paper = ssmtrim.count_flops(toy, convention="paper").total
        pruned_full = ssmtrim.count_flops(toy, convention="full").total
        assert pruned_paper < dense_paper and pruned_full < dense_full
        with torch.no_grad():
            logits = toy(images)
        ssmtrim.save_model(toy, tmp_path / "toy")
    finally:
        remove_pruning(toy)
    reloaded = ssmtrim.load_model(str(tmp_path / "toy"))
    assert type(reloaded).__name__ == "ReducedToyMamba" and reloaded.prune_config.score == "toy-neg-norm"
    with torch.no_grad():
        assert torch.equal(reloaded(images), logits)


def test_unregistered_names_are_one_sentence():
    with pytest.raises(ConfigError, match="--arrangement 'nope' is not one of"):
        PruneConfig(layers=(1,), keep=(0.5,), arrangement="nope")
    with pytest.raises(ConfigError, match="--score 'nope' is not one of"):
        PruneConfig(layers=(1,), keep=(0.5,), score="nope")


def test_a_strategy_declares_its_own_option_and_the_plan_asks_it(toy, images, tmp_path):
    """The option lives in the strategy's file: a plan takes it in ``options``, validated by its declaration, saved
    and reloaded with the folder; another strategy refuses a value it does not read."""
    plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="toy-keep-first", options={"toy_skip": 2})
    assert plan.option("toy_skip") == 2 and PruneConfig(layers=(1,), keep=(0.5,)).option("toy_skip") == 0
    out = reduced_forward(toy, images, plan)
    assert out.state.positions[0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match=r"--toy-skip 9 is outside \[0, 4\]"):
        PruneConfig(layers=(1,), keep=(0.5,), options={"toy_skip": 9})
    with pytest.raises(ConfigError, match="option 'nope' is not declared"):
        PruneConfig(layers=(1,), keep=(0.5,), options={"nope": 1})
    with pytest.raises(ConfigError, match="--toy-skip is an option of toy-keep-first; --arrangement align"):
        apply_pruning(ssmtrim.create_model("toymamba_test"), PruneConfig(layers=(1,), keep=(0.5,),
                                                                          options={"toy_skip": 1}))
    assert PruneConfig.from_dict(plan.to_dict()) == plan
    older = {k: v for k, v in plan.to_dict().items() if k != "options"}  # a folder written before options existed
    assert PruneConfig.from_dict(older).option("toy_skip") == 0
    model = ssmtrim.create_model("toymamba_test").eval()
    apply_pruning(model, plan)
    again = ssmtrim.load_model(str(ssmtrim.save_model(model, tmp_path / "m")))
    assert again.prune_config == plan


def test_the_declared_options_follow_every_registration():
    """declared_options() is kept between registrations (a forward reads defaults from it): a strategy registered or
    unregistered later is seen at once, by a plan made before it too."""
    from ssmtrim.pruning.config import declared_options

    class Later(Strategy):
        name = "toy-later"
        options = (Option("toy_later", 3, "a later plug-in's option", low=0, high=9),)

    plan = PruneConfig(layers=(1,), keep=(0.5,))
    assert "toy_later" not in declared_options()
    register_strategy(Later())
    try:
        assert declared_options()["toy_later"].default == 3 and plan.option("toy_later") == 3
    finally:
        unregister_strategy("toy-later")
    assert "toy_later" not in declared_options()
    with pytest.raises(ConfigError, match="option 'toy_later' is not declared"):
        plan.option("toy_later")


def test_a_plan_that_needs_what_the_family_does_not_give_is_refused_when_applied(toy):
    """The toy family declares no ``provides``: a score or strategy that reads softplus(Δ) or the mixer input is
    refused in one sentence when the plan is applied, not mid-forward."""
    model = ssmtrim.create_model("toymamba_test").eval()
    for plan, words in ((PruneConfig(layers=(1,), keep=(0.5,), score="delta"), "--score delta"),
                        (PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"), "--arrangement merge")):
        with pytest.raises(ConfigError, match=f"{words} \\(as set\\) needs .* which a toymamba model does not give"):
            apply_pruning(model, plan)
    apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", metric="y"))  # y: always given


def test_a_family_without_a_required_method_is_refused_at_registration():
    class Incomplete:
        name = "incomplete"
        config_cls = ToyConfig

        def build(self, config):
            return nn.Identity()

    with pytest.raises(TypeError, match="family 'incomplete' lacks convert_state_dict, detect"):
        register_family(Incomplete())
    assert "incomplete" not in ssmtrim.models.registry.families()
