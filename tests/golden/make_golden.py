"""Write ``tests/golden/golden.safetensors``: logits (and calibrated thresholds) of a fixed input for every family x
strategy x mode x score (and Vim's gap and conv options) on the tiny test models and the bundled models.

Run once before a refactor of the reduction engine; ``tests/pruning/test_golden.py`` then checks that the refactored
code gives the same logits, to the tolerance that holds across CPUs (``tests/tolerance.py``). Regenerate only when
behaviour is meant to change, and say so in the commit.

``--kept`` writes ``tests/golden/kept.safetensors`` alone: which tokens each case keeps (the positions after the last
reduction in count mode; the mean tokens entering each block in threshold mode). Integers, the same on every CPU;
written from the current code after checking that its logits match the saved ones.

    python tests/golden/make_golden.py [--kept]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning
from ssmtrim.pruning.calibrate import calibrate

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"


def cases() -> list[tuple[str, dict]]:
    """(model key, prune config fields)."""
    out = []
    plans = {"vim_test": ((1, 2), (0.7,)), "plainmamba_test": ((1,), (0.6,)),
             "vim_cifar": ((3, 6, 9), (0.75,)), "plainmamba_cifar": ((4, 8), (0.7,))}
    for key, (layers, keep) in plans.items():
        vim = key.startswith("vim")
        for arrangement in ("align", "keep-order", "reorder"):
            for mode in ("count", "threshold"):
                out.append((key, dict(layers=layers, keep=keep, arrangement=arrangement, mode=mode)))
        for score in ("unclipped", "l1", "l2", "random"):
            out.append((key, dict(layers=layers, keep=keep, score=score)))
        for gap in ("mean", "zero"):
            out.append((key, dict(layers=layers, keep=keep, gap=gap)))
        for arrangement in ("merge", "tome"):  # merging: the streams averaged, sizes carried between steps
            out.append((key, dict(layers=layers, keep=keep, arrangement=arrangement)))
        out.append((key, dict(layers=layers, keep=keep, arrangement="merge", metric="y", drop_fraction=0.5)))
        if vim:
            out.append((key, dict(layers=layers, keep=keep, conv="kept")))
            out.append((key, dict(layers=layers, keep=keep, conv="kept", mode="threshold")))
            out.append((key, dict(layers=layers, keep=keep, arrangement="merge", conv="kept")))
        out.append((key, dict(layers=layers, keep=(1.0,))))
    return out


def case_name(key: str, fields: dict) -> str:
    return key + "|" + ",".join(f"{k}={fields[k]}" for k in sorted(fields))


def models_and_inputs() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """The four models, each with a fixed input batch (B 3 H W) and calibration images."""
    out = {}
    for name in ("vim_test", "plainmamba_test"):
        torch.manual_seed(0)
        model = ssmtrim.create_model(name).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # off the init, so that scores differ between tokens
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        size = model.config.img_size
        x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
        out[name] = model, x
    for name in ("vim_cifar", "plainmamba_cifar"):
        model = ssmtrim.load_model(str(EXAMPLES / name)).eval()
        x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        out[name] = model, x
    return out


def run_case(model, x, fields: dict) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    cfg_fields = dict(fields)
    thresholds = None
    if cfg_fields.get("mode") == "threshold":
        base = PruneConfig(**{**cfg_fields, "mode": "count"})
        thresholds = calibrate(model, base, x).thresholds
        cfg_fields["thresholds"] = thresholds
    cfg = PruneConfig(**cfg_fields)
    apply_pruning(model, cfg)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        remove_pruning(model)
    return logits, thresholds


def kept_record(model, x, fields: dict) -> dict[str, torch.Tensor]:
    """Which tokens a case keeps: positions after the last reduction (count mode), tokens per block (threshold)."""
    from ssmtrim.pruning.engine import reduced_forward

    cfg_fields = dict(fields)
    if cfg_fields.get("mode") == "threshold":
        cfg_fields["thresholds"] = calibrate(model, PruneConfig(**{**cfg_fields, "mode": "count"}), x).thresholds
    with torch.no_grad():
        out = reduced_forward(model, x, PruneConfig(**cfg_fields))
    if out.state is None:
        return {"tokens": torch.tensor(out.stats.tokens_per_block, dtype=torch.float64)}
    return {"positions": out.state.positions.contiguous()}


def main_kept() -> None:
    import sys

    sys.path.insert(0, str(HERE.parents[1]))
    from tests.pruning import test_golden as golden  # the models and inputs exactly as the test loads them
    from tests.tolerance import assert_close_across_cpus

    tensors: dict[str, torch.Tensor] = {}
    for name, fields in sorted(golden.CASES.items()):
        key = name.split("|")[0]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        model, x = golden._model(key), golden.TENSORS[f"input|{key}"]
        logits, _ = run_case(model, x, fields)
        # the code still gives the pinned logits, so what it keeps is what the pinned code kept
        assert_close_across_cpus(logits, golden.TENSORS[f"logits|{name}"], what=name)
        for kind, value in kept_record(model, x, fields).items():
            tensors[f"{kind}|{name}"] = value
    save_file(tensors, str(HERE / "kept.safetensors"))
    print(f"wrote what {len(golden.CASES)} cases keep to {HERE / 'kept.safetensors'}")


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    models = models_and_inputs()
    for name, (model, x) in models.items():
        tensors[f"input|{name}"] = x.contiguous()
        if name.endswith("_test"):
            for k, v in model.state_dict().items():
                tensors[f"weights|{name}|{k}"] = v.contiguous()
        with torch.no_grad():
            tensors[f"dense|{name}"] = model(x).contiguous()
    for key, fields in cases():
        model, x = models[key]
        logits, thresholds = run_case(model, x, fields)
        name = case_name(key, fields)
        tensors[f"logits|{name}"] = logits.contiguous()
        meta[name] = json.dumps(fields)
        if thresholds is not None:
            tensors[f"thresholds|{name}"] = torch.tensor(thresholds, dtype=torch.float64)
    save_file(tensors, str(HERE / "golden.safetensors"), metadata={"cases": json.dumps(meta)})
    print(f"wrote {len(meta)} cases to {HERE / 'golden.safetensors'}")


if __name__ == "__main__":
    import sys

    main_kept() if "--kept" in sys.argv[1:] else main()
