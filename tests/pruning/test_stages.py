"""A toy two-stage family registered from this test file alone (nothing in ``ssmtrim/`` names it): the engine follows
its stages (docs/ARCHITECTURE.md, "Stages: a hierarchical family"). Dense through the engine gives the model's
logits with the tokens per block measured (64, 64, 16, 16); a reduction inside the last stage runs; FLOPs are
counted per nested block; a reduction before a stage change is refused in one sentence by the family (restoring the
grid before a downsample is not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import ArchConfig, register_family, unregister_family
from ssmtrim.models.tokens import BlockOutput, TokenState
from ssmtrim.ops import selective_scan
from ssmtrim.pruning import PruneConfig, apply_pruning, reduced_forward, remove_pruning


@dataclass(frozen=True)
class TwoStageConfig(ArchConfig):
    family: ClassVar[str] = "toy-two-stage"

    dims: tuple[int, int] = (8, 16)
    depths: tuple[int, int] = (2, 2)
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 4

    @property
    def depth(self) -> int:
        return sum(self.depths)

    def stage_of(self, block: int) -> tuple[int, int]:
        return (0, block) if block < self.depths[0] else (1, block - self.depths[0])


class ScanBlock(nn.Module):
    """x += out(scan(in(LN(x)))): one-direction selective scan over the tokens in their current order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.inp, self.out = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.bc = nn.Linear(dim, 8, bias=False)
        self.A_log = nn.Parameter(torch.zeros(dim, 4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, dt = self.inp(self.norm(x)).chunk(2, -1)
        b, c = self.bc(u).chunk(2, -1)
        y = selective_scan(u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), -torch.exp(self.A_log),
                           b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(), delta_softplus=True)
        y = y.transpose(1, 2)
        return x + self.out(y), y


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, next_dim: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ScanBlock(dim) for _ in range(depth))
        self.downsample = nn.Linear(4 * dim, next_dim) if next_dim else nn.Identity()


def merge_2x2(x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Tokens (B L C) of an h x w grid -> (B L/4 4C) of the h/2 x w/2 grid (patch merging)."""
    bsz, _, c = x.shape
    h, w = hw
    x = x.reshape(bsz, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(bsz, (h // 2) * (w // 2), 4 * c)
    return x, (h // 2, w // 2)


class TwoStage(nn.Module):
    def __init__(self, config: TwoStageConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.in_chans, config.dims[0], 4, 4)
        self.stages = nn.ModuleList([Stage(config.dims[0], config.depths[0], config.dims[1]),
                                     Stage(config.dims[1], config.depths[1], None)])
        self.head = nn.Linear(config.dims[1], config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x, _ = block(x)
            if i == 0:
                x, hw = merge_2x2(x, hw)
                x = stage.downsample(x)
        return self.head(x.mean(1))


class TwoStageFamily:
    name = "toy-two-stage"
    config_cls = TwoStageConfig

    def build(self, config):
        return TwoStage(config)

    def convert_state_dict(self, state_dict):
        return dict(state_dict)

    def detect(self, state_dict):
        return False

    def infer_config(self, state_dict):
        return TwoStageConfig()

    def depth(self, config):
        return config.depth

    def num_tokens(self, config):
        return (config.img_size // 4) ** 2

    def has_class_token(self, config):
        return False

    def block_name(self, config, index):
        stage, j = config.stage_of(index)
        return f"stages.{stage}.blocks.{j}"

    def _state(self, x: Tensor, hw, keeps_positions: bool) -> TokenState:
        positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return TokenState(positions, None, x.shape[1], hw, keeps_positions)

    def embed(self, model, x, keeps_positions):
        x = model.patch_embed(x)
        hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        return (x,), self._state(x, hw, keeps_positions)

    def run_block(self, model, index, streams, state, geometry):
        stage, j = model.config.stage_of(index)
        x, y = model.stages[stage].blocks[j](streams[0])
        return BlockOutput((x,), y)

    def after_block(self, model, index, streams, state):
        stage, j = model.config.stage_of(index)
        if stage != 0 or j != model.config.depths[0] - 1:
            return streams, state
        if state.reduced:
            raise ConfigError("the toy family's patch merging needs the full grid; reduce inside its last stage.")
        x, hw = merge_2x2(streams[0], state.grid)
        x = model.stages[0].downsample(x)
        return (x,), self._state(x, hw, state.keeps_positions)

    def geometry(self, model, state, plan):
        return None

    def features(self, model, streams, state):
        return streams[0].mean(1)

    def classifier(self, model):
        return model.head

    def recommended_plan(self, config):
        return {"arrangement": "keep-order", "layers": (3,)}

    def check_plan(self, plan):
        pass

    def mixer_dims(self, module):
        return None


@pytest.fixture
def model():
    register_family(TwoStageFamily())
    torch.manual_seed(0)
    net = TwoStage(TwoStageConfig()).eval()
    yield net
    unregister_family("toy-two-stage")


def test_dense_through_the_engine_follows_the_stages(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = reduced_forward(model, x, PruneConfig(layers=(1,), keep=(1.0,), arrangement="keep-order"))
        assert torch.equal(out.logits, model(x))  # same process, same operations
    assert out.stats.tokens_per_block == [64.0, 64.0, 16.0, 16.0]  # measured, not assumed
    assert out.state.grid == (4, 4) and out.state.length == 16


def test_reduction_inside_the_last_stage_runs(model):
    x = torch.randn(3, 3, 32, 32)
    apply_pruning(model, PruneConfig(layers=(3,), keep=(0.5,), arrangement="keep-order"))
    try:
        with torch.no_grad():
            out = reduced_forward(model, x)
    finally:
        remove_pruning(model)
    assert out.stats.tokens_per_block == [64.0, 64.0, 16.0, 8.0]
    with torch.no_grad():
        assert not torch.allclose(out.logits, model(x))  # something was reduced


def test_flops_are_counted_per_nested_block(model):
    from ssmtrim.flops import count_flops
    from ssmtrim.pruning.schedule import FlopsModel

    report = count_flops(model, convention="full", images=torch.zeros(1, 3, 32, 32))
    names = [TwoStageFamily().block_name(model.config, i) for i in range(4)]
    blocks = [report.by_module[n] for n in names]
    assert all(b > 0 for b in blocks) and blocks[0] == blocks[1] and blocks[2] == blocks[3]
    assert blocks[0] > blocks[2] / 2  # stage 0: 4x the tokens at half the width
    assert FlopsModel(model).whole_blocks == blocks


def test_a_reduction_before_a_stage_change_is_refused_in_one_sentence(model):
    with pytest.raises(ConfigError, match="needs the full grid"), torch.no_grad():
        reduced_forward(model, torch.randn(1, 3, 32, 32), PruneConfig(layers=(1,), keep=(0.5,),
                                                                     arrangement="keep-order"))
