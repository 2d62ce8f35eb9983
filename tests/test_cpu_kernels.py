"""MaxViT's CPU kernels (common/cpu_kernels.cc): each op's values and gradients against Paddle's own ops, the whole
model with them (use_fast_layers) against the plain model, and the fallback to Paddle's ops when they cannot be
built.

Tolerances: an op's output is compared within rtol of the largest entry of its reference (assert_same): the
kernels sum in another order than oneDNN/MKL, so results differ by float32 rounding of the magnitudes summed."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import paddle.nn as nn

import maxvit
from common import cpu_kernels
from common.fast_layers import FastConv2D, use_fast_layers
from tests.conftest import ROOT, assert_gradients_close, step_as_built_then_fast

pytestmark = [pytest.mark.skipif(not cpu_kernels.load(), reason='the CPU kernels could not be built here'),
              pytest.mark.numerics]
OPS = cpu_kernels.KernelOps


def values_and_grads(fn, *inputs, seed=0):
    """fn(*inputs) and the gradients of <fn(*inputs), g> for a fixed random g, as numpy arrays."""
    inputs = [paddle.to_tensor(a, stop_gradient=False) for a in inputs]
    out = fn(*inputs)
    g = paddle.to_tensor(np.random.RandomState(seed).randn(*out.shape).astype('float32'))
    out.backward(g)
    return [out.numpy()] + [t.grad.numpy() for t in inputs]


def assert_same(mine, ref, rtol=1e-5):
    """Every array within rtol of the largest entry of its reference."""
    assert len(mine) == len(ref)
    for i, (a, b) in enumerate(zip(mine, ref)):
        scale = np.abs(b).max()
        assert scale > 0 and np.abs(a - b).max() <= rtol * scale, (i, np.abs(a - b).max(), scale)


@pytest.mark.parametrize('shape, k, stride, padding', [
    ((2, 5, 9, 11), 3, 1, 1), ((2, 5, 9, 11), 3, 2, 1),
    ((2, 4, 10, 10), 3, 2, 'SAME'),       # TF padding: nothing before, one after
    ((3, 4, 7, 7), 3, 1, 1), ((1, 3, 5, 6), 3, 2, 1), ((2, 3, 12, 9), 5, 1, 2), ((2, 3, 13, 9), 5, 2, 'SAME'),
])
def test_depthwise_conv_matches_paddle(shape, k, stride, padding):
    rng = np.random.RandomState(0)
    C = shape[1]
    x, w, b = (rng.randn(*shape).astype('float32'), rng.randn(C, 1, k, k).astype('float32'),
               rng.randn(C).astype('float32'))
    conv = FastConv2D(C, C, k, stride, padding, groups=C)
    geometry = conv.depthwise_geometry(shape)
    ref = values_and_grads(lambda x, w, b: F.conv2d(x, w, b, stride, padding, groups=C), x, w, b)
    assert geometry[2:] == ref[0].shape[2:]
    assert_same(values_and_grads(lambda x, w, b: OPS.depthwise_conv(x, w, b, stride, *geometry), x, w, b), ref)


def test_depthwise_geometry_only_for_what_the_kernel_computes():
    assert FastConv2D(4, 4, 3, 1, 1, groups=4).depthwise_geometry([1, 4, 8, 8]) == (1, 1, 8, 8)
    assert FastConv2D(4, 4, 3, 2, 'SAME', groups=4).depthwise_geometry([1, 4, 8, 7]) == (0, 1, 4, 4)
    for conv in (FastConv2D(4, 8, 3, 1, 1, groups=4), FastConv2D(4, 4, 3, 1, 1),
                 FastConv2D(4, 4, 3, 1, 2, dilation=2, groups=4), FastConv2D(4, 4, 3, 1, 'VALID', groups=4),
                 FastConv2D(4, 4, 3, 1, 1, groups=4, padding_mode='reflect')):
        assert conv.depthwise_geometry([1, 4, 8, 8]) is None


@pytest.mark.parametrize('shape', [(6, 37, 64), (5, 3, 7)])
def test_layer_norm_matches_paddle(shape):
    rng = np.random.RandomState(1)
    C = shape[-1]
    x, w, b = (3 * rng.randn(*shape).astype('float32') + 1, rng.randn(C).astype('float32'),
               rng.randn(C).astype('float32'))
    assert_same(values_and_grads(lambda x, w, b: OPS.layer_norm(x, w, b, 1e-5), x, w, b),
                values_and_grads(lambda x, w, b: F.layer_norm(x, [C], w, b, 1e-5), x, w, b))


@pytest.mark.parametrize('shape', [(6, 2, 49, 49), (4, 3, 4, 4)])
def test_bias_softmax_matches_paddle(shape):
    rng = np.random.RandomState(2)
    x, b = 20 * rng.randn(*shape).astype('float32'), rng.randn(*shape[1:]).astype('float32')
    assert_same(values_and_grads(lambda x, b: OPS.bias_softmax(x, b, 0.17), x, b),
                values_and_grads(lambda x, b: F.softmax(x * 0.17 + b, axis=-1), x, b))


@pytest.mark.parametrize('shape', [(7, 5, 16), (300, 33)])
def test_linear_matches_paddle(shape):
    rng = np.random.RandomState(5)
    x, w, b = (rng.randn(*shape).astype('float32'), rng.randn(shape[-1], 24).astype('float32'),
               rng.randn(24).astype('float32'))
    assert_same(values_and_grads(OPS.linear, x, w, b), values_and_grads(F.linear, x, w, b))


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_matches_paddle(approximate):
    # the whole float range that matters, tails and zero included, then random values
    x = np.concatenate([np.linspace(-12, 12, 24001), np.random.RandomState(3).randn(999) * 3,
                        [-200, -50, 50, 200]]).astype('float32')
    assert_same(values_and_grads(lambda x: OPS.gelu(x, approximate), x),
                values_and_grads(lambda x: F.gelu(x, approximate), x))


class Recording:
    """KernelOps that counts its calls by op."""

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(OPS, name)(*args)
        return call


@pytest.mark.parametrize('name, size', [('tiny_tf', 128), ('tiny', 128), ('tiny_tf', 50)],
                         ids=['official-128', 'article-128', 'official-50-padded'])
def test_model_with_kernels_equals_model_without(name, size):
    """Logits and every parameter gradient of a training step, with the fast layers and kernels
    (use_fast_layers) and as built (Paddle's own ops): the
    official layout ('SAME' padding, tanh GELU, SiLU in SE), the article layout, and a size whose stage maps need
    padding and masked attention (which the kernels leave to Paddle). 4x4 windows: at 128 every stage map
    (32, 16, 8, 4) divides by them, at 50 three of four do not."""
    paddle.seed(0)
    model = maxvit.create_model(name, num_classes=10, stage_num_block=[1, 1, 2, 1], block_size=[4, 4],
                                grid_size=[4, 4])
    x = paddle.to_tensor(np.random.RandomState(4).randn(2, 3, size, size).astype('float32'))
    ops = Recording()
    (ref_logits, ref_grads), (logits, grads) = step_as_built_then_fast(model, x, ops)
    # every kind of layer went through the kernels
    assert set(ops.calls) == {'depthwise_conv', 'gelu', 'layer_norm', 'bias_softmax'}, ops.calls
    assert ops.calls['depthwise_conv'] == 5 and ops.calls['layer_norm'] == 20
    assert_same([logits], [ref_logits])
    assert len(grads) > 100
    assert_gradients_close(grads, ref_grads)


def test_a_strided_view_reaches_the_kernels_dense():
    """The kernels read memory row-major; Paddle hands a custom op a dense copy of a strided view (what _run relies
    on with FLAGS_use_stride_kernel on, Paddle's default)."""
    before = paddle.get_flags(['FLAGS_use_stride_kernel'])
    paddle.set_flags({'FLAGS_use_stride_kernel': True})
    try:
        x = paddle.to_tensor(np.random.RandomState(6).randn(3, 5, 4).astype('float32'))
        view = x.transpose([0, 2, 1])                                        # (3, 4, 5), strided
        assert not view.is_contiguous()
        w, b = paddle.ones([5]), paddle.zeros([5])
        assert_same([OPS.layer_norm(view, w, b, 1e-5).numpy()],
                    [F.layer_norm(view.contiguous(), [5], w, b, 1e-5).numpy()])
    finally:
        paddle.set_flags(before)


def test_no_backward_recorded_under_no_grad():
    """Paddle records a backward for custom ops even under no_grad; the kernels' wrappers must not (it would keep
    every input alive during inference)."""
    x = paddle.randn([2, 3, 4, 4])
    x.stop_gradient = False
    saved = []
    with paddle.autograd.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t), paddle.no_grad():
        y = OPS.gelu(OPS.depthwise_conv(x, paddle.ones([3, 1, 3, 3]), paddle.zeros([3]), 1, 1, 1, 4, 4), False)
    assert y.stop_gradient and not saved
    assert not OPS.gelu(x, False).stop_gradient  # with gradients on, the backward is there


def test_kernels_in_eager_and_static_training_but_not_in_exports_or_other_dtypes():
    """The kernels run in eager mode and in static training graphs (Global.to_static), on float32; exported models
    (static, eval mode) keep Paddle's ops, which Paddle Inference and the ONNX runtimes know."""
    ops = Recording()

    def fast(layer):
        return use_fast_layers(layer, kernels=ops)
    fast(nn.GELU())(paddle.ones([4], 'float64'))
    assert not ops.calls
    spec = [paddle.static.InputSpec([4], 'float32')]
    exported = fast(nn.GELU())
    exported.eval()
    paddle.jit.to_static(exported, full_graph=True, input_spec=spec)(paddle.ones([4]))
    assert not ops.calls
    training = fast(nn.GELU())
    training.train()
    paddle.jit.to_static(training, full_graph=True, input_spec=spec)(paddle.ones([4]))  # traced once
    fast(nn.GELU())(paddle.ones([4]))
    assert ops.calls == {'gelu': 2}
    # Linear: its own C++ op in static training graphs only (eager training has _LinearFn, exports addmm)
    linear = fast(nn.Linear(4, 3))
    paddle.jit.to_static(linear, full_graph=True, input_spec=[paddle.static.InputSpec([2, 4], 'float32')])(
        paddle.ones([2, 4]))
    fast(nn.Linear(4, 3))(paddle.ones([2, 4]))
    assert ops.calls == {'gelu': 2, 'linear': 1}


def test_build_failure_falls_back_to_paddle_ops(monkeypatch, tmp_path):
    def fail(directory):
        raise RuntimeError('c++: command not found')
    monkeypatch.setattr(cpu_kernels, '_loaded', None)
    monkeypatch.setattr(cpu_kernels, '_build', fail)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    with pytest.warns(UserWarning, match=r'could not be built or loaded \(RuntimeError: c\+\+: command not found\).*'
                                         r'MAXVIT_CPU_KERNELS=0'):
        gelu = use_fast_layers(nn.GELU())
    assert gelu._kernels is None and cpu_kernels.load() is False
    np.testing.assert_array_equal(gelu(paddle.ones([3])).numpy(), F.gelu(paddle.ones([3])).numpy())


def test_environment_turns_the_kernels_off():
    code = ('import paddle, maxvit\n'
            'from common.device import setup\n'
            'from common.fast_layers import use_fast_layers\n'
            'setup("cpu")\n'
            'model = use_fast_layers(maxvit.MaxViT(maxvit.tiny_args))\n'
            'logits = model(paddle.zeros([1, 3, 64, 64]))\n'
            'print(model.conv_stem[0]._kernels is None, list(logits.shape))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'MAXVIT_CPU_KERNELS': '0'})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == 'True [1, 1000]', out.stdout


def test_kernels_refuse_mismatched_shapes():
    with pytest.raises(Exception, match="weight and bias must have x's last size"):
        OPS.layer_norm(paddle.randn([2, 4]), paddle.ones([3]), paddle.zeros([3]), 1e-5)
    with pytest.raises(Exception, match=r'bias must be \(heads, N, M\)'):
        OPS.bias_softmax(paddle.randn([1, 2, 3, 3]), paddle.zeros([7]), 1.0)
    with pytest.raises(Exception, match=r'weight must be \(C, 1, k, k\)'):
        OPS.depthwise_conv(paddle.randn([1, 3, 5, 5]), paddle.ones([4, 1, 3, 3]), paddle.zeros([4]), 1, 1, 1, 5, 5)


def test_an_interrupted_build_leaves_nothing_a_later_run_would_load(monkeypatch, tmp_path):
    """A build writes into a staging directory that becomes the cache entry only when the build finished: a build
    that fails (or is killed: its staging directory is never renamed) makes the next run build again."""
    import paddle.utils.cpp_extension as cpp_extension
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    directory = cpu_kernels.build_dir()

    def interrupted(name, build_directory, **kwargs):  # writes part of a library, then dies
        (Path(build_directory) / name).mkdir(parents=True)
        (Path(build_directory) / name / f'{name}.so').write_bytes(b'\x7fELF half a library')
        raise KeyboardInterrupt
    monkeypatch.setattr(cpp_extension, 'load', interrupted)
    with pytest.raises(KeyboardInterrupt):
        cpu_kernels._build(directory)
    assert not directory.exists() and list(directory.parent.iterdir()) == []

    # a killed build's staging directory stays behind, but it is not the cache entry: load() builds again
    (directory.parent / f'{directory.name}.building-12345' / cpu_kernels.NAME).mkdir(parents=True)
    builds = []
    monkeypatch.setattr(cpu_kernels, '_loaded', None)
    monkeypatch.setattr(cpu_kernels, '_build', builds.append)
    assert cpu_kernels.load() is True and builds == [directory]


def test_builds_unused_for_a_month_are_deleted_when_another_is_built(monkeypatch, tmp_path):
    """Each source, Paddle version and CPU has its own build (about 4 MB). A new build deletes the ones no process
    has loaded for UNUSED_DAYS, their lock files and killed builds' staging directories, but not one that a process
    is loading (it holds the lock); loading a build marks it used."""
    import fcntl
    import paddle.utils.cpp_extension as cpp_extension
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    directory = cpu_kernels.build_dir()
    cache, name = directory.parent, cpu_kernels.NAME

    def entry(entry_name, age_days):  # a build (or staging directory) last used age_days ago, with its lock file
        path = cache / entry_name
        (path / name).mkdir(parents=True)
        (path / name / f'{name}.so').write_bytes(b'')
        (cache / f'{entry_name}.lock').write_text('')
        os.utime(path, (time.time() - age_days * 86400,) * 2)
        return path
    entry(f'{name}-00000000', 31)                              # an old Paddle version's build
    entry(f'{name}-11111111.building-99', 31)                  # a build killed a month ago
    recent = entry(f'{name}-22222222', 29)                     # another Paddle version, still in use
    busy = entry(f'{name}-33333333', 31)                       # old, but a process is loading it right now
    (cache / 'something-else').mkdir()
    os.utime(cache / 'something-else', (0, 0))

    def built(name, build_directory, **kwargs):                # what cpp_extension.load leaves
        (Path(build_directory) / name).mkdir(parents=True)
        (Path(build_directory) / name / f'{name}.so').write_bytes(b'')
    monkeypatch.setattr(cpp_extension, 'load', built)
    with open(cache / f'{busy.name}.lock') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cpu_kernels._build(directory)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [directory.name, recent.name, f'{recent.name}.lock', busy.name, f'{busy.name}.lock', 'something-else'])

    # loading a cached build marks it used, so that other builds' prune keeps it
    os.utime(directory, (time.time() - 40 * 86400,) * 2)
    monkeypatch.setattr(cpp_extension, 'load_op_meta_info_and_register_op', lambda library: None)
    monkeypatch.setattr(cpu_kernels, '_loaded', None)
    assert cpu_kernels.load() is True
    assert time.time() - directory.stat().st_mtime < 60
    assert cpu_kernels.prune(recent) == [busy] and directory.exists()          # busy: no longer loading
