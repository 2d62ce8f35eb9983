"""Evaluate MaxViT weights on the validation set: top-1, top-5, loss and images/s.

    python eval.py -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best
    python eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=output/maxvit_t/best -o Global.eval_weights=raw
    python -m paddle.distributed.launch --devices 0,1,2,3 eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=...

Global.pretrained_model is a weights file (.pdparams, .safetensors, .npz) or a training checkpoint prefix
(output/run/best); from a checkpoint, Global.eval_weights picks the EMA (default) or the raw weights.
Each process evaluates its own shard; the sums are reduced across processes, every image counted once.
SIGTERM or Ctrl-C ends it after the batch in progress, with one line and the status 128 + the signal (143, 130).
"""
import argparse
import signal
import sys

if __name__ == '__main__' and hasattr(signal, 'pthread_sigmask'):
    # Stop signals wait while Python imports Paddle (a second or so) until main() takes them (StopSignals), so one
    # sent meanwhile ends the evaluation at its first batch. (Paddle's import installs a C++ SIGTERM handler that can
    # deadlock, and Ctrl-C would end an import with a traceback.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from common.checkpoint import CheckpointError, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config
from common.data import DataError, SkipReport, build_dataset, build_loader
from common.device import Stopped, StopSignals, ignore_stop_signals, setup
from common.evaluate import evaluate
from common.fast_layers import use_fast_layers


def main(argv=None) -> dict:
    with StopSignals() as stop:  # a stop signal ends the evaluation after its batch in progress: Stopped
        return evaluate_weights(argv, stop)


def evaluate_weights(argv, stop: StopSignals) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    g = cfg['Global']
    env = setup(g['device'])
    if not g['pretrained_model']:
        raise ConfigError('nothing to evaluate: pass -o Global.pretrained_model=PATH (weights or checkpoint prefix)')

    with env.main_first():  # rank 0 writes the built-in dataset when it is missing
        dataset = build_dataset(cfg, 'val', print if env.is_main else lambda msg: None)
    classes = len(dataset.class_names)  # a file list may lack the last classes; a folder tree must have them all
    if classes > cfg['Model']['num_classes'] or (cfg['Data']['format'] != 'filelist'
                                                 and classes != cfg['Model']['num_classes']):
        raise ConfigError(f"Model.num_classes is {cfg['Model']['num_classes']} but the validation set has "
                          f"{classes} classes: set -o Model.num_classes={classes}")
    loader = build_loader(dataset, cfg, train=False, rank=env.rank, world_size=env.world_size)
    model = build_model(cfg)
    model = use_fast_layers(model)  # the CPU kernels and memory-saving backward passes; Paddle's own ops without it
    _, _, what = load_pretrained(model, g['pretrained_model'], ema=g['eval_weights'] == 'ema')
    skipped = SkipReport(dataset, lambda msg: print(msg, file=sys.stderr, flush=True))
    metrics = evaluate(model, loader, env.world_size, cfg['AMP'], skipped, stop)
    if env.is_main:
        print(f"{what}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['images']} images, {metrics['images_per_sec']:.1f} images/s)", flush=True)
    return metrics


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
