"""Faster forms of MaxViT's layers for eager Paddle and CPU training, switched on by one call:

    model = use_fast_layers(MaxViT(args))

``maxvit.py`` builds the model from Paddle's own layers. ``use_fast_layers`` gives the layers of a built model
their fast classes below (each a subclass of the layer it replaces, so parameters, state_dict, hooks and
``isinstance`` checks stay as they were) and returns the same model:

* on the CPU, MaxViT's C++ kernels (common/cpu_kernels.cc) for the depthwise convolution, GELU, LayerNorm, the
  attention's scale + bias + softmax and the linear layers of static training graphs, where Paddle's own CPU
  kernels are slow; the bias of convolutions and linear layers added in a form Paddle's CPU kernels run fast;
* on any device, two backward passes that keep less memory: DropPath keeps only its per-sample scale, and Mlp
  keeps fc1's output but not its activation, which backward recomputes.

A model without this call runs Paddle's own ops; with it, the same results to float rounding
(tests/test_fast_layers.py, tests/test_cpu_kernels.py). Exported models (static graphs in eval mode) and other
dtypes than float32 take Paddle's ops either way: those are what Paddle Inference's oneDNN passes and the ONNX
runtimes fuse. MAXVIT_CPU_KERNELS=0, or a machine where the kernels cannot be built, keeps the C++ kernels off.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

import maxvit
from common import cpu_kernels

__all__ = ['use_fast_layers', 'FastConv2D', 'FastLinear', 'FastGELU', 'FastLayerNorm', 'FastRelAttention',
           'FastMlp', 'FastDropPath']


def use_fast_layers(model: nn.Layer, kernels='auto') -> nn.Layer:
    """Give every layer of ``model`` that has a fast form its fast class (in place) and return ``model``.

    ``kernels``: 'auto' loads MaxViT's CPU kernels when the current device is the CPU (building them once per
    machine, common/cpu_kernels.py) and uses none elsewhere; None uses none (the memory-saving paths only); tests
    pass a KernelOps-like object.
    """
    if kernels == 'auto':
        kernels = cpu_kernels.KernelOps() if paddle.get_device() == 'cpu' and cpu_kernels.load() else None
    for layer in model.sublayers(include_self=True):
        fast = _FAST.get(type(layer))
        if fast is not None:
            layer.__class__ = fast
            layer._kernels = kernels
    return model


def _cpu_path(layer: nn.Layer, x: paddle.Tensor) -> bool:
    """Whether ``layer`` takes its CPU forms on x: on the CPU, in eager mode or in a static training graph whose
    input shape is fully known. Exported models (static, eval mode) keep Paddle's ops; GPUs keep Paddle's kernels."""
    return paddle.get_device() == 'cpu' and (paddle.in_dynamic_mode() or (layer.training and -1 not in x.shape))


def _kernels_for(layer: nn.Layer, x: paddle.Tensor):
    """The layer's C++ kernels where they apply to x (float32, _cpu_path, not the legacy static IR), else None."""
    kernels = getattr(layer, '_kernels', None)
    if kernels is None or x.dtype != paddle.float32 or not _cpu_path(layer, x) \
            or not paddle.framework.in_dynamic_or_pir_mode():
        return None
    return kernels


class FastConv2D(nn.Conv2D):
    """nn.Conv2D whose depthwise form runs the C++ kernel, and which otherwise adds its bias on a (B, C, H*W)
    view on the CPU: Paddle's CPU add broadcasts a (1, C, 1, 1) bias over a 4-D map far slower than the same sum
    in 3-D. Its forward is not_to_static: to_static's rewriting of it on every trace slowed tracing down."""

    @paddle.jit.not_to_static
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        kernels = _kernels_for(self, x)
        geometry = None if kernels is None else self.depthwise_geometry(x.shape)
        if geometry is not None:
            bias = self.bias if self.bias is not None else paddle.zeros([self._out_channels], x.dtype)
            return kernels.depthwise_conv(x, self.weight, bias, self._stride[0], *geometry)
        if self.bias is None or not _cpu_path(self, x) or self._padding_mode != 'zeros' \
                or self._data_format != 'NCHW':
            return super().forward(x)
        out = F.conv2d(x, self.weight, None, self._stride, self._padding, self._dilation, self._groups,
                       self._data_format)                                  # (B, C, H', W')
        return (out.flatten(2) + self.bias.unsqueeze(-1)).reshape(out.shape)

    def depthwise_geometry(self, shape: Sequence[int]):
        """(pad_top, pad_left, out_h, out_w) when this is a depthwise convolution that the kernel computes
        (NCHW, square kernel, equal strides, no dilation, zero padding given as an int or 'SAME'), else None."""
        k, s = self._kernel_size[0], self._stride[0]
        if not (self._groups == self._in_channels == self._out_channels and self._data_format == 'NCHW'
                and self._padding_mode == 'zeros' and self._kernel_size[1] == k and self._stride[1] == s
                and list(self._dilation) == [1, 1] and (isinstance(self._padding, int) or self._padding == 'SAME')):
            return None
        H, W = shape[2], shape[3]
        if self._padding == 'SAME':  # TensorFlow's: output ceil(size / s), the odd pixel of padding after
            Ho, Wo = -(-H // s), -(-W // s)
            return max((Ho - 1) * s + k - H, 0) // 2, max((Wo - 1) * s + k - W, 0) // 2, Ho, Wo
        p = self._padding
        return p, p, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1


def _addmm_linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """F.linear, (..., in) -> (..., out), with the bias accumulated by the GEMM (paddle.addmm): on the CPU faster
    than Paddle's matmul followed by a broadcast add, the same numbers."""
    out = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)  # (tokens, out)
    return out.reshape(x.shape[:-1] + [weight.shape[1]])


class _LinearFn(PyLayer):
    """linear(act(h), weight, bias) (act: None or an activation) for eager training, with its backward written out:

    * on the CPU the bias gradient is a GEMM, ones @ grad, where Paddle's own linear backward runs a much slower
      column sum;
    * with act (Mlp's fc2), h is kept but not act(h), which backward recomputes (one elementwise op): the MLP's
      (tokens, 4C) activation is stored once, not twice.

    Only inputs that need a gradient get one (a frozen weight gets None). Equal to plain autograd (tests)."""

    @staticmethod
    def forward(ctx, h, weight, bias, act=None):
        ctx.act, ctx.cpu = act, paddle.get_device() == 'cpu'
        ctx.needs = [not t.stop_gradient for t in (h, weight, bias)]
        ctx.save_for_backward(h, weight)
        return (_addmm_linear if ctx.cpu else F.linear)(act(h) if act else h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensor()
        need_h, need_weight, need_bias = ctx.needs
        a = h
        if ctx.act is not None:
            with paddle.set_grad_enabled(True):
                h = h.detach()
                h.stop_gradient = False
                a = ctx.act(h)                                                        # (..., in), again
        grad_h = grad_weight = grad_bias = None
        if need_h:
            grad_h = paddle.matmul(grad, weight.astype(grad.dtype), transpose_y=True)  # (..., in)
            if ctx.act is not None:
                (grad_h,) = paddle.grad(a, h, grad_h)
        a, grad = a.detach().reshape([-1, a.shape[-1]]), grad.reshape([-1, grad.shape[-1]])  # (tokens, .)
        if need_weight:
            grad_weight = paddle.matmul(a, grad.astype(a.dtype), transpose_x=True).astype(weight.dtype)  # (in, out)
        if need_bias and ctx.cpu:
            ones = paddle.ones([1, grad.shape[0]], grad.dtype)
            grad_bias = paddle.matmul(ones, grad).reshape([-1]).astype(weight.dtype)              # (out,)
        elif need_bias:
            grad_bias = grad.sum(0).astype(weight.dtype)
        return grad_h, grad_weight, grad_bias


class FastLinear(nn.Linear):
    """nn.Linear that, on the CPU, adds its bias inside the GEMM and, in eager training, runs _LinearFn's backward
    where the output has at least LINEAR_FN_MIN elements (below that, the Python backward's fixed cost of a few
    tens of microseconds outweighs the faster bias gradient). In a static training graph the C++ linear op gives
    the same bias gradient."""
    LINEAR_FN_MIN = 2 ** 16

    @paddle.jit.not_to_static
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.bias is None or not _cpu_path(self, x):
            return super().forward(x)
        if paddle.in_dynamic_mode():
            if paddle.is_grad_enabled() and math.prod(x.shape[:-1]) * self.weight.shape[1] >= self.LINEAR_FN_MIN:
                return _LinearFn.apply(x, self.weight, self.bias)
        else:  # a static training graph: traced once, so the op is C++, not a PyLayer
            kernels = _kernels_for(self, x)
            if kernels is not None:
                return kernels.linear(x, self.weight, self.bias)
        return _addmm_linear(x, self.weight, self.bias)


class FastGELU(nn.GELU):
    """nn.GELU, computed by the C++ kernel where it applies."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        kernels = _kernels_for(self, x)
        return super().forward(x) if kernels is None else kernels.gelu(x, self._approximate)


class FastLayerNorm(maxvit.Channel_Layernorm):
    """Channel_Layernorm, computed by the C++ kernel where it applies."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        kernels = _kernels_for(self, x)
        if kernels is None or self.weight is None or self.bias is None:
            return super().forward(x)
        return kernels.layer_norm(x, self.weight, self.bias, self._epsilon)


class FastRelAttention(maxvit.Rel_Attention):
    """Rel_Attention whose scale + relative bias + softmax is one C++ pass where it applies (no padding mask)."""

    def scores_to_weights(self, scores: paddle.Tensor, mask: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        kernels = _kernels_for(self, scores)
        if kernels is None or mask is not None:
            return super().scores_to_weights(scores, mask)
        return kernels.bias_softmax(scores, self.relative_bias(), self.scale)


class FastMlp(maxvit.Mlp):
    """Mlp whose eager training backward recomputes the activation instead of keeping it (_LinearFn with act).
    Not with dropout (its mask would have to be kept) nor under paddle.jit.to_static (no static form of the
    paddle.grad that recomputes the activation; the compiler plans memory itself)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not (self.training and self.drop.p == 0 and paddle.in_dynamic_mode()):
            return super().forward(x)
        h = self.fc1(x)                                                            # (..., hidden)
        return _LinearFn.apply(h, self.fc2.weight, self.fc2.bias, self.act)


class _ScaleSamples(PyLayer):
    """x * scale for a constant per-sample scale (B, 1, ...). Its backward keeps only the scale: paddle.multiply
    would also keep x alive (for a gradient of scale nobody needs), one extra activation per residual branch."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        scale, = ctx.saved_tensor()
        return grad * scale


class FastDropPath(maxvit.DropPath):
    """DropPath whose eager backward keeps only the per-sample scale, not the branch it scales."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.drop_prob == 0.0 or not self.training or not paddle.in_dynamic_mode():
            return super().forward(x)
        return _ScaleSamples.apply(x, self.sample_scale(x))


_FAST = {nn.Conv2D: FastConv2D, nn.Linear: FastLinear, nn.GELU: FastGELU, maxvit.Channel_Layernorm: FastLayerNorm,
         maxvit.Rel_Attention: FastRelAttention, maxvit.Mlp: FastMlp, maxvit.DropPath: FastDropPath}
