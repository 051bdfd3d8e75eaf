"""ONNX export: every family, reduced with its recommended plan in count mode, runs in onnxruntime with PyTorch's
logits (1e-4 of the largest) and top-1; stable sorts keep their ties; what cannot export is refused in one sentence;
the output file follows ssmtrim's rules (its own files only, replaced with --force, written only when checked)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError, ExportError
from ssmtrim.models.sizes import size_hw
from ssmtrim.pruning import PruneConfig, apply_pruning

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from ssmtrim.export import RTOL, OnnxModel, export_onnx  # noqa: E402  (after the skips: needs onnx at use)

from .conftest import randomize  # noqa: E402

runner = CliRunner()
FAMILIES = ("vim_test", "mambar_test", "plainmamba_test", "vmamba_test", "mambavision_test")


def _reduced(name: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model(name))
    return apply_pruning(model, PruneConfig.recommended(model, keep=(0.7,), compensate="none", **fields))


def _images(model, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size_hw(model.config.img_size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family's reduced model and its file, exported once for the tests of this module."""
    done = {}

    def get(name):
        if name not in done:
            model = _reduced(name)
            x = _images(model, 6)
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            done[name] = model, x, path, export_onnx(model, path, batch_size=2, check_images=x)
        return done[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_reduced_runs_in_onnxruntime(name, exports, tmp_path):
    model, x, path, summary = exports(name)
    (tmp_path / "m.onnx").write_bytes(path.read_bytes())
    assert summary["check"]["passed"] and summary["check"]["top1_same"] == 6
    runner_ = OnnxModel(tmp_path / "m.onnx")
    assert runner_.batch_size == 2
    with torch.no_grad():
        got, want = runner_(x[:5]), model(x[:5])  # 5 images: two calls of 2 and one padded
    assert float((got - want).abs().max()) <= RTOL * float(want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    meta = runner_.metadata
    assert meta["ssmtrim_version"] == ssmtrim.__version__
    assert json.loads(meta["plan"])["layers"] == list(model.prune_config.layers)
    assert json.loads(meta["check"])["images"] == 6


def test_dense_exports_too(tmp_path):
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_test"))
    x = _images(model, 3)
    export_onnx(model, tmp_path / "d.onnx", check_images=x)
    with torch.no_grad():
        got, want = OnnxModel(tmp_path / "d.onnx")(x), model(x)
    assert float((got - want).abs().max()) <= RTOL * float(want.abs().max())
    assert OnnxModel(tmp_path / "d.onnx").metadata["plan"] == ""


def test_the_file_does_not_grow_with_the_batch(tmp_path, monkeypatch):
    """The scan's channels run as one block in the file: the CPU's cache-sized blocks, whose number grows with the
    batch, would each be a copy of the scan's nodes (a 257-token Vim at batch 50: 96 copies per scan, 0.7 GB)."""
    import ssmtrim.ops.backends.portable as portable

    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_test"))
    x = _images(model, 4)
    sizes = {}
    for batch, block in ((1, portable.CPU_BLOCK_ELEMENTS), (4, portable.CPU_BLOCK_ELEMENTS), (4, 1)):
        monkeypatch.setattr(portable, "CPU_BLOCK_ELEMENTS", block)  # 1: every channel its own block on CPU
        path = tmp_path / f"b{batch}_{block}.onnx"
        export_onnx(model, path, batch_size=batch, check_images=x)
        sizes[batch, block] = len(onnx.load(str(path)).graph.node)
    assert len(set(sizes.values())) == 1, sizes


def test_a_dynamic_batch_runs_any_number_of_images(tmp_path):
    """MambaVision reduced: windows, attention over merged tokens and a stage change, all with a symbolic batch (the
    other families were run the same way by hand; each export here costs half a minute)."""
    model = _reduced("mambavision_test")
    x = _images(model, 10)
    summary = export_onnx(model, tmp_path / "d.onnx", dynamic_batch=True, check_images=x)
    assert summary["batch_size"] == "dynamic" and summary["check"]["passed"]
    runner_ = OnnxModel(tmp_path / "d.onnx")
    assert runner_.batch_size is None and json.loads(runner_.metadata["input_shape"])[0] == "batch"
    for n in (1, 3, 10):  # one call each, of n images
        with torch.no_grad():
            got, want = runner_.run(x[:n].numpy()), model(x[:n])
        assert got.shape == tuple(want.shape)
        assert float((torch.from_numpy(got) - want).abs().max()) <= RTOL * float(want.abs().max())


def test_a_stable_sort_keeps_its_ties_in_onnx(tmp_path):
    class Sorts(torch.nn.Module):
        def forward(self, x):
            return (torch.sort(x, dim=1, stable=True).indices, torch.sort(x, dim=-1, descending=True,
                                                                         stable=True).indices)

    from ssmtrim.export import onnx_translations

    x = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    torch.onnx.export(Sorts().eval(), (x,), tmp_path / "s.onnx", dynamo=True,
                      custom_translation_table=onnx_translations(), verbose=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "s.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g, want in zip(got, Sorts()(x), strict=True):
        assert g.tolist() == want.tolist()


def test_a_threshold_plan_is_refused():
    model = _reduced("vim_test", mode="threshold", thresholds=(0.0, 0.0, 0.0))
    with pytest.raises(ConfigError, match="threshold mode.*--mode count"):
        export_onnx(model, "unused.onnx")


def test_the_output_file_rules(tmp_path):
    model = _reduced("vim_test")
    with pytest.raises(ConfigError, match="does not end in .onnx"):
        export_onnx(model, tmp_path / "m.txt")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        export_onnx(model, tmp_path / "dir.onnx")
    other = tmp_path / "other.onnx"
    other.write_bytes(b"somebody else's file")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        export_onnx(model, other)
    with pytest.raises(ConfigError, match="not an ONNX file ssmtrim wrote"):
        export_onnx(model, other, force=True)
    assert other.read_bytes() == b"somebody else's file"


def test_a_failed_check_writes_nothing_and_keeps_the_old_file(exports, tmp_path, monkeypatch):
    model, x, path, _ = exports("vim_test")
    out = tmp_path / "m.onnx"
    out.write_bytes(path.read_bytes())  # a file ssmtrim wrote
    before = out.read_bytes()
    monkeypatch.setattr("ssmtrim.export.RTOL", -1.0)  # no difference can pass
    with pytest.raises(ExportError, match="does not match PyTorch.*nothing was written"):
        export_onnx(model, out, check_images=x, force=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def test_the_command_exports_a_saved_reduced_folder(tmp_path):
    model = _reduced("vim_test")
    folder = ssmtrim.save_model(model, tmp_path / "reduced")
    out = tmp_path / "r.onnx"
    result = runner.invoke(app, ["export", str(folder), "-o", str(out), "--check-images", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["check"]["images"] == 8 and summary["check"]["passed"]
    again = runner.invoke(app, ["export", str(folder), "-o", str(out), "--check-images", "0"])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    bad = runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "x.onnx"), "--batch-size", "0"])
    assert bad.exit_code == 1 and "--batch-size must be at least 1" in bad.output


def test_speed_in_onnxruntime_for_the_report():
    from ssmtrim.report import measure_speed_onnx

    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_test", depth=2))
    apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
    speed = measure_speed_onnx(model, (3, 32, 32), batch_size=3, warmup=1, iters=1, repeats=1)
    assert speed.images_per_s > 0 and speed.latency_ms > 0 and speed.batch_size == 3
    assert speed.device == "cpu (onnxruntime)"


def test_the_report_refuses_what_onnxruntime_cannot_time(tmp_path):
    from ssmtrim.report import build_report

    dense = ssmtrim.create_model("vim_test")
    thresholded = _reduced("vim_test", mode="threshold", thresholds=(0.0, 0.0, 0.0))
    with pytest.raises(ConfigError, match="threshold mode"):
        build_report(dense, tmp_path, [("t", thresholded)], runtime="onnxruntime")
    with pytest.raises(ConfigError, match="--runtime must be one of"):
        build_report(dense, tmp_path, [("t", thresholded)], runtime="tvm")
