"""Count multiply-adds (MACs) and parameters of MaxViT per stage, attention included.

    python -m tools.flops -c configs/maxvit_t_tf_224.yaml              # one model, per stage
    python -m tools.flops -c configs/maxvit_t.yaml --size 384
    python -m tools.flops --paper                                       # official layout T/S/B/L at 224/384/512
                                                                        # next to the paper's Table 13

MACs count every multiply-add of convolutions, linear layers and the two attention matmuls (QK^T and AV), the
operations torch's FlopCounterMode counts; "other" counts one operation per element of softmax, normalisation,
activation and the elementwise steps (bias-table add, residual adds, SE gating), which MAC counts leave out.
paddle.flops is not used: it fails with numpy >= 2.4, counts matmul and softmax as zero, and leaves
total_ops/total_params buffers in the model (all seen with Paddle 3.3). Here forward hooks are added for one
forward pass and removed, so the model is left exactly as it was. Parameters are trainable ones (BatchNorm
running statistics excluded, as timm counts).
"""
import argparse
import math
import sys
from collections import defaultdict

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.flops ...')

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import paddle
import paddle.nn as nn

import maxvit
from common.config import build_model, load_config

# The paper's Table 13 (GMACs; "FLOPs" in the paper are multiply-adds), official layout, 1000 classes.
PAPER_GMACS = {('T', 224): 5.6, ('T', 384): 17.7, ('T', 512): 33.7,
               ('S', 224): 11.7, ('S', 384): 36.1, ('S', 512): 67.6,
               ('B', 224): 24.2, ('B', 384): 74.2, ('B', 512): 138.5,
               ('L', 224): 43.9, ('L', 384): 133.1, ('L', 512): 245.4}
PAPER_PARAMS_M = {'T': 31, 'S': 69, 'B': 119, 'L': 212}
VARIANTS = {'T': 'tiny_tf', 'S': 'small_tf', 'B': 'base_tf', 'L': 'large_tf'}


def _numel(t) -> int:
    return math.prod(t.shape)


def _group(name: str) -> str:
    if name.startswith('conv_stem'):
        return 'stem'
    if name.startswith('max_blocks.'):
        return f'stage {int(name.split(".")[1]) + 1}'
    return 'head'


def count(model: maxvit.MaxViT, height: int, width: int) -> dict:
    """{'macs': {group: n}, 'other': {group: n}, 'params': {group: n}, 'attention_macs': {group: n}} for one image
    of height x width; attention_macs is the part of macs in the two attention matmuls (the rest: convolutions
    and linear layers)."""
    macs, other, attention = defaultdict(int), defaultdict(int), defaultdict(int)

    def hook_for(group):
        def hook(layer, inputs, output):
            x = inputs[0]
            if isinstance(layer, nn.Conv2D):
                k = math.prod(layer.weight.shape[1:])                  # (in / groups) * kh * kw
                macs[group] += _numel(output) * k
                other[group] += _numel(output) if layer.bias is not None else 0
            elif isinstance(layer, nn.Linear):
                macs[group] += _numel(output) * layer.weight.shape[0]
                other[group] += _numel(output) if layer.bias is not None else 0
            elif isinstance(layer, maxvit.Rel_Attention):
                windows, n, c = x.shape
                macs[group] += 2 * windows * n * n * c                 # QK^T and AV over all heads
                attention[group] += 2 * windows * n * n * c
                other[group] += 3 * windows * layer.num_heads * n * n  # scale, bias add, softmax
            elif isinstance(layer, (nn.LayerNorm, nn.BatchNorm2D, nn.GELU, nn.Silu, nn.Sigmoid, nn.Tanh)):
                other[group] += _numel(output)
            elif isinstance(layer, (maxvit.Window_Block, maxvit.MBConv, maxvit.SE)):
                other[group] += _numel(output) * (2 if isinstance(layer, maxvit.Window_Block) else 1)  # residuals
        return hook

    handles = [layer.register_forward_post_hook(hook_for(_group(name)))
               for name, layer in model.named_sublayers() if name]
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros([1, model.args['input_dim'], height, width]))
    finally:
        for h in handles:
            h.remove()
        if was_training:  # Paddle 3.0's Layer.train() takes no argument
            model.train()
    params = defaultdict(int)
    for name, p in model.named_parameters():
        if not p.stop_gradient:
            params[_group(name)] += _numel(p)
    order = ['stem'] + [f'stage {i + 1}' for i in range(len(model.max_blocks))] + ['head']
    return {kind: {g: d.get(g, 0) for g in order} for kind, d in
            (('macs', macs), ('other', other), ('params', params), ('attention_macs', attention))}


def format_table(result: dict) -> str:
    rows = [f'{"":<10}{"params":>14}{"GMACs":>10}{"other Gops":>12}']
    for g in result['macs']:
        rows.append(f'{g:<10}{result["params"][g]:>14,}{result["macs"][g] / 1e9:>10.3f}'
                    f'{result["other"][g] / 1e9:>12.3f}')
    total = {k: sum(v.values()) for k, v in result.items()}
    rows.append(f'{"total":<10}{total["params"]:>14,}{total["macs"] / 1e9:>10.3f}{total["other"] / 1e9:>12.3f}')
    return '\n'.join(rows)


def paper_table() -> str:
    """The official layout at 224/384/512 beside the paper's Table 13 (window = image size // 32)."""
    rows = ['model   size  params (M)  paper (M)   GMACs   paper GMACs   ours / paper']
    for v in 'TSBL':
        for size in (224, 384, 512):
            w = size // 32
            model = maxvit.create_model(VARIANTS[v], block_size=[w, w], grid_size=[w, w])
            result = count(model, size, size)
            params, macs = sum(result['params'].values()) / 1e6, sum(result['macs'].values()) / 1e9
            paper = PAPER_GMACS[(v, size)]
            rows.append(f'MaxViT-{v} {size:>4}  {params:>10.2f}  {PAPER_PARAMS_M[v]:>9}  {macs:>7.2f}  {paper:>12.1f}'
                        f'  {macs / paper:>13.3f}')
    return '\n'.join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-c', '--config', help='YAML config (omit with --paper)')
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value')
    parser.add_argument('--size', type=int, nargs='+', help='input H [W] (default: Data.img_size)')
    parser.add_argument('--paper', action='store_true', help="official layout T/S/B/L at 224/384/512 vs the paper")
    args = parser.parse_args(argv)
    if args.paper:
        table = paper_table()
        print(table)
        return table
    if not args.config:
        parser.error('give -c CONFIG, or --paper')
    cfg = load_config(args.config, args.override)
    size = args.size or [cfg['Data']['img_size']]
    h, w = size[0], size[-1]
    result = count(build_model(cfg), h, w)
    print(f'{args.config} at {h}x{w} (MACs: convolutions, linear layers, attention matmuls; other: softmax, '
          f'norms, activations, elementwise)')
    print(format_table(result))
    return result


if __name__ == '__main__':
    main()
