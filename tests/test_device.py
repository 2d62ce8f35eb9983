"""common/device.py: the one place that picks the device and the CPU threads."""
import os
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

import common.device
from common.config import ConfigError
from common.cpu_info import cpu_vendor
from common.device import setup, tune_cpu_eager, use_cpu_cores


def test_cpu_threads_are_this_process_share_of_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv('MKL_NUM_THREADS', raising=False)
    monkeypatch.delenv('PADDLE_LOCAL_SIZE', raising=False)
    assert use_cpu_cores() == cores
    monkeypatch.delenv('MKL_NUM_THREADS')
    monkeypatch.setenv('PADDLE_LOCAL_SIZE', str(2 * cores))   # more processes than cores: one thread each
    assert use_cpu_cores() == 1
    monkeypatch.setenv('MKL_NUM_THREADS', '3')                # the user's choice wins
    assert use_cpu_cores() == 3


@pytest.mark.parametrize('vendor, expected', [('AuthenticAMD', '5'), ('GenuineIntel', None)])
def test_mkl_takes_its_avx2_kernels_on_amd_cpus_only(monkeypatch, vendor, expected):
    # Paddle's bundled MKL runs a slow generic path on AMD CPUs unless MKL_DEBUG_CPU_TYPE=5 (2.4x on sgemm here)
    monkeypatch.delenv('MKL_DEBUG_CPU_TYPE', raising=False)
    monkeypatch.setattr(common.device, 'cpu_vendor', lambda: vendor)
    use_cpu_cores()
    assert os.environ.get('MKL_DEBUG_CPU_TYPE') == expected
    monkeypatch.setenv('MKL_DEBUG_CPU_TYPE', '4')  # the user's choice wins
    use_cpu_cores()
    assert os.environ['MKL_DEBUG_CPU_TYPE'] == '4'


def test_cpu_vendor_reads_this_machine():
    with open('/proc/cpuinfo') as f:
        assert cpu_vendor() in f.read() and cpu_vendor() != ''


def test_setup_on_this_machine():
    """'auto' picks the GPU where this Paddle build has one (paddlepaddle-gpu), else the CPU."""
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    env = setup('auto')
    assert (env.device, env.rank, env.world_size, env.is_main) == ('gpu' if has_gpu else 'cpu', 0, 1, True)
    setup('cpu')  # the rest of the suite runs on the CPU


def test_asking_for_a_gpu_that_is_not_there_is_a_config_error(monkeypatch):
    # on a CPU build, and on a GPU build on a machine without a visible GPU
    monkeypatch.setattr(paddle.device.cuda, 'device_count', lambda: 0)
    with pytest.raises(ConfigError, match='Global.device=gpu, but this Paddle build sees no GPU'):
        setup('gpu')


def test_tuned_cpu_reuses_freed_buffers_and_transposes_densely():
    """tune_cpu_eager (setup('cpu')): a freed 24 MB buffer is reused instead of coming fresh from the kernel
    (page faults counted in a fresh process: the settings are process-wide), and transposes are dense copies,
    not strided views.

    Faults are counted over 20 buffers after two warm-up ones, as in a training loop. The first reuse can miss:
    when a small allocation lands next to the freed buffer, Paddle's aligned allocation asks for a little more
    than the hole, and strace shows the heap growing by a second buffer. Under load that happened in about
    one process in five, and made the old count (five buffers, warm-up included) flaky. After the warm-up,
    40 processes under load faulted none of their 20 buffers; the test allows one, where Paddle's defaults
    fault all of them."""
    code = (
        'import resource, paddle\n'
        'def faults():\n'
        '    for _ in range(2):                       # warm-up: the first buffer and its first reuse\n'
        '        paddle.ones([6_000_000])\n'
        '    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        '    for _ in range(20):\n'
        '        paddle.ones([6_000_000])\n'
        '    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n'
        'transposed = lambda: paddle.ones([2, 3]).transpose([1, 0]).is_contiguous()\n'
        'plain, plain_dense = faults(), transposed()\n'
        'from common.device import tune_cpu_eager\n'
        'tune_cpu_eager()\n'
        'print(plain, plain_dense, faults(), transposed())\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ('FLAGS_use_stride_kernel',) + common.device.MALLOC_SETTINGS}
    out = subprocess.run([sys.executable, '-c', code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    plain, plain_dense, tuned, tuned_dense = int(out[0]), out[1], int(out[2]), out[3]
    pages = 6_000_000 * 4 // 4096                 # one buffer
    assert plain >= 19 * pages and plain_dense == 'False'   # Paddle's defaults: every buffer faults, views
    assert tuned <= 1.5 * pages and tuned_dense == 'True'   # tuned: at most one of the 20


def test_tuning_leaves_a_stride_setting_from_the_environment(monkeypatch):
    before = paddle.get_flags(['FLAGS_use_stride_kernel'])
    paddle.set_flags({'FLAGS_use_stride_kernel': True})
    monkeypatch.setenv('FLAGS_use_stride_kernel', '1')
    try:
        tune_cpu_eager()
        assert paddle.get_flags(['FLAGS_use_stride_kernel'])['FLAGS_use_stride_kernel'] is True
    finally:
        paddle.set_flags(before)
