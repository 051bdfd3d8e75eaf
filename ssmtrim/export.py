"""ONNX export of dense and reduced models, checked in onnxruntime before the file is written.

The scan runs as the ``portable`` backend computes it under export (in plain tensor ops, unrolled: chunks of about
sqrt(L) tokens stepped through token by token, all chunks at once, then their end states carried chunk by chunk), so the
graph holds standard ONNX operators only, with no loop and no custom op. A reduced model exports when its plan fixes
every shape: count mode (a fixed number of tokens per step); a threshold-mode plan keeps a number of tokens that depends
on the image, which the file cannot hold, and is refused in one sentence. The reduction steps' sorts are stable in
PyTorch (ties go to the earlier token); ONNX's ``TopK`` breaks ties the same way by its specification, and is what a
stable sort becomes here (:func:`onnx_translations`). Every token count is fixed in the file by the plan; the batch size
is too (``batch_size``), or symbolic with ``dynamic_batch`` (any number of images per call; the check then runs one
image and batches of eight).

Every export is checked before it is kept: onnxruntime runs the written graph on real images (by default a seeded
subset of the bundled held-out CIFAR-10 images, transformed as the model's preprocessing says) beside PyTorch, and
the file is written only if the logits agree to ``RTOL`` of the largest logit and the top-1 classes are the same
(:class:`ExportCheck`). A reduced model's token choices (a ranking, a best match) are discontinuous: where two
candidates tie to within rounding (identical patches of a flat background give exact ties), onnxruntime's rounding
may break the tie the other way and the logits move by more than ``RTOL`` on that image, the graph being right. An
image over the limit is therefore probed in PyTorch alone: if its own logits move by more than ``RTOL`` under input
noise of ``NEAR_TIE_NOISE`` of the image's largest value (far below a pixel level, and too small to move a dense
model's logits by a tenth of the limit), it is counted as near a tie and not held to the limit; its top-1 still
must agree. onnxruntime's own last bits may also differ from one session of a file to the next, and a choice that close
follows them: an image still over the limit is run again in up to ``RUNTIME_SESSIONS`` fresh sessions, and one that a
fresh session computes within the limit is not held to it either (an image every session gets wrong stays wrong). At
most ``MAX_NEAR_TIES`` of the images (or one) may be excused, the two kinds together. The file carries its provenance
in the ONNX metadata (``ssmtrim_version``, the source, the plan, the preprocessing, the check's numbers): an existing
file is replaced only with ``force`` and only when it carries that mark, and it is written atomically (a temporary
file beside it, renamed when complete).

onnx, onnxscript and onnxruntime are the optional ``export`` extra (``pip install 'ssmtrim[export]'``), imported
only here and only when an export or an onnxruntime session is asked for.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError, ExportError, MissingDependencyError
from ssmtrim.outputs import lock_output, output_error

__all__ = ["ExportCheck", "OnnxModel", "RTOL", "check_exportable", "export_onnx", "onnx_translations",
           "require_export_packages"]

OPSET = 18
RTOL = 1e-4  # logits in onnxruntime within this fraction of the largest PyTorch logit
NEAR_TIE_NOISE = 1e-6  # input noise, a fraction of the image's largest |value|, that probes a near-tie
NEAR_TIE_DRAWS = 32  # noise draws per probed image
MAX_NEAR_TIES = 0.05  # the largest fraction of the checked images (or one image) that may be excused as near a tie
RUNTIME_SESSIONS = 2  # fresh onnxruntime sessions an image over the limit (and not near a tie) is run again in
MARK = "ssmtrim_version"  # the metadata key that says ssmtrim wrote an ONNX file
DEFAULT_CHECK_IMAGES = 200
MAX_DYNAMIC_BATCH = 4096  # the largest batch a file exported with dynamic_batch declares


def require_export_packages() -> None:
    """Refuse in one sentence when the optional export packages are missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"ONNX export needs {', '.join(missing)}; install them with "
                                     "pip install 'ssmtrim[export]' (onnx, onnxscript, onnxruntime).")


def check_exportable(model: nn.Module) -> None:
    """Refuse, in one sentence, a model whose graph cannot have fixed shapes (a threshold-mode plan)."""
    from ssmtrim.pruning import is_pruned

    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_dict"):
        raise ConfigError(f"export takes a model made by ssmtrim (load_model, create_model), got "
                          f"{type(model).__name__}.")
    if is_pruned(model) and model.prune_config.mode != "count":
        raise ConfigError("this model's plan keeps a number of tokens that depends on each image (threshold mode), "
                          "which an ONNX graph's fixed shapes cannot hold; prune it again with --mode count.")


def onnx_translations() -> dict:
    """ONNX translations of the ATen ops the exporter has none for: a stable sort as ``TopK`` (which breaks ties by
    the lower index, as the stable sort does), ``searchsorted`` as a count of the smaller entries."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
        axis = dim % len(self.shape)
        k = op.Shape(self, start=axis, end=axis + 1)
        return op.TopK(self, k, axis=axis, largest=1 if descending else 0, sorted=1)

    def searchsorted(sorted_sequence, self, *, out_int32: bool = False, right: bool = False, side=None,
                     sorter=None):
        # index of the first entry >= the value (right: > the value) = how many entries are smaller (or not greater)
        seq, values = op.Unsqueeze(sorted_sequence, [-2]), op.Unsqueeze(self, [-1])
        before = op.LessOrEqual(seq, values) if (right or side == "right") else op.Less(seq, values)
        count = op.ReduceSum(op.Cast(before, to=ir.DataType.INT64), [-1], keepdims=0)
        return op.Cast(count, to=ir.DataType.INT32) if out_int32 else count

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.searchsorted.Tensor: searchsorted}


@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime against PyTorch on the same images."""

    images: int  # images compared
    max_rel_error: float  # largest |onnxruntime - PyTorch| logit over the largest |PyTorch| logit, per batch
    top1_same: int  # images whose top-1 class is the same in both
    passed: bool
    near_ties: int  # images over the limit whose PyTorch logits themselves move past it under NEAR_TIE_NOISE
    max_rel_error_rest: float  # the largest difference on the other images
    runtime_varied: int  # images over the limit, not near a tie, that a fresh onnxruntime session got within it

    def sentence(self) -> str:
        text = (f"onnxruntime against PyTorch on {self.images} images: largest logit difference "
                f"{self.max_rel_error_rest:.1e} of the largest logit (limit {RTOL:g})")
        if self.near_ties:
            text += (f" on the {self.images - self.near_ties} images not near a tie, {self.max_rel_error:.1e} on "
                     f"{self.near_ties} near a tie in a token choice (PyTorch's own logits move past the limit under "
                     f"input noise of {NEAR_TIE_NOISE:g}; at most {MAX_NEAR_TIES:.0%} of the images, or one, may be)")
        if self.runtime_varied:
            text += (f"; {self.runtime_varied} over the limit in one onnxruntime session and within it in a fresh one "
                     "(onnxruntime's results vary between sessions, and a token choice followed)")
        return text + f", same top-1 on {self.top1_same} of {self.images}"


class OnnxModel:
    """An onnxruntime session over an exported file, called like the model: ``OnnxModel(path)(x)`` -> logits.
    Inputs of another batch size than the file's run in pieces of its batch size (the last one padded)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        require_export_packages()
        import onnxruntime as ort

        self.path, self.threads = os.fspath(path), threads

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: constant folding notes about CastLike are noise
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {os.fspath(path)!r} ({_first_line(exc)}); export the model "
                              "again with ssmtrim export.") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.batch_size = first.shape[0] if isinstance(first.shape[0], int) else None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def fresh(self) -> OnnxModel:
        """A new session of the same file (onnxruntime's results may differ between sessions in the last bits)."""
        return OnnxModel(self.path, self.threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        """One call of the session on exactly the file's input shape."""
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, x: Tensor) -> Tensor:
        arr = x.detach().float().cpu().numpy()
        b = self.batch_size or arr.shape[0]
        outs = []
        for lo in range(0, arr.shape[0], b):
            piece = arr[lo : lo + b]
            n = piece.shape[0]
            if n < b:  # pad the last piece with copies of its last image
                piece = np.concatenate([piece, np.repeat(piece[-1:], b - n, axis=0)])
            outs.append(self.run(np.ascontiguousarray(piece))[:n])
        return torch.from_numpy(np.concatenate(outs))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _input_shape(model: nn.Module, batch_size: int) -> tuple[int, ...]:
    from ssmtrim.models.sizes import size_hw

    h, w = size_hw(model.config.img_size)
    return (batch_size, model.config.in_chans, h, w)


def _export_graph(model: nn.Module, example: Tensor, optimize: bool, dynamic_batch: bool = False):
    """torch.export of the forward under the portable scan, translated to ONNX (an ``ONNXProgram``); with
    ``dynamic_batch`` the batch dimension is symbolic (the example must then hold at least two images: torch.export
    specialises a dimension of size 1)."""
    from ssmtrim.ops import use_backend

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # the exporter warns about torchvision's ops when torchvision is absent
    try:
        with torch.no_grad(), use_backend("portable"), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
            return torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                     output_names=["logits"], custom_translation_table=onnx_translations(),
                                     dynamic_shapes=dynamic, optimize=optimize, verbose=False)
    except ExportError:
        raise
    except Exception as exc:  # torch.export and the ONNX translation raise many types
        raise ExportError(f"this model could not be exported to ONNX ({_first_line(exc)}); please report it with "
                          "the model and plan.") from None
    finally:
        log.setLevel(level)


def _metadata(model: nn.Module, check: ExportCheck | None, batch_size: int | str) -> dict[str, str]:
    from ssmtrim import __version__
    from ssmtrim.models.loading import class_names_of, data_config_of
    from ssmtrim.pruning import is_pruned

    source = getattr(model, "source", None)
    meta = {
        MARK: __version__,
        "family": str(model.config.family),
        "arch": json.dumps(model.config.to_dict()),
        "input_shape": json.dumps(list(_input_shape(model, batch_size))),
        "preprocessing": json.dumps(asdict(data_config_of(model))),
        "source": str(getattr(source, "source", "") or ""),
        "plan": json.dumps(model.prune_config.to_dict()) if is_pruned(model) else "",
    }
    names = class_names_of(model)
    if names:
        meta["class_names"] = json.dumps(list(names))
    if check is not None:
        meta["check"] = json.dumps(asdict(check))
    return meta


def check_onnx(model: nn.Module, runner: OnnxModel, images: Tensor, progress=None) -> ExportCheck:
    """Compare onnxruntime's logits with PyTorch's (the model under its own backend) on ``images``: in calls of the
    file's batch size, or, for a file with a dynamic batch, one image first and then eight at a time (both sizes
    run)."""
    n = images.shape[0]
    if runner.batch_size is not None:
        starts = list(range(0, n, runner.batch_size)) + [n]
    else:
        starts = [0, *range(1, n, 8), n] if n > 1 else [0, n]
    errors, same, over, refs = [], 0, [], {}
    model.eval()
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        x = images[lo:hi]
        with torch.no_grad():
            ref = model(x).float()
        got = runner(x)
        scale = float(ref.abs().max().clamp_min(1e-12))
        per_image = ((got - ref).abs().flatten(1).amax(1) / scale).tolist()
        errors += per_image
        over += [(lo + j, scale) for j, e in enumerate(per_image) if e > RTOL]
        refs.update({lo + j: ref[j] for j, e in enumerate(per_image) if e > RTOL})
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        if progress:
            progress("checking in onnxruntime", hi, n)
    near = {i for i, scale in over if near_tie(model, images[i:i + 1], scale)}
    varied = _within_in_a_fresh_session(runner, images, [(i, sc, refs[i]) for i, sc in over if i not in near])
    excused = near | varied
    rest = max((e for i, e in enumerate(errors) if i not in excused), default=0.0)
    passed = rest <= RTOL and same == n and len(excused) <= max(1, int(MAX_NEAR_TIES * n))
    return ExportCheck(images=n, max_rel_error=max(errors, default=0.0), top1_same=same, passed=passed,
                       near_ties=len(near), max_rel_error_rest=rest, runtime_varied=len(varied))


def _within_in_a_fresh_session(runner: OnnxModel, images: Tensor, over: list[tuple[int, float, Tensor]]) -> set[int]:
    """Of the images ``over`` the limit (index, scale, PyTorch's logits from the check), those that one of
    ``RUNTIME_SESSIONS`` fresh sessions of the file computes within it: onnxruntime's last bits may differ from one
    session to the next (measured on a reduced 256-token Vim: a file's two sessions 2.7e-7 apart on the same images),
    and where a token choice is that close the logits follow it. An image that every session gets wrong stays wrong."""
    left = {i: (scale, ref) for i, scale, ref in over}
    within: set[int] = set()
    for _ in range(RUNTIME_SESSIONS if left else 0):
        index = sorted(left)
        got = runner.fresh()(images[index])
        for j, i in enumerate(index):
            scale, ref = left[i]
            if float((got[j] - ref).abs().max()) <= RTOL * scale:
                within.add(i)
                del left[i]
        if not left:
            break
    return within


def near_tie(model: nn.Module, image: Tensor, scale: float) -> bool:
    """Whether PyTorch's own logits for ``image`` (1 C H W) move by more than ``RTOL`` x ``scale`` under input noise
    of ``NEAR_TIE_NOISE`` of its largest value (``NEAR_TIE_DRAWS`` seeded draws, run as one batch): a token choice
    there is a tie to within rounding."""
    generator = torch.Generator().manual_seed(0)
    amplitude = NEAR_TIE_NOISE * float(image.abs().max())
    noise = torch.randn((NEAR_TIE_DRAWS, *image.shape[1:]), generator=generator, dtype=image.dtype)
    with torch.no_grad():
        ref = model(image).float()
        moved = model(image + amplitude * noise.to(image.device)).float()
    return float((moved - ref).abs().max()) > RTOL * scale


def check_output_file(path: str | os.PathLike, force: bool, inputs: dict[str, Any] | None = None) -> Path:
    """Before any work: ``path`` names an .onnx file that may be written: not a folder or a link, clear of the
    inputs, not being written by another run, and, if it exists, an ONNX file ssmtrim wrote and ``force`` given."""
    from ssmtrim.outputs import _check_clear_of, _nearest_existing

    text = os.fspath(path)
    if not text.strip():
        raise ConfigError("the output path is empty; give a file name ending in .onnx with -o.")
    out = Path(text).expanduser()
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"output {text!r} does not end in .onnx; give -o a file name such as model.onnx.")
    _check_clear_of(out, text, inputs or {}, what="output file")
    if out.is_symlink():
        raise ConfigError(f"output {text!r} is a symbolic link; give -o the file it points to, or another path.")
    if out.is_dir():
        raise ConfigError(f"output {text!r} is a folder; give -o a file name ending in .onnx.")
    lock_output(out, text)
    if out.exists():
        if not force:
            raise ConfigError(f"output file {text!r} already exists; pass --force to replace it or choose another -o.")
        if not _written_by_ssmtrim(out):
            raise ConfigError(f"output file {text!r} is not an ONNX file ssmtrim wrote, and ssmtrim replaces only "
                              "its own files; choose another -o.")
    place = _nearest_existing(out.parent)
    if not place.is_dir():
        raise ConfigError(f"cannot create {text!r}: {str(place)!r} is not a folder; choose another -o.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ssmtrim-probe-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(text, exc, "the output file") from None
    return out


def _written_by_ssmtrim(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # not ONNX at all, or unreadable: not ours
        return False
    return any(p.key == MARK for p in model.metadata_props)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    check_images: Tensor | None = None,
    force: bool = False,
    optimize: bool = False,
    inputs: dict[str, Any] | None = None,
    progress=None,
) -> dict[str, Any]:
    """Export ``model`` (dense, or reduced with a count-mode plan) to the ONNX file ``path`` for inputs of
    ``batch_size`` images (``dynamic_batch``: any number of images, 1 to 4096, per call), check it in onnxruntime
    on ``check_images`` (N 3 H W, already transformed; None: no check), and write it only if the check passes.
    ``optimize`` runs the exporter's graph optimiser (a smaller file; onnxruntime optimises the graph when it loads
    it either way, and the optimiser takes minutes on a deep model). Returns a summary (path, seconds, size, the
    check)."""
    require_export_packages()
    check_exportable(model)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    from ssmtrim.checkpoint import source_inputs

    out = check_output_file(path, force, {**source_inputs(model), **(inputs or {})})
    model.eval()
    if progress:
        progress("exporting to ONNX", 0, 1)
    start = time.perf_counter()
    example = torch.zeros(_input_shape(model, max(batch_size, 2) if dynamic_batch else batch_size))
    program = _export_graph(model, example, optimize, dynamic_batch)
    exported = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shown = "batch" if dynamic_batch else batch_size
        program.model.metadata_props.update(_metadata(model, None, shown))
        program.save(tmp_name)
        check = None
        if check_images is not None and check_images.shape[0]:
            check = check_onnx(model, OnnxModel(tmp), check_images, progress)
            if not check.passed:
                raise ExportError(f"the exported graph does not match PyTorch ({check.sentence()}); nothing was "
                                  "written; please report it with the model and plan.")
            program.model.metadata_props.update(_metadata(model, check, shown))
            program.save(tmp_name)
        os.replace(tmp, out)
    except OSError as exc:
        raise output_error(os.fspath(path), exc, "the output file") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return {"path": str(out), "batch_size": "dynamic" if dynamic_batch else batch_size,
            "export_seconds": round(exported, 1), "bytes": out.stat().st_size, "opset": OPSET,
            "check": None if check is None else asdict(check)}
