"""How far two float32 computations of the same result may differ: tolerances from the arithmetic.

Two correct float32 computations of one result differ in their last bits. oneDNN, MKL and MaxViT's CPU kernels
(built with -march=native) sum in orders that depend on the instruction set (AVX2, AVX-512, AMX), the batch shape
and the thread count, fuse multiply-adds or not, and evaluate exp and tanh by their own approximations. The
rounding error of a sum is relative to the magnitude of its terms, not of its result: a sum of n terms t_i is off
by up to (n - 1) * EPS/2 * sum|t_i|, and by about sqrt(n) * EPS/2 * sum|t_i| when the roundings are independent.
So a tolerance here is a number of EPS times the magnitude of what was summed, the number justified where it is
chosen (tests/test_cpu_kernels.py likewise compares each array relative to the largest value of its reference).
Results that are exact by construction (the same kernels on the same shapes twice, a resumed run on one machine)
are compared exactly, not here.
"""
import contextlib

import numpy as np

EPS = float(np.finfo(np.float32).eps)   # 2**-23 = 1.19e-7: the spacing of float32 numbers in [1, 2)

# The rounding one float32 MaxViT forward leaves in an output, in EPS of the output's magnitude. Every block chains
# about ten reductions (convolutions, LayerNorm, qkv, q.k, softmax, attention @ v, projections, the MLP), each
# adding about sqrt(n) EPS/2 for its n-term sums (n: up to 9 * C for a 3x3 convolution, the tokens of a window,
# the channels of a linear layer), and a LayerNorm over few channels magnifies the error it receives as much as
# it shrinks its input's spread. The reduced parity models (tests/data/parity, 12x12 windows, 4 channels in the
# first stage) reach 44 EPS in timm's float32 against a float64 run of the same model; 128 bounds a forward with
# room for wider sums and other instruction sets.
FORWARD_EPS = 128


def max_diff(a, b) -> float:
    """The largest absolute difference, computed in float64."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def summation_tolerance(n: int, magnitude):
    """Elementwise bound on the difference of two float32 computations of one sum of n terms whose absolute values
    sum to ``magnitude`` (a number or an array): 2 sqrt(n) EPS magnitude, four times the sqrt(n) EPS/2 that
    independent roundings give each (well below the worst case, (n - 1) EPS/2 each); a term missed or counted
    twice moves a sum by far more."""
    return 2 * np.sqrt(n) * EPS * np.asarray(magnitude, np.float64)


def forward_tolerance(magnitude, forwards: int = 2) -> float:
    """How far MaxViT outputs of the given magnitude may be apart when ``forwards`` of the computations compared
    are float32 forwards, each with its own rounding: 2 for two engines, batch shapes, thread counts or machines;
    1 for a float32 forward against a float64 one (whose rounding is 2^29 times finer)."""
    return forwards * FORWARD_EPS * EPS * float(np.max(magnitude))


def softmax_tolerance(probs, logit_tolerance: float):
    """Elementwise bound for softmax weights whose logits may move by ``logit_tolerance``: the Jacobian of p_i is
    p_i (delta_ij - p_j), so p_i moves by at most 2 p_i max|d logit|; plus a few EPS of p_i for exp and the
    division, each rounded on its own."""
    return np.asarray(probs, np.float64) * (2 * logit_tolerance + 4 * EPS)


def assert_close(actual, expected, tolerance, what: str = ''):
    """|actual - expected| <= tolerance everywhere (a number or an array that broadcasts); a failure names the
    worst element, its difference and its tolerance."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    tolerance = np.broadcast_to(np.asarray(tolerance, np.float64), actual.shape)
    diff = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(diff - tolerance), diff.shape) if diff.size else ()
    assert diff.size == 0 or diff[worst] <= tolerance[worst], (
        f'{what}: differs by {diff[worst]:.3g} at {tuple(int(i) for i in worst)} (tolerance {tolerance[worst]:.3g}, '
        f'{diff[worst] / max(tolerance[worst], 1e-300):.2f}x it; largest difference {diff.max():.3g})')


@contextlib.contextmanager
def linear_magnitude(layer):
    """Within the block, each call of the linear ``layer`` (Paddle layout: weight (in, out)) appends to the yielded
    list the magnitude its matrix product sums, |x| @ |W| + |b| (float64, one row per input row): what the
    rounding of its outputs is relative to, and what errors in its input reach them through."""
    magnitudes = []

    def record(layer, inputs):
        x = np.abs(inputs[0].numpy().astype(np.float64))
        m = x @ np.abs(layer.weight.numpy().astype(np.float64))
        if layer.bias is not None:
            m += np.abs(layer.bias.numpy().astype(np.float64))
        magnitudes.append(m)
    hook = layer.register_forward_pre_hook(record)
    try:
        yield magnitudes
    finally:
        hook.remove()
