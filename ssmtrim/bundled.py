"""The bundled example: a small Vim trained on CIFAR-10 and CIFAR-10 images, used when ``ssmtrim prune`` is given no
model. In a source checkout they live in ``examples/``; an installed ssmtrim carries them as ``ssmtrim.examples``."""

from __future__ import annotations

from pathlib import Path

from ssmtrim.errors import SourceNotFoundError

# the schedule of the default run: prune after blocks 3, 6, 9 with the keep ratio that removes 30% of the FLOPs
DEFAULT_LAYERS = (3, 6, 9)
DEFAULT_FLOPS = 0.7
DEFAULT_CONVENTION = "paper"


def examples_dir() -> Path:
    """Where the bundled files are: the installed ``ssmtrim.examples`` package data, else the checkout's
    ``examples/``."""
    candidates = []
    try:
        from importlib.resources import files

        candidates.append(Path(str(files("ssmtrim.examples"))))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parents[1] / "examples")
    for path in candidates:
        if (path / "vim_cifar" / "config.json").is_file():
            return path
    raise SourceNotFoundError("the bundled example model is missing from this installation; reinstall ssmtrim from "
                              "its source folder (pip install .) or name a model to prune.")


def bundled_folder(name: str) -> Path | None:
    """The folder of a registered model that ships with ssmtrim (``examples/<name>``), if there is one."""
    try:
        folder = examples_dir() / name
    except SourceNotFoundError:
        return None
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def bundled_or_random(name: str, seed: int = 0):
    """The registered model ``name`` in eval mode: its bundled weights where they ship (``examples/<name>``), else its
    architecture with random weights (seeded), which serve as well where only speed is measured."""
    import torch

    import ssmtrim

    folder = bundled_folder(name)
    if folder is not None:
        return ssmtrim.load_model(folder).eval()
    torch.manual_seed(seed)
    return ssmtrim.create_model(name).eval()


def bundled_model() -> Path:
    return examples_dir() / "vim_cifar"


def calibration_images() -> Path:
    return examples_dir() / "cifar10" / "calib"


def validation_images() -> Path:
    return examples_dir() / "cifar10" / "val"
