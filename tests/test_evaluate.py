"""Evaluation over folders: label layouts, the standard ImageNet index, labels files, unreadable images, agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.data import eval_transform, load_rgb, scan_folder
from ssmtrim.evaluate import dense_of, evaluate, imagenet_wnids, label_images
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning

runner = CliRunner()


def _save(path, rng, size=(32, 32)):
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three class folders of 4 images each (one of them odd-sized, one corrupt)."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(4):
            _save(root / c / f"{i}.png", rng, (32 + 7 * i, 40))
    (root / "b" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", num_classes=3)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return ssmtrim.save_model(model, tmp_path_factory.mktemp("m") / "model")


def _expected_top1(model, root):
    images = scan_folder(root)
    correct = n = 0
    for path, label in zip(images.paths, images.labels, strict=True):
        try:
            x = eval_transform(load_rgb(path), data_config_of(model))[None]
        except OSError:
            continue
        correct += int(model(x).argmax(1).item() == label)
        n += 1
    return 100.0 * correct / n, n


@torch.no_grad()
def test_top1_matches_image_by_image_and_unreadable_is_counted(folder, model_dir):
    model = ssmtrim.load_model(model_dir)
    result = evaluate(model, folder, batch_size=5, workers=0)
    expected, n = _expected_top1(model, folder)
    assert result.num_images == n == 12 and result.unreadable == 1
    assert result.top1 == pytest.approx(expected)
    assert result.top5 == 100.0  # 3 classes
    assert result.agreement is None


@torch.no_grad()
def test_pruned_model_is_compared_with_its_own_dense_weights(folder, model_dir):
    model = apply_pruning(ssmtrim.load_model(model_dir), PruneConfig(layers=(2,), keep=(1.0,)))
    dense = dense_of(model)
    result = evaluate(model, folder, dense=dense, batch_size=4, workers=1)
    assert result.agreement == 100.0 and result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.dense_top1 == result.top1
    pruned = apply_pruning(ssmtrim.load_model(model_dir), PruneConfig(layers=(1,), keep=(0.25,), score="random"))
    result = evaluate(pruned, folder, dense=dense, batch_size=4, workers=0)
    assert result.kl > 0 and result.dense_top1 == pytest.approx(_expected_top1(dense, folder)[0])


def test_imagenet_wnid_files_use_the_standard_index(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    rng = np.random.default_rng(0)
    for w in (wnids[3], wnids[500], wnids[999]):
        _save(tmp_path / f"{w}_0001.JPEG", rng)
    images = label_images(scan_folder(tmp_path), 1000)
    assert sorted(images.labels) == [3, 500, 999]  # not 0, 1, 2: their ranks among the files present
    with pytest.raises(ssmtrim.errors.ConfigError, match="not 1000"):
        label_images(scan_folder(tmp_path), 10)


def test_labels_file(tmp_path, model_dir):
    rng = np.random.default_rng(0)
    for i in range(5):
        _save(tmp_path / f"img{i}.png", rng)
    (tmp_path / "labels.txt").write_text("# name label\n" + "".join(f"img{i}.png,{i % 3}\n" for i in range(5)))
    images = label_images(scan_folder(tmp_path), 3, tmp_path / "labels.txt")
    assert images.labels == [0, 1, 2, 0, 1] and images.labelled
    (tmp_path / "short.txt").write_text("img0.png 1\n")
    with pytest.raises(ssmtrim.errors.ConfigError, match="4 of the 5 images are not in the labels file"):
        label_images(scan_folder(tmp_path), 3, tmp_path / "short.txt")
    (tmp_path / "big.txt").write_text("".join(f"img{i}.png 7\n" for i in range(5)))
    with pytest.raises(ssmtrim.errors.ConfigError, match="outside the model's 3 classes"):
        label_images(scan_folder(tmp_path), 3, tmp_path / "big.txt")


def test_cli_json_and_bad_input(folder, model_dir, tmp_path):
    res = runner.invoke(app, ["eval", str(model_dir), "--data", str(folder), "--json", "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["num_images"] == 12 and out["unreadable"] == 1 and out["top1"] is not None
    other = ssmtrim.save_model(ssmtrim.create_model("vim_test", num_classes=5), tmp_path / "other")
    # a folder whose classes do not match the model's
    (tmp_path / "x" / "only").mkdir(parents=True)
    _save(tmp_path / "x" / "only" / "1.png", np.random.default_rng(0))
    cases = [
        (["--data", str(tmp_path / "x")], "has 1 class folders but the model predicts 3"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(folder), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--data", str(folder), "--dense", str(other)], "predicts 3 classes but the dense model 5"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["eval", str(model_dir), *args])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output, (args, res.output)


def test_cli_device_and_backend(folder, model_dir):
    from ssmtrim.ops.backend import requested_backend

    args = ["eval", str(model_dir), "--data", str(folder), "--json", "--workers", "0"]
    plain = json.loads(runner.invoke(app, args).output)
    res = runner.invoke(app, [*args, "--backend", "ref", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top1"] == plain["top1"]
    assert requested_backend() == "auto"  # the option lasts for the command only
    bad = runner.invoke(app, [*args, "--backend", "gpu"])
    assert bad.exit_code == 1 and "choose one of auto, ref, cpu, cuda" in bad.output
    bad = runner.invoke(app, [*args, "--backend", "cuda"])
    assert bad.exit_code == 1 and "needs CUDA tensors" in bad.output


@torch.no_grad()
def test_batches_tensors_and_folder_share_one_loop(model_dir):
    """evaluate_batches (what training's per-epoch evaluation uses) counts exactly as evaluate_tensors does."""
    from ssmtrim.evaluate import evaluate_batches, evaluate_tensors

    model = ssmtrim.load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 3, 32, 32, generator=g), torch.randint(0, 3, (23,), generator=g)
    whole = evaluate_tensors(model, x, y, batch_size=5, device="cpu")
    seen = []
    batched = evaluate_batches(model, ((x[i:i + 7], y[i:i + 7]) for i in range(0, 23, 7)), total=23, device="cpu",
                               progress=lambda stage, done, total: seen.append((done, total)))
    assert (batched.top1, batched.top5, batched.num_images) == (whole.top1, whole.top5, whole.num_images)
    assert seen[-1] == (23, 23) and batched.agreement is None
    logits = model(x)
    assert whole.top1 == 100.0 * int((logits.argmax(1) == y).sum()) / 23


def test_a_file_size_limit_below_a_batch_reads_in_process_instead_of_hanging(folder, model_dir, tmp_path):
    """DataLoader workers pass batches through shared-memory files, which ``ulimit -f`` caps; a worker that meets
    the limit loses its batch without a word and the loop would wait for ever. The images are read in this process
    instead, with a note."""
    import subprocess
    import sys

    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); "
            "from ssmtrim.cli.app import main; sys.argv = ['ssmtrim', 'eval', "
            f"{str(model_dir)!r}, '--data', {str(folder)!r}, '--workers', '1', '-q', '--json']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "file-size limit (ulimit -f)" in done.stderr, done.stderr
    result = json.loads(done.stdout)
    assert (result["num_images"], result["unreadable"]) == (12, 1), result


def test_a_stalled_or_dead_worker_is_one_sentence():
    from ssmtrim.data import _Loader
    from ssmtrim.errors import LoaderFailed

    class Failing:
        def __init__(self, text):
            self.text = text

        def __len__(self):
            return 1

        def __iter__(self):
            raise RuntimeError(self.text)
            yield  # noqa: unreachable - makes this a generator

    for text, words in (("DataLoader timed out after 600 seconds", "--workers 0"),
                        ("DataLoader worker (pid 7) is killed by signal: Killed.", "died")):
        with pytest.raises(LoaderFailed, match=words):
            list(_Loader(Failing(text)))
    with pytest.raises(RuntimeError, match="something else"):
        list(_Loader(Failing("something else")))
