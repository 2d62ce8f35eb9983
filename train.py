"""Train MaxViT with the paper's recipe, on one CPU or many GPUs.

    python train.py -c configs/quickstart.yaml                          # built-in data, minutes on a laptop CPU
    python train.py -c configs/maxvit_t.yaml                            # ImageNet-1K, the paper's recipe
    python train.py -c configs/maxvit_t.yaml -o Global.resume=auto      # continue OUTPUT_DIR/latest
    python train.py -c configs/maxvit_t_tf_384.yaml -o Global.pretrained_model=maxvit_t_tf_224.pdparams
    python -m paddle.distributed.launch --devices 0,1,2,3 train.py -c configs/maxvit_t.yaml
    python -m paddle.distributed.launch --master 10.0.0.1:8090 --nnodes 2 --devices 0,1,2,3,4,5,6,7 \
        train.py -c configs/maxvit_t.yaml                               # the same line on every machine

main() takes the stop signals and the output directory's lock, then run_training() reads top to bottom: config ->
device and seed -> data -> step plan -> model, optimizer, AMP, EMA -> resume (check_resume: what may change) ->
the loop: train_epoch (one epoch of optimizer steps), end_epoch (the evaluation of the raw and EMA weights when it
is due, Checkpoints.save). A RunState (epoch, step, best) says where the run is and a Learner (model, optimizer,
lr schedule, loss scaler, EMA) holds what its steps change; a checkpoint saves both. Only rank 0 writes logs and
checkpoints. The recipe's numbers are in common/config.py (DEFAULTS) and configs/*.yaml.

SIGTERM or Ctrl-C stops the run at the end of the optimizer step in progress (or of the evaluation batch in
progress): latest is saved there, one line gives the command that resumes it, and the exit status is 128 + the
signal (143, 130). docs/training.md, "Stopping, preemption and resuming", has the rules.

Every random stream (dropout, drop path, Mixup) restarts at each micro-batch from (seed, epoch, micro-batch,
rank), and each image's augmentation from (seed, epoch, image), so a run resumed from any checkpoint, at an
epoch's end or mid-epoch (Global.save_interval_steps), ends bit-identical to one that never stopped.
"""
import argparse
import math
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

if __name__ == '__main__' and hasattr(signal, 'pthread_sigmask'):
    # Stop signals wait while Python imports Paddle (a second or so) until main() takes them (StopSignals), so one
    # sent meanwhile stops the run before its first step. (Paddle's import installs a C++ SIGTERM handler that can
    # deadlock, and Ctrl-C would end an import with a traceback.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import numpy as np
import paddle
import paddle.nn.functional as F
import yaml
from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

from common.checkpoint import (CheckpointError, adapt_state_dict, check_output_dir, copy_checkpoint, load_checkpoint,
                               load_pretrained, recover, resolve_prefix, save_checkpoint, set_model_state)
from common.config import AUTO, ConfigError, add_config_args, build_model, load_config, resolve_num_classes
from common.confusion import MAX_LISTED, log_confusion
from common.data import DataError, SkipReport, batch_is_empty, build_dataset, build_loader
from common.device import (BusyError, Stopped, StopSignals, amp_context, hold_output_dir, ignore_stop_signals, iterate,
                           peak_memory_gb, setup)
from common.evaluate import evaluate
from common.fast_layers import use_fast_layers
from common.logger import Logger, StepTimer
from common.mixup import Mixup
from common.optim import (ModelEma, build_optimizer, layer_decay_line, load_optimizer_state, optimizer_state,
                          schedule_lines, warmup_steps)
from common.resume import check_resume


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (label smoothing, Mixup/CutMix), computed in float32."""
    return F.cross_entropy(logits.astype('float32'), targets, soft_label=True)


def stream_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    """The seed of every random stream for one micro-batch: a function of where the run is, so that a resumed run
    needs no saved random state to continue exactly as if it had never stopped."""
    return (seed * 1_000_003 + epoch * 1_000_033 + micro * 1009 + rank) % (2 ** 31)


def due(epoch: int, every: int, epochs: int) -> bool:
    """Whether what a run does every ``every`` epochs and after its last one (an evaluation: Global.eval_freq; an
    epoch_N checkpoint: Global.save_epoch_freq) is due after epoch ``epoch`` (1-based) of ``epochs``."""
    return epoch % every == 0 or epoch == epochs


def build_data(cfg, env, log):
    """Training and validation sets and loaders; Model.num_classes from the training data ('auto') or checked
    against it; Data.batch_size capped to a training set smaller than one batch of every process."""
    D = cfg['Data']
    with env.main_first():  # rank 0 writes the built-in dataset when it is missing; the others wait and read it
        train_set, val_set = build_dataset(cfg, 'train', log.info), build_dataset(cfg, 'val', log.info)
    auto = cfg['Model']['num_classes'] == AUTO
    found = resolve_num_classes(cfg, train_set.class_names, D['train_root'])
    if auto:
        log.info(f"Model.num_classes: {found}, the classes of {D['train_root']} (auto)")
    # a missing class folder would shift every label after it (a file list may just lack the last classes)
    names, val_names = train_set.class_names, val_set.class_names
    if val_names != names[:len(val_names)] or (D['format'] != 'filelist' and len(val_names) != len(names)):
        raise DataError(f"the validation classes ({len(val_names)}, {D['val_root']}) are not the training "
                        f"classes ({len(names)}, {D['train_root']}): both need the same class folders or label "
                        f"names (docs/training.md, Preparing data)")
    per_process = len(train_set) // env.world_size
    if 1 <= per_process < D['batch_size']:  # the loader drops a last partial batch: none would be left
        log.info(f"Data.batch_size {D['batch_size']} capped to {per_process}: {len(train_set)} training images "
                 f"for {env.world_size} process(es)")
        D['batch_size'] = per_process
    train_loader = build_loader(train_set, cfg, train=True, rank=env.rank, world_size=env.world_size)
    val_loader = build_loader(val_set, cfg, train=False, rank=env.rank, world_size=env.world_size)
    return train_set, val_set, train_loader, val_loader


def plan_steps(cfg, env, train_set, train_loader) -> dict:
    """Global batch = batch per process x processes x accumulation steps; steps per epoch; the warmup in steps; the
    peak lr. The accumulation is capped to the batches of an epoch: a dataset smaller than Optimizer.global_batch_size
    trains with a global batch of all its images (logged with the schedule)."""
    D, O, G = cfg['Data'], cfg['Optimizer'], cfg['Global']
    per_step = D['batch_size'] * env.world_size
    wanted = max(1, round(O['global_batch_size'] / per_step)) if O['global_batch_size'] else 1
    accum = max(1, min(wanted, len(train_loader)))
    global_batch = per_step * accum
    steps_per_epoch = len(train_loader) // accum
    if G['max_steps_per_epoch']:
        steps_per_epoch = min(steps_per_epoch, G['max_steps_per_epoch'])
    if steps_per_epoch < 1:
        raise ConfigError(f'{len(train_set)} training images make no full optimizer step of {global_batch} images: '
                          f'lower Optimizer.global_batch_size or Data.batch_size')
    return {'accum': accum, 'accum_capped': accum < wanted, 'global_batch': global_batch,
            'batch_size': D['batch_size'], 'world_size': env.world_size, 'train_images': len(train_set),
            'steps_per_epoch': steps_per_epoch,
            'total_steps': G['epochs'] * steps_per_epoch, 'warmup_steps': warmup_steps(cfg, steps_per_epoch),
            'peak_lr': O['lr'] * global_batch / O['base_batch_size']}  # linear scaling rule


def resume_point(cfg, env, out_dir: Path):
    """The checkpoint to resume: Global.resume, or OUTPUT_DIR/latest when it is 'auto' and one exists."""
    resume = cfg['Global']['resume']
    with env.main_first():  # rank 0 finishes or discards the saves a kill interrupted (leftovers of every
        recover(str(out_dir / 'latest'))  # checkpoint in the folder) before the others look
    if resume != 'auto':
        return resume
    return str(out_dir / 'latest') if (out_dir / 'latest.pdstates').exists() else None


def load_resume(resume: str, cfg: dict, class_names: List[str], plan: dict, model, optimizer, scaler,
                log: Logger) -> dict:
    """Check what changed since the checkpoint (check_resume), then restore model, optimizer (with its lr
    schedule) and loss scaler; return the checkpoint's other states."""
    model_state, opt_state, states = load_checkpoint(resolve_prefix(resume))
    check_resume(resume, states, cfg, class_names, plan, log)
    set_model_state(model, adapt_state_dict(model, model_state)[0])  # strict: weights of another model are an error
    try:
        load_optimizer_state(optimizer, model, opt_state)
    except KeyError as e:
        raise CheckpointError(f'{resume}: its optimizer state has no entry for {e}; was Model.* or '
                              f'Optimizer.* changed since it was saved? Start a new run instead') from None
    if states['scaler']:  # empty when fp16 loss scaling was off: then the scaler starts fresh
        scaler.load_state_dict(states['scaler'])
    return states


@dataclass
class RunState:
    """Where the run is. Every checkpoint saves it, so a run resumed from one continues from exactly there."""
    epoch: int = 0       # epochs finished
    epoch_step: int = 0  # optimizer steps done in epoch + 1: a mid-epoch checkpoint's position, else 0
    step: int = 0        # optimizer steps done in all
    best: dict = field(default_factory=lambda: {'metric': -1.0, 'epoch': 0})  # + 'weights' once evaluated
    eval_pending: bool = False  # the evaluation due after epoch `epoch` was stopped by a signal: it comes next

    def keep_if_best(self, metrics: dict, eval_weights: str) -> bool:
        """Record this epoch's top-1 as the best when it beats the best so far; whether it did. The weights
        compared are Global.eval_weights' when they were evaluated (the EMA's exist with EMA.decay > 0), else
        the raw ones."""
        which = eval_weights if eval_weights in metrics else 'raw'
        if metrics[which]['top1'] <= self.best['metric']:
            return False
        self.best = {'metric': metrics[which]['top1'], 'epoch': self.epoch, 'weights': which}
        return True


@dataclass
class Learner:
    """What the optimizer steps change; a checkpoint holds it and the RunState."""
    model: paddle.nn.Layer    # MaxViT: the parameters and state_dict
    net: paddle.nn.Layer      # what runs forward: the model, in paddle.DataParallel when there are several processes
    optimizer: paddle.optimizer.Optimizer
    schedule: paddle.optimizer.lr.LRScheduler
    scaler: paddle.amp.GradScaler  # fp16 loss scaling; passes the loss and gradients through unchanged otherwise
    ema: Optional[ModelEma]   # None when EMA.decay is 0


class Checkpoints:
    """OUTPUT_DIR/latest after every epoch and every Global.save_interval_steps steps; best when the top-1
    improved; epoch_N every Global.save_epoch_freq epochs and after the last. Only rank 0 writes them."""

    def __init__(self, cfg: dict, class_names: List[str], plan: dict, log: Logger, enabled: bool):
        self.cfg, self.class_names, self.plan, self.log, self.enabled = cfg, class_names, plan, log, enabled
        self.dir = Path(cfg['Global']['output_dir'])

    def save(self, run: RunState, learner: Learner, metrics: Optional[dict] = None, is_best: bool = False) -> None:
        """Save at the run's position: mid-epoch when run.epoch_step > 0, else at the end of epoch run.epoch."""
        if not self.enabled:
            return
        G, latest, epoch_end = self.cfg['Global'], str(self.dir / 'latest'), run.epoch_step == 0
        states = dict(asdict(run), metrics=metrics or {}, ema=learner.ema.state_dict() if learner.ema else None,
                      scaler=learner.scaler.state_dict(), config=self.cfg, class_names=self.class_names,
                      plan=self.plan)
        save_checkpoint(latest, learner.model.state_dict(), optimizer_state(learner.optimizer, learner.model), states)
        if is_best:
            copy_checkpoint(latest, str(self.dir / 'best'))
        if epoch_end and due(run.epoch, G['save_epoch_freq'], G['epochs']):
            copy_checkpoint(latest, str(self.dir / f'epoch_{run.epoch}'))
        self.log.info(f'saved {latest}' + ('' if epoch_end else f' (epoch {run.epoch + 1}, step {run.epoch_step}/'
                                                                   f'{self.plan["steps_per_epoch"]})')
                      + (f' and best (top-1 {run.best["metric"]:.2f}%, {run.best["weights"]})' if is_best else ''))


class GradientAllReduce:
    """When the processes' gradients are averaged (one process: never). DataParallel all-reduces them from hooks
    in the backward pass, which under accumulation run on the last micro-batch only (the others run under its
    no_sync). Model.recompute runs a second backward pass inside the first, which trips those hooks: then every
    backward pass runs under no_sync and the gradients are all-reduced once, after the last micro-batch's."""

    def __init__(self, net: paddle.nn.Layer, world_size: int, recompute: bool):
        self.net = net
        self.by_hooks = world_size > 1 and not recompute
        self.after_backward = world_size > 1 and recompute

    def around_backward(self, last_micro: bool):
        """The context of one micro-batch's forward and backward pass."""
        return self.net.no_sync() if self.after_backward or (self.by_hooks and not last_micro) else nullcontext()

    def after_accumulation(self) -> None:
        """Call after the last micro-batch's backward pass, before the optimizer step."""
        if self.after_backward:
            fused_allreduce_gradients(list(self.net.parameters()), None)  # the mean over processes


def train_epoch(run: RunState, learner: Learner, loader, skipped: SkipReport, cfg: dict, env, plan: dict,
                log: Logger, timer: StepTimer, checkpoints: Checkpoints, stop: StopSignals) -> List[float]:
    """Epoch run.epoch + 1 from optimizer step run.epoch_step on (0, or a mid-epoch checkpoint's position): a log
    line every Global.print_freq steps, a checkpoint every Global.save_interval_steps steps. Returns the loss of
    each optimizer step (this process); afterwards run.epoch counts this epoch. A stop signal ends it after the
    optimizer step in progress, saved there (run.epoch_step > 0 then tells it apart from a finished epoch)."""
    G, D, M = cfg['Global'], cfg['Data'], cfg['Model']
    accum, steps, epoch = plan['accum'], plan['steps_per_epoch'], run.epoch
    first_micro = run.epoch_step * accum
    learner.net.train()
    loader.dataset.set_epoch(epoch)
    # one order for all ranks; the epoch ends after the last micro-batch an optimizer step uses
    loader.batch_sampler.set_epoch(stream_seed(G['seed'], epoch, 0, rank=0), start=first_micro, stop=steps * accum)
    mixup = Mixup(D['mixup'], D['cutmix'], D['mix_prob'], D['label_smoothing'], M['num_classes'])
    amp_ctx, allreduce = amp_context(cfg['AMP']), GradientAllReduce(learner.net, env.world_size, M['recompute'])
    losses, step_loss, epoch_images = [], 0.0, 0
    loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.perf_counter()  # since the last log line
    for micro, (images, labels, _, bad) in enumerate(iterate(loader), start=first_micro):
        skipped(bad)
        seed = stream_seed(G['seed'], epoch, micro, env.rank)
        paddle.seed(seed)
        mixup.seed(seed)
        # A batch in which no image could be read still takes its turn, as a zero-weight image, so the
        # accumulation count and every process's gradient all-reduce stay in step.
        weight = 0.0 if batch_is_empty(labels) else 1.0
        if not weight:
            images = paddle.zeros([1, M['input_dim'], D['img_size'], D['img_size']])
            labels = paddle.zeros([1], dtype='int64')
        images, targets = mixup(images, labels)
        last_micro = (micro + 1) % accum == 0
        with allreduce.around_backward(last_micro):
            with amp_ctx():
                logits = learner.net(images)
            loss = soft_cross_entropy(logits, targets) * weight / accum
            learner.scaler.scale(loss).backward()
        step_loss += loss.detach()
        images_used = int(weight) * labels.shape[0]
        seen, epoch_images = seen + images_used, epoch_images + images_used
        if not last_micro:
            continue

        # ---- one optimizer step
        allreduce.after_accumulation()
        loss_value = float(step_loss)  # one device sync per optimizer step
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f'loss is {loss_value} at epoch {epoch + 1}, optimizer step {run.step + 1}: stopping before the '
                f'update. The last good checkpoint is {checkpoints.dir}/latest (resume with -o Global.resume=auto); '
                f'consider a lower Optimizer.lr.')
        step_lr = learner.optimizer.get_lr()  # this step's lr (the schedule moves on after the step)
        optimizer_step(learner)
        run.step, run.epoch_step = run.step + 1, run.epoch_step + 1
        losses.append(loss_value)
        loss_sum, loss_n, step_loss = loss_sum + loss_value, loss_n + 1, 0.0
        timer.step()
        log.progress(run.epoch_step, steps, f'loss {loss_value:.4f}')
        if run.step % G['print_freq'] == 0 or run.epoch_step == steps:
            mean_loss = loss_sum / loss_n
            ips = seen * env.world_size / (time.perf_counter() - t_log)  # images/s of all processes
            log.info(f'epoch {epoch + 1}/{G["epochs"]} step {run.epoch_step}/{steps} loss {mean_loss:.4f} '
                     f'lr {step_lr:.3e} {ips:.1f} img/s eta {timer.eta()} mem {peak_memory_gb(env.device):.2f}G')
            for name, value in (('loss', mean_loss), ('lr', step_lr), ('images_per_sec', ips)):
                log.scalar(f'train/{name}', value, run.step)
            loss_sum, loss_n, seen, t_log = 0.0, 0, 0, time.perf_counter()
        stopping = stop.requested()  # asked after every step, by every process (a collective with several)
        interval = G['save_interval_steps'] and run.step % G['save_interval_steps'] == 0
        if run.epoch_step < steps and (stopping or interval):
            checkpoints.save(run, learner)  # mid-epoch: a killed run loses at most save_interval_steps steps
            if stopping:
                return losses  # the rest of the epoch follows on resume
    if skipped.count:
        log.info(f'{skipped.count} unreadable training images skipped so far')
    if epoch_images == 0:
        raise DataError(f'no training image of epoch {epoch + 1} could be read ({skipped.count} unreadable, '
                        f'listed above): check Data.train_root (docs/training.md, Preparing data)')
    run.epoch, run.epoch_step = epoch + 1, 0
    return losses


def optimizer_step(learner: Learner) -> None:
    """One update from the accumulated gradients; the lr schedule and the EMA follow it."""
    learner.scaler.step(learner.optimizer)  # unscales, clips (Optimizer.clip_grad), skips the step on fp16 overflow
    learner.scaler.update()
    learner.optimizer.clear_grad()
    learner.schedule.step()
    if learner.ema:
        learner.ema.update(learner.model)


def evaluate_epoch(epoch: int, learner: Learner, ema_model, loader, skipped: SkipReport, cfg: dict, env,
                   log: Logger, stop: StopSignals) -> dict:
    """Top-1, top-5 and loss on the validation set of the raw weights and, with EMA, of the EMA weights (in
    ``ema_model``), logged and written as scalars: {'raw': ..., 'ema': ...}. Raises Stopped on a stop signal."""
    metrics = {'raw': evaluate(learner.model, loader, env.world_size, cfg['AMP'], skipped, stop)}
    if learner.ema:
        ema_model.set_state_dict(learner.ema.state)
        metrics['ema'] = evaluate(ema_model, loader, env.world_size, cfg['AMP'], skipped, stop)
    for kind, m in metrics.items():
        log.info(f'epoch {epoch} eval ({kind}): top-1 {m["top1"]:.2f}% top-5 {m["top5"]:.2f}% loss {m["loss"]:.4f} '
                 f'({m["images"]} images, {m["images_per_sec"]:.1f} img/s)')
        for name in ('top1', 'top5', 'loss'):
            log.scalar(f'eval_{kind}/{name}', m[name], epoch)
        if len(m['confusion']) <= MAX_LISTED:  # the picture; the checkpoint keeps the matrix (at most 80 kB)
            log_confusion(log, f'eval_{kind}/confusion', m['confusion'], loader.dataset.class_names, epoch)
        else:  # ImageNet's would add 8 MB to every checkpoint: eval.py writes it on demand
            del m['confusion']
    return metrics


def end_epoch(run: RunState, learner: Learner, ema_model, loader, skipped: SkipReport, cfg: dict, env, log: Logger,
              timer: StepTimer, checkpoints: Checkpoints, stop: StopSignals) -> dict:
    """After epoch run.epoch: its evaluation when it is due, then its checkpoint; the metrics (none when not
    evaluated). A stop signal before or during the evaluation leaves it pending (run.eval_pending): the epoch's
    training is saved, and a run resumed from there evaluates it first."""
    G, metrics, is_best = cfg['Global'], {}, False
    run.eval_pending = due(run.epoch, G['eval_freq'], G['epochs'])
    if run.eval_pending and not stop.requested():
        timer.pause()
        try:
            metrics = evaluate_epoch(run.epoch, learner, ema_model, loader, skipped, cfg, env, log, stop)
        except Stopped:
            pass
        timer.resume(evaluated=bool(metrics))
        if metrics:
            run.eval_pending, is_best = False, run.keep_if_best(metrics, G['eval_weights'])
    checkpoints.save(run, learner, metrics, is_best)
    return metrics


def command_line(argv) -> List[str]:
    """This run's command as typed: python train.py ARGS (a test's main(argv) counts as train.py)."""
    script = sys.argv[0] if argv is None and sys.argv[0].endswith('.py') else 'train.py'
    return ['python', script] + list(sys.argv[1:] if argv is None else argv)


def resume_command(command: List[str], world_size: int) -> str:
    """``command`` with -o Global.resume=auto in place of its Global.resume overrides (under the launcher, the
    launch options are not known here: the line says to repeat them)."""
    kept, args = [], iter(command)
    for a in args:
        pair = [a, next(args, '')] if a in ('-o', '--override') else [a]
        if pair[-1].split('=', 1)[0].strip() not in ('Global.resume', '-oGlobal.resume'):
            kept += pair
    launch = ' -m paddle.distributed.launch (its launch options)' if world_size > 1 else ''
    return f'{kept[0]}{launch} {shlex.join(kept[1:] + ["-o", "Global.resume=auto"])}'


def stop_line(stop: StopSignals, run: RunState, plan: dict, out_dir: Path, resume: str) -> str:
    """The one line a stopped run ends with: where it stopped, what latest holds and the command that resumes."""
    if not run.step:
        where = 'before its first step'
    elif run.epoch_step:
        where = f'at epoch {run.epoch + 1} step {run.epoch_step}/{plan["steps_per_epoch"]}'
    else:
        where = f'after epoch {run.epoch}' + (' (its evaluation runs first on resume)' if run.eval_pending else '')
    held = f'{out_dir}/latest holds step {run.step} of {plan["total_steps"]}' if run.step else 'nothing trained yet'
    return f'stopped by {stop.name} {where}: {held}; resume: {resume}'


def next_commands(config: str, overrides, out_dir: Path) -> str:
    """What to run after training, with the model and data overrides this run used."""
    kept = ''.join(f' -o {shlex.quote(o)}' for o in overrides if not o.startswith('Global.'))
    best = f'-c {config}{kept} -o Global.pretrained_model={out_dir}/best'
    return (f'next: python eval.py {best}\n'
            f'      visualdl --logdir {out_dir}/vdl    (then open http://localhost:8040)\n'
            f'      python -m tools.export {best}')


def main(argv=None) -> dict:
    """Train as the config says; the result of run_training ('stopped': the signal that stopped the run, or None).
    From here on a stop signal stops the run at a step boundary, saved; the output directory is this run's."""
    with StopSignals() as stop:
        parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
        args = parser.parse_args(argv)
        cfg = load_config(args.config, args.override)
        env = setup(cfg['Global']['device'])
        command, G = command_line(argv), cfg['Global']
        if env.is_main:  # a read-only, full or unusable folder: one error line before any work
            check_output_dir(G['output_dir'])
        with hold_output_dir(G['output_dir'], shlex.join(command), enabled=env.is_main), \
                Logger(G['output_dir'], enabled=env.is_main, use_visualdl=G['use_visualdl']) as log:
            return run_training(cfg, env, stop, args, resume_command(command, env.world_size), log)


def run_training(cfg: dict, env, stop: StopSignals, args, resume_cmd: str, log: Logger) -> dict:
    """The run ``cfg`` describes, to its last epoch or to a stop signal; ``resume_cmd`` goes in the stop line."""
    G, D, A, O = cfg['Global'], cfg['Data'], cfg['AMP'], cfg['Optimizer']

    # ---- seed, logging
    paddle.seed(G['seed'])  # the same initial weights on every rank
    random.seed(G['seed'])
    np.random.seed(G['seed'])
    out_dir = Path(G['output_dir'])
    if env.is_main:
        (out_dir / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    log.info(f'{args.config} on {env.world_size} x {env.device}, Paddle {paddle.__version__}, output {out_dir}')

    # ---- data and the step plan
    train_set, val_set, train_loader, val_loader = build_data(cfg, env, log)
    skipped, skipped_val = SkipReport(train_set, log.info), SkipReport(val_set, log.info)
    plan = plan_steps(cfg, env, train_set, train_loader)
    log.info(f'{len(train_set)} train / {len(val_set)} val images, {len(train_set.class_names)} classes; global '
             f'batch {plan["global_batch"]} = {D["batch_size"]} x {env.world_size} processes x {plan["accum"]} '
             f'accumulation; {plan["steps_per_epoch"]} steps/epoch, {plan["total_steps"]} steps; peak lr '
             f'{plan["peak_lr"]:.3g}')
    if plan['accum_capped']:
        log.info(f'global batch {plan["global_batch"]}, not Optimizer.global_batch_size {O["global_batch_size"]}: '
                 f'capped to the {len(train_set)} training images (one optimizer step per epoch)')
    schedule, warnings = schedule_lines(cfg, plan)
    for line in [schedule] + warnings:
        log.info(line)

    # ---- model, optimizer, AMP, EMA
    resume = resume_point(cfg, env, out_dir)
    model = build_model(cfg)
    model = use_fast_layers(model)  # the CPU kernels and memory-saving backward passes; Paddle's own ops without it
    log.info(f'MaxViT: {sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient):,} trainable '
             f'parameters' + (' (Global.linear_probe: the classifier only; the rest frozen, BatchNorm statistics '
                              'fixed)' if G['linear_probe'] else ''))
    if O['layer_decay'] is not None:
        log.info(layer_decay_line(model, O['layer_decay']))
    if G['pretrained_model'] and not resume:  # a resumed run has its own weights
        resized, new, what = load_pretrained(model, G['pretrained_model'], ema=G['eval_weights'] == 'ema',
                                             new_classifier=True)  # ema: a checkpoint's EMA weights
        log.info(f'initialised from {what}' + (f'; new classifier (not loaded): {", ".join(new)}' if new else '')
                 + (f'; bias tables resized to the new window: {len(resized)}' if resized else ''))
    optimizer, schedule = build_optimizer(model, cfg, plan)
    if A['enable'] and A['level'] == 'O2':
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level='O2', dtype=A['dtype'])
    scaler = paddle.amp.GradScaler(enable=A['enable'] and A['dtype'] == 'float16',
                                   init_loss_scaling=A['init_loss_scaling'])

    # ---- resume: everything that makes the continued run identical to an uninterrupted one
    run, states = RunState(), {}
    if resume:
        states = load_resume(resume, cfg, train_set.class_names, plan, model, optimizer, scaler, log)
        # the schedule's step is restored with the optimizer; its stored lr is the checkpoint recipe's, which
        # Global.resume_changes=allow may have changed: the next step's lr comes from this run's schedule
        schedule.last_lr = schedule.get_lr()
        run = RunState(**{k: states.get(k, 0) for k in ('epoch', 'epoch_step', 'step')}, best=states['best'],
                       eval_pending=states.get('eval_pending', False))
        log.info(f'resumed {resume}: epoch {run.epoch}' + (f' (+{run.epoch_step} steps)' if run.epoch_step else '')
                 + f', step {run.step}, best {run.best["metric"]:.2f}')
    ema = ModelEma(model, cfg['EMA']['decay']) if cfg['EMA']['decay'] > 0 else None  # from the loaded weights
    if ema and states.get('ema'):
        ema.set_state_dict(states['ema'])
    ema_model = use_fast_layers(build_model(cfg)) if ema else None  # evaluates the EMA weights
    if G['to_static']:  # the forward (and so its backward) as a static program, one per input shape; CINN on GPU
        model = paddle.jit.to_static(model, full_graph=True)  # the same Layer: same parameters and checkpoints
        log.info('compiled: paddle.jit.to_static (the first step of each input shape, train and eval, traces it)')
    net = paddle.DataParallel(model) if env.world_size > 1 else model
    learner = Learner(model, net, optimizer, schedule, scaler, ema)
    checkpoints = Checkpoints(cfg, train_set.class_names, plan, log, enabled=env.is_main)

    # ---- the loop: an epoch, then its evaluation when due and a checkpoint; a stop signal ends it at a step
    metrics, history = {}, []  # history: training loss of every optimizer step (this process)
    evals_left = run.eval_pending + sum(due(e, G['eval_freq'], G['epochs']) for e in range(run.epoch + 1,
                                                                                             G['epochs'] + 1))
    timer = StepTimer(steps_left=plan['total_steps'] - run.step, evals_left=evals_left)
    # (a checkpoint whose epoch's evaluation a stop signal interrupted has it done first, before any training)
    while run.eval_pending or (run.epoch < G['epochs'] and not stop.requested()):
        if not run.eval_pending:
            history += train_epoch(run, learner, train_loader, skipped, cfg, env, plan, log, timer, checkpoints, stop)
            if run.epoch_step:  # stopped mid-epoch (saved)
                break
        metrics = end_epoch(run, learner, ema_model, val_loader, skipped_val, cfg, env, log, timer, checkpoints, stop)
        if run.eval_pending:  # a stop signal came before or during the evaluation (saved, evaluated on resume)
            break
    stopped = stop.signum if run.epoch < G['epochs'] or run.eval_pending else None  # else nothing was left to do
    if stopped:
        log.info(stop_line(stop, run, plan, out_dir, resume_cmd))
    else:
        log.info(f'done: best top-1 {run.best["metric"]:.2f}% at epoch {run.best["epoch"]} ({out_dir}/best)')
        log.info(next_commands(args.config, args.override, out_dir))
    return {'best': run.best, 'metrics': metrics, 'step': run.step, 'history': history, 'model': model,
            'global_batch': plan['global_batch'], 'steps_per_epoch': plan['steps_per_epoch'], 'stopped': stopped}


def cli(argv=None) -> int:
    """train.py as a command; its exit status: 0 when the run has finished; 128 + the signal's number when a stop
    signal stopped it (143 SIGTERM, 130 SIGINT: the shell's convention, which a scheduler's requeue logic can
    read; OUTPUT_DIR/latest holds where it stopped); 1 after one 'error:' line on stderr."""
    try:
        out = main(argv)
    except (ConfigError, DataError, CheckpointError, FloatingPointError, BusyError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 1
    finally:
        ignore_stop_signals()  # the run is over; its exit status says how it ended
    return 128 + out['stopped'] if out['stopped'] else 0


if __name__ == '__main__':
    sys.exit(cli())
