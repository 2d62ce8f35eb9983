"""Fine-tuning: Model.num_classes from the data, warmup in epochs, the schedule line and its warnings, a dataset
smaller than one global batch, and configs/finetune_maxvit_t.yaml end to end with a pretrained checkpoint of
another class count."""
import re
from pathlib import Path

import numpy as np
import paddle
import pytest

import train
from common.checkpoint import load_checkpoint
from common.config import ConfigError, build_model, load_config
from common.optim import build_optimizer, cosine_lr, layer_decay_line, layer_lr_scales, schedule_lines, warmup_steps
from conftest import ROOT, TINY, quickstart_args
from maxvit import MaxViT

FINETUNE = ROOT / 'configs' / 'finetune_maxvit_t.yaml'


def log_of(out) -> str:
    return (Path(out) / 'train.log').read_text()


def logged_lrs(text: str):
    return [float(x) for x in re.findall(r' lr (\d\.\d+e[-+]\d+) ', text)]


def test_num_classes_auto_from_the_training_folder(train_args, tmp_path):
    out = train.main(train_args('Model.num_classes=auto', 'Global.epochs=1', 'Global.max_steps_per_epoch=2'))
    assert out['model'].args['num_classes'] == 10 and out['model'](paddle.zeros([1, 3, 32, 32])).shape == [1, 10]
    assert 'Model.num_classes: 10, the classes of' in log_of(tmp_path / 'out')
    _, _, states = load_checkpoint(str(tmp_path / 'out' / 'latest'))
    assert states['config']['Model']['num_classes'] == 10  # the checkpoint stores the resolved number


def test_num_classes_stated_and_wrong_is_still_an_error(train_args):
    with pytest.raises(ConfigError, match=r'Model.num_classes is 7 but .* has 10 classes: set -o Model.num_classes=10'):
        train.main(train_args('Model.num_classes=7'))


def test_build_model_outside_training_takes_auto_from_the_weights(tmp_path):
    """eval, export, predict and summary build the model from the config: 'auto' is the classifier width of
    Global.pretrained_model's weights, 0 (no classifier) without weights."""
    tiny = ['Model.stage_num_block=[1, 1, 1, 1]', 'Model.stem_dim=8', 'Model.stage_dim=16', 'Model.num_heads=1']
    cfg = load_config(FINETUNE, tiny)
    assert cfg['Model']['num_classes'] == 'auto'
    assert build_model(cfg).args['num_classes'] == 0 and cfg['Model']['num_classes'] == 0
    weights = tmp_path / 'w.pdparams'
    paddle.save(MaxViT(dict(load_config(FINETUNE, tiny + ['Model.num_classes=37'])['Model'])).state_dict(),
                str(weights))
    cfg = load_config(FINETUNE, tiny + [f'Global.pretrained_model={weights}'])
    assert build_model(cfg).args['num_classes'] == 37 and cfg['Model']['num_classes'] == 37


def plan_of(cfg, steps_per_epoch, global_batch):
    """The schedule's part of train.plan_steps' plan, for the given steps per epoch and global batch."""
    return {'total_steps': cfg['Global']['epochs'] * steps_per_epoch, 'global_batch': global_batch,
            'warmup_steps': warmup_steps(cfg, steps_per_epoch),
            'peak_lr': cfg['Optimizer']['lr'] * global_batch / cfg['Optimizer']['base_batch_size']}


def test_the_issue_schedule_is_warned_about_twice():
    """The ImageNet recipe on 640 images at global batch 16 for 30 epochs (40 steps each): peak 1.17e-5, a 10k-step
    warmup over a 1,200-step run."""
    cfg = load_config(ROOT / 'configs' / 'maxvit_t_tf_224.yaml', ['Global.epochs=30'])
    plan = plan_of(cfg, 40, 16)
    line, warnings = schedule_lines(cfg, plan)
    assert plan['peak_lr'] == pytest.approx(1.171875e-5) and plan['warmup_steps'] == 10000
    assert 'lr at step 1 1.17e-09, at the end of warmup 1.41e-06, at the last step 1.41e-06' in line
    assert len(warnings) == 2
    assert warnings[0].startswith('warning: the warmup (10000 steps) is at least as long as the run (1200 steps): '
                                  'the lr never reaches its peak 1.17e-05 (it ends at 1.41e-06, 12% of it)')
    assert 'set -o Optimizer.base_batch_size=16' in warnings[1]


def test_warmup_epochs_give_the_schedule_its_numbers():
    cfg = load_config(FINETUNE, ['Global.epochs=30', 'Optimizer.warmup_epochs=1.5'])
    plan = plan_of(cfg, 20, 32)  # 640 images at 32: 20 steps an epoch, 600 steps
    assert plan['warmup_steps'] == 30 and plan['peak_lr'] == 1e-4
    line, warnings = schedule_lines(cfg, plan)
    assert warnings == []
    assert 'warmup 1.5 epochs = 30 steps' in line
    assert 'lr at step 1 3.33e-06, at the end of warmup 0.0001, at the last step 1e-06' in line
    assert cosine_lr(0, 600, 30, 1e-4, 1e-6) == pytest.approx(1e-4 / 30)
    assert cosine_lr(315, 600, 30, 1e-4, 1e-6) == pytest.approx((1e-4 + 1e-6) / 2)  # halfway through the cosine
    # the optimizer's schedule is the same one: warmup from Optimizer.warmup_epochs
    model = MaxViT(dict(cfg['Model'], num_classes=3, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16,
                        num_heads=1, block_size=[2, 2], grid_size=[2, 2]))
    optimizer, schedule = build_optimizer(model, cfg, plan)
    lrs = []
    for _ in range(600):
        lrs.append(optimizer.get_lr())
        schedule.step()
    assert lrs[0] == pytest.approx(1e-4 / 30) and lrs[29] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(cosine_lr(599, 600, 30, 1e-4, 1e-6)) and lrs[-1] < 1.01e-6


def test_a_dataset_smaller_than_the_global_batch_trains(train_args, tmp_path):
    """120 training images, Optimizer.global_batch_size 4096 and Data.batch_size 500: the batch is capped to 120
    images, one step an epoch (it was 'error: 120 training images make no full optimizer step of 4096 images')."""
    out = train.main(train_args('Optimizer.global_batch_size=4096', 'Data.batch_size=500', 'Global.epochs=2',
                                'Optimizer.warmup_steps=1'))
    assert out['global_batch'] == 120 and out['steps_per_epoch'] == 1 and out['step'] == 2
    log = log_of(tmp_path / 'out')
    assert 'Data.batch_size 500 capped to 120: 120 training images' in log
    assert 'global batch 120 = 120 x 1 processes x 1 accumulation' in log


def test_accumulation_is_capped_to_the_epoch(train_args, tmp_path):
    """7 batches of 16 an epoch, Optimizer.global_batch_size 4096: a global batch of 7 x 16 = 112 images."""
    out = train.main(train_args('Optimizer.global_batch_size=4096', 'Global.epochs=1', 'Optimizer.warmup_steps=0'))
    assert out['global_batch'] == 112 and out['steps_per_epoch'] == 1
    assert 'global batch 112, not Optimizer.global_batch_size 4096: capped' in log_of(tmp_path / 'out')


def test_a_warmup_longer_than_the_run_is_one_warning_line(train_args, tmp_path):
    train.main(train_args('Global.epochs=1', 'Global.max_steps_per_epoch=2', 'Optimizer.warmup_steps=5'))
    lines = [x for x in log_of(tmp_path / 'out').splitlines() if 'warning: the warmup' in x]
    assert len(lines) == 1 and 'the warmup (5 steps) is at least as long as the run (2 steps)' in lines[0]


def test_the_finetune_config_end_to_end_with_a_pretrained_checkpoint_of_1000_classes(shapes, tmp_path):
    """configs/finetune_maxvit_t.yaml with only the tiny model and image size of the tests, data and weights: the
    classes come from the data, the 1000-class classifier is replaced, the logged lr is the recipe's."""
    # the tiny model of the tests (its Model.* keys), at 32x32, batch 16, no loader processes, no VisualDL
    tiny = [o for o in TINY if o.startswith(('Model.', 'Data.img_size', 'Data.batch_size', 'Data.num_workers',
                                             'Global.use_visualdl'))]
    source = load_config(FINETUNE, tiny + ['Model.num_classes=1000'])
    paddle.seed(0)
    weights = tmp_path / 'pretrained.pdparams'
    paddle.save(MaxViT(source['Model']).state_dict(), str(weights))
    out_dir = tmp_path / 'ft'
    args = ['-c', str(FINETUNE), '-o', f'Data.train_root={shapes[0]}', '-o', f'Data.val_root={shapes[1]}',
            '-o', f'Global.pretrained_model={weights}', '-o', f'Global.output_dir={out_dir}', '-o', 'Global.epochs=3',
            '-o', 'Global.print_freq=1']
    for o in tiny:
        args += ['-o', o]
    out = train.main(args)
    log = log_of(out_dir)
    assert 'Model.num_classes: 10' in log and 'new classifier (not loaded)' in log
    assert out['model'].args['num_classes'] == 10
    # 120 images at global batch 32 (batch 16 x 2 accumulation): 3 steps an epoch, warmup 1 epoch = 3 steps
    assert out['global_batch'] == 32 and out['steps_per_epoch'] == 3 and out['step'] == 9
    assert 'warmup 1 epochs = 3 steps' in log and 'warning' not in log
    lrs = logged_lrs(log)
    # the lr of steps 1..9 (0-based 0..8): warmup 1e-4 * (s + 1) / 3, then cosine towards 1e-6 at step 9
    expected = [cosine_lr(s, 9, 3, 1e-4, 1e-6) for s in range(9)]
    assert lrs == pytest.approx(expected, rel=1e-3), log
    assert lrs[0] == pytest.approx(1e-4 / 3, rel=1e-3) and max(lrs) == pytest.approx(1e-4, rel=1e-3)
    assert all(np.isfinite(out['history']))
    # export builds the model from the same config: 'auto' is the classifier width of the fine-tuned weights
    cfg = load_config(FINETUNE, tiny + [f'Global.pretrained_model={out_dir}/best'])
    assert cfg['Model']['num_classes'] == 'auto'
    assert build_model(cfg).args['num_classes'] == 10 and cfg['Model']['num_classes'] == 10


# ---- layer-wise learning-rate decay and the linear probe

def tiny_cfg(*overrides):
    return load_config(ROOT / 'configs' / 'quickstart.yaml', TINY + list(overrides))


@pytest.mark.parametrize('head', ['norm_mlp', 'conv'])
def test_layer_decay_groups_the_parameters_as_timm_groups_maxvit(head):
    """timm (param_groups_layer_decay with MaxxVit.group_matcher) puts the stem in layer 0, stage i in layer i and
    the head in layer 5 of a four-stage MaxViT: scales decay ** (5 - layer)."""
    model = build_model(tiny_cfg(f'Model.head={head}', 'Model.num_classes=10'))
    scales = layer_lr_scales(model, 0.5)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    expected = {'conv_stem': 0.5 ** 5, 'max_blocks.0': 0.5 ** 4, 'max_blocks.1': 0.5 ** 3, 'max_blocks.2': 0.25,
                'max_blocks.3': 0.5}
    for name, scale in scales.items():
        part = name.split('.')[0] if name.startswith('conv_stem') else '.'.join(name.split('.')[:2])
        assert scale == expected.get(part, 1.0), name
    head_names = {n for n, s in scales.items() if s == 1.0}
    assert {n.split('.')[0] for n in head_names} == ({'norm', 'pre_logits', 'proj'} if head == 'norm_mlp'
                                                      else {'last_conv', 'proj'})
    assert layer_decay_line(model, 0.5) == ('layer-wise lr decay 0.5: lr x 1 for the head, x 0.5, 0.25, 0.125, '
                                            '0.0625 for stages 4..1, x 0.0312 for the stem')


def test_layer_decay_first_step_moves_each_parameter_by_its_layers_lr():
    """AdamW's first step moves each element with a gradient by exactly its lr (m / sqrt(v) = sign(g) after bias
    correction; no weight decay or clipping here): the stem by lr x 0.5**5, the head by lr."""
    cfg = tiny_cfg('Model.num_classes=10', 'Optimizer.layer_decay=0.5', 'Optimizer.weight_decay=0.0',
                   'Optimizer.clip_grad=0.0', 'Optimizer.warmup_steps=0')
    paddle.seed(0)
    model = build_model(cfg)
    optimizer, _ = build_optimizer(model, cfg, {'peak_lr': 1e-2, 'warmup_steps': 0, 'total_steps': 10})
    params = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]  # not BatchNorm statistics
    before = {n: p.numpy().copy() for n, p in params}
    x, y = paddle.randn([4, 3, 32, 32]), paddle.to_tensor([0, 1, 2, 3])
    paddle.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.numpy().copy() for n, p in params}
    optimizer.step()
    scales = layer_lr_scales(model, 0.5)
    seen = set()
    for name, p in params:
        moved, g = np.abs(p.numpy() - before[name]), np.abs(grads[name])
        strong = g > 1e-5  # |g| / (|g| + epsilon 1e-8) within 1e-3 of 1 (a bias before a BatchNorm has ~0)
        if not strong.any():
            continue
        # float32 parameters: the step is exact up to the rounding of p + step (|p| x 2**-23 each)
        ulp = np.abs(before[name][strong]) * 2.0 ** -22 + 1e-12
        np.testing.assert_allclose(moved[strong], 1e-2 * scales[name], rtol=2e-3, atol=ulp.max(), err_msg=name)
        seen.add(scales[name])
    assert seen == {0.5 ** k for k in range(6)}


def test_layer_decay_keeps_gradient_clipping_global():
    """Optimizer.clip_grad clips the norm of all gradients at once, with layer decay as without it: fed the same
    gradients, the head (lr x 1 either way) follows the same path under both optimizers while the clip is active and
    each layer's share of the norm changes from step to step. The control shows the test can fail: Paddle parameter
    groups (one per layer) clip each group on its own, and the head's path differs."""
    overrides = ['Model.num_classes=10', 'Optimizer.clip_grad=0.1', 'Optimizer.warmup_steps=0']
    plain_cfg, decay_cfg = tiny_cfg(*overrides), tiny_cfg(*overrides, 'Optimizer.layer_decay=0.5')
    paddle.seed(0)
    models = [build_model(plain_cfg) for _ in range(3)]
    for m in models[1:]:
        m.set_state_dict(models[0].state_dict())
    plan = {'peak_lr': 1e-2, 'warmup_steps': 0, 'total_steps': 10}
    optimizers = [build_optimizer(models[0], plain_cfg, plan)[0], build_optimizer(models[1], decay_cfg, plan)[0]]
    names = [n for n, p in models[0].named_parameters() if not p.stop_gradient]
    scales = layer_lr_scales(models[2], 0.5)
    by_scale = {}
    for n, p in models[2].named_parameters():
        if not p.stop_gradient:
            by_scale.setdefault(scales[n], []).append(p)
    optimizers.append(paddle.optimizer.AdamW(  # the control: the same multipliers as parameter groups
        learning_rate=1e-2, weight_decay=0.05, grad_clip=paddle.nn.ClipGradByGlobalNorm(0.1),
        parameters=[{'params': ps, 'learning_rate': s} for s, ps in by_scale.items()]))
    rng = np.random.default_rng(0)
    for step in range(4):
        # a linear loss: fixed gradients, the same for the three models, each parameter at its own scale this step
        coef = {n: paddle.to_tensor(rng.standard_normal(dict(models[0].named_parameters())[n].shape)
                                    * 10.0 ** rng.uniform(-2, 1), dtype='float32') for n in names}
        for model, optimizer in zip(models, optimizers):
            params = dict(model.named_parameters())
            sum((coef[n] * params[n]).sum() for n in names).backward()
            optimizer.step()
            optimizer.clear_grad()
    head = [n for n in names if scales[n] == 1.0]
    plain, decayed, grouped = (dict(m.named_parameters()) for m in models)
    for n in head:
        np.testing.assert_allclose(decayed[n].numpy(), plain[n].numpy(), rtol=1e-6, atol=1e-8, err_msg=n)
    assert max(np.abs(grouped[n].numpy() - plain[n].numpy()).max() for n in head) > 1e-4
    stem = [n for n in names if n.startswith('conv_stem.')]
    assert max(np.abs(decayed[n].numpy() - plain[n].numpy()).max() for n in stem) > 1e-4  # decay did act


def test_linear_probe_trains_only_the_classifier(shapes, tmp_path):
    """Global.linear_probe from weights with a classifier of another class count: after each epoch every tensor but
    the new classifier is bit-identical to the weights, BatchNorm running statistics included, in the raw weights
    and in their EMA; the classifier moves. (That a probe learns from features worth probing: docs/training.md,
    'What transfer does'.)"""
    paddle.seed(0)
    start = {k: v.numpy() for k, v in MaxViT(tiny_cfg('Model.num_classes=3')['Model']).state_dict().items()}
    weights = tmp_path / 'pretrained.pdparams'
    paddle.save({k: paddle.to_tensor(v) for k, v in start.items()}, str(weights))
    out_dir = tmp_path / 'probe'
    train.main(quickstart_args(*shapes, out_dir, 'Global.linear_probe=true', 'Model.num_classes=auto',
                               f'Global.pretrained_model={weights}', 'Global.epochs=2', 'Global.save_epoch_freq=1'))
    assert 'MaxViT: 1,290 trainable parameters (Global.linear_probe' in log_of(out_dir)  # 128 features x 10 + 10
    first, last = (load_checkpoint(str(out_dir / name))[0] for name in ('epoch_1', 'latest'))
    ema = load_checkpoint(str(out_dir / 'latest'))[2]['ema']['state']  # the weights evaluated and exported
    assert any(k.endswith('_mean') for k in last) and any(k.endswith('_variance') for k in last)
    for key in start:
        if not key.startswith('proj.'):
            for weights in (first, last, ema):
                np.testing.assert_array_equal(np.asarray(weights[key]), start[key], err_msg=key)
    assert np.abs(np.asarray(last['proj.weight']) - np.asarray(first['proj.weight'])).max() > 1e-4


@pytest.mark.parametrize('others', [[], ['Global.resume=auto']])  # auto with no checkpoint would start at random
def test_linear_probe_needs_weights(others):
    with pytest.raises(ConfigError, match='Global.linear_probe is true; it must be true only with '
                                          'Global.pretrained_model'):
        tiny_cfg('Global.linear_probe=true', *others)


def test_layer_decay_is_refused_for_a_linear_probe():
    with pytest.raises(ConfigError, match='Optimizer.layer_decay is 0.8; it must be null when Global.linear_probe is '
                                          'true: a probe trains only the classifier'):
        tiny_cfg('Global.linear_probe=true', 'Global.pretrained_model=w.pdparams', 'Optimizer.layer_decay=0.8')


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_each_finetune_config_builds_the_model_its_weights_come_from(size):
    """configs/finetune_maxvit_X.yaml is configs/maxvit_X_tf_224.yaml's model (so that the converted weights load)
    with the classes from the data and half its stochastic depth, at the same input and eval preprocessing."""
    finetune = load_config(ROOT / 'configs' / f'finetune_maxvit_{size}.yaml')
    source = load_config(ROOT / 'configs' / f'maxvit_{size}_tf_224.yaml')
    differs = {k for k in source['Model'] if finetune['Model'][k] != source['Model'][k]}
    assert differs == {'num_classes', 'drop_path'}
    assert finetune['Model']['num_classes'] == 'auto'
    assert finetune['Model']['drop_path'] == pytest.approx(source['Model']['drop_path'] / 2)
    for key in ('img_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std'):
        assert finetune['Data'][key] == source['Data'][key], key
    recipe = load_config(FINETUNE)
    for section in ('Optimizer', 'EMA', 'AMP'):
        assert finetune[section] == recipe[section]
