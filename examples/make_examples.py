"""Re-create the bundled CIFAR-10 image selection from an unpacked CIFAR-10 JPEG folder (``train/``, ``test/``).

    python examples/make_examples.py CIFAR10_DIR
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(src: str) -> None:
    rng = random.Random(0)
    for split, dst, per_class in (("train", "calib", 25), ("test", "val", 100)):
        for cls in sorted(os.listdir(f"{src}/{split}")):
            files = sorted(os.listdir(f"{src}/{split}/{cls}"))
            out = HERE / "cifar10" / dst / cls
            out.mkdir(parents=True, exist_ok=True)
            for name in sorted(rng.sample(files, per_class)):
                shutil.copyfile(f"{src}/{split}/{cls}/{name}", out / name)


if __name__ == "__main__":
    main(sys.argv[1])
