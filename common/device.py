"""Device and process-group selection, in one place. Every GPU path also runs on CPU (gloo), so tests on a
CPU machine exercise the same code as a GPU cluster."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import paddle
import paddle.distributed as dist

from common.config import ConfigError
from common.cpu_info import cpu_cores, cpu_vendor


@dataclass
class Env:
    device: str        # 'cpu' or 'gpu'
    rank: int          # this process, 0 .. world_size - 1
    world_size: int    # processes in the job (1 without paddle.distributed.launch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (a no-op in a single process)."""
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Run the block on rank 0 first, then on the other processes: rank 0 writes what they then read
        (the built-in dataset on first use, an interrupted checkpoint save it finishes)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies, however it dies (kill -9 included), so that
    DataLoader workers and launched trainers never run on as orphans (Linux; elsewhere a no-op).
    ``parent_pid`` is the parent at fork time: if it died before this call, exit now."""
    if not sys.platform.startswith('linux'):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def amp_context(amp: dict):
    """A factory of autocast contexts for the config's AMP section (``with amp_context(cfg['AMP'])():``); the
    same code path on CPU and GPU."""
    if not amp or not amp['enable']:
        return nullcontext
    return lambda: paddle.amp.auto_cast(level=amp['level'], dtype=amp['dtype'])


def use_cpu_cores() -> int:
    """Tune Paddle's CPU math library (MKL) before the first Paddle operation runs; settings the user made in
    the environment win. Returns the thread count.

    * Threads: this process's share of the cores. Eager Paddle runs MKL on one thread unless MKL_NUM_THREADS
      says otherwise.
    * AMD CPUs: the MKL that Paddle bundles takes a slow generic code path on non-Intel CPUs unless
      MKL_DEBUG_CPU_TYPE=5 lets it use its AVX2 kernels (float32 GEMM then runs at about twice the rate).
    """
    per_process = max(1, cpu_cores() // int(os.environ.get('PADDLE_LOCAL_SIZE', '1')))  # processes on this machine
    os.environ.setdefault('MKL_NUM_THREADS', str(per_process))
    if cpu_vendor() == 'AuthenticAMD':
        os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
    return int(os.environ['MKL_NUM_THREADS'])


# glibc malloc settings a user may make in the environment; tune_cpu_eager then leaves malloc alone
MALLOC_SETTINGS = ('GLIBC_TUNABLES', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')


def tune_cpu_eager() -> None:
    """Two process-wide settings that make eager Paddle on CPU faster (docs/performance.md), for everything in this
    process; settings the user made in the environment win. Neither changes a result.

    * ``FLAGS_use_stride_kernel`` off: transpose and unbind write dense copies with Paddle's transpose kernel
      instead of returning strided views, which the next reshape or matmul then copies with a generic
      strided-copy kernel several times slower (the window/grid partitions and the q/k/v split).
    * glibc's malloc keeps freed buffers of up to 32 MB (``M_MMAP_THRESHOLD``, its maximum) for reuse, and
      keeps up to 1 GB of free heap (``M_TRIM_THRESHOLD``) rather than returning it to the OS after every step.
      Paddle's CPU allocator mallocs and frees every tensor, and a new activation of a few MB would otherwise
      come fresh from the kernel and page-fault as it is written. Larger buffers still go back to the OS, so
      peak memory stays as it was (every buffer from the heap, M_MMAP_MAX=0, would raise the training peak).
    """
    if 'FLAGS_use_stride_kernel' not in os.environ:
        paddle.set_flags({'FLAGS_use_stride_kernel': False})
    if any(k in os.environ for k in MALLOC_SETTINGS):
        return
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)  # glibc (Linux); elsewhere nothing to set
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
        mallopt(M_TRIM_THRESHOLD, 2 ** 30)


def setup(device: str = 'auto') -> Env:
    """Pick the device ('auto': GPU when this Paddle build has one) and join the process group when launched
    by `python -m paddle.distributed.launch` (which sets the rank and world size in the environment)."""
    use_cpu_cores()
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if device == 'auto':
        device = 'gpu' if has_gpu else 'cpu'
    if device == 'gpu' and not has_gpu:
        raise ConfigError('Global.device=gpu, but this Paddle build sees no GPU: install paddlepaddle-gpu '
                           '(README, Install) or use -o Global.device=cpu')
    if device == 'cpu':
        tune_cpu_eager()
    paddle.set_device(device)  # under the launcher, 'gpu' means this process's GPU (FLAGS_selected_gpus)
    world_size = dist.get_world_size()
    if world_size > 1:
        die_with_parent(os.getppid())  # the launcher: a killed launcher takes its trainers with it
        dist.init_parallel_env()  # NCCL on GPU, gloo on CPU
    return Env(device=device, rank=dist.get_rank(), world_size=world_size)


def peak_memory_gb(device: str) -> float:
    """Peak memory of this process: GPU allocator peak, or the CPU resident-set peak."""
    if device == 'gpu':
        return paddle.device.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux
