"""Training-free token reduction on a trained model: the method, its ablations, the peers' methods as ssmtrim
reproduces them, and ours, at fixed FLOPs.

    python benchmarks/method_table.py --test ../shared/data/cifar10/test   # after unpacking cifar10.tar.gz there

Rows (``--rows``): random scores; keep-order (the released ToP-ViM code's arrangement); reorder (EViT-style); align
with the clipped score (the method as specified) and its ablations (unclipped, l1, l2 scores; the missing Δ
estimated as the kept tokens' mean or zero; Vim's conv over the kept neighbours); the peers' merging methods as
reproduced here on a condensed sequence (no decay across gaps, Vim's conv over the kept neighbours): ToMe / R-MeeTo
(bipartite matching on the block input, no re-training), UTR (clipped score; half of the removed tokens dropped,
half merged into their most similar kept token), MTR (Δ importance, merged into the most similar kept token); and
ours, ``merge`` (clipped score, removed tokens merged into their most similar kept token on the normed block input,
size-weighted, tokens at their original positions with the scans' gap bookkeeping), without and with the head
compensation fitted on the bundled 250 calibration images (``--calib``), and Vim's default: each removed token merged
into the more similar of its staying neighbours in the sequence, the class token's four neighbours on each side kept,
with the compensation. Columns: FLOPs reduced by 20/30/40/50%
(paper convention) by reducing after the same blocks with the keep ratio that meets the target, in count mode. No
fine-tuning. Accuracy on the whole test folder. The Δ̃ rows run at −30% and −50% only. The blocks before the first
reduction run once for all rows (``ssmtrim.pruning.dense_prefix``; the same logits bit for bit in one process, which
``tests/pruning/test_prefix.py`` checks), so an entry's ``seconds`` leaves them out. ``--append`` keeps the rows of
an earlier run that this run does not compute; ``--resume`` continues a stopped run (the JSON is written after every
entry); ``--combine A.json B.json`` makes one table of runs made side by side
(e.g. two row subsets, one process each). Writes JSON, Markdown and a plot (top-1 against GFLOPs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ssmtrim
from ssmtrim.data import scan_folder
from ssmtrim.errors import ConfigError
from ssmtrim.evaluate import evaluate_logits, label_images, topk_accuracy
from ssmtrim.flops import count_flops_all
from ssmtrim.models.loading import data_config_of
from ssmtrim.models.registry import family_of, recommended_plan_of
from ssmtrim.pruning import PruneConfig, apply_pruning, dense_prefix, reduced_forward, remove_pruning
from ssmtrim.pruning.calibrate import load_images
from ssmtrim.pruning.compensation import compensate
from ssmtrim.pruning.schedule import FlopsModel, keep_for

ROOT = Path(__file__).resolve().parents[1]
# id: (label, PruneConfig fields); "conv" = "kept" is Vim's only: rows that ask for it are skipped on other families,
# and CONDENSED rows take the family's own way of reading a condensed sequence
CONDENSED = {"gap": "zero", "conv": "kept"}
ROWS = {
    "random": ("random", {"score": "random", "arrangement": "align"}),
    "keep-order": ("keep-order (ToP-ViM released code)", {"arrangement": "keep-order"}),
    "reorder": ("reorder (EViT-style)", {"arrangement": "reorder"}),
    "align": ("align, clipped (the method as specified)", {"arrangement": "align"}),
    "align-unclipped": ("align, unclipped", {"arrangement": "align", "score": "unclipped"}),
    "align-l1": ("align, l1", {"arrangement": "align", "score": "l1"}),
    "align-l2": ("align, l2", {"arrangement": "align", "score": "l2"}),
    "align-conv-kept": ("align, clipped, conv over kept neighbours", {"arrangement": "align", "conv": "kept"}),
    "align-gap-mean": ("align, clipped, Δ̃ = mean Δ", {"arrangement": "align", "gap": "mean"}),
    "align-gap-zero": ("align, clipped, Δ̃ = 0", {"arrangement": "align", "gap": "zero"}),
    "tome": ("ToMe / R-MeeTo (bipartite, block input)", {"arrangement": "tome", **CONDENSED}),
    "utr": ("UTR-style (clipped; half dropped, half merged)", {"arrangement": "merge", "drop_fraction": 0.5,
                                                                **CONDENSED}),
    "mtr": ("MTR-style (Δ importance, merged)", {"arrangement": "merge", "score": "delta", **CONDENSED}),
    "stm": ("STM-style (a token most like its sequence neighbour leaves first, merged into a neighbour; the class "
            "token's neighbours kept)", {"arrangement": "merge", "score": "neighbour-similarity",
                                         "options": {"merge_into": "adjacent", "protect_around": 4}, **CONDENSED}),
    "merge": ("merge (ours, no compensation)", {"arrangement": "merge", "conv": "kept"}),
    "merge-comp": ("merge + head compensation (ours, PlainMamba's default before rescaling; Vim's before merging into "
                   "neighbours)", {"arrangement": "merge", "conv": "kept", "compensate": "head"}),
    "merge-norm-comp": ("merge, a merged token rescaled to its tokens' mean norm, + head compensation (ours, "
                        "PlainMamba's default)", {"arrangement": "merge", "conv": "kept", "compensate": "head",
                                                  "options": {"rescale": "norm"}}),
    "merge-adjacent-comp": ("merge into a staying neighbour, the class token's neighbours kept, + head compensation "
                            "(ours, Vim's default before Δ̃ = 0)",
                            {"arrangement": "merge", "conv": "kept", "compensate": "head",
                             "options": {"merge_into": "adjacent", "protect_around": 4}}),
    "merge-adjacent-zero-comp": ("merge into a staying neighbour, no decay across the merged positions (Δ̃ = 0), the "
                                 "class token's neighbours kept, + head compensation (ours, Vim's default before "
                                 "rescaling)",
                                 {"arrangement": "merge", "conv": "kept", "gap": "zero", "compensate": "head",
                                  "options": {"merge_into": "adjacent", "protect_around": 4}}),
    "merge-adjacent-zero-norm-comp": ("merge into a staying neighbour, Δ̃ = 0, the class token's neighbours kept, a "
                                      "merged token rescaled to its tokens' mean norm, + head compensation (ours, "
                                      "Vim's default)",
                                      {"arrangement": "merge", "conv": "kept", "gap": "zero", "compensate": "head",
                                       "options": {"merge_into": "adjacent", "protect_around": 4,
                                                   "rescale": "norm"}}),
    "unmerge": ("unmerge (ours: merged for the blocks, residual stream whole)", {"arrangement": "unmerge",
                                                                                  "conv": "kept"}),
    "unmerge-comp": ("unmerge + head compensation (ours)",
                     {"arrangement": "unmerge", "conv": "kept", "compensate": "head"}),
    "unmerge-mlp-comp": ("unmerge, the mixers on every position (only the MLPs merged) + head compensation (ours, "
                         "VMamba's default)",
                         {"arrangement": "unmerge", "conv": "kept", "compensate": "head",
                          "options": {"mixer": "positions"}}),
    "unmerge-mlp-regroup-comp": ("unmerge, the mixers on every position, each block's MLP regrouping the positions by "
                                 "its input (--option mlp_groups=block) + head compensation (ours, "
                                 "MambaVision's default)",
                                 {"arrangement": "unmerge", "conv": "kept", "compensate": "head",
                                  "options": {"mixer": "positions", "mlp_groups": "block"}}),
    "unmerge-share-comp": ("unmerge, the mixers on the merged tokens, the MLPs regrouped around a tenth of them "
                           "(--option mlp_share=0.1) + head compensation (ours; the hierarchical families' plan past "
                           "the MLPs' reach, and the schedule search's choice where it is closer to dense)",
                           {"arrangement": "unmerge", "conv": "kept", "compensate": "head",
                            "options": {"mixer": "tokens", "mlp_share": 0.1}}),
    "unmerge-importance": ("unmerge, importance matching at every step + head compensation",
                           {"arrangement": "unmerge", "conv": "kept", "options": {"match": "importance"},
                            "compensate": "head"}),
    "unmerge-bipartite": ("unmerge, ToMe's bipartite matching (ToMe for SD's scheme) + head compensation",
                          {"arrangement": "unmerge", "conv": "kept", "options": {"match": "bipartite"},
                           "compensate": "head"}),
    # its own rule, a fixed stride: the same plan (and FLOPs) at every target; run it with --targets at its budget
    "quartermap": ("QuarterMap (scan a quarter of the grid, nearest-neighbour back)", {"arrangement": "quartermap",
                                                                                         "keep": 0.25}),
}
# labels of earlier runs, renamed
RENAMED = {"align, clipped (default)": ROWS["align"][0], "keep-order": ROWS["keep-order"][0],
           "merge (ours, the default)": ROWS["merge"][0],
           "merge + head compensation (ours, the default)": ROWS["merge-comp"][0],
           "merge + head compensation (ours, the flat families' default)": ROWS["merge-comp"][0],
           "merge + head compensation (ours, PlainMamba's default; Vim's before merging into neighbours)":
               ROWS["merge-comp"][0],
           "merge into a staying neighbour, the class token's neighbours kept, + head compensation (ours, Vim's "
           "default)": ROWS["merge-adjacent-comp"][0],
           "merge into a staying neighbour, no decay across the merged positions (Δ̃ = 0), the class token's "
           "neighbours kept, + head compensation (ours, Vim's default)": ROWS["merge-adjacent-zero-comp"][0],
           "unmerge + head compensation (ours, the hierarchical families' default)": ROWS["unmerge-comp"][0],
           "unmerge + head compensation (ours; the hierarchical families' default where the MLPs alone cannot reach "
           "the target)": ROWS["unmerge-comp"][0],
           "unmerge, the mixers on the merged tokens, the MLPs regrouped around a tenth of them (--option "
           "mlp_share=0.1) + head compensation (ours, the hierarchical families' default where the MLPs alone cannot "
           "reach the target)": ROWS["unmerge-share-comp"][0],
           "unmerge, the mixers on every position (only the MLPs merged) + head compensation":
               ROWS["unmerge-mlp-comp"][0],
           "unmerge, the mixers on every position (only the MLPs merged) + head compensation (ours, the hierarchical "
           "families' default)": ROWS["unmerge-mlp-comp"][0],
           "unmerge, the mixers on every position, each block's MLP regrouping the positions by its input (--option "
           "mlp_groups=block) + head compensation (ours)": ROWS["unmerge-mlp-regroup-comp"][0]}
GAP_ROWS, GAP_TARGETS = ("align-gap-mean", "align-gap-zero"), (0.7, 0.5)  # the Δ̃ ablation at two budgets


def row_config(row: str, family, arch_config, layers, keep) -> PruneConfig | None:
    """The plan of a row on this family, or None where the row does not apply (Vim's conv options elsewhere)."""
    fields = dict(ROWS[row][1])
    keep = fields.pop("keep", keep)  # a row with its own fixed keep (QuarterMap's stride)
    if fields.get("conv") == "kept" and recommended_plan_of(family, arch_config).get("conv") != "kept":
        if row == "align-conv-kept":
            return None
        fields["conv"] = "original"  # a 2-D conv has no 'previous kept token': the family's own conv
    return PruneConfig(layers=layers, keep=(keep,), **fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "vim_cifar"))
    ap.add_argument("--test", help="labelled test images (class sub-folders); required unless --combine")
    ap.add_argument("--layers", default="3,6,9", help="prune after these blocks (1-based)")
    ap.add_argument("--targets", default="0.8,0.7,0.6,0.5", help="FLOPs as fractions of dense (paper convention)")
    ap.add_argument("--rows", default=",".join(ROWS), help="subset of the rows, comma-separated")
    ap.add_argument("--num-test", type=int, default=None, help="seeded subset of the test images")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--calib", default=str(ROOT / "examples" / "cifar10" / "calib"),
                    help="images that compensation is fitted on (the bundled 250 calibration images)")
    ap.add_argument("--append", action="store_true", help="keep the earlier run's rows that this run does not compute")
    ap.add_argument("--resume", action="store_true",
                    help="continue a run that stopped: keep the entries already in --out's JSON (written after every "
                         "entry) and compute only the missing ones")
    ap.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                    help="no evaluation: merge the rows of earlier runs' JSON files (same model, test images and "
                         "layers; e.g. row subsets run side by side) into --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "method_table"))
    args = ap.parse_args()
    if args.combine:
        write(combine([json.loads(Path(f).read_text()) for f in args.combine]), Path(args.out))
        return
    if args.test is None:
        ap.error("--test is required (the labelled test images), unless --combine makes a table of earlier runs")

    model = ssmtrim.load_model(args.model)
    data_cfg = data_config_of(model)
    layers = tuple(int(v) for v in args.layers.split(","))
    targets = [float(v) for v in args.targets.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")

    t0 = time.perf_counter()
    test = label_images(scan_folder(args.test).subset(args.num_test), model.config.num_classes)
    x_test, y_test, bad = load_images(test, data_cfg, 256)
    print(f"{len(y_test)} test images ({bad} unreadable) [{time.perf_counter() - t0:.0f} s]", flush=True)

    dense_flops = {c: r.gflops for c, r in count_flops_all(model).items()}
    # the blocks before the first reduction are the same for every row: run once, kept per batch
    with torch.inference_mode():
        prefixes = [dense_prefix(model, x_test[lo : lo + args.batch_size], min(layers) - 1)
                    for lo in range(0, len(y_test), args.batch_size)]
    del x_test
    unreduced = PruneConfig(layers=layers, keep=(1.0,))  # from a prefix: the dense model (tests/pruning/test_prefix.py)
    dense_logits = logits_of(model, prefixes, unreduced)  # once: every row is compared with these
    print(f"dense prefix of {min(layers) - 1} blocks and dense logits [{time.perf_counter() - t0:.0f} s]", flush=True)
    dense_top1, dense_top5 = (100 * topk_accuracy(dense_logits, y_test, k) for k in (1, 5))
    print(f"dense: top-1 {dense_top1:.2f}%  GFLOPs paper {dense_flops['paper']:.4f} full {dense_flops['full']:.4f}",
          flush=True)
    family = family_of(model)
    dense_estimate = FlopsModel(model, "paper")

    def keep_of(row: str, target: float) -> tuple[float | None, FlopsModel]:
        probe = row_config(row, family, model.config, layers, 1.0)
        estimate = dense_estimate if probe is None else dense_estimate.for_plan(probe)
        return keep_for(estimate, layers, target), estimate
    fresh: dict[str, list] = {}
    x_calib = None
    results = {"model": args.model, "test": args.test, "num_test": len(y_test), "mode": "count",
               "layers": layers, "dense": {"top1": dense_top1, "top5": dense_top5,
                                                                      "gflops": dense_flops}, "rows": {}}
    out_json = Path(args.out).with_suffix(".json")
    earlier = json.loads(out_json.read_text()) if (args.append or args.resume) and out_json.is_file() else None
    if earlier is not None:
        earlier["layers"] = list(earlier["layers"])
        combine([earlier, results])  # refuses a run on another model, other images or layers
    done = {(RENAMED.get(k, k), e["target"]) for k, v in earlier["rows"].items() for e in v} \
        if earlier is not None and args.resume else set()

    def so_far() -> dict:
        current = dict(results, rows=fresh, seconds=time.perf_counter() - t0)
        return combine([earlier, current]) if earlier is not None else combine([current])
    for target in targets:
        for row in rows:
            label = ROWS[row][0]
            if row in GAP_ROWS and target not in GAP_TARGETS or (label, target) in done:
                continue
            keep, estimate = keep_of(row, target)
            if keep is None:
                floor = estimate.ratio(layers, 0.01)  # every step at the smallest keep keep_for tries
                print(f"target {target} {label}: unreachable with layers {layers} (at most {1 - floor:.0%} fewer "
                      "FLOPs there: the blocks before the first reduction point, what the plan leaves whole and what "
                      "is not a block keep theirs)", flush=True)
                continue
            # count mode (the default) keeps a fixed number of tokens per layer: thresholds play no part
            config = row_config(row, family, model.config, layers, keep)
            if config is None:
                continue
            try:
                pruned = apply_pruning(model, config)
            except ConfigError as exc:  # a plan the strategy cannot run (ToMe below keep 0.5): no row, said
                print(f"FLOPs x{target:.1f} {label}: not run ({exc})", flush=True)
                continue
            if config.compensate != "none":
                if x_calib is None:
                    x_calib = load_images(scan_folder(args.calib), data_cfg, 256)[0]
                compensate(pruned, x_calib)
            flops = {c: r.gflops for c, r in count_flops_all(pruned).items()}
            start = time.perf_counter()
            r = evaluate_logits(logits_of(pruned, prefixes), y_test, dense_logits, time.perf_counter() - start)
            with torch.inference_mode():
                tokens = reduced_forward(pruned, prefixes[0].select(slice(0, 1))).stats.tokens_per_block
            remove_pruning(model)
            entry = {"target": target, "keep": config.keep[0], "top1": r.top1, "top5": r.top5, "agreement": r.agreement,
                     "kl": r.kl, "gflops": flops, "flops_reduction": 1 - flops["paper"] / dense_flops["paper"],
                     "tokens_per_block": tokens, "seconds": r.seconds}
            fresh.setdefault(label, []).append(entry)
            print(f"FLOPs x{target:g} (keep {config.keep[0]:.3f}, -{100 * entry['flops_reduction']:.1f}%) {label:28s} "
                  f"top-1 {r.top1:6.2f}  agreement {r.agreement:6.2f}  KL {r.kl:.4f}  [{r.seconds:.0f} s]",
                  flush=True)
            save_json(so_far(), out_json)  # after every entry, so that --resume can continue a stopped run
    write(so_far(), Path(args.out))  # this run's entries replace the earlier ones at the same target


def logits_of(model, prefixes: list, config: PruneConfig | None = None) -> torch.Tensor:
    """The plan (``config``, or the model's own) run from each batch's dense prefix, logits concatenated."""
    with torch.inference_mode():
        return torch.cat([reduced_forward(model, prefix, config).logits for prefix in prefixes])


def combine(runs: list[dict]) -> dict:
    """One table from runs on the same model, test images and layers: later runs' entries replace earlier ones at
    the same row and target; rows in the order of ROWS."""
    first = runs[0]
    for run in runs[1:]:
        same = (run["num_test"], list(run["layers"]), Path(run["model"]).name, run["dense"]["top1"])
        if same != (first["num_test"], list(first["layers"]), Path(first["model"]).name, first["dense"]["top1"]):
            raise SystemExit("these runs used other models, test images or layers and cannot share a table; run "
                             "every row in one run instead.")
    merged: dict[str, dict] = {}
    for run in runs:
        for label, entries in run["rows"].items():
            merged.setdefault(RENAMED.get(label, label), {}).update({e["target"]: e for e in entries})
    order = [label for label, _ in ROWS.values()]
    rows = {k: [v[t] for t in sorted(v, reverse=True)] for k, v in merged.items()}
    result = dict(first, rows=dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)))
    result["seconds"] = sum(run.get("seconds", 0.0) for run in runs)
    return result


def markdown(results: dict) -> str:
    rows = results["rows"]
    first: dict[float, dict] = {}  # per target, the first row's entry (its FLOPs head the column)
    for entries in rows.values():
        for e in entries:
            first.setdefault(e["target"], e)
    cols = [first[t] for t in sorted(first, reverse=True)]  # every target any row reached, even in a partial run
    head = "| method | " + " | ".join(f"−{100 * e['flops_reduction']:.0f}% FLOPs ({e['gflops']['paper'] * 1e3:.1f} M)"
                                      for e in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|",
             f"| dense ({results['dense']['gflops']['paper'] * 1e3:.1f} MFLOPs) | "
             + " | ".join(f"{results['dense']['top1']:.2f}" for _ in cols) + " |"]
    targets = [e["target"] for e in cols]
    for name, entries in rows.items():
        by_target = {e["target"]: e for e in entries}
        cells = [f"{by_target[t]['top1']:.2f}" if t in by_target else "" for t in targets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Top-1 (%) on {results['num_test']} test images; pruning after blocks "
              f"{', '.join(map(str, results['layers']))} in count mode (a fixed number of tokens per layer, so no "
              "thresholds are involved); no fine-tuning. FLOPs in the paper convention. One standard error of a "
              f"top-1 figure on {results['num_test']} images is about {_stderr(results):.2f} points. Empty cells were "
              "not run."]
    return "\n".join(lines) + "\n"


def _stderr(results: dict) -> float:
    p = results["dense"]["top1"] / 100
    return 100 * (p * (1 - p) / results["num_test"]) ** 0.5


def save_json(results: dict, path: Path) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def write(results: dict, out: Path) -> None:
    save_json(results, out.with_suffix(".json"))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = results["dense"]
    ax.scatter([d["gflops"]["paper"] * 1e3], [d["top1"]], color="black", zorder=3, label="dense")
    for name, entries in results["rows"].items():
        style = "-o" if "ours" in name else ("--." if "align" in name else "-s")
        ax.plot([e["gflops"]["paper"] * 1e3 for e in entries], [e["top1"] for e in entries], style, label=name)
    ax.set_xlabel("MFLOPs per image (paper convention)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Post-training token pruning, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
