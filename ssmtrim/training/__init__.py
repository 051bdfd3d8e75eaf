"""Training: from scratch (the bundled CIFAR-10 models) and the short fine-tune of a pruned model, one loop for both.

- :mod:`.config`: the recipe, :class:`TrainConfig`;
- :mod:`.data`: images decoded once into memory (cached), normalised and augmented by tensor ops;
- :mod:`.loop`: :func:`fit` (AdamW, warm-up + cosine, label smoothing, distillation, clipping, bf16 on CUDA), the
  atomic resumable state and the JSON-lines log; evaluation goes through :mod:`ssmtrim.evaluate`;
- :mod:`.distributed`: data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU) and the ranks' weight checksums;
- :mod:`.recipes`: :func:`train_from_scratch`, :func:`finetune`, :func:`teacher_for` and their model cards.
"""

from ssmtrim.training.config import Log, Progress, TrainConfig
from ssmtrim.training.data import ArraySet, augment, load_array_set, load_folder, normalise
from ssmtrim.training.distributed import dist_info, init_distributed, weights_checksum
from ssmtrim.training.loop import (
    LOG_NAME,
    STATE_NAME,
    evaluate_set,
    fit,
    load_state,
    loss_fn,
    lr_at,
    param_groups,
    run_id,
    save_state,
)
from ssmtrim.training.recipes import finetune, teacher_for, train_from_scratch

__all__ = [
    "LOG_NAME",
    "STATE_NAME",
    "ArraySet",
    "Log",
    "Progress",
    "TrainConfig",
    "augment",
    "dist_info",
    "evaluate_set",
    "finetune",
    "fit",
    "init_distributed",
    "load_array_set",
    "load_folder",
    "load_state",
    "loss_fn",
    "lr_at",
    "normalise",
    "param_groups",
    "run_id",
    "save_state",
    "teacher_for",
    "train_from_scratch",
    "weights_checksum",
]
