"""Builds and loads the fused CPU selective scan (``csrc/selective_scan.c``) at first use.

Why plain C through ctypes rather than a torch C++ extension: it compiles in about a second with the system C
compiler (no torch headers, no ninja), and nothing is built at install time, so ``pip install`` never pulls a
CUDA-sized torch into a build environment. The shared object is cached per source, compiler flags and CPU, so a
cache shared between machines never hands a ``-march=native`` build to the wrong processor.
Where no compiler is found the fast path reports itself unavailable and ``auto`` falls back to the reference scan.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.c"
_FLAG_SETS = (
    # 512-bit vectors where the CPU has them: one vector is one block of 16 channels (gcc defaults to 256 bits);
    # -fno-plt: libm's vector expf (the backward's sigmoid) is reached through the GOT without a PLT jump;
    # -mno-recip: divisions rounded once (-ffast-math would take a reciprocal estimate, whose bits differ between
    # AVX-512 and AVX2), so that builds for either give the same bits
    ["-O3", "-ffast-math", "-march=native", "-mprefer-vector-width=512", "-mno-recip", "-fno-plt", "-fopenmp"],
    ["-O3", "-ffast-math", "-march=native", "-fopenmp"],
    ["-O3", "-ffast-math", "-fopenmp"],
    ["-O3", "-ffast-math"],
)


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    detail: str  # path of the loaded library and how it takes the exp, or why it is unavailable


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: KernelStatus | None = None


def cache_dir() -> Path:
    root = os.environ.get("SSMTRIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ssmtrim"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(target: Path) -> bool:
    """A cached library is used only if its recorded digest (written after it was complete) matches: a truncated or
    damaged file, which would crash the process when loaded (SIGBUS), is built again instead."""
    stamp = target.with_suffix(".sha256")
    try:
        return target.is_file() and stamp.read_text().strip() == _digest(target)
    except OSError:
        return False


def _clean_stale(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove what an interrupted build left in ssmtrim's kernel cache (temporary libraries, the compiler's own
    temporary files, which builds write there too), once it is old enough not to be a concurrent build's."""
    import time

    now = time.time()
    for path in folder.iterdir():
        if path.name.startswith(("tmp", "cc")) and not path.name.startswith("selective_scan_"):
            try:
                if now - path.stat().st_mtime > max_age_s:
                    path.unlink()
            except OSError:
                pass


def _build(cc: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS) -> tuple[Path | None, str]:
    """(the cached or newly built library of the first flag set that compiles, None and the errors if none does)."""
    source = _SOURCE.read_bytes()
    errors = []
    extra = os.environ.get("SSMTRIM_KERNEL_FLAGS", "").split()  # e.g. -mno-avx512f: build as for a CPU without it
    for flags in flag_sets:
        flags = [*flags, *extra]
        key = hashlib.sha256(source + " ".join([cc, *flags]).encode() + _cpu_signature().encode()).hexdigest()[:16]
        target = cache_dir() / f"selective_scan_{key}.so"
        if _cached(target):
            return target, ""
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target.parent)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-std=c99", str(_SOURCE), "-o", tmp, "-lm"]
        # the compiler's temporary files go to the cache too, so that a killed build leaves nothing in TMPDIR
        env = {**os.environ, "TMPDIR": str(target.parent)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except BaseException:
            os.unlink(tmp)
            raise
        if proc.returncode == 0:
            digest = _digest(Path(tmp))
            os.replace(tmp, target)  # atomic: a concurrent builder never sees half a library
            fd, stamp = tempfile.mkstemp(suffix=".sha256", dir=target.parent)
            with os.fdopen(fd, "w") as f:
                f.write(digest)
            os.replace(stamp, target.with_suffix(".sha256"))  # written last: the library is complete
            return target, ""
        os.unlink(tmp)
        errors.append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return None, "; ".join(errors)


def _declare(lib: ctypes.CDLL) -> None:
    p, i, lng = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.ssm_scan_fwd.argtypes = [p] * 10 + [i, p, p] + [lng] * 4 + [i]
    lib.ssm_scan_fwd.restype = None
    lib.ssm_scan_bwd.argtypes = [p] * 10 + [i] + [p] * 11 + [lng] * 4 + [i]
    lib.ssm_conv_silu.argtypes = [p, lng, lng, lng, p, p, p, i, p] + [lng] * 4 + [i]
    lib.ssm_conv_silu.restype = None
    lib.ssm_conv_silu_bwd.argtypes = [p, p, p, p, i, p, p, p, p] + [lng] * 4 + [i]
    lib.ssm_conv_silu_bwd.restype = None
    lib.ssm_scan_bwd.restype = None
    lib.ssm_max_state.restype = ctypes.c_int
    lib.ssm_avx512.restype = ctypes.c_int
    lib.ssm_conv_silu_tok.argtypes = [p, lng, lng, p, p, p, i, i, p] + [lng] * 4 + [i]
    lib.ssm_conv_silu_tok.restype = None
    lib.ssm_scan_bi_tok.argtypes = [p, p, p, lng, lng, i, p] + [lng] * 4 + [i]
    lib.ssm_scan_bi_tok.restype = None
    lib.ssm_conv_pair_tok.argtypes = [p, lng, lng] + [p] * 7 + [lng] * 4 + [i]
    lib.ssm_conv_pair_tok.restype = None
    lib.ssm_mixer_scan_tok.argtypes = [p, p, p, lng, i, p, lng, lng, p] + [lng] * 4 + [i]
    lib.ssm_mixer_scan_tok.restype = None
    lib.ssm_merge_choose.argtypes = [p, p, p, lng, lng, lng, lng, lng, lng, lng, p, p, p, i, i]
    lib.ssm_merge_choose.restype = None
    lib.ssm_merge_keep.argtypes = [lng, lng, lng, lng, p, p, p, p, i, p, p, p, p, p, p, i, i]
    lib.ssm_merge_keep.restype = None
    lib.ssm_merge_step.argtypes = [p, p, p, lng, lng, p, lng, lng, lng, p, lng, lng, lng, lng, i, i, p, p, p, p, i,
                                   p, p, p, p, p, p, p, i]
    lib.ssm_merge_step.restype = None
    lib.ssm_group_mean.argtypes = [p, lng, lng, lng, lng, lng, lng, p, p, p, i]
    lib.ssm_group_mean.restype = None
    lib.ssm_group_add.argtypes = [p, lng, lng, p, lng, lng, p, p, p, lng, lng, lng, i]
    lib.ssm_group_add.restype = None
    lib.ssm_regroup.argtypes = [p, lng, lng, lng, lng, lng, lng, lng, p, p, p, i, p, p, i]
    lib.ssm_regroup.restype = None
    lib.ssm_bipartite_choose.argtypes = [p, lng, lng, p, lng, lng, lng, lng, p, p, p, i]
    lib.ssm_bipartite_choose.restype = None


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first call; None where it cannot be built (see :func:`status`)."""
    global _lib, _status
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("SSMTRIM_NO_COMPILE") == "1":
            _status = KernelStatus(False, "disabled by SSMTRIM_NO_COMPILE=1")
            return None
        cc = _compiler()
        if cc is None:
            _status = KernelStatus(False, "no C compiler found (install gcc, or set CC)")
            return None
        try:
            path, err = _build(cc)
            if path is None:
                _status = KernelStatus(False, f"compiling the CPU scan failed: {err}")
                return None
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except OSError as exc:
            _status = KernelStatus(False, f"loading the CPU scan failed: {exc}")
            return None
        exp = "exp by AVX-512 intrinsics" if lib.ssm_avx512() else "exp by vectorised C"
        _lib, _status = lib, KernelStatus(True, f"{path} ({exp})")
        return _lib


def status() -> KernelStatus:
    load()
    assert _status is not None
    return _status
