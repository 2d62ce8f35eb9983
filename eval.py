"""Evaluate MaxViT weights on the validation set: top-1, top-5, loss and images/s.

    python eval.py -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best
    python eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=output/maxvit_t/best -o Global.eval_weights=raw
    python -m paddle.distributed.launch --devices 0,1,2,3 eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=...
    python eval.py -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best --out results/cm

Global.pretrained_model is a weights file (.pdparams, .safetensors, .npz) or a training checkpoint prefix
(output/run/best); from a checkpoint, Global.eval_weights picks the EMA (default) or the raw weights.
Each process evaluates its own shard; the sums are reduced across processes, every image counted once.
SIGTERM or Ctrl-C ends it after the batch in progress, with one line and the status 128 + the signal (143, 130).

After the summary line it prints per-class top-1 and the most confused pairs (up to 100 classes; above, one line
saying where the matrix is) and writes the confusion matrix (rows: true class, columns: predicted top-1) as
PREFIX.csv (counts, class names in the first row and column) and PREFIX.png (row-normalised heat map,
common/confusion.py). PREFIX is --out, else beside the weights: output/run/best.confusion (EMA weights),
output/run/best.raw.confusion (raw), weights/w.confusion for weights/w.pdparams.
"""
import argparse
import os
import signal
import sys

if __name__ == '__main__' and hasattr(signal, 'pthread_sigmask'):
    # Stop signals wait while Python imports Paddle (a second or so) until main() takes them (StopSignals), so one
    # sent meanwhile ends the evaluation at its first batch. (Paddle's import installs a C++ SIGTERM handler that can
    # deadlock, and Ctrl-C would end an import with a traceback.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from common.checkpoint import CheckpointError, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config
from common.confusion import report_lines, write_csv, write_picture
from common.data import DataError, SkipReport, build_dataset, build_loader
from common.device import Stopped, StopSignals, ignore_stop_signals, setup
from common.evaluate import evaluate
from common.fast_layers import use_fast_layers


def main(argv=None) -> dict:
    with StopSignals() as stop:  # a stop signal ends the evaluation after its batch in progress: Stopped
        return evaluate_weights(argv, stop)


def evaluate_weights(argv, stop: StopSignals) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    parser.add_argument('--out', metavar='PREFIX', help='write the confusion matrix to PREFIX.csv and PREFIX.png '
                        '(default: beside the weights, WEIGHTS.confusion or CHECKPOINT.raw.confusion)')
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    g = cfg['Global']
    env = setup(g['device'])
    if not g['pretrained_model']:
        raise ConfigError('nothing to evaluate: pass -o Global.pretrained_model=PATH (weights or checkpoint prefix)')
    out = args.out or confusion_prefix(g['pretrained_model'], g['eval_weights'])
    if env.is_main:
        check_writable(out, explicit=bool(args.out))  # before the evaluation, which can take an hour

    with env.main_first():  # rank 0 writes the built-in dataset when it is missing
        dataset = build_dataset(cfg, 'val', print if env.is_main else lambda msg: None)
    model = build_model(cfg)  # Model.num_classes: auto takes the classifier width of the weights (cfg updated)
    classes = len(dataset.class_names)  # a file list may lack the last classes; a folder tree must have them all
    if classes > cfg['Model']['num_classes'] or (cfg['Data']['format'] != 'filelist'
                                                 and classes != cfg['Model']['num_classes']):
        raise ConfigError(f"Model.num_classes is {cfg['Model']['num_classes']} but the validation set has "
                          f"{classes} classes: set -o Model.num_classes={classes}")
    loader = build_loader(dataset, cfg, train=False, rank=env.rank, world_size=env.world_size)
    model = use_fast_layers(model)  # the CPU kernels and memory-saving backward passes; Paddle's own ops without it
    _, _, what = load_pretrained(model, g['pretrained_model'], ema=g['eval_weights'] == 'ema')
    skipped = SkipReport(dataset, lambda msg: print(msg, file=sys.stderr, flush=True))
    metrics = evaluate(model, loader, env.world_size, cfg['AMP'], skipped, stop)
    if env.is_main:
        print(f"{what}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['images']} images, {metrics['images_per_sec']:.1f} images/s)", flush=True)
        try:
            write_csv(out + '.csv', metrics['confusion'], dataset.class_names)
            write_picture(out + '.png', metrics['confusion'], dataset.class_names)
        except OSError as e:
            raise ConfigError(f'cannot write the confusion matrix to {out}.csv/.png ({e}); pass --out PREFIX') from e
        print('\n'.join(report_lines(metrics['confusion'], dataset.class_names, f'{out}.csv, {out}.png')),
              flush=True)
    return metrics


def confusion_prefix(weights: str, eval_weights: str) -> str:
    """Where the confusion matrix goes by default: beside the weights, named after them (a checkpoint prefix's
    raw weights get .raw, so that they do not overwrite the EMA weights' matrix)."""
    stem, ext = os.path.splitext(weights)
    if ext in ('.pdparams', '.safetensors', '.npz'):
        return stem + '.confusion'
    return weights + ('.raw' if eval_weights == 'raw' else '') + '.confusion'


def check_writable(prefix: str, explicit: bool) -> None:
    """ConfigError unless PREFIX.csv and PREFIX.png can be written (the folder exists, or is made, and is writable)."""
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f'cannot make the folder {folder} for the confusion matrix ({e.strerror})'
                          + ('' if explicit else '; pass --out PREFIX')) from e
    if not os.access(folder, os.W_OK):
        raise ConfigError(f'cannot write the confusion matrix into {folder} (not writable)'
                          + ('' if explicit else '; pass --out PREFIX'))


if __name__ == '__main__':
    try:
        main()
    except Stopped as e:
        print(f'{e}: the evaluation was interrupted, no result', file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f'error: {e}')
    finally:
        ignore_stop_signals()  # the evaluation is over; its exit status says how it ended
