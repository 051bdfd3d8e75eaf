"""Reduction strategies: registered objects, one module each, with one small interface.

A strategy is given a :class:`~ssmtrim.pruning.state.ReductionStep` (the scores, how many unprotected tokens to keep,
the streams and the token state) and returns the reduced streams and the new state. It applies one selection to
every stream, so the hidden and residual streams and the position map stay in step. ``keeps_positions`` tells the
family how the later blocks treat the reduced sequence: at the tokens' original positions (convs read original
neighbours, scans decay over the gaps) or as a new, condensed sequence.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import Streams, TokenState, gather_tokens
from ssmtrim.pruning.options import Option, declarations_changed
from ssmtrim.pruning.state import ReductionStep


class Strategy:
    """Subclass, set ``name`` (and ``keeps_positions``), implement :meth:`reduce`; :func:`register_strategy` it."""

    name: ClassVar[str]
    keeps_positions: ClassVar[bool] = False
    description: ClassVar[str] = ""
    keeps_what: ClassVar[str] = "of the tokens"  # what a keep ratio counts, in words (for summaries)

    # the options this strategy reads beyond where / how many, declared in its own module (a non-default value of
    # an option it does not read is refused with one sentence naming the strategies that do)
    options: ClassVar[tuple[Option, ...]] = ()

    def needs(self, plan) -> frozenset[str]:
        """What the family must give: besides y at a reduction point ("delta", "mixer_input"), and "condensed" (its
        blocks run the kept tokens as a new sequence) for a strategy that does not keep positions; checked against
        the family's ``provides`` when a plan is applied. A subclass adds to this."""
        return frozenset() if self.keeps_positions else frozenset({"condensed"})

    def check_plan(self, plan) -> None:
        mine = {o.name for o in self.options}
        for name, option in strategy_options().items():
            if name not in mine and plan.option(name) != option.default:
                users = ", ".join(strategies_reading(name))
                if name == GAP.name:
                    raise ConfigError(f"--gap sets the decay over pruned positions, which --arrangement {self.name} "
                                      f"does not keep (its tokens form a new sequence); leave --gap out or use one "
                                      f"of {users}.")
                raise ConfigError(f"{option.flag} is an option of {users}; --arrangement {self.name} does not use it, "
                                  f"so leave {option.flag} out or choose one of those.")

    def reduces_mlps_only(self, plan) -> bool:
        """True where the plan's later blocks run only their per-token MLPs on fewer tokens (the mixers on every
        position): the FLOPs estimate then scales the MLPs' FLOPs alone with the tokens (the family's ``token_mlp``)."""
        return False

    def mlp_share(self, plan) -> float:
        """The share of a step's tokens the later blocks' per-token MLPs run on (1.0: all of them, as the mixers); the
        FLOPs estimate scales the MLPs' FLOPs by it, in the blocks after a step."""
        return 1.0

    def steps_without_removal(self, plan) -> bool:
        """True where a step that removes no token still changes how the later blocks run (unmerge's MLPs on a share
        of the tokens): the engine then runs :meth:`reduce` at a keep of 1 too (its ``k`` every candidate), and the
        FLOPs estimate scales the MLPs by :meth:`mlp_share` after such a step. Default False: a step that removes
        nothing is skipped."""
        return False

    def reaching_further(self, plan):
        """A plan like ``plan`` that can save more FLOPs, for a FLOPs target ``plan`` cannot reach (None: none)."""
        return None

    def fit_target(self, plan, meets):
        """Where a plan's keep ratio cannot bring its FLOPs close to a target (they jump at the first token a step
        removes), a plan nearer dense whose estimate still ``meets`` the target (``meets(plan) -> bool``, at the same
        layers and keep); default ``plan`` itself."""
        return plan

    def reach_hint(self, plan) -> str:
        """Said after "this FLOPs target cannot be reached": what in the plan limits the saving (default nothing)."""
        return ""

    def threshold_count(self, k: int, candidates: int, state: TokenState) -> int:
        """Threshold mode: adjust the number of tokens an image keeps (default: as counted)."""
        return k

    def reduce(self, step: ReductionStep) -> tuple[Streams, TokenState]:
        raise NotImplementedError


# read by the strategies that keep tokens at their original positions (the families' scans decay over the gaps)
GAP = Option("gap", "bias", "how the step size of a position that no longer exists is estimated: bias softplus(dt "
             "bias), mean the kept tokens' mean, zero no decay", choices=("bias", "mean", "zero"))

_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    declared = strategy_options()
    for option in strategy.options:
        other = declared.get(option.name)
        if other is not None and other != option:
            raise ValueError(f"strategy {strategy.name!r} declares option {option.name!r} differently from another "
                             "strategy; share one Option object.")
    _STRATEGIES[strategy.name] = strategy
    declarations_changed()
    return strategy


def strategy_options() -> dict[str, Option]:
    """Every option a registered strategy declares, by name."""
    return {o.name: o for s in _STRATEGIES.values() for o in s.options}


def strategies_reading(option: str) -> tuple[str, ...]:
    """The registered strategies that declare ``option``."""
    return tuple(s.name for s in _STRATEGIES.values() if option in {o.name for o in s.options})


def unregister_strategy(name: str) -> None:
    _STRATEGIES.pop(name, None)
    declarations_changed()


def get_strategy(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise ConfigError(f"--arrangement {name!r} is not one of {', '.join(_STRATEGIES)}.")
    return _STRATEGIES[name]


def strategy_names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by strategies


def gather_streams(streams: Streams, index: Tensor) -> Streams:
    """The same index (B K) applied to every stream (B L ...)."""
    return tuple(None if t is None else gather_tokens(t, index) for t in streams)


def centre_protected(kept: Tensor, state: TokenState) -> tuple[Tensor, Tensor | None]:
    """Kept unprotected tokens (B K) with the protected tokens put back among them: one class token in the middle
    (the released Vim code), P registers evenly, one after each of the first P groups of K // (P + 1) kept tokens
    (as Mamba® places them); (index, new protected indices). Without a protected token, the kept tokens as they are."""
    prot = state.protected_index()
    if prot is None:
        return kept, None
    group = kept.shape[1] // (prot.shape[1] + 1)
    parts = []
    for j in range(prot.shape[1]):
        parts += [kept[:, j * group : (j + 1) * group], prot[:, j : j + 1]]
    index = torch.cat([*parts, kept[:, prot.shape[1] * group :]], 1)
    return index, state.protected_after(index)


def in_order_with_protected(kept: Tensor, state: TokenState) -> tuple[Tensor, Tensor | None]:
    """Kept unprotected tokens (B K, increasing) and the protected tokens, all in their current order; (index, new
    protected indices)."""
    prot = state.protected_index()
    if prot is None:
        return kept, None
    index = torch.cat([kept, prot], 1).sort(1).values
    return index, state.protected_after(index)


def even_when_centred(k: int, candidates: int, state: TokenState) -> int:
    """With one class token to centre, an even number of kept tokens puts it exactly in the middle."""
    if state.num_protected == 1 and k % 2 and k < candidates:
        return k + 1
    return k
