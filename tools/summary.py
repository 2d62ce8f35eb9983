"""Print paddle.summary of a config's model (the article's table) and its parameters per stage.

    python -m tools.summary -c configs/maxvit_t.yaml                 # the article's Tiny at 224
    python -m tools.summary -c configs/maxvit_t_tf_384.yaml --size 384 288
"""
import argparse
import sys

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.summary ...')

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import paddle

from common.config import add_config_args, build_model, load_config


def count(layer) -> int:
    """Parameters as paddle.summary counts them (BatchNorm running statistics included)."""
    return sum(int(p.numel()) for p in layer.parameters())


def stage_table(model) -> str:
    stem = count(model.conv_stem)
    stages = [count(stage) for stage in model.max_blocks]
    total = count(model)
    rows = [('stem', stem)] + [(f'stage {i + 1} ({len(s)} blocks, {model.feature_info[i + 1]["num_chs"]} ch)', n)
                               for i, (s, n) in enumerate(zip(model.max_blocks, stages))]
    rows += [('head', total - stem - sum(stages)), ('total', total)]
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name:<{width}}  {n:>13,}  {100 * n / total:5.1f}%' for name, n in rows)


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    parser.add_argument('--size', type=int, nargs='+', help='input H [W] (default: Data.img_size)')
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    size = args.size or [cfg['Data']['img_size']]
    h, w = size[0], size[-1]
    model = build_model(cfg)
    model.eval()
    totals = paddle.summary(model, (1, cfg['Model']['input_dim'], h, w))
    print(f'\nParameters per stage ({args.config}, input {h}x{w}):')
    print(stage_table(model))
    return totals


if __name__ == '__main__':
    main()
