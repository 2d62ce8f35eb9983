"""MaxViT's CPU kernels (cpu_kernels.cc), built once per machine and Paddle version with paddle.utils.cpp_extension:
depthwise convolution, GELU, LayerNorm, the attention's scale + bias + softmax, and the linear layers of static
training graphs, each with its backward, where Paddle's own CPU kernels are slow (docs/performance.md).
common/fast_layers.py hands them to a model's layers (use_fast_layers). Without a C++ compiler, or with
MAXVIT_CPU_KERNELS=0 in the environment, load() returns False and the layers run Paddle's own ops, with the same
results to float rounding."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import paddle

from common import native_output_filtered
from common.cpu_info import cpu_field

SOURCE = Path(__file__).with_name('cpu_kernels.cc')
NAME = 'maxvit_cpu_kernels'
BUILD_NOISE = ('No ccache found', 'warnings.warn(warning_message)', 'using custom operator only')
UNUSED_DAYS = 30  # a build no process has loaded for this long is deleted when another one is built
_loaded: Optional[bool] = None  # this process: None = not tried yet, else whether the ops are registered


def build_dir() -> Path:
    """Where the compiled kernels live: one directory per source (the .cc and this file, which holds the build
    flags), Paddle build and CPU (-march=native), under $XDG_CACHE_HOME or ~/.cache."""
    key = hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes() + paddle.version.full_version.encode()
                         + paddle.version.commit.encode() + cpu_field('flags').encode()).hexdigest()[:16]
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return cache / 'maxvit_paddle' / f'{NAME}-{key}'


def _link_flags() -> list:
    """The kernels' OpenMP threads come from the runtime of Paddle's MKL (libiomp5): with GCC's own (libgomp) the
    two thread pools took turns on the cores, and a kernel waited for a 4 ms scheduler tick while MKL's threads
    spun."""
    libs = Path(paddle.__file__).parent / 'libs'
    if (libs / 'libiomp5.so').is_file():
        return [f'-L{libs}', '-l:libiomp5.so', f'-Wl,-rpath,{libs}']
    return ['-fopenmp']


def _build(directory: Path) -> None:
    """Compile cpu_kernels.cc (about 15 s) into a fresh directory, then rename it to ``directory``: a build that
    is interrupted or fails leaves no library behind that a later run would take for a finished one."""
    from paddle.utils.cpp_extension import load
    staging = directory.with_name(f'{directory.name}.building-{os.getpid()}')
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f'maxvit: building the CPU kernels once for this machine and Paddle {paddle.__version__} '
          f'(about 15 s) into {directory}', file=sys.stderr, flush=True)
    try:
        # the build's chatter (Paddle's compiler subprocess: a ccache hint, 'using custom operator only' twice) is
        # dropped; anything else it prints, a compiler error included, still shows
        with contextlib.redirect_stdout(io.StringIO()), native_output_filtered(BUILD_NOISE):
            load(name=NAME, sources=[str(SOURCE)], extra_cxx_cflags=['-O3', '-march=native', '-fopenmp'],
                 extra_ldflags=_link_flags(), build_directory=str(staging), verbose=False)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # the build is done; a cache we cannot tidy is no reason to fail it
        prune(directory)


def prune(keep: Path, unused_days: float = UNUSED_DAYS) -> list:
    """Delete the other builds beside ``keep`` (other sources, Paddle versions or CPUs) that no process has loaded
    for ``unused_days`` (load() touches a build each time it loads it), with their lock files, and staging
    directories that killed builds left behind. About 4 MB each; they piled up with every upgrade. A build that a
    process is loading right now (it holds the build's lock) is left alone. Returns what it deleted."""
    import fcntl  # (Linux only: called by load(), after a build)
    deleted, cutoff = [], time.time() - unused_days * 86400
    for path in keep.parent.glob(f'{NAME}-*'):
        if path == keep or path.suffix == '.lock' or not path.exists():
            continue
        with open(path.with_name(path.name + '.lock'), 'w') as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if path.stat().st_mtime > cutoff:
                    continue
            except OSError:  # being loaded or built by another process, or already deleted by one
                continue
            shutil.rmtree(path, ignore_errors=True)
            Path(lock.name).unlink(missing_ok=True)
        deleted.append(path)
    return deleted


def load() -> bool:
    """Register the kernels' ops in this process, building them first if needed. False (and a warning) where they
    cannot be built or loaded: the model then uses Paddle's own ops."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get('MAXVIT_CPU_KERNELS', '1') == '0' or not sys.platform.startswith('linux'):
        return False
    import fcntl  # (Linux only, as paddle.utils.cpp_extension's custom operators)
    try:
        with warnings.catch_warnings():  # cpp_extension warns on import when ccache is missing
            warnings.simplefilter('ignore')
            from paddle.utils.cpp_extension import load_op_meta_info_and_register_op
            directory = build_dir()
            library = directory / NAME / f'{NAME}.so'
            directory.parent.mkdir(parents=True, exist_ok=True)
            with open(directory.parent / f'{directory.name}.lock', 'w') as lock:  # one build for all processes
                fcntl.flock(lock, fcntl.LOCK_EX)
                if library.is_file():
                    load_op_meta_info_and_register_op(str(library))
                    with contextlib.suppress(OSError):  # the last use, for prune() (a read-only cache: no matter)
                        os.utime(directory)
                else:
                    _build(directory)  # cpp_extension.load registers the ops too
    except Exception as e:  # no compiler, a read-only home, a failed compile: run on Paddle's own ops
        warnings.warn(f'maxvit: the CPU kernels could not be built or loaded ({type(e).__name__}: '
                      f'{str(e).strip()[-500:]}); running on Paddle\'s own (slower) CPU ops. MAXVIT_CPU_KERNELS=0 '
                      f'skips this attempt.')
        return False
    _loaded = True
    return True


def _run(op: str, tensors: list, *attrs):
    """Run custom op ``op`` on ``tensors`` and ``attrs``; its first output. (Paddle hands a custom op a dense copy
    of a strided view, which the kernels need: tested.) Under no_grad (and in a PyLayer's forward) the inputs are
    detached: Paddle 3.x records a backward for custom ops even there, which would keep their inputs alive
    (inference memory, and the activation _LinearFn recomputes instead of keeping)."""
    if paddle.in_dynamic_mode() and not paddle.is_grad_enabled():  # (static graphs plan their backward)
        tensors = [t.detach() for t in tensors]
    return paddle._C_ops._run_custom_op(op, *tensors, *attrs)[0]


class KernelOps:
    """The ops as common/fast_layers.py calls them: float32 CPU tensors, in eager mode or a static training graph; autograd runs
    back through each."""

    @staticmethod
    def depthwise_conv(x, weight, bias, stride: int, pad_top: int, pad_left: int, out_h: int, out_w: int):
        """(B, C, H, W) -> (B, C, out_h, out_w); weight (C, 1, k, k), bias (C,)."""
        return _run('maxvit_depthwise_conv', [x, weight, bias], stride, pad_top, pad_left, out_h, out_w)

    @staticmethod
    def gelu(x, approximate: bool):
        """GELU, exact or with the tanh approximation, elementwise."""
        return _run('maxvit_gelu', [x], approximate)

    @staticmethod
    def layer_norm(x, weight, bias, eps: float):
        """LayerNorm over the last axis of x (..., C); weight, bias (C,)."""
        return _run('maxvit_layer_norm', [x, weight, bias], eps)

    @staticmethod
    def linear(x, weight, bias):
        """x @ weight + bias: (..., in) -> (..., out); weight (in, out), bias (out,)."""
        out = _run('maxvit_linear', [x.reshape([-1, x.shape[-1]]), weight, bias])  # (tokens, out)
        return out.reshape(list(x.shape[:-1]) + [weight.shape[1]])

    @staticmethod
    def bias_softmax(x, bias, scale: float):
        """softmax(scale * x + bias) over the last axis; x (B', heads, N, M), bias (heads, N, M)."""
        return _run('maxvit_bias_softmax', [x, bias], scale)
