"""Evaluation over a validation loader: top-1, top-5, mean cross-entropy, images/s and the confusion matrix, reduced
across processes (each process evaluates its own shard, every image counted once). Used by eval.py and by train.py
after each epoch.
"""
import time
from typing import Optional

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from common.data import DataError, batch_is_empty
from common.device import Stopped, StopSignals, amp_context, iterate


@paddle.no_grad()
def evaluate(model, loader, world_size: int = 1, amp=None, report_skipped=None,
             stop: Optional[StopSignals] = None) -> dict:
    """Top-1/top-5 accuracy (%), mean cross-entropy and throughput of ``model`` over ``loader``, which yields
    (images (B, C, H, W), labels (B,), indices (B,), unreadable paths) as ImageDataset.collate makes them, and
    'confusion': the (num_classes, num_classes) int64 counts of images of true class i (row) whose top-1 is j.
    With ``stop``, a stop signal ends the evaluation after the batch in progress: Stopped is raised."""
    model.eval()
    amp_ctx = amp_context(amp)
    classes = model_classes(model)
    sums = paddle.zeros([4], dtype='float64')  # correct@1, correct@5, loss sum, images
    cells = []  # per batch: true * classes + top-1 of its images, counted once at the end (bincount)
    # the processes' shards may differ by a batch: all of them ask (a collective) at the batches they all have
    checks = len(loader.dataset) // world_size // loader.batch_sampler.batch_size if stop else 0
    start = time.perf_counter()
    batches = iterate(loader)  # its workers leave stop signals to this process
    for batch, (images, labels, _, bad) in enumerate(batches):
        if batch < checks and stop.requested():
            batches.close()  # ends the loader's workers now
            raise Stopped(stop.signum)
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
        cells.append(labels.astype('int64') * classes + top[:, 0].astype('int64'))
    cells = paddle.concat(cells) if cells else paddle.zeros([0], dtype='int64')
    confusion = paddle.bincount(cells, minlength=classes * classes)  # (classes * classes,) int64 counts
    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, n = sums.numpy().tolist()
    if n == 0:
        raise DataError('no validation image could be read: check Data.val_root / Data.val_list (the skipped '
                        'files are listed above)')
    return {'top1': 100 * correct1 / n, 'top5': 100 * correct5 / n, 'loss': loss_sum / n,
            'images': int(n), 'images_per_sec': n / seconds,
            'confusion': confusion.numpy().astype(np.int64).reshape(classes, classes)}


def model_classes(model) -> int:
    """The number of classes ``model`` predicts: its args['num_classes'] (MaxViT), also inside a DataParallel."""
    for layer in (model, getattr(model, '_layers', None)):
        args = getattr(layer, 'args', None)
        if isinstance(args, dict) and args.get('num_classes'):
            return int(args['num_classes'])
    raise ValueError(f'evaluate: cannot tell how many classes {type(model).__name__} predicts (no args["num_classes"])')
