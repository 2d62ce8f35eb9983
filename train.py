"""Train MaxViT with the paper's recipe, on one CPU or many GPUs.

    python train.py -c configs/quickstart.yaml                          # built-in data, minutes on a laptop CPU
    python train.py -c configs/maxvit_t.yaml                            # ImageNet-1K, the paper's recipe
    python train.py -c configs/maxvit_t.yaml -o Global.resume=auto      # continue OUTPUT_DIR/latest
    python train.py -c configs/maxvit_t_tf_384.yaml -o Global.pretrained_model=maxvit_t_tf_224.pdparams
    python -m paddle.distributed.launch --devices 0,1,2,3 train.py -c configs/maxvit_t.yaml
    python -m paddle.distributed.launch --master 10.0.0.1:8090 --nnodes 2 --devices 0,1,2,3,4,5,6,7 \
        train.py -c configs/maxvit_t.yaml                               # the same line on every machine

It reads top to bottom: config -> device and seed -> data -> model -> optimizer, schedule, AMP, EMA -> resume
-> the loop (an epoch of training, evaluation of the raw and EMA weights, checkpoints). Only rank 0 writes
logs and checkpoints. The recipe's numbers are in common/config.py (DEFAULTS) and configs/*.yaml.
"""
import argparse
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml

from common.checkpoint import (CheckpointError, adapt_state_dict, copy_checkpoint, load_checkpoint, load_pretrained,
                               recover, resolve_prefix, save_checkpoint, set_model_state)
from common.config import ConfigError, add_config_args, build_model, load_config
from common.data import DataError, SkipReport, batch_is_empty, build_dataset, build_loader
from common.device import amp_context, peak_memory_gb, setup
from common.evaluate import evaluate
from common.logger import Logger, eta
from common.mixup import Mixup
from common.optim import ModelEma, build_optimizer, load_optimizer_state, optimizer_state


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (label smoothing, Mixup/CutMix), computed in float32."""
    return F.cross_entropy(logits.astype('float32'), targets, soft_label=True)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every random stream (dropout, drop path, Mixup) restarts each epoch from (seed, epoch, rank), so a run
    resumed at an epoch boundary continues exactly as if it had never stopped, on every rank."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 31)


def main(argv=None) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)
    G, D, O, A = cfg['Global'], cfg['Data'], cfg['Optimizer'], cfg['AMP']

    # ---- device, seed, logging
    env = setup(G['device'])
    paddle.seed(G['seed'])  # the same initial weights on every rank
    random.seed(G['seed'])
    np.random.seed(G['seed'])
    out_dir = Path(G['output_dir'])
    log = Logger(str(out_dir), enabled=env.is_main, use_visualdl=G['use_visualdl'])
    if env.is_main:
        (out_dir / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    log.info(f'{args.config} on {env.world_size} x {env.device}, Paddle {paddle.__version__}, output {out_dir}')

    # ---- data (rank 0 first: it writes the built-in dataset when it is missing; the others wait and read it)
    with env.main_first():
        train_set, val_set = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    num_classes = cfg['Model']['num_classes']
    if num_classes != len(train_set.class_names):
        raise ConfigError(f"Model.num_classes is {num_classes} but {D['train_root']} has "
                          f"{len(train_set.class_names)} classes: set -o Model.num_classes={len(train_set.class_names)}")
    # a missing class folder would shift every label after it (a file list may just lack the last classes)
    names, val_names = train_set.class_names, val_set.class_names
    if val_names != names[:len(val_names)] or (D['format'] != 'filelist' and len(val_names) != len(names)):
        raise DataError(f"the validation classes ({len(val_names)}, {D['val_root']}) are not the training "
                        f"classes ({len(names)}, {D['train_root']}): both need the same class folders or label "
                        f"names (README, Preparing data)")
    train_loader = build_loader(train_set, cfg, train=True, rank=env.rank, world_size=env.world_size)
    val_loader = build_loader(val_set, cfg, train=False, rank=env.rank, world_size=env.world_size)
    skipped = SkipReport(train_set, log.info)
    skipped_val = SkipReport(val_set, log.info)

    # ---- batch and schedule: global batch = batch per process x processes x accumulation steps
    per_step = D['batch_size'] * env.world_size
    accum = max(1, round(O['global_batch_size'] / per_step)) if O['global_batch_size'] else 1
    global_batch = per_step * accum
    steps_per_epoch = len(train_loader) // accum
    if G['max_steps_per_epoch']:
        steps_per_epoch = min(steps_per_epoch, G['max_steps_per_epoch'])
    if steps_per_epoch < 1:
        raise ConfigError(f'{len(train_set)} training images make no full optimizer step of {global_batch} images: '
                          f'lower Optimizer.global_batch_size or Data.batch_size')
    total_steps = G['epochs'] * steps_per_epoch
    peak_lr = O['lr'] * global_batch / O['base_batch_size']  # linear scaling rule
    log.info(f'{len(train_set)} train / {len(val_set)} val images, {num_classes} classes; global batch '
             f'{global_batch} = {D["batch_size"]} x {env.world_size} processes x {accum} accumulation; '
             f'{steps_per_epoch} steps/epoch, {total_steps} steps; peak lr {peak_lr:.3g}')

    # ---- model, optimizer, AMP, EMA
    resume = G['resume']
    if resume == 'auto':
        with env.main_first():  # rank 0 finishes a save that a kill interrupted, before the others look
            recover(str(out_dir / 'latest'))
        resume = str(out_dir / 'latest') if (out_dir / 'latest.pdstates').exists() else None
    model = build_model(cfg)
    log.info(f'MaxViT: {sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient):,} trainable '
             f'parameters')
    if G['pretrained_model'] and not resume:  # a resumed run has its own weights
        resized, new, what = load_pretrained(model, G['pretrained_model'], ema=G['eval_weights'] == 'ema',
                                             new_classifier=True)  # ema: a checkpoint's EMA weights
        log.info(f'initialised from {what}' + (f'; new classifier (not loaded): {", ".join(new)}' if new else '')
                 + (f'; bias tables resized to the new window: {len(resized)}' if resized else ''))
    optimizer, schedule = build_optimizer(model, cfg, peak_lr, total_steps)
    if A['enable'] and A['level'] == 'O2':
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level='O2', dtype=A['dtype'])
    scaler = paddle.amp.GradScaler(enable=A['enable'] and A['dtype'] == 'float16',
                                   init_loss_scaling=A['init_loss_scaling'])
    amp_ctx = amp_context(A)
    mixup = Mixup(D['mixup'], D['cutmix'], D['mix_prob'], D['label_smoothing'], num_classes)

    # ---- resume: everything that makes the continued run identical to an uninterrupted one
    start_epoch, step, best, states = 0, 0, {'metric': -1.0, 'epoch': 0}, {}
    if resume:
        model_state, opt_state, states = load_checkpoint(resolve_prefix(resume))
        set_model_state(model, adapt_state_dict(model, model_state)[0])  # strict: a changed Model.* is an error
        try:
            load_optimizer_state(optimizer, model, opt_state)
        except KeyError as e:
            raise CheckpointError(f'{resume}: its optimizer state has no entry for {e}; was Model.* or '
                                  f'Optimizer.* changed since it was saved? Start a new run instead') from None
        if states['scaler']:  # empty when fp16 loss scaling was off: then the scaler starts fresh
            scaler.load_state_dict(states['scaler'])
        start_epoch, step, best = states['epoch'], states['step'], states['best']
        log.info(f'resumed {resume}: epoch {start_epoch}, step {step}, best {best["metric"]:.2f}')
    ema = ModelEma(model, cfg['EMA']['decay']) if cfg['EMA']['decay'] > 0 else None  # from the loaded weights
    if ema and states.get('ema'):
        ema.set_state_dict(states['ema'])
    ema_model = build_model(cfg) if ema else None
    net = paddle.DataParallel(model) if env.world_size > 1 else model
    metrics, history = {}, []  # history: training loss of every optimizer step (this process)

    # ---- the loop
    for epoch in range(start_epoch, G['epochs']):
        net.train()
        paddle.seed(epoch_seed(G['seed'], epoch, env.rank))
        mixup.seed(epoch_seed(G['seed'], epoch, env.rank))
        train_set.set_epoch(epoch)
        train_loader.batch_sampler.set_epoch(epoch_seed(G['seed'], epoch, rank=0))  # one order for all ranks
        loss_sum, loss_n, seen, t_log, t_epoch = 0.0, 0, 0, time.perf_counter(), time.perf_counter()
        epoch_step, step_loss, epoch_images = 0, 0.0, 0
        for micro, (images, labels, _, bad) in enumerate(train_loader):
            skipped(bad)
            # A batch in which no image could be read still takes its turn, as a zero-weight image, so the
            # accumulation count and every process's gradient all-reduce stay in step.
            weight = 0.0 if batch_is_empty(labels) else 1.0
            if not weight:
                images = paddle.zeros([1, cfg['Model']['input_dim'], D['img_size'], D['img_size']])
                labels = paddle.zeros([1], dtype='int64')
            images, targets = mixup(images, labels)
            last_micro = (micro + 1) % accum == 0
            # gradients are all-reduced only on the last micro-batch of an accumulation
            sync = nullcontext() if last_micro or env.world_size == 1 else net.no_sync()
            with sync:
                with amp_ctx():
                    logits = net(images)
                loss = soft_cross_entropy(logits, targets) * weight / accum
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            seen += int(weight) * labels.shape[0]
            epoch_images += int(weight) * labels.shape[0]
            if not last_micro:
                continue
            loss_value = float(step_loss)  # one device sync per optimizer step
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f'loss is {loss_value} at epoch {epoch + 1}, optimizer step {step + 1}: stopping before '
                    f'the update. The last good checkpoint is {out_dir}/latest (resume with '
                    f'-o Global.resume=auto); consider a lower Optimizer.lr.')
            scaler.step(optimizer)  # unscales, clips (Optimizer.clip_grad), skips the step on fp16 overflow
            scaler.update()
            optimizer.clear_grad()
            schedule.step()
            if ema:
                ema.update(model)
            step, epoch_step = step + 1, epoch_step + 1
            history.append(loss_value)
            loss_sum, loss_n, step_loss = loss_sum + loss_value, loss_n + 1, 0.0

            now = time.perf_counter()
            log.progress(epoch_step, steps_per_epoch, f'loss {loss_value:.4f}')
            if step % G['print_freq'] == 0 or epoch_step == steps_per_epoch:
                ips = seen * env.world_size / (now - t_log)
                lr = optimizer.get_lr()
                log.info(f'epoch {epoch + 1}/{G["epochs"]} step {epoch_step}/{steps_per_epoch} '
                         f'loss {loss_sum / loss_n:.4f} lr {lr:.3e} {ips:.1f} img/s '
                         f'eta {eta((total_steps - step) * (now - t_epoch) / epoch_step)} '
                         f'mem {peak_memory_gb(env.device):.2f}G')
                log.scalar('train/loss', loss_sum / loss_n, step)
                log.scalar('train/lr', lr, step)
                log.scalar('train/images_per_sec', ips, step)
                loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.perf_counter()
            if epoch_step == steps_per_epoch:
                break
        if skipped.count:
            log.info(f'{skipped.count} unreadable training images skipped so far')
        if epoch_images == 0:
            raise DataError(f'no training image of epoch {epoch + 1} could be read ({skipped.count} unreadable, '
                            f'listed above): check Data.train_root (README, Preparing data)')

        # ---- evaluate raw and EMA weights, keep the best
        last = epoch + 1 == G['epochs']
        if (epoch + 1) % G['eval_freq'] == 0 or last:
            metrics = {'raw': evaluate(model, val_loader, env.world_size, A, skipped_val)}
            if ema:
                ema_model.set_state_dict(ema.state)
                metrics['ema'] = evaluate(ema_model, val_loader, env.world_size, A, skipped_val)
            for kind, m in metrics.items():
                log.info(f'epoch {epoch + 1} eval ({kind}): top-1 {m["top1"]:.2f}% top-5 {m["top5"]:.2f}% '
                         f'loss {m["loss"]:.4f} ({m["images"]} images, {m["images_per_sec"]:.1f} img/s)')
                for name in ('top1', 'top5', 'loss'):
                    log.scalar(f'eval_{kind}/{name}', m[name], epoch + 1)
            which = G['eval_weights'] if G['eval_weights'] in metrics else 'raw'
            is_best = metrics[which]['top1'] > best['metric']
            if is_best:
                best = {'metric': metrics[which]['top1'], 'epoch': epoch + 1, 'weights': which}
        else:
            is_best, metrics = False, {}  # the checkpoint's metrics are this epoch's, or none

        # ---- checkpoints (rank 0): latest always, best when it improved, epoch_N every save_epoch_freq
        if env.is_main:
            states = {'epoch': epoch + 1, 'step': step, 'best': best, 'metrics': metrics,
                      'ema': ema.state_dict() if ema else None, 'scaler': scaler.state_dict(),
                      # the RNG state: every stream restarts each epoch from (seed, epoch, rank), see epoch_seed
                      'rng': {'seed': G['seed'], 'reseeded': 'every epoch from (seed, epoch, rank)'}, 'config': cfg,
                      'class_names': train_set.class_names}
            save_checkpoint(str(out_dir / 'latest'), model.state_dict(), optimizer_state(optimizer, model), states)
            if is_best:
                copy_checkpoint(str(out_dir / 'latest'), str(out_dir / 'best'))
            if (epoch + 1) % G['save_epoch_freq'] == 0 or last:
                copy_checkpoint(str(out_dir / 'latest'), str(out_dir / f'epoch_{epoch + 1}'))
            log.info(f'saved {out_dir}/latest' + (f' and best (top-1 {best["metric"]:.2f}%, {best["weights"]})'
                                                   if is_best else ''))
    log.info(f'done: best top-1 {best["metric"]:.2f}% at epoch {best["epoch"]}')
    log.close()
    return {'best': best, 'metrics': metrics, 'step': step, 'history': history, 'model': model,
            'global_batch': global_batch, 'steps_per_epoch': steps_per_epoch}


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        sys.exit(f'error: {e}')
