"""Device and process-group selection, in one place. Every GPU path also runs on CPU (gloo), so tests on a
CPU machine exercise the same code as a GPU cluster. Also the life of a run's process: stop signals
(StopSignals) and the lock that gives an output directory to one run (hold_output_dir)."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import paddle
import paddle.distributed as dist

from common.config import ConfigError
from common.cpu_info import cpu_cores, cpu_vendor

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked
    fcntl = None


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


# ------------------------------------------------------------------------------------------------ stopping
class Stopped(Exception):
    """A stop signal ended what was running (an evaluation); ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(f'stopped by {signal.Signals(signum).name}')
        self.signum = signum


class StopSignals:
    """SIGTERM (what Slurm, Kubernetes, notebooks and paddle.distributed.launch send before a kill) and SIGINT
    (Ctrl-C) as a request to stop at the next safe point, in a ``with`` block.

    The handler only records the first signal: Python runs it in the main thread between bytecodes, so it never
    interrupts a save or a step, and the caller decides where to stop by calling requested(). It replaces
    Paddle's C++ SIGTERM handler, which calls backtrace() (not async-signal-safe) and deadlocks a process that the
    signal caught inside malloc. Further signals change nothing: the stop is already on its way (SIGKILL is the
    way to end a run at once; checkpoints survive it). DataLoader workers started by iterate() never see these
    signals; a process forked otherwise inherits the handler, which does nothing there.
    On leaving the block the previous handlers come back (Python's default for SIGTERM where Paddle's C++ one
    was)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world_size: Optional[int] = None):
        """``world_size``: the processes that stop together; None: those of paddle.distributed.launch's job."""
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.signum, self.pid, self.previous = None, os.getpid(), {}

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():  # elsewhere Python cannot install handlers
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
            if hasattr(signal, 'pthread_sigmask'):  # what train.py and eval.py held back while importing comes now
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _record(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ''

    def requested(self) -> bool:
        """Whether to stop here: a signal reached this process or, with several processes, any of them (an
        all-reduce of one number, so every process must call it at the same points and they stop together)."""
        if self.world_size == 1:
            return self.signum is not None
        flag = paddle.to_tensor([self.signum or 0], dtype='int32')
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())  # what every process decides on: not self.signum, which a signal may set meanwhile
        self.signum = self.signum or agreed or None
        return agreed != 0


def ignore_stop_signals() -> None:
    """For a command whose run is over: a stop signal while the interpreter exits (its loader workers, its
    atexit work) would only turn the exit status into 'killed by a signal'."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def iterate(loader):
    """The batches of ``loader`` (a paddle.io.DataLoader), its worker processes started with SIGTERM and SIGINT
    blocked for good: Ctrl-C, or a SIGTERM that a launcher or scheduler sends to the whole process group, stops the
    run through its main process alone. (Paddle's worker replaces the SIGTERM handler it inherits with one that
    kills the worker, and its parent then fails at its next batch.) The workers end with the iteration, however it
    ends (exhausted, left early, an exception: CPython closes a generator as soon as nothing refers to it), since
    they no longer end on the SIGTERM with which multiprocessing ends daemonic children before it waits for them at
    exit; one that has not ended 10 s after it was told to is killed."""
    with _stop_signals_blocked():
        batches = iter(loader)  # forks the workers
    try:
        yield from batches
    finally:
        if hasattr(batches, '_workers'):  # Paddle's multi-process iterator; its shutdown is private (as in __del__)
            batches._try_shutdown_all(10)
            for worker in batches._workers:
                if worker.is_alive():
                    worker.kill()
        elif hasattr(batches, '_try_shutdown_all'):  # num_workers=0: a reading thread
            batches._try_shutdown_all()


@contextmanager
def _stop_signals_blocked():
    """SIGTERM and SIGINT held back during the block (one that arrives meanwhile is delivered at its end); a process
    forked in it keeps them blocked."""
    if not hasattr(signal, 'pthread_sigmask'):  # Windows: no process groups to signal
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ------------------------------------------------------------------------------------------------ the output dir
RUN_LOCK = '.run.lock'


class BusyError(RuntimeError):
    """Another run holds the output directory; the message names it."""


@contextmanager
def hold_output_dir(output_dir: str, command: str, enabled: bool = True):
    """Hold OUTPUT_DIR/.run.lock (flock) for the block: a second run on the directory fails with a BusyError
    naming the one that holds it (pid, host, start time and command, which the holder writes into the lock file).
    The kernel releases the lock when its holder ends, however it ends (kill -9 included), so a dead run never
    blocks the next one. Without fcntl (Windows) or on a file system without locks, the run goes unlocked."""
    if not enabled or fcntl is None:
        yield
        return
    path = Path(output_dir) / RUN_LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f'Global.output_dir {output_dir}: cannot write there ({e.strerror or e}): choose a '
                          f'writable directory') from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip() or 'a run that is just starting'
        os.close(fd)
        raise BusyError(f'{output_dir} is in use by another run: {holder}. Wait for it to end, stop it (kill -TERM '
                        f'PID: it stops at its next step and saves latest), or choose another Global.output_dir'
                        ) from None
    except OSError:  # a file system without locks (some network mounts): unlocked
        pass
    else:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}: '
                      f'{command}\n'.encode('utf-8'), 0)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
