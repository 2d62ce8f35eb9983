"""Evaluate MaxViT weights on the validation set: top-1, top-5, loss and images/s.

    python eval.py -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best
    python eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=output/maxvit_t/best -o Global.eval_weights=raw
    python -m paddle.distributed.launch --devices 0,1,2,3 eval.py -c configs/maxvit_t.yaml -o Global.pretrained_model=...

Global.pretrained_model is a weights file (.pdparams, .safetensors, .npz) or a training checkpoint prefix
(output/run/best); from a checkpoint, Global.eval_weights picks the EMA (default) or the raw weights.
Each process evaluates its own shard; the sums are reduced across processes, every image counted once.
"""
import argparse
import sys
import time

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from common.checkpoint import CheckpointError, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config
from common.data import DataError, SkipReport, batch_is_empty, build_dataset, build_loader
from common.device import amp_context, setup


@paddle.no_grad()
def evaluate(model, loader, world_size: int = 1, amp=None, report_skipped=None) -> dict:
    """Top-1/top-5 accuracy (%), mean cross-entropy and throughput of ``model`` over ``loader``, which yields
    (images (B, C, H, W), labels (B,), indices (B,), unreadable paths) as ImageDataset.collate makes them."""
    model.eval()
    amp_ctx = amp_context(amp)
    sums = paddle.zeros([4], dtype='float64')  # correct@1, correct@5, loss sum, images
    start = time.perf_counter()
    for images, labels, _, bad in loader:
        if report_skipped:
            report_skipped(bad)
        if batch_is_empty(labels):
            continue
        with amp_ctx():
            logits = model(images)
        logits = logits.astype('float32')
        k = min(5, logits.shape[1])
        top = logits.topk(k, axis=1)[1]
        hits = (top == labels.unsqueeze(1)).astype('float64')
        sums += paddle.stack([hits[:, 0].sum(), hits.sum(), F.cross_entropy(logits, labels, reduction='sum')
                              .astype('float64'), paddle.to_tensor(float(labels.shape[0]), 'float64')])
    if world_size > 1:
        dist.all_reduce(sums)
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, n = sums.numpy().tolist()
    if n == 0:
        raise DataError('no validation image could be read: check Data.val_root / Data.val_list (the skipped '
                        'files are listed above)')
    return {'top1': 100 * correct1 / n, 'top5': 100 * correct5 / n, 'loss': loss_sum / n,
            'images': int(n), 'images_per_sec': n / seconds}


def main(argv=None) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    g = cfg['Global']
    env = setup(g['device'])
    if not g['pretrained_model']:
        raise ConfigError('nothing to evaluate: pass -o Global.pretrained_model=PATH (weights or checkpoint prefix)')

    with env.main_first():  # rank 0 writes the built-in dataset when it is missing
        dataset = build_dataset(cfg, 'val')
    classes = len(dataset.class_names)  # a file list may lack the last classes; a folder tree must have them all
    if classes > cfg['Model']['num_classes'] or (cfg['Data']['format'] != 'filelist'
                                                 and classes != cfg['Model']['num_classes']):
        raise ConfigError(f"Model.num_classes is {cfg['Model']['num_classes']} but the validation set has "
                          f"{classes} classes: set -o Model.num_classes={classes}")
    loader = build_loader(dataset, cfg, train=False, rank=env.rank, world_size=env.world_size)
    model = build_model(cfg)
    _, _, what = load_pretrained(model, g['pretrained_model'], ema=g['eval_weights'] == 'ema')
    skipped = SkipReport(dataset, lambda msg: print(msg, file=sys.stderr, flush=True))
    metrics = evaluate(model, loader, env.world_size, cfg['AMP'], skipped)
    if env.is_main:
        print(f"{what}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['images']} images, {metrics['images_per_sec']:.1f} images/s)", flush=True)
    return metrics


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f'error: {e}')
