"""Device and process-group selection, in one place. Every GPU path also runs on CPU (gloo), so tests on a
CPU machine exercise the same code as a GPU cluster."""
from __future__ import annotations

import resource
from dataclasses import dataclass

import paddle
import paddle.distributed as dist


@dataclass
class Env:
    device: str        # 'cpu' or 'gpu'
    rank: int          # this process, 0 .. world_size - 1
    world_size: int    # processes in the job (1 without paddle.distributed.launch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = 'auto') -> Env:
    """Pick the device ('auto': GPU when this Paddle build has one) and join the process group when launched
    by `python -m paddle.distributed.launch` (which sets the rank and world size in the environment)."""
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if device == 'auto':
        device = 'gpu' if has_gpu else 'cpu'
    if device == 'gpu' and not has_gpu:
        raise RuntimeError('Global.device=gpu, but this Paddle build sees no GPU: install paddlepaddle-gpu '
                           '(README, Install) or use -o Global.device=cpu')
    paddle.set_device(device)  # under the launcher, 'gpu' means this process's GPU (FLAGS_selected_gpus)
    world_size = dist.get_world_size()
    if world_size > 1:
        dist.init_parallel_env()  # NCCL on GPU, gloo on CPU
    return Env(device=device, rank=dist.get_rank(), world_size=world_size)


def peak_memory_gb(device: str) -> float:
    """Peak memory of this process: GPU allocator peak, or the CPU resident-set peak."""
    if device == 'gpu':
        return paddle.device.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux
