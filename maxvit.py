"""MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022, arXiv:2204.01697) in PaddlePaddle.

One model class, ``MaxViT(args)``, builds every variant from a plain dict of arguments:

* the article layout (``tiny_args`` ... ``xlarge_args``): the Paddle port of qwopqwop200/MaxVIT-pytorch that the
  article walks through (``paddle.summary`` of Tiny: 31,001,840 parameters), with its bugs fixed;
* the official layout (``tiny_tf_args`` ...): google-research/maxvit as timm's ``maxvit_*_tf_*`` models copy it,
  so the released weights load (see ``tools/convert_weights.py``). Every difference from the article layout is one
  named key of the args dict (``TF_LAYOUT`` lists them).

Tensor layout: MBConv works on NCHW; Window_Block and Grid_Block work channels-last (NHWC) so that LayerNorm,
the qkv/MLP projections and the partitions need no transposes. Max_Block switches layout once in each direction.

The file needs only Paddle and uses Paddle's own layers and ops. ``common.fast_layers.use_fast_layers(model)``
swaps a built model's layers for faster CPU and memory-saving forms (train.py and eval.py call it);
``model.set_grad_checkpointing()`` trades compute for memory in training.

Differences from the article's code (each is tested in tests/test_model.py):
1. Window_Block applies attention once (the article applied it twice).
2. Height and width are both checked and any size works: a map that does not divide by the block/grid size is
   padded, the padded keys are masked out of attention, and the result is cropped back.
3. ``forward`` returns logits; ``predict`` returns probabilities.
4. The relative position bias table ((2h-1)(2w-1), heads) is indexed by relative offset (paddle.gather selects whole
   rows, so the index is a row index into the table, never an element-wise gather).
5. Weights are initialised as the official model does: normal std 0.02 (truncated at 2 std) for conv and linear
   weights and the bias table, zero biases, norm weights 1.
6. Stochastic depth rises linearly from 0 at the first block to ``drop_path`` at the last; MBConv's unused
   ``dropout`` argument is gone (it takes ``drop_path`` instead).
"""
from __future__ import annotations

import difflib
import functools
import math
from typing import Dict, List, Optional, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

__all__ = [
    'MaxViT', 'Max_Block', 'Window_Block', 'Grid_Block', 'MBConv', 'SE', 'Mlp', 'Rel_Attention',
    'Channel_Layernorm', 'DropPath', 'window_partition', 'window_reverse', 'grid_partition', 'grid_reverse',
    'relative_position_index', 'resize_relative_bias_table', 'check_args', 'ArgumentError', 'create_model',
    'MODEL_ARGS', 'TF_LAYOUT', 'DEFAULT_ARGS',
    'tiny_args', 'small_args', 'base_args', 'large_args', 'xlarge_args',
    'tiny_tf_args', 'small_tf_args', 'base_tf_args', 'large_tf_args', 'xlarge_tf_args',
]

# ----------------------------------------------------------------------------------------------------------------
# Arguments. DEFAULT_ARGS is the article's tiny_args; every key is documented here and validated by check_args.
# ----------------------------------------------------------------------------------------------------------------
DEFAULT_ARGS: Dict[str, object] = {
    # --- the article's keys ---
    'stage_num_block': [2, 2, 5, 2],  # Max_Blocks per stage
    'input_dim': 3,                   # image channels
    'stem_dim': 64,                   # channels of the two stem convolutions
    'stage_dim': 64,                  # channels of stage 0; stage i has stage_dim * 2**i
    'num_heads': 2,                   # heads of stage 0; stage i has num_heads * 2**i (head dim stays 32)
    'mbconv_ksize': 3,                # depthwise kernel of MBConv
    'pooling_size': 2,                # stride of the first MBConv of every stage
    'num_classes': 1000,              # 0 gives a model without classifier (features only)
    'block_size': [7, 7],             # window of block (local) attention
    'grid_size': [7, 7],              # grid of grid (dilated global) attention
    'mbconv_expand_rate': 4,          # MBConv hidden = expand_rate * out channels
    'se_rate': 0.25,                  # SE hidden = se_rate * out channels
    'mlp_ratio': 4,                   # MLP hidden = mlp_ratio * channels
    'qkv_bias': True,
    'qk_scale': None,                 # None: head_dim ** -0.5
    'drop': 0.0,                      # dropout after MLP layers and the attention projection
    'attn_drop': 0.0,                 # dropout on attention weights
    'drop_path': 0.0,                 # stochastic depth of the LAST block; rises linearly from 0
    'act_layer': 'gelu',              # 'gelu' (exact, erf) or 'gelu_tanh' (tanh approximation, official)
    # --- layout options: article values here, official values in TF_LAYOUT ---
    'stem_out_norm': True,            # BN + act after the second stem conv (official: none)
    'mbconv_conv_bias': True,         # bias on MBConv's 1x1 expand and depthwise convs (official: none)
    'mbconv_out_norm': True,          # BN after MBConv's 1x1 projection (official: none)
    'shortcut_pool': 'max3',          # downsampling shortcut: 'max3' = MaxPool of the MBConv kernel size (3) s2
                                      # as in the article, 'avg2' = AvgPool 2x2 s2 (official)
    'shortcut_conv_always': True,     # 1x1 conv on the downsampling shortcut even when channels do not change
                                      # (official: only when they do)
    'se_act': 'gelu',                 # activation inside SE: 'gelu' (article) or 'silu' (official)
    'bn_eps': 1e-5,
    'bn_momentum': 0.9,               # Paddle convention (= TensorFlow's): running = m * running + (1 - m) * batch
    'same_padding': False,            # TensorFlow 'SAME' padding on strided convs/pools (official)
    'head': 'conv',                   # 'conv': 1x1 conv+BN+act, mean, Linear (article);
                                      # 'norm_mlp': mean, LayerNorm, Linear+tanh, Linear (official)
    # --- how the model trains, not what it is (no parameters: checkpoints load either way) ---
    'recompute': False,               # gradient checkpointing: in training, each Max_Block keeps only its input
                                      # and runs its forward again in backward (less memory, more compute)
}

_CHOICES = {
    'act_layer': ('gelu', 'gelu_tanh'),
    'se_act': ('gelu', 'gelu_tanh', 'silu'),
    'shortcut_pool': ('max3', 'avg2'),
    'head': ('conv', 'norm_mlp'),
}

tiny_args = dict(DEFAULT_ARGS)
small_args = dict(DEFAULT_ARGS, stage_dim=96, num_heads=3)
base_args = dict(DEFAULT_ARGS, stage_dim=96, num_heads=3, stage_num_block=[2, 6, 14, 2])
large_args = dict(DEFAULT_ARGS, stem_dim=128, stage_dim=128, num_heads=4, stage_num_block=[2, 6, 14, 2])
xlarge_args = dict(DEFAULT_ARGS, stem_dim=192, stage_dim=192, num_heads=6, stage_num_block=[2, 6, 14, 2])

# The official (google-research/maxvit, timm maxvit_*_tf_*) layout as overrides of the article's.
TF_LAYOUT: Dict[str, object] = {
    'act_layer': 'gelu_tanh',
    'stem_out_norm': False,
    'mbconv_conv_bias': False,
    'mbconv_out_norm': False,
    'shortcut_pool': 'avg2',
    'shortcut_conv_always': False,
    'se_act': 'silu',
    'bn_eps': 1e-3,
    'bn_momentum': 0.99,
    'same_padding': True,
    'head': 'norm_mlp',
}
tiny_tf_args = dict(tiny_args, **TF_LAYOUT)
small_tf_args = dict(small_args, **TF_LAYOUT)
base_tf_args = dict(base_args, **TF_LAYOUT)
large_tf_args = dict(large_args, **TF_LAYOUT)
xlarge_tf_args = dict(xlarge_args, **TF_LAYOUT)

MODEL_ARGS: Dict[str, Dict[str, object]] = {
    'tiny': tiny_args, 'small': small_args, 'base': base_args, 'large': large_args, 'xlarge': xlarge_args,
    'tiny_tf': tiny_tf_args, 'small_tf': small_tf_args, 'base_tf': base_tf_args, 'large_tf': large_tf_args,
    'xlarge_tf': xlarge_tf_args,
}


class ArgumentError(ValueError):
    """A MaxViT argument that check_args refuses: its ``key``, ``value`` and what it must be (``allowed``)."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f'MaxViT argument {key} is {value!r}; it must be {allowed}')
        self.key, self.value, self.allowed = key, value, allowed


# What each value must be, checked after its type (the type of its DEFAULT_ARGS value; qk_scale may be None).
_AT_LEAST_1 = (lambda v: v >= 1, '>= 1')
_RATE = (lambda v: 0 <= v < 1, 'in [0, 1) (a drop rate)')
_RULES = {
    'stage_num_block': (lambda v: len(v) >= 1 and min(v) >= 1, 'a non-empty list of ints >= 1 (Max_Blocks per stage)'),
    'input_dim': (lambda v: v >= 1, '>= 1 (image channels)'),
    'stem_dim': _AT_LEAST_1, 'stage_dim': _AT_LEAST_1, 'num_heads': _AT_LEAST_1,
    'mbconv_ksize': (lambda v: v >= 1 and v % 2 == 1,
                     'an odd int >= 1 (an even kernel changes the map size and breaks the residual)'),
    'pooling_size': (lambda v: v >= 1, '>= 1 (the stride of the first MBConv of every stage)'),
    'num_classes': (lambda v: v >= 0, '>= 0 (0 builds a model without classifier)'),
    'block_size': (lambda v: len(v) == 2 and min(v) >= 1, 'an int or two ints >= 1 (height, width)'),
    'grid_size': (lambda v: len(v) == 2 and min(v) >= 1, 'an int or two ints >= 1 (height, width)'),
    'mbconv_expand_rate': (lambda v: v >= 1, '>= 1 (MBConv hidden channels = expand_rate x channels)'),
    'se_rate': (lambda v: v > 0, '> 0 (SE hidden channels = se_rate x channels)'),
    'mlp_ratio': (lambda v: v >= 1, '>= 1 (MLP hidden channels = mlp_ratio x channels)'),
    'qk_scale': (lambda v: v > 0, '> 0, or null for head_dim ** -0.5'),
    'drop': _RATE, 'attn_drop': _RATE, 'bn_eps': (lambda v: v > 0, '> 0'),
    'drop_path': (lambda v: 0 <= v < 1, 'in [0, 1) (the stochastic depth rate of the last block)'),
    'bn_momentum': (lambda v: 0 <= v < 1, 'in [0, 1) (running = momentum x running + (1 - momentum) x batch)'),
}


def _typed(key: str, value):
    """``value`` if it has the type of ``DEFAULT_ARGS[key]`` (a float from an int, a list from a tuple), else
    ArgumentError."""
    default = 0.125 if key == 'qk_scale' else DEFAULT_ARGS[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in _CHOICES:
        ok, kind = value in _CHOICES[key], 'one of ' + ', '.join(map(repr, _CHOICES[key]))
    elif isinstance(default, bool):
        ok, kind = isinstance(value, bool), 'true or false'
    elif isinstance(default, int):
        ok, kind = is_int, f'an int like {default}'
    elif isinstance(default, float):
        ok, kind = (is_int or isinstance(value, float)) and math.isfinite(value), f'a finite number like {default}'
        value = float(value) if ok else value
    else:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        kind, value = f'a list of ints like {default}', list(value) if ok else value
    if not ok:
        raise ArgumentError(key, value, ('null or ' if key == 'qk_scale' else '') + kind)
    return value


def check_args(args: Dict[str, object]) -> Dict[str, object]:
    """Return a complete, validated copy of ``args``: missing keys take DEFAULT_ARGS values, an int block_size or
    grid_size is a square, an int where a float is documented becomes a float.

    Raises KeyError for an unknown key (naming the closest valid one) and ArgumentError (a ValueError naming the
    key, the value and what it must be) for a value of the wrong type or out of its range.
    """
    unknown = [k for k in args if k not in DEFAULT_ARGS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, DEFAULT_ARGS.keys(), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
        raise KeyError(f"unknown MaxViT argument(s): {', '.join(hints)}; valid keys: {', '.join(DEFAULT_ARGS)}")
    out = dict(DEFAULT_ARGS, **args)
    for key in ('block_size', 'grid_size'):
        if isinstance(out[key], int) and not isinstance(out[key], bool):
            out[key] = [out[key], out[key]]
    for key, value in out.items():
        if key == 'qk_scale' and value is None:  # head_dim ** -0.5
            continue
        out[key] = value = _typed(key, value)
        test, allowed = _RULES.get(key, (None, ''))
        if test is not None and not test(value):
            raise ArgumentError(key, value, allowed)
    if out['stage_dim'] % out['num_heads']:  # stage i has stage_dim * 2**i channels and num_heads * 2**i heads
        raise ArgumentError('num_heads', out['num_heads'],
                            f"a divisor of stage_dim ({out['stage_dim']}): every stage splits its channels evenly "
                            f"into heads")
    return out


def create_model(name_or_args, **overrides) -> 'MaxViT':
    """Build a MaxViT from a MODEL_ARGS name ('tiny', 'small_tf', ...) or an args dict, with key overrides."""
    if isinstance(name_or_args, str):
        if name_or_args not in MODEL_ARGS:
            raise KeyError(f"unknown MaxViT variant {name_or_args!r}; known: {', '.join(MODEL_ARGS)}")
        name_or_args = MODEL_ARGS[name_or_args]
    return MaxViT(dict(name_or_args, **overrides))


# ----------------------------------------------------------------------------------------------------------------
# The model, top down as in the article: MaxViT -> Max_Block -> Window_Block / Grid_Block -> MBConv
# ----------------------------------------------------------------------------------------------------------------


class MaxViT(nn.Layer):
    """MaxViT image classifier. ``MaxViT(args)(images)`` maps (B, input_dim, H, W) to logits (B, num_classes).

    Any H, W work. ``forward_features`` returns the stem and the four stage outputs (strides 2, 4, 8, 16, 32;
    channels in ``feature_info``); ``predict`` returns probabilities.

    Backbone for detection/segmentation (docs/backbone.md). The keywords say how a model is used, not what it is,
    so they are not keys of ``args`` (configs and checkpoints do not carry them):

    * ``out_indices``: with it, there is no classifier head, and ``forward`` returns the list of feature maps
      with these indices (0 = stem, stride 2; 1..4 = stages, strides 4..32), NCHW; stages after the last one
      asked for are not built. ``feature_info`` then describes exactly those maps, in that order.
    * ``frozen_stages=k`` (k >= 0): the stem (index 0) and stages 1..k get no gradient (stop_gradient) and
      run in eval mode (BatchNorm statistics fixed, no dropout or stochastic depth) even in training.
    * ``norm_eval=True``: every BatchNorm runs in eval mode even in training (fixed statistics, as
      PaddleDetection backbones do for small detection batches); its weight and bias still train.

    Paddle's ``train()`` sets ``training`` on every sublayer directly (a detector's ``train()`` never calls the
    backbone's), so these modes are re-applied at the start of every forward pass in training mode.
    """

    def __init__(self, args: Dict[str, object], out_indices: Optional[Sequence[int]] = None,
                 frozen_stages: int = -1, norm_eval: bool = False):
        super().__init__()
        args = check_args(args)
        self.args = args
        num_stages = len(args['stage_num_block'])
        if out_indices is not None:
            out_indices = [int(i) for i in out_indices]
            if not out_indices or out_indices != sorted(set(out_indices)) or out_indices[0] < 0 \
                    or out_indices[-1] > num_stages:
                raise ValueError(f'out_indices must be increasing feature indices in 0..{num_stages} (0 = stem, '
                                 f'i = stage i), got {out_indices}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be -1 (none), 0 (stem) or up to {num_stages} (stem and stages '
                             f'1..k), got {frozen_stages}')
        self.out_indices, self.frozen_stages, self.norm_eval = out_indices, frozen_stages, bool(norm_eval)
        stem, act, same = args['stem_dim'], args['act_layer'], args['same_padding']
        bn = functools.partial(nn.BatchNorm2D, momentum=args['bn_momentum'], epsilon=args['bn_eps'])
        stem_layers = [_conv(args['input_dim'], stem, 3, 2, same=same), bn(stem), _act(act),
                       _conv(stem, stem, 3, 1)]
        if args['stem_out_norm']:
            stem_layers += [bn(stem), _act(act)]
        self.conv_stem = nn.Sequential(*stem_layers)
        self.feature_info = [dict(num_chs=stem, reduction=2, module='conv_stem')]

        depths = args['stage_num_block']
        total = sum(depths)
        # stochastic depth: linear from 0 at the first Max_Block to drop_path at the last
        rates = [args['drop_path'] * i / max(total - 1, 1) for i in range(total)]
        in_dim, block_idx = stem, 0
        self.max_blocks = nn.LayerList()
        for i, num_block in enumerate(depths):
            if out_indices is not None and i >= out_indices[-1]:
                break                                       # a backbone builds no stage after its last output
            out_dim, heads = args['stage_dim'] * 2 ** i, args['num_heads'] * 2 ** i
            layers = nn.LayerList()
            for j in range(num_block):
                stride = args['pooling_size'] if j == 0 else 1
                layers.append(Max_Block(in_dim, out_dim, heads, stride, rates[block_idx], args))
                in_dim, block_idx = out_dim, block_idx + 1
            self.max_blocks.append(layers)
            self.feature_info.append(dict(num_chs=out_dim, reduction=2 * args['pooling_size'] ** (i + 1),
                                          module=f'max_blocks.{i}'))
        self.num_features = in_dim

        if out_indices is not None:
            self.feature_info = [self.feature_info[i] for i in out_indices]
        elif args['head'] == 'conv':
            self.last_conv = nn.Sequential(nn.Conv2D(in_dim, in_dim, 1), bn(in_dim), _act(act))
        else:
            self.norm = nn.LayerNorm(in_dim)
            self.pre_logits = nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh())
        if out_indices is None:
            self.proj = nn.Linear(in_dim, args['num_classes']) if args['num_classes'] > 0 else nn.Identity()
        self.apply(_init_weights)

        for part in self._frozen_parts():
            for p in part.parameters():
                p.stop_gradient = True

    def _frozen_parts(self) -> List[nn.Layer]:
        return [self.conv_stem, *self.max_blocks[:self.frozen_stages]] if self.frozen_stages >= 0 else []

    def _keep_frozen_in_eval(self) -> None:
        """Eval mode for the frozen parts and (norm_eval) every BatchNorm: ``training`` set directly, as
        Paddle's train() sets it (Layer.eval() would also switch the global tracer). Looked up on every call,
        so that BatchNorms converted later (nn.SyncBatchNorm.convert_sync_batchnorm) are found too."""
        for part in self._frozen_parts():
            for layer in [part, *part.sublayers()]:
                layer.training = False
        if self.norm_eval:
            for layer in self.sublayers():
                if isinstance(layer, (nn.BatchNorm2D, nn.SyncBatchNorm)):
                    layer.training = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing on or off (timm's switch; args['recompute'] sets it at construction): in
        training, each Max_Block keeps only its input and runs its forward again in backward."""
        self.args['recompute'] = bool(enable)

    def _recomputes(self, block: nn.Layer, x: paddle.Tensor) -> bool:
        """Whether ``block`` runs through gradient checkpointing: args['recompute'], training (a frozen block
        runs in eval mode: no), a gradient to compute (x needs one: recompute passes only x to its backward), and
        eager mode (paddle.jit.to_static leaves memory planning to the compiler)."""
        return (self.args['recompute'] and block.training and paddle.is_grad_enabled() and not x.stop_gradient
                and paddle.in_dynamic_mode())

    def forward_features(self, x: paddle.Tensor) -> List[paddle.Tensor]:
        """(B, C, H, W) -> [stem (B, stem_dim, H/2, W/2), stage i (B, stage_dim*2**i, H/2**(i+2), ...)]."""
        if x.ndim != 4 or x.shape[1] != self.args['input_dim']:
            raise ValueError(f"MaxViT expects images shaped [batch, {self.args['input_dim']}, height, width], "
                             f"got a tensor of shape {list(x.shape)}")
        if self.training and (self.frozen_stages >= 0 or self.norm_eval):
            self._keep_frozen_in_eval()
        x = self.conv_stem(x)
        features = [x]
        for blocks in self.max_blocks:
            for block in blocks:
                x = _recompute_block(block, x) if self._recomputes(block, x) else block(x)
            features.append(x)
        return features

    def forward_head(self, x: paddle.Tensor) -> paddle.Tensor:
        """Last feature map (B, C, h, w) -> logits (B, num_classes)."""
        if self.out_indices is not None:
            raise RuntimeError(f'this MaxViT is a backbone (out_indices={self.out_indices}): it has no classifier')
        if self.args['head'] == 'conv':
            x = self.last_conv(x).mean(axis=[2, 3])
        else:
            x = self.pre_logits(self.norm(x.mean(axis=[2, 3])))
        return self.proj(x)

    def forward(self, x: paddle.Tensor):
        """Logits (B, num_classes); for a backbone (out_indices), the list of the chosen feature maps."""
        if self.out_indices is not None:
            features = self.forward_features(x)
            return [features[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x)[-1])

    def predict(self, x: paddle.Tensor) -> paddle.Tensor:
        """Class probabilities (B, num_classes): softmax of the logits, for export and prediction."""
        return F.softmax(self(x), axis=-1)

    def bias_table_windows(self) -> Dict[str, List[int]]:
        """{state-dict name of every relative bias table: its window [h, w]}: what loading weights trained at
        another window size resizes each table to."""
        return {f'{name}.relative_bias_table': list(layer.window_size)
                for name, layer in self.named_sublayers() if isinstance(layer, Rel_Attention)}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes."""
        self.args['num_classes'] = num_classes
        self.proj = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.proj.apply(_init_weights)


def _init_weights(layer: nn.Layer) -> None:
    """Official initialisation: conv/linear weights ~ truncated normal(0, 0.02), zero biases.
    Norms keep Paddle's defaults (weight 1, bias 0); bias tables are initialised where they are created."""
    if isinstance(layer, (nn.Conv2D, nn.Linear)):
        _TRUNC_NORMAL(layer.weight)
        if layer.bias is not None:
            nn.initializer.Constant(0.0)(layer.bias)


class Max_Block(nn.Layer):
    """MBConv -> Window_Block -> Grid_Block. (B, Cin, H, W) -> (B, Cout, H/stride, W/stride)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, stride: int, drop_path: float,
                 args: Dict[str, object]):
        super().__init__()
        self.mbconv = MBConv(in_dim, out_dim, args['mbconv_ksize'], stride, args['mbconv_expand_rate'],
                             args['se_rate'], drop_path, act_layer=args['act_layer'], se_act=args['se_act'],
                             conv_bias=args['mbconv_conv_bias'], out_norm=args['mbconv_out_norm'],
                             shortcut_pool=args['shortcut_pool'], shortcut_conv_always=args['shortcut_conv_always'],
                             same_padding=args['same_padding'], bn_eps=args['bn_eps'],
                             bn_momentum=args['bn_momentum'])
        attn_kwargs = dict(mlp_ratio=args['mlp_ratio'], qkv_bias=args['qkv_bias'], qk_scale=args['qk_scale'],
                           drop=args['drop'], attn_drop=args['attn_drop'], drop_path=drop_path,
                           act_layer=args['act_layer'])
        self.block_attn = Window_Block(out_dim, args['block_size'], num_heads, **attn_kwargs)
        self.grid_attn = Grid_Block(out_dim, args['grid_size'], num_heads, **attn_kwargs)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.mbconv(x).transpose([0, 2, 3, 1])        # (B, H, W, C): attention works channels-last
        x = self.grid_attn(self.block_attn(x))
        return x.transpose([0, 3, 1, 2])                  # back to (B, C, H, W) for the next MBConv


def _recompute_block(block: nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
    """block(x) with gradient checkpointing (Paddle's recompute): the forward keeps no activations, only x, and
    runs again in backward with the first run's random state (the same DropPath masks) and autocast, so the
    gradients are the plain ones. BatchNorm normalises by the batch in both runs; the second run starts from the
    running statistics the first one started from, so they end as one update per step leaves them."""
    running = [t for layer in block.sublayers() if isinstance(layer, (nn.BatchNorm2D, nn.SyncBatchNorm))
               for t in layer.state_dict().values() if t.stop_gradient]     # running mean and variance
    before = [t.clone() for t in running]

    def run(inp):
        if paddle.is_grad_enabled():  # the second run (recompute runs the first under no_grad)
            for t, value in zip(running, before):
                paddle.assign(value, output=t)
        return block(inp)
    return recompute(run, x, preserve_rng_state=True)


# ----------------------------------------------------------------------------------------------------------------
# Partitions. Block (window) attention attends within each non-overlapping p0 x p1 window; grid attention
# attends within each g0 x g1 set of positions spaced (H/g0, W/g1) apart. Both return (B*num_windows, N, C)
# with N = p0*p1 (or g0*g1), window index ordered (batch, row, column). The article called these block/unblock.
# ----------------------------------------------------------------------------------------------------------------


def window_partition(x: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """(B, H, W, C) -> (B * H/p0 * W/p1, p0*p1, C): token (i, j) of window (a, b) is pixel (a*p0+i, b*p1+j)."""
    B, H, W, C = x.shape
    if H % size[0] or W % size[1]:
        raise ValueError(f'window_partition: a {H}x{W} map does not divide into {size[0]}x{size[1]} windows')
    x = x.reshape([B, H // size[0], size[0], W // size[1], size[1], C])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, size[0] * size[1], C])


def window_reverse(windows: paddle.Tensor, size: Sequence[int], hw: Sequence[int]) -> paddle.Tensor:
    """Inverse of window_partition: (B * H/p0 * W/p1, p0*p1, C) -> (B, H, W, C)."""
    H, W = hw
    C = windows.shape[-1]
    x = windows.reshape([-1, H // size[0], W // size[1], size[0], size[1], C])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, H, W, C])


def grid_partition(x: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """(B, H, W, C) -> (B * H/g0 * W/g1, g0*g1, C): token (i, j) of window (a, b) is pixel (i*H/g0+a, j*W/g1+b)."""
    B, H, W, C = x.shape
    if H % size[0] or W % size[1]:
        raise ValueError(f'grid_partition: a {H}x{W} map does not divide into a {size[0]}x{size[1]} grid')
    x = x.reshape([B, size[0], H // size[0], size[1], W // size[1], C])
    return x.transpose([0, 2, 4, 1, 3, 5]).reshape([-1, size[0] * size[1], C])


def grid_reverse(windows: paddle.Tensor, size: Sequence[int], hw: Sequence[int]) -> paddle.Tensor:
    """Inverse of grid_partition: (B * H/g0 * W/g1, g0*g1, C) -> (B, H, W, C)."""
    H, W = hw
    C = windows.shape[-1]
    x = windows.reshape([-1, H // size[0], W // size[1], size[0], size[1], C])
    return x.transpose([0, 3, 1, 4, 2, 5]).reshape([-1, H, W, C])


def _pad_bottom_right(x: paddle.Tensor, pad_h: int, pad_w: int, value: float) -> paddle.Tensor:
    """(B, H, W, C) -> (B, H+pad_h, W+pad_w, C), new rows/columns filled with ``value``. Concatenation rather
    than F.pad: in exported models Paddle 3.3's oneDNN pads channels-last maps along the wrong axes
    (data_format='NHWC') or crashes (the generic pad op)."""
    B, H, W, C = x.shape
    if pad_h:
        x = paddle.concat([x, paddle.full([B, pad_h, W, C], value, x.dtype)], axis=1)
    if pad_w:
        x = paddle.concat([x, paddle.full([B, H + pad_h, pad_w, C], value, x.dtype)], axis=2)
    return x


class Window_Block(nn.Layer):
    """Block attention + MLP, pre-norm residual, on a channels-last map (B, H, W, C) -> (B, H, W, C).

    Only attention needs the windows, but everything else (LayerNorm, MLP, residuals) is per token, so the map is
    partitioned once on the way in and put back once on the way out: the same values as normalising the map and
    partitioning it for attention alone, with no layout change between the norms and the linear layers, which
    inference engines then fuse. If H or W does not divide by the partition size, the map is zero-padded at the
    bottom/right, padded keys are masked out of attention, and padded tokens are cropped at the end (they never
    reach a real token).
    """
    partition = staticmethod(window_partition)
    reverse = staticmethod(window_reverse)

    def __init__(self, dim: int, block_size: Sequence[int] = (7, 7), num_heads: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: str = 'gelu'):
        super().__init__()
        self.partition_size = list(block_size)
        self.norm1 = Channel_Layernorm(dim)
        self.attn = Rel_Attention(dim, block_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = Channel_Layernorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def _drop_images(self, branch: paddle.Tensor, tokens_per_image: int) -> paddle.Tensor:
        """DropPath on a (B*num_windows, N, C) branch, per image rather than per window: windows are ordered
        (batch, window), so a (B, num_windows*N, C) view holds each image's tokens together."""
        if isinstance(self.drop_path, nn.Identity):
            return branch
        return self.drop_path(branch.reshape([-1, tokens_per_image, branch.shape[-1]])).reshape(branch.shape)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        B, H, W, C = x.shape
        ph, pw = self.partition_size
        pad_h, pad_w = -H % ph, -W % pw
        mask = ()  # Rel_Attention's optional argument; none when nothing is padded (as paddle.summary shows it)
        if pad_h or pad_w:
            x = _pad_bottom_right(x, pad_h, pad_w, 0.0)                   # (B, Hp, Wp, C)
            padded = _pad_bottom_right(paddle.zeros([1, H, W, 1]), pad_h, pad_w, 1.0)
            mask = (self.partition(padded, self.partition_size).squeeze(-1).astype('bool'),)  # (nW, N), True = pad
        Hp, Wp = H + pad_h, W + pad_w
        t = self.partition(x, self.partition_size)                        # (B*nW, N, C)
        t = t + self._drop_images(self.attn(self.norm1(t), *mask), Hp * Wp)
        t = t + self._drop_images(self.mlp(self.norm2(t)), Hp * Wp)
        x = self.reverse(t, self.partition_size, (Hp, Wp))                # (B, Hp, Wp, C)
        return x[:, :H, :W, :] if pad_h or pad_w else x


class Grid_Block(Window_Block):
    """Grid attention + MLP: like Window_Block, but each attention window is a grid_size grid of positions
    spaced (H/g0, W/g1) apart, so it mixes information across the whole map (dilated, global)."""
    partition = staticmethod(grid_partition)
    reverse = staticmethod(grid_reverse)

    def __init__(self, dim: int, grid_size: Sequence[int] = (7, 7), num_heads: int = 8, **kwargs):
        super().__init__(dim, grid_size, num_heads, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# MBConv and squeeze-excitation (NCHW)
# ----------------------------------------------------------------------------------------------------------------


class MBConv(nn.Layer):
    """Pre-norm inverted bottleneck: BN -> 1x1 expand -> BN act -> kxk depthwise (stride) -> BN act -> SE
    -> 1x1 project [-> BN], plus a shortcut (pool + 1x1 conv when it downsamples). (B, Cin, H, W) ->
    (B, Cout, ceil(H/stride), ceil(W/stride)).

    The positional arguments are the article's; the keyword-only ones are the layout options of DEFAULT_ARGS
    (article values by default, TF_LAYOUT for the official layout).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3, stride_size: int = 1,
                 expand_rate: float = 4, se_rate: float = 0.25, drop_path: float = 0.0, *,
                 act_layer: str = 'gelu', se_act: str = 'gelu', conv_bias: bool = True, out_norm: bool = True,
                 shortcut_pool: str = 'max3', shortcut_conv_always: bool = True, same_padding: bool = False,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.9):
        super().__init__()
        hidden_dim = int(expand_rate * out_dim)
        bn = functools.partial(nn.BatchNorm2D, momentum=bn_momentum, epsilon=bn_eps)
        self.bn = bn(in_dim)
        self.expand_conv = nn.Sequential(_conv(in_dim, hidden_dim, 1, bias=conv_bias), bn(hidden_dim),
                                         _act(act_layer))
        self.dw_conv = nn.Sequential(_conv(hidden_dim, hidden_dim, kernel_size, stride_size, groups=hidden_dim,
                                           bias=conv_bias, same=same_padding),
                                     bn(hidden_dim), _act(act_layer))
        self.se = SE(hidden_dim, max(1, int(out_dim * se_rate)), se_act)
        out_conv = [_conv(hidden_dim, out_dim, 1)]
        if out_norm:
            out_conv.append(bn(out_dim))
        self.out_conv = nn.Sequential(*out_conv)
        shortcut = []
        if stride_size > 1:
            if shortcut_pool == 'max3':
                shortcut.append(nn.MaxPool2D(kernel_size, stride_size, kernel_size // 2))
            else:
                shortcut.append(nn.AvgPool2D(stride_size, stride_size, padding='SAME' if same_padding else 0,
                                             ceil_mode=not same_padding))
        if in_dim != out_dim or (stride_size > 1 and shortcut_conv_always):
            shortcut.append(nn.Conv2D(in_dim, out_dim, 1))
        self.proj = nn.Sequential(*shortcut) if shortcut else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.bn(x)
        out = self.expand_conv(out)          # (B, hidden, H, W)
        out = self.dw_conv(out)              # (B, hidden, ceil(H/s), ceil(W/s))
        out = self.se(out)
        out = self.out_conv(out)             # (B, out, ceil(H/s), ceil(W/s))
        return self.drop_path(out) + self.proj(x)


class SE(nn.Layer):
    """Squeeze-and-excitation: x * sigmoid(conv(act(conv(mean_hw(x))))). x: (B, C, H, W)."""

    def __init__(self, in_dim: int, hidden_dim: int, act_layer: str = 'gelu'):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2D(in_dim, hidden_dim, 1), _act(act_layer),
                                  nn.Conv2D(hidden_dim, in_dim, 1), nn.Sigmoid())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # adaptive_avg_pool2d rather than mean: same values, but Paddle Inference runs it as a oneDNN pool
        # (reduce_mean falls back to a slow kernel) and its backward is cheaper than mean's broadcast.
        return x * self.gate(F.adaptive_avg_pool2d(x, 1))  # gate: (B, C, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Attention and MLP (channels-last tokens)
# ----------------------------------------------------------------------------------------------------------------


def relative_position_index(size: Sequence[int]) -> paddle.Tensor:
    """Row of the bias table for every (query, key) pair of an h x w window, flattened to (h*w*h*w,).

    Row = (dy + h - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = query - key, as in Swin and the article.
    """
    h, w = size
    ys, xs = paddle.meshgrid(paddle.arange(h), paddle.arange(w))
    coords = paddle.stack([ys.flatten(), xs.flatten()])                 # (2, N)
    rel = coords.unsqueeze(2) - coords.unsqueeze(1)                    # (2, N, N): query - key
    return ((rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)).flatten().astype('int64')


def resize_relative_bias_table(table: paddle.Tensor, new_size: Sequence[int],
                               old_size: Optional[Sequence[int]] = None) -> paddle.Tensor:
    """Resize a ((2h-1)(2w-1), heads) bias table to another window size, bilinearly (align_corners=False),
    as the official code does (tf.image.resize) when fine-tuning at a new resolution. ``old_size`` defaults
    to the square window the table's row count implies."""
    rows, heads = table.shape
    if old_size is None:
        side = math.isqrt(rows)
        if side * side != rows:
            raise ValueError(f'a bias table of {rows} rows is not from a square window; pass old_size')
        old_size = ((side + 1) // 2, (side + 1) // 2)
    old = [2 * s - 1 for s in old_size]
    new = [2 * s - 1 for s in new_size]
    if old == new:
        return table
    grid = table.astype('float32').transpose([1, 0]).reshape([1, heads, old[0], old[1]])
    grid = F.interpolate(grid, size=new, mode='bilinear', align_corners=False)
    return grid.reshape([heads, new[0] * new[1]]).transpose([1, 0]).astype(table.dtype)


class Rel_Attention(nn.Layer):
    """Multi-head self-attention with a learned relative position bias, on windows (B', N, C) -> (B', N, C).

    ``mask`` (optional, (num_windows, N), True = padding) removes padded keys: windows are ordered
    (batch, window), so B' = batch * num_windows.
    """

    def __init__(self, dim: int, window_size: Sequence[int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = list(window_size)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        h, w = self.window_size
        self.relative_bias_table = self.create_parameter(
            [(2 * h - 1) * (2 * w - 1), num_heads], default_initializer=_TRUNC_NORMAL)
        self.register_buffer('relative_index', relative_position_index(self.window_size), persistable=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_bias(self) -> paddle.Tensor:
        """(heads, N, N) bias: one row-gather of the table (index_select semantics, not torch.gather's)."""
        n = self.window_size[0] * self.window_size[1]
        bias = paddle.index_select(self.relative_bias_table, self.relative_index, axis=0)  # (N*N, heads)
        return bias.reshape([n, n, self.num_heads]).transpose([2, 0, 1])

    def attention_weights(self, x: paddle.Tensor, mask: Optional[paddle.Tensor] = None):
        """Returns (softmax weights (B', heads, N, N), values (B', heads, N, head_dim))."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape([Bw, N, 3, self.num_heads, C // self.num_heads])
        q, k, v = qkv.transpose([2, 0, 3, 1, 4]).unbind(0)                 # each (B', heads, N, head_dim)
        scores = paddle.matmul(q, k, transpose_y=True)                     # (B', heads, N, N)
        attn = self.scores_to_weights(scores, mask)                        # float32
        return (attn if attn.dtype == v.dtype else attn.astype(v.dtype)), v

    def scores_to_weights(self, scores: paddle.Tensor, mask: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """softmax(scale * q.k + relative bias) over the keys, with padded keys (mask) left out: (B', heads, N, N)."""
        Bw, heads, N, _ = scores.shape
        # scale the contiguous product, not the strided q view (an elementwise op on a strided view is slow)
        attn = scores * self.scale + self.relative_bias().astype(scores.dtype)
        if mask is not None:                                               # (nW, N) -> bias on padded keys
            nw = mask.shape[0]
            neg = paddle.full([], -1e4 if attn.dtype == paddle.float16 else -1e9, attn.dtype)
            key_bias = paddle.where(mask, neg, paddle.zeros([], attn.dtype)).reshape([1, nw, 1, 1, N])
            attn = (attn.reshape([-1, nw, heads, N, N]) + key_bias).reshape([Bw, heads, N, N])
        # softmax in float32 (as the official code) so that fp16/bf16 training stays stable
        return F.softmax(attn.astype('float32'), axis=-1)

    def forward(self, x: paddle.Tensor, mask: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        Bw, N, C = x.shape
        attn, v = self.attention_weights(x, mask)
        out = paddle.matmul(self.attn_drop(attn), v)                      # (B', heads, N, head_dim)
        out = out.transpose([0, 2, 1, 3]).reshape([Bw, N, C])
        return self.proj_drop(self.proj(out))


class Mlp(nn.Layer):
    """Linear -> act -> dropout -> Linear -> dropout on channels-last tokens (..., C)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = 'gelu', drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = _act(act_layer)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.act(self.fc1(x))                            # (..., hidden)
        return self.drop(self.fc2(self.drop(h)))


# ----------------------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------------------


# N(0, 0.02) truncated at 2 std. Paddle's a/b are absolute bounds (the default -2, 2 would truncate nothing).
_TRUNC_NORMAL = nn.initializer.TruncatedNormal(mean=0.0, std=0.02, a=-0.04, b=0.04)


def _act(name: str) -> nn.Layer:
    if name == 'silu':
        return nn.Silu()
    return nn.GELU(approximate=(name == 'gelu_tanh'))


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True,
          same: bool = False) -> nn.Conv2D:
    """Conv2D with 'k//2' padding, or TensorFlow 'SAME' padding when it is strided and ``same`` is set
    (stride 2 on an even size: TF pads nothing before and one after, which shifts the sampling grid)."""
    padding = 'SAME' if (same and stride > 1) else k // 2
    return nn.Conv2D(cin, cout, k, stride, padding, groups=groups, bias_attr=None if bias else False)


class DropPath(nn.Layer):
    """Stochastic depth: zero a residual branch for a random subset of samples, scale the rest by 1/keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def sample_scale(self, x: paddle.Tensor) -> paddle.Tensor:
        """(B, 1, 1, ...): 0 for a dropped sample, 1/keep for a kept one."""
        keep = 1.0 - self.drop_prob
        return (paddle.rand([x.shape[0]] + [1] * (x.ndim - 1)) < keep).astype(x.dtype) / keep

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self.sample_scale(x)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class Channel_Layernorm(nn.LayerNorm):
    """LayerNorm over the channel axis of channels-last tokens (..., C): an attention block's windows.

    The article's Channel_Layernorm wrapped a LayerNorm between two NCHW<->NHWC transposes; our attention blocks
    are channels-last already, so the transposes are gone and this is LayerNorm itself (same parameters).
    """
