"""train.py / eval.py: real runs of a tiny MaxViT on real image files."""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

import eval as eval_py
import train
from common.checkpoint import load_checkpoint
from common.config import ConfigError, load_config
from common.data import DataError
from common.mixup import Mixup
from common.optim import build_optimizer, cosine_lr, no_weight_decay
from maxvit import MaxViT, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def test_loss_falls_on_shapes(train_args):
    out = train.main(train_args('Global.epochs=10', 'Global.eval_freq=10', 'Data.randaugment_ops=0',
                                'Data.label_smoothing=0.0', 'Model.drop_path=0.0', 'Optimizer.lr=1e-3'))
    h = out['history']
    assert len(h) == 10 * 7  # 120 images // batch 16 = 7 steps per epoch
    first, last = np.mean(h[:7]), np.mean(h[-7:])
    assert first > 2.2 and last < first - 0.3, (first, last)  # measured: 2.31 -> 1.83


def test_resume_is_bit_identical(train_args, tmp_path):
    common = ['Global.epochs=2', 'Global.save_epoch_freq=1', 'Data.mixup=0.8', 'Data.cutmix=1.0']
    straight = train.main(train_args(*common, output=tmp_path / 'straight'))
    # Continue from the checkpoint written after epoch 1, in another folder: the same final weights, bit for bit.
    resumed = train.main(train_args(*common, f'Global.resume={tmp_path / "straight" / "epoch_1"}',
                                    output=tmp_path / 'resumed'))
    assert resumed['step'] == straight['step'] == 14
    a, _, sa = load_checkpoint(str(tmp_path / 'straight' / 'latest'))
    b, _, sb = load_checkpoint(str(tmp_path / 'resumed' / 'latest'))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in sa['ema']['state']:
        np.testing.assert_array_equal(sa['ema']['state'][k], sb['ema']['state'][k], err_msg=k)
    # ... and the resumed run's second epoch was real training, not a copy
    first, _, _ = load_checkpoint(str(tmp_path / 'straight' / 'epoch_1'))
    assert any(not np.array_equal(first[k], b[k]) for k in b)


def test_checkpoint_holds_everything_to_continue(train_args, tmp_path):
    train.main(train_args('Global.epochs=1', 'AMP.enable=true', 'AMP.dtype=float16'))
    model, opt, states = load_checkpoint(str(tmp_path / 'out' / 'latest'))
    assert 'LR_Scheduler' in opt
    assert 'max_blocks.0.0.block_attn.attn.qkv.weight@moment1_0' in opt  # keyed by the model's own names
    assert {'epoch', 'epoch_step', 'step', 'best', 'ema', 'scaler', 'config', 'class_names'} <= set(states)
    assert states['epoch'] == 1 and states['epoch_step'] == 0 and states['step'] == 7
    assert len(states['class_names']) == 10
    # fp16 loss scaling: on GPU builds the scaler's state (the loss scale) is saved; the CPU build disables
    # GradScaler, so its state is empty here and only the plumbing runs.
    if paddle.is_compiled_with_cuda():
        assert states['scaler']['scale'] > 0
    assert (tmp_path / 'out' / 'best.pdparams').exists() and (tmp_path / 'out' / 'train.log').exists()


@pytest.mark.parametrize('level', ['O1', 'O2'])
def test_amp_bf16_runs_on_cpu(train_args, level):
    # On the CPU build AMP is plumbing only (parameters and outputs stay float32):
    # this proves auto_cast, decorate, GradScaler and checkpointing run, not reduced-precision arithmetic.
    out = train.main(train_args('Global.epochs=1', 'AMP.enable=true', 'AMP.dtype=bfloat16', f'AMP.level={level}'))
    assert all(math.isfinite(x) for x in out['history']) and len(out['history']) == 7


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(train_args, tmp_path, monkeypatch):
    real_build = train.build_model
    calls = {'n': 0}

    def poisoned(cfg):
        model = real_build(cfg)
        forward = model.forward

        def nan_after_nine(x):  # training forwards 1-9 are fine, the 10th gives NaN
            calls['n'] += model.training
            y = forward(x)
            return y * float('nan') if calls['n'] > 9 and model.training else y
        model.forward = nan_after_nine
        return model
    monkeypatch.setattr(train, 'build_model', poisoned)
    with pytest.raises(FloatingPointError, match=r'loss is nan at epoch 2, optimizer step 10'):
        train.main(train_args('Global.epochs=3'))
    _, _, states = load_checkpoint(str(tmp_path / 'out' / 'latest'))
    assert states['epoch'] == 1 and states['step'] == 7


# Runs train.main in a child process that SIGKILLs itself right after its Nth checkpoint save (deterministic,
# no timing) and first writes the pids of its DataLoader worker processes to WORKERS_FILE.
KILL_AFTER_SAVES = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
real, calls = train.save_checkpoint, []

def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == {n}:
        tasks = '/proc/self/task'
        kids = [p for t in os.listdir(tasks) for p in open(f'{{tasks}}/{{t}}/children').read().split()]
        open({workers!r}, 'w').write(' '.join(kids))
        os.kill(os.getpid(), signal.SIGKILL)

train.save_checkpoint = save_then_die
train.main(sys.argv[1:])
"""


def _alive(pid: str) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def test_killed_mid_epoch_resumes_bit_identical_and_leaves_no_workers(train_args, tmp_path):
    # 7 batches of 16 images, 2 micro-batches per optimizer step: 3 steps per epoch. Saves: step 2 (mid-epoch),
    # step 3 (epoch 1 ends), step 4 (epoch 2, 1 step in) -- the run is killed right after that third save.
    # All three runs are fresh processes: float sums depend on MKL's thread count, fixed when a process first
    # multiplies, which other tests in this process may already have done.
    common = ['Global.epochs=2', 'Optimizer.global_batch_size=32', 'Data.mixup=0.8', 'Data.cutmix=1.0',
              'Model.drop_path=0.2', 'Global.save_interval_steps=2', 'Data.num_workers=2']

    def run(*args, script=None, output):
        cmd = [sys.executable] + (['-c', script] if script else [str(ROOT / 'train.py')])
        return subprocess.run(cmd + train_args(*common, *args, output=output), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    straight = run(output=tmp_path / 'straight')
    assert straight.returncode == 0, straight.stderr[-2000:]
    out, workers = tmp_path / 'killed', tmp_path / 'workers.txt'
    killed = run(script=KILL_AFTER_SAVES.format(root=str(ROOT), n=3, workers=str(workers)), output=out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _, _, states = load_checkpoint(str(out / 'latest'))
    assert (states['epoch'], states['epoch_step'], states['step']) == (1, 1, 4)

    # the DataLoader workers die with their trainer (they used to run on for minutes)
    pids = workers.read_text().split()
    assert len(pids) >= 2  # this epoch's training workers (and any still ending from the last evaluation)
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]

    resumed = run('Global.resume=auto', output=out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (out / 'train.log').read_text()
    assert 'epoch 1 (+1 steps), step 4' in log
    a, _, sa = load_checkpoint(str(tmp_path / 'straight' / 'latest'))
    b, _, sb = load_checkpoint(str(out / 'latest'))
    assert sa['step'] == sb['step'] == 6
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in sa['ema']['state']:
        np.testing.assert_array_equal(sa['ema']['state'][k], sb['ema']['state'][k], err_msg=k)

    def last_loss(text):  # the loss of the run's last step, as logged (print_freq 1)
        return [line.split(' loss ')[1].split()[0] for line in text.splitlines() if 'epoch 2/2 step 3/3' in line][-1]
    assert last_loss(log) == last_loss((tmp_path / 'straight' / 'train.log').read_text())


def test_two_process_cpu_run(two_process_run):
    out, logs = two_process_run['out'], two_process_run['logs']
    text = (out / 'train.log').read_text()
    assert 'global batch 64 = 16 x 2 processes x 2 accumulation; 1 steps/epoch' in text
    assert 'train: wrote the built-in shapes dataset' in text            # rank 0 wrote it; rank 1 waited for it
    assert 'epoch 1 eval (raw)' in text and '(500 images,' in text  # every val image once across both ranks
    assert (out / 'latest.pdparams').exists()
    assert 'epoch 1/1' not in logs.get('workerlog.1', '')  # only rank 0 logs


def test_evaluation_and_epoch_checkpoints_every_n_epochs_and_after_the_last(train_args, tmp_path):
    train.main(train_args('Global.epochs=3', 'Global.eval_freq=2', 'Global.save_epoch_freq=2',
                          'Global.max_steps_per_epoch=1'))
    log = (tmp_path / 'out' / 'train.log').read_text()
    assert [e for e in (1, 2, 3) if f'epoch {e} eval (raw)' in log] == [2, 3]
    assert sorted(p.name for p in (tmp_path / 'out').glob('epoch_*.pdparams')) == ['epoch_2.pdparams',
                                                                                    'epoch_3.pdparams']
    _, _, states = load_checkpoint(str(tmp_path / 'out' / 'epoch_2'))
    assert states['best']['epoch'] == 2 and set(states['metrics']) == {'raw', 'ema'}


class _Net:
    """Stands in for paddle.DataParallel: no_sync() returns a marker."""
    def no_sync(self):
        return 'no_sync'

    def parameters(self):
        return []


@pytest.mark.parametrize('world_size, recompute, no_sync_on', [
    (1, False, []), (1, True, []),                    # one process: nothing to all-reduce
    (2, False, [0, 1, 2]),                            # hooks in the backward pass of the last micro-batch only
    (2, True, [0, 1, 2, 3]),                          # recompute: never the hooks, all-reduced after the last one
])
def test_gradients_are_all_reduced_once_per_optimizer_step(world_size, recompute, no_sync_on, monkeypatch):
    calls = []
    monkeypatch.setattr(train, 'fused_allreduce_gradients', lambda params, group: calls.append(params))
    allreduce = train.GradientAllReduce(_Net(), world_size, recompute)
    contexts = [allreduce.around_backward(last_micro=micro == 3) for micro in range(4)]  # 4 micro-batches per step
    assert [m for m, c in enumerate(contexts) if c == 'no_sync'] == no_sync_on
    allreduce.after_accumulation()
    assert len(calls) == (world_size > 1 and recompute)


def test_missing_dataset_names_the_path_and_the_docs(train_args, tmp_path):
    where = r'docs/training.md, section "Preparing data"'
    with pytest.raises(DataError, match=rf'dataset folder not found: .*nowhere.*{where}'):
        train.main(train_args(f'Data.train_root={tmp_path / "nowhere"}'))
    with pytest.raises(DataError, match=r'file list not found: .*train.txt'):
        train.main(train_args('Data.format=filelist', f'Data.train_list={tmp_path / "train.txt"}'))
    # the error line that ends the run is in train.log too, as the last line
    last = (tmp_path / 'out' / 'train.log').read_text().rstrip().splitlines()[-1]
    assert re.fullmatch(r'\[[0-9: -]+\] error: file list not found: .*train\.txt.*', last), last


def test_corrupt_image_is_reported_once_and_skipped(train_args, shapes, copy_of, tmp_path):
    root = copy_of(shapes[0], 'train_bad')
    bad = root / 'circle' / '0003.png'
    bad.write_bytes(b'not a png at all')
    # with worker processes and shared memory, as real runs use them
    out = train.main(train_args(f'Data.train_root={root}', 'Global.epochs=2', 'Data.num_workers=2',
                                'Data.use_shared_memory=true'))
    assert len(out['history']) == 14
    log = (tmp_path / 'out' / 'train.log').read_text()
    assert log.count(f'skipped unreadable image {bad}: UnidentifiedImageError') == 1
    assert '1 unreadable training images skipped so far' in log


def test_file_list_format(train_args, shapes, tmp_path):
    train_root, val_root = shapes
    for split, root in (('train', train_root), ('val', val_root)):
        classes = sorted(os.listdir(root))
        lines = [f'{c}/{f} {i}' for i, c in enumerate(classes) for f in sorted(os.listdir(Path(root) / c))]
        (tmp_path / f'{split}.txt').write_text('\n'.join(lines))
    (tmp_path / 'labels.txt').write_text('\n'.join(sorted(os.listdir(train_root))))
    train.main(train_args('Data.format=filelist', f'Data.train_list={tmp_path / "train.txt"}',
                          f'Data.val_list={tmp_path / "val.txt"}', f'Data.label_names={tmp_path / "labels.txt"}',
                          'Global.epochs=1'))
    _, _, states = load_checkpoint(str(tmp_path / 'out' / 'latest'))
    assert states['class_names'] == sorted(os.listdir(train_root))


def test_wrong_num_classes_is_a_clear_error(train_args):
    with pytest.raises(ConfigError, match='Model.num_classes is 7 but .* has 10 classes'):
        train.main(train_args('Model.num_classes=7'))


def test_validation_classes_must_be_the_training_classes(train_args, shapes, copy_of):
    val = copy_of(shapes[1], 'val_missing_class')
    shutil.rmtree(sorted(val.iterdir())[3])  # every label after the 4th class would shift by one
    with pytest.raises(DataError, match=r'validation classes \(9, .*\) are not the training classes \(10'):
        train.main(train_args(f'Data.val_root={val}'))


def test_resume_with_another_model_is_an_error(train_args, tmp_path):
    train.main(train_args('Global.epochs=1', 'Global.max_steps_per_epoch=1'))
    # one line naming the key (not a line per tensor that no longer fits); tests/test_resume_config.py has the rest
    with pytest.raises(ConfigError, match=r'^cannot resume .*/latest: Model.num_heads changed since the checkpoint '
                                          r'\(Model.num_heads 1 -> 2\)\. [^\n]*$'):
        train.main(train_args('Global.epochs=2', 'Global.resume=auto', 'Model.num_heads=2'))


def test_finetune_new_classes_and_new_window(train_args, tmp_path):
    src = MaxViT(dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1,
                      block_size=[3, 3], grid_size=[3, 3], num_classes=1000))
    paddle.save(src.state_dict(), str(tmp_path / 'src.pdparams'))
    # resume=auto with nothing to resume yet: a fresh fine-tuning run from the pretrained weights
    train.main(train_args(f'Global.pretrained_model={tmp_path / "src.pdparams"}', 'Global.epochs=1',
                          'Global.resume=auto'))
    log = (tmp_path / 'out' / 'train.log').read_text()
    assert 'new classifier (not loaded): proj.weight, proj.bias' in log
    assert 'bias tables resized to the new window: 8' in log


def test_eval_py_reports_metrics_for_raw_and_ema(train_args, tmp_path, capsys):
    train.main(train_args('Global.epochs=1'))
    ckpt = tmp_path / 'out' / 'latest'
    raw = eval_py.main(train_args(f'Global.pretrained_model={ckpt}', 'Global.eval_weights=raw'))
    ema = eval_py.main(train_args(f'Global.pretrained_model={ckpt}'))
    assert raw['images'] == ema['images'] == 40
    assert {'top1', 'top5', 'loss', 'images_per_sec'} <= set(raw)
    _, _, states = load_checkpoint(str(ckpt))
    assert raw['top1'] == pytest.approx(states['metrics']['raw']['top1'])
    assert ema['top1'] == pytest.approx(states['metrics']['ema']['top1'])
    assert 'EMA weights' in capsys.readouterr().out


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    peak, low, warm, total = 3e-3, 1e-5, 10, 110
    # warmup: peak/10, 2 peak/10, ... peak at step 9; cosine: half-way at step 60, min_lr at the end
    assert cosine_lr(0, total, warm, peak, low) == pytest.approx(3e-4)
    assert cosine_lr(4, total, warm, peak, low) == pytest.approx(1.5e-3)
    assert cosine_lr(9, total, warm, peak, low) == cosine_lr(10, total, warm, peak, low) == pytest.approx(peak)
    assert cosine_lr(60, total, warm, peak, low) == pytest.approx((peak + low) / 2)
    assert cosine_lr(35, total, warm, peak, low) == pytest.approx(low + (peak - low) * (2 + 2 ** 0.5) / 4)
    assert cosine_lr(total, total, warm, peak, low) == pytest.approx(low)
    after = [cosine_lr(s, total, warm, peak, low) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # the optimizer follows it step by step
    cfg = load_config(None, ['Optimizer.warmup_steps=10', 'Optimizer.min_lr=1e-5'])
    model = MaxViT(dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1))
    optimizer, schedule = build_optimizer(model, cfg, {'peak_lr': peak, 'warmup_steps': warm, 'total_steps': total})
    for s in range(total):
        assert optimizer.get_lr() == pytest.approx(cosine_lr(s, total, warm, peak, low), rel=1e-9)
        schedule.step()


def test_weight_decay_skips_biases_norms_and_bias_tables():
    model = MaxViT(dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1))
    decayed = {n for n, p in model.named_parameters() if not p.stop_gradient and not no_weight_decay(n, p)}
    assert decayed and all(model.state_dict()[n].ndim >= 2 for n in decayed)
    assert not any(n.endswith(('bias', 'relative_bias_table')) or '.norm' in n for n in decayed)
    assert 'max_blocks.0.0.block_attn.attn.qkv.weight' in decayed


@pytest.mark.parametrize('mixup, cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_targets_sum_to_one(mixup, cutmix):
    mix = Mixup(mixup, cutmix, prob=1.0, smoothing=0.1, num_classes=5, seed=0)
    images = paddle.rand([8, 3, 16, 16])
    labels = paddle.to_tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for _ in range(5):
        mixed, targets = mix(images, labels)
        np.testing.assert_allclose(targets.sum(-1).numpy(), 1.0, rtol=1e-6)
        lam = float(targets[0, 0] - 0.1 / 5) / 0.9 + 0.0  # share of sample 0's own label (0; sample 7 is 2)
        if cutmix and not mixup:
            kept = float((mixed[0] == images[0]).astype('float32').mean())
            assert lam == pytest.approx(kept, abs=0.02)  # CutMix: the label share is the area kept
        if mixup and not cutmix:
            np.testing.assert_allclose(mixed[0].numpy(), lam * images[0].numpy() + (1 - lam) * images[7].numpy(),
                                       rtol=1e-5, atol=1e-6)


def test_visualdl_logs_train_and_eval_scalars(train_args, tmp_path):
    from visualdl import LogReader
    train.main(train_args('Global.epochs=2', 'Global.use_visualdl=true'))
    (log_file,) = (tmp_path / 'out' / 'vdl').glob('vdlrecords.*')
    reader = LogReader(file_path=str(log_file))
    tags = set(reader.get_tags()['scalar'])
    assert {'train/loss', 'train/lr', 'train/images_per_sec'} <= tags
    assert {f'eval_{w}/{m}' for w in ('raw', 'ema') for m in ('top1', 'top5', 'loss')} <= tags
    assert [r.id for r in reader.get_data('scalar', 'train/loss')] == list(range(1, 15))  # every step (print_freq 1)
    assert [r.id for r in reader.get_data('scalar', 'eval_ema/top1')] == [1, 2]            # every epoch


def test_batches_without_a_readable_image_are_skipped(train_args, shapes, copy_of, tmp_path):
    root = copy_of(shapes[0], 'train_all_bad')
    for f in root.rglob('*.png'):
        f.write_bytes(b'garbage')
    # each batch takes its turn with zero weight (accumulation and all-reduce stay in step), then the epoch
    # ends with an error, not a model trained on nothing
    with pytest.raises(DataError, match=r'no training image of epoch 1 could be read \(112 unreadable'):
        train.main(train_args(f'Data.train_root={root}', 'Data.num_workers=2'))  # 7 steps x 16 images
    assert '112 unreadable training images skipped so far' in (tmp_path / 'out' / 'train.log').read_text()


def test_finished_epochs_leave_no_loader_workers(train_args):
    # 7 batches, 2 per optimizer step: each epoch uses 6 and the loader still ends its epoch (the loop used to
    # leave it early, which kept two idle workers per epoch alive until the run ended)
    train.main(train_args('Global.epochs=3', 'Optimizer.global_batch_size=32', 'Data.num_workers=2'))
    def live_children():
        return [p for p in _descendants(os.getpid()) if _alive(p)]
    deadline = time.time() + 5
    while live_children() and time.time() < deadline:
        time.sleep(0.1)
    assert live_children() == []


def _parent(pid: str) -> int:
    try:
        return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
    except OSError:  # it ended meanwhile
        return -1


def _descendants(pid: int):
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    found, todo = [], [str(pid)]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f'/proc/{parent}/task')
        except OSError:
            continue
        for task in tasks:
            try:
                kids = Path(f'/proc/{parent}/task/{task}/children').read_text().split()
            except OSError:
                continue
            found += kids
            todo += kids
    return found


@pytest.mark.parametrize('victim', ['launcher', 'rank 1'])
def test_killing_the_launcher_or_a_rank_takes_trainers_and_workers_down(train_args, tmp_path, victim):
    out = tmp_path / 'dist'
    args = train_args('Global.epochs=200', 'Data.num_workers=2', output=out)
    launcher = subprocess.Popen([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                                 '--log_dir', str(tmp_path / 'log'), str(ROOT / 'train.py')] + args, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / 'latest.pdstates').exists() and time.time() < deadline:  # training is under way
            assert launcher.poll() is None, 'the launcher ended early'
            time.sleep(0.2)
        assert (out / 'latest.pdstates').exists()
        while time.time() < deadline:  # a moment when both ranks have their two loader workers (between epochs
            everything = _descendants(launcher.pid)  # a loader may have none)
            trainers = [p for p in everything if _parent(p) == launcher.pid]
            if len(trainers) == 2 and all(len(_descendants(int(t))) >= 2 for t in trainers):
                break
            time.sleep(0.05)
        assert len(trainers) == 2 and len(everything) >= 2 + 2 * 2
        victim_pid = launcher.pid if victim == 'launcher' else int(sorted(trainers, key=int)[1])
        below_victim = everything if victim == 'launcher' else _descendants(victim_pid)
        os.kill(victim_pid, signal.SIGKILL)

        def survivors(pids, seconds):
            deadline = time.time() + seconds
            while [p for p in pids if _alive(p)] and time.time() < deadline:
                time.sleep(0.1)
            return [p for p in pids if _alive(p)]
        assert survivors(below_victim, 5) == []    # its workers (and, for the launcher, the trainers) within 5 s
        assert survivors(everything, 60) == []     # a lost rank: the launcher then stops the job
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
