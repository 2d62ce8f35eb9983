"""Resuming with a changed config: compared with the config, classes and batch plan the checkpoint stores. Refused
in one line for the model, the linear probe, the classes and a mid-epoch batch plan; accepted in one line for the
run's length and rhythm; the rest of the recipe only with -o Global.resume_changes=allow (docs/training.md,
"Stopping, preemption and resuming"). Real runs of train.main on the tiny config; the mid-epoch checkpoint is made
by a real SIGTERM."""
import os
import signal

import pytest

import train
from common.checkpoint import load_checkpoint
from common.config import ConfigError, load_config
from common.logger import Logger
from common.optim import cosine_lr
from common.resume import check_resume
from conftest import ROOT, TINY, quickstart_args


@pytest.fixture(scope='module')
def saved(shapes, tmp_path_factory):
    """{'end': a checkpoint after epoch 1 of 1 (7 steps), 'mid': one at epoch 1 step 3 of 7, where a SIGTERM that
    this process sent itself during step 3 stopped the run}: their prefixes."""
    root = tmp_path_factory.mktemp('resume_config')
    train.main(quickstart_args(*shapes, root / 'end', 'Global.epochs=1'))
    real, done = train.optimizer_step, []

    def step_then_sigterm(learner):
        real(learner)
        done.append(1)
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    train.optimizer_step = step_then_sigterm
    try:
        stopped = train.main(quickstart_args(*shapes, root / 'mid', 'Global.epochs=1'))
    finally:
        train.optimizer_step = real
    assert stopped['stopped'] == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert load_checkpoint(str(root / 'mid' / 'latest'))[2]['epoch_step'] == 3
    return {'end': root / 'end' / 'latest', 'mid': root / 'mid' / 'latest'}


def resume(train_args, prefix, *overrides):
    """train.main resuming ``prefix`` into tmp_path/out (the checkpoint itself stays as it is)."""
    return train.main(train_args(f'Global.resume={prefix}', *overrides))


def one_line(error) -> str:
    text = str(error.value)
    assert '\n' not in text
    return text


def test_a_changed_model_is_refused_naming_the_keys(train_args, saved):
    with pytest.raises(ConfigError) as e:
        resume(train_args, saved['end'], 'Model.stage_dim=32', 'Model.mbconv_ksize=5')
    assert one_line(e) == (
        f"cannot resume {saved['end']}: Model.stage_dim, Model.mbconv_ksize changed since the checkpoint "
        f"(Model.stage_dim 16 -> 32, Model.mbconv_ksize 3 -> 5). Resume with the checkpoint's settings, or start a "
        f"new run in another Global.output_dir (-o Global.pretrained_model={saved['end']} starts from its weights)")


def test_switching_the_linear_probe_is_refused_even_when_changes_are_allowed(train_args, saved):
    """A probe's optimizer holds the classifier's state only: switching it on or off cannot continue the run."""
    with pytest.raises(ConfigError) as e:
        resume(train_args, saved['end'], 'Global.linear_probe=true', f"Global.pretrained_model={saved['end']}",
               'Global.resume_changes=allow')
    assert one_line(e).startswith(f"cannot resume {saved['end']}: Global.linear_probe changed since the checkpoint "
                                  f"(Global.linear_probe false -> true)")


def test_renamed_classes_are_refused(train_args, saved, shapes, copy_of):
    train_root, val_root = copy_of(shapes[0], 'train'), copy_of(shapes[1], 'val')
    for root in (train_root, val_root):  # 'cross' -> 'cross2' stays the 4th class: only the name differs
        (root / 'cross').rename(root / 'cross2')
    with pytest.raises(ConfigError) as e:
        resume(train_args, saved['end'], f'Data.train_root={train_root}', f'Data.val_root={val_root}')
    assert "the classes changed since the checkpoint (class 3: 'cross' -> 'cross2'; 10 -> 10 classes)" in one_line(e)


@pytest.mark.parametrize('change, listed', [
    ('Data.batch_size=8', 'Data.batch_size 16 -> 8, global batch 16 -> 8'),
    ('Optimizer.global_batch_size=32', 'global batch 16 -> 32, accumulation steps 1 -> 2'),
])
def test_a_changed_batch_plan_is_refused_mid_epoch(train_args, saved, change, listed):
    with pytest.raises(ConfigError) as e:
        resume(train_args, saved['mid'], change)
    assert f'the batch plan changed since its mid-epoch save ({listed}), which would misplace its position ' \
           f'(epoch 1, step 3)' in one_line(e)


def test_the_recipe_changes_only_when_allowed(train_args, saved, tmp_path):
    changes = ['Optimizer.lr=2e-3', 'Model.drop_path=0.2', 'Global.epochs=2']
    with pytest.raises(ConfigError) as e:
        resume(train_args, saved['end'], *changes)
    assert one_line(e) == (
        f"resuming {saved['end']} would change its recipe: Model.drop_path 0.1 -> 0.2, Optimizer.lr 0.001 -> 0.002. "
        f"Add -o Global.resume_changes=allow to resume with the change, or drop it to continue as the checkpoint's "
        f"run would (docs/training.md, \"Stopping, preemption and resuming\")")
    assert not (tmp_path / 'out' / 'latest.pdparams').exists()

    out = resume(train_args, saved['end'], *changes, 'Global.resume_changes=allow')
    assert out['step'] == 14 and out['stopped'] is None
    log = (tmp_path / 'out' / 'train.log').read_text()
    assert log.count('resuming with changes: ') == 1
    assert ('resuming with changes: Global.epochs 1 -> 2, Model.drop_path 0.1 -> 0.2, Optimizer.lr 0.001 -> 0.002 '
            '(Global.resume_changes=allow)') in log
    # the new peak lr drives the schedule from the checkpoint's step on (global batch 16 = base batch 16)
    min_lr = load_config(ROOT / 'configs' / 'quickstart.yaml', TINY)['Optimizer']['min_lr']
    lr = cosine_lr(7, 14, 5, 2e-3, min_lr)  # the lr of the 8th step, the first of the resumed run
    assert 'epoch 2/2 step 1/7 loss' in log and f'lr {lr:.3e}' in log.split('epoch 2/2 step 1/7')[1].split('\n')[0]


def test_length_and_rhythm_change_freely_with_one_line(train_args, saved, tmp_path):
    out = resume(train_args, saved['mid'], 'Global.epochs=2', 'Global.print_freq=2', 'Global.eval_freq=2',
                 'Global.save_interval_steps=4', 'Model.recompute=true')
    assert out['step'] == 14
    log = (tmp_path / 'out' / 'train.log').read_text()
    assert [line.split('] ')[1] for line in log.splitlines() if 'resuming with changes' in line] == [
        'resuming with changes: Global.epochs 1 -> 2, Global.print_freq 1 -> 2, Global.eval_freq 1 -> 2, '
        'Global.save_interval_steps null -> 4, Model.recompute false -> true']
    steps = [int(line.split(' step ')[1].split('/')[0]) for line in log.splitlines() if '/7 loss' in line]
    assert steps == [4, 6, 7, 1, 3, 5, 7]  # every 2nd step of the run (steps 4, 6, 8, ...) and each epoch's last
    assert log.count('eval (raw)') == 1  # after epoch 2 only


@pytest.mark.parametrize('epoch_step, world_size, accum, images, outcome', [
    (0, 1, 2, 120, 'resuming with changes: processes 2 -> 1, accumulation steps 1 -> 2'),  # same global batch
    (3, 1, 2, 120, 'the batch plan changed since its mid-epoch save (processes 2 -> 1, accumulation steps 1 -> 2)'),
    (3, 2, 1, 130, 'the batch plan changed since its mid-epoch save (training images 120 -> 130)'),
    (0, 2, 1, 130, 'would change its recipe: training images 120 -> 130'),
])
def test_processes_and_images_against_the_stored_plan(epoch_step, world_size, accum, images, outcome, capsys):
    cfg = load_config(ROOT / 'configs' / 'quickstart.yaml', TINY)
    plan = {'global_batch': 32, 'batch_size': 16, 'world_size': 2, 'accum': 1, 'train_images': 120}
    states = {'config': cfg, 'class_names': ['a', 'b'], 'plan': plan, 'epoch': 1, 'epoch_step': epoch_step}
    now = dict(plan, world_size=world_size, accum=accum, train_images=images)
    try:
        check_resume('ckpt', states, cfg, ['a', 'b'], now, Logger(None))
    except ConfigError as e:
        assert outcome in str(e)
    else:
        assert outcome in capsys.readouterr().out
