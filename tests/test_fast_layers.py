"""common/fast_layers.py: use_fast_layers swaps a built model's layers for their fast forms in place (same
parameters, same state_dict, same results to float rounding), and the memory-saving backward passes keep what
they promise. maxvit.py itself runs Paddle's own layers and needs nothing but Paddle.

Tolerances (tests/tolerance.py): the fast forms sum in other orders than Paddle's ops (a GEMM for a column sum,
addmm for matmul + add), so each gradient is held to the summation bound of its own terms, with the magnitude
computed as the same product on absolute values."""
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

import maxvit
from common.fast_layers import (FastConv2D, FastDropPath, FastLinear, FastMlp, FastRelAttention, _LinearFn,
                                use_fast_layers)
from tests.conftest import ROOT, assert_gradients_close, step_as_built_then_fast
from tolerance import assert_close, forward_tolerance, summation_tolerance

pytestmark = pytest.mark.numerics

def small_model():
    return maxvit.create_model('tiny_tf', num_classes=10, stage_num_block=[1, 1, 1, 1], block_size=[2, 2],
                               grid_size=[2, 2], drop_path=0.2)


def test_maxvit_py_runs_alone_with_paddle_only(tmp_path):
    """maxvit.py copied into an empty folder: the article's snippet and summary, no project module imported."""
    (tmp_path / 'maxvit.py').write_bytes((ROOT / 'maxvit.py').read_bytes())
    code = ('import sys, paddle\n'
            'from maxvit import MaxViT, tiny_args\n'
            'print(list(MaxViT(tiny_args)(paddle.zeros([2, 3, 224, 224])).shape))\n'
            'print(paddle.summary(MaxViT(tiny_args), (1, 3, 224, 224))["total_params"])\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("common", "tools", "train")))\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == '[2, 1000]' and lines[-2:] == ['31001840', '[]'], out.stdout[-500:]


def test_a_built_model_runs_paddles_own_layers():
    model = small_model()
    assert not any(type(layer).__module__.startswith('common') for layer in model.sublayers())
    assert {type(layer) for layer in model.sublayers()} >= {nn.Conv2D, nn.Linear, nn.GELU, maxvit.Rel_Attention}


def test_use_fast_layers_swaps_in_place_and_keeps_every_parameter():
    paddle.seed(0)
    model = small_model()
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert use_fast_layers(model, kernels=None) is model
    after = model.state_dict()
    assert list(after) == list(before) and all(np.array_equal(after[k].numpy(), v) for k, v in before.items())
    assert [id(p) for p in model.parameters()] == params
    kinds = {type(layer) for layer in model.sublayers()}
    assert {FastConv2D, FastLinear, FastRelAttention, FastMlp, FastDropPath} <= kinds
    assert nn.Conv2D not in kinds and nn.Linear not in kinds
    assert all(isinstance(layer, (nn.Conv2D, nn.Linear, maxvit.Rel_Attention)) for layer in model.sublayers()
               if type(layer) in (FastConv2D, FastLinear, FastRelAttention))


def test_fast_model_gives_the_plain_models_logits_and_gradients():
    """A training step through Paddle's layers and through the fast ones (without the C++ kernels, which
    tests/test_cpu_kernels.py compares): the bias paths, _LinearFn, the recomputed MLP activation, DropPath's
    scale-only backward."""
    paddle.seed(0)
    model = small_model()
    x = paddle.to_tensor(np.random.RandomState(0).randn(4, 3, 32, 32).astype('float32'))
    (ref_logits, ref_grads), (logits, grads) = step_as_built_then_fast(model, x, kernels=None)
    assert_close(logits, ref_logits, forward_tolerance(np.abs(ref_logits)), 'logits')
    assert len(grads) > 50
    assert_gradients_close(grads, ref_grads)


def test_drop_path_backward_keeps_only_the_per_sample_scale():
    # paddle.multiply would keep the whole branch output alive until backward, for each residual branch
    layer = use_fast_layers(maxvit.DropPath(0.5), kernels=None)
    x = paddle.randn([8, 3, 4, 4])
    x.stop_gradient = False
    saved = []
    with paddle.autograd.saved_tensors_hooks(lambda t: saved.append(list(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert saved == [[8, 1, 1, 1]]
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.where(y.numpy() == 0, 0.0, 2.0))
    plain_saved = []
    with paddle.autograd.saved_tensors_hooks(lambda t: plain_saved.append(list(t.shape)) or t, lambda t: t):
        maxvit.DropPath(0.5)(x)
    assert [8, 3, 4, 4] in plain_saved  # what the fast form saves memory on


@pytest.mark.parametrize('act', ['gelu', 'gelu_tanh', 'silu'])
def test_mlp_training_backward_recomputes_the_activation_and_matches_plain_autograd(act):
    mlp = maxvit.Mlp(8, 32, act)
    x = paddle.randn([2, 3, 5, 8])
    x.stop_gradient = False
    g = paddle.randn([2, 3, 5, 8])

    def grads(out):
        (out * g).sum().backward()
        got = [t.grad.numpy().copy() for t in (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)]
        x.clear_gradient()
        mlp.clear_gradients()
        return [out.numpy()] + got

    plain = grads(mlp(x))  # Paddle's own autograd, all the way
    use_fast_layers(mlp, kernels=None)
    saved = []
    with paddle.autograd.saved_tensors_hooks(lambda t: saved.append(list(t.shape)) or t, lambda t: t):
        fast = mlp(x)
    assert saved.count([2, 3, 5, 32]) == 1  # fc1's output kept, its activation not
    # each value is a sum over at most 32 hidden units or 30 tokens: within rounding of the largest entry
    for a, b in zip(grads(fast), plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=summation_tolerance(32, np.abs(b).max() * 32))


def test_linear_training_backward_matches_plain_autograd(monkeypatch):
    """FastLinear's eager training backward (_LinearFn: the bias gradient as a GEMM) against F.linear's own
    autograd, each gradient within the summation bound of its own terms; an input or a weight that needs no
    gradient gets none."""
    calls = []
    apply = _LinearFn.apply
    monkeypatch.setattr(_LinearFn, 'apply', lambda *a: calls.append(1) or apply(*a))
    layer = use_fast_layers(nn.Linear(8, 256), kernels=None)
    x, g = paddle.randn([4, 64, 8]), paddle.randn([4, 64, 256])    # 256 tokens x 256 outputs: LINEAR_FN_MIN
    ax, ag, aw = np.abs(x.numpy()).reshape(256, 8), np.abs(g.numpy()).reshape(256, 256), np.abs(layer.weight.numpy())
    magnitude = {'out': ax @ aw + np.abs(layer.bias.numpy()), 'x': ag @ aw.T, 'weight': ax.T @ ag,
                 'bias': ag.sum(0)}
    terms = {'out': 8, 'x': 256, 'weight': 256, 'bias': 256}
    for x_needs, weight_needs in [(True, True), (False, True), (True, False)]:
        x.stop_gradient, layer.weight.stop_gradient = not x_needs, not weight_needs
        grads = []
        for out in (layer(x), F.linear(x, layer.weight, layer.bias)):
            (out * g).sum().backward()
            grads.append({'out': out.numpy().reshape(256, 256)} | {
                name: None if t.grad is None else t.grad.numpy().reshape(magnitude[name].shape)
                for name, t in (('x', x), ('weight', layer.weight), ('bias', layer.bias))})
            x.clear_gradient(False)                    # to None, not zeros
            layer.clear_gradients(set_to_zero=False)
        fast, plain = grads
        for name in magnitude:
            assert (fast[name] is None) == (plain[name] is None), name
            if fast[name] is not None:
                assert_close(fast[name], plain[name], summation_tolerance(terms[name], magnitude[name]), name)
        assert (fast['x'] is None) == (not x_needs) and (fast['weight'] is None) == (not weight_needs)
    assert len(calls) == 3
    layer(x[:1, :3]).sum().backward()               # 3 tokens x 256 outputs: below it, Paddle's own autograd
    assert len(calls) == 3


def test_summation_tolerance_catches_one_missing_term():
    """The bound is tight enough that a gradient missing one token's contribution fails it."""
    g = np.random.RandomState(0).randn(256, 16).astype('float32')
    full, missing = g.sum(0), g[1:].sum(0)
    tolerance = summation_tolerance(256, np.abs(g).sum(0))
    with pytest.raises(AssertionError):
        assert_close(missing, full, tolerance)
    assert_close(g[::-1].sum(0), full, tolerance)  # another order passes
