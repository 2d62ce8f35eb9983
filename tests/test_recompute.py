"""Model.recompute: gradient checkpointing of every Max_Block gives the plain gradients with less memory."""

import numpy as np
import paddle
import pytest

import maxvit
import train
from common.checkpoint import load_checkpoint
from common.config import ConfigError, load_config
from conftest import TWO_PROCESS, launch_two_processes, quickstart_args
from maxvit import MaxViT, tiny_args


SMALL = dict(tiny_args, stage_num_block=[1, 2, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, block_size=[2, 2],
             grid_size=[2, 2], num_classes=10, drop_path=0.3)


def twins(**kwargs):
    """(plain, checkpointed): the same weights, recompute off and on."""
    paddle.seed(0)
    plain = MaxViT(dict(SMALL, **kwargs))
    checkpointed = MaxViT(dict(SMALL, recompute=True, **kwargs))
    checkpointed.set_state_dict(plain.state_dict())
    return plain, checkpointed


def step(model, x, seed=7, amp=False):
    """One training forward and backward on a fixed random stream: (logits, {name: grad}, {name: BN stat}),
    and the shapes of the tensors autograd kept for backward."""
    model.train()
    paddle.seed(seed)
    kept = []
    with paddle.autograd.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        with paddle.amp.auto_cast(enable=amp, level='O1', dtype='bfloat16'):
            logits = model(x)
    (logits.astype('float32') * paddle.linspace(-1, 1, 10)).sum().backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: t.numpy().copy() for n, t in model.state_dict().items() if n.endswith(('_mean', '_variance'))}
    model.clear_gradients()
    return logits.numpy(), grads, stats, kept


@pytest.mark.numerics
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-O1'])
def test_gradients_equal_the_plain_backward(amp):
    # bf16 on the CPU build is plumbing only (README: AMP): auto_cast must reach the recomputed forward
    plain, checkpointed = twins()
    x = paddle.randn([4, 3, 32, 32])
    out_a, grads_a, stats_a, kept_a = step(plain, x, amp=amp)
    out_b, grads_b, stats_b, kept_b = step(checkpointed, x, amp=amp)
    np.testing.assert_allclose(out_b, out_a, rtol=1e-6, atol=1e-6)
    trainable = {n for n, p in plain.named_parameters() if not p.stop_gradient}
    assert set(grads_a) == set(grads_b) == trainable
    for name in grads_a:  # drop_path 0.3: the recomputed forward draws the same DropPath masks
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # BatchNorm's running statistics are updated once per step, not again by the recomputation
    for name in stats_a:
        np.testing.assert_allclose(stats_b[name], stats_a[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # what autograd keeps: the input of each Max_Block instead of its activations (the count includes what the
    # no_grad forward's PyLayers save and drop at once)
    assert len(kept_b) < len(kept_a) / 5


def test_same_parameters_and_checkpoints_and_eval_is_untouched():
    plain, checkpointed = twins()
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    assert sum(int(p.numel()) for p in plain.parameters()) == sum(int(p.numel()) for p in checkpointed.parameters())
    plain.eval(), checkpointed.eval()
    x = paddle.randn([2, 3, 32, 32])
    x.stop_gradient = False
    assert not any(checkpointed._recomputes(b, x) for blocks in checkpointed.max_blocks for b in blocks)
    np.testing.assert_array_equal(checkpointed(x).numpy(), plain(x).numpy())
    checkpointed.train()
    with paddle.no_grad():  # no gradient to compute: nothing to recompute
        assert not checkpointed._recomputes(checkpointed.max_blocks[0][0], x)
    assert checkpointed._recomputes(checkpointed.max_blocks[0][0], x)


def test_set_grad_checkpointing_switches_it_on_a_built_model():
    """timm's switch: the same as building with recompute=True, and off again."""
    plain, checkpointed = twins()
    x = paddle.randn([4, 3, 32, 32])
    plain.set_grad_checkpointing()
    assert plain.args['recompute'] is True
    _, grads_a, _, kept_a = step(plain, x)
    _, grads_b, _, kept_b = step(checkpointed, x)
    assert len(kept_a) == len(kept_b)
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)
    x.stop_gradient = False
    plain.train()
    assert plain._recomputes(plain.max_blocks[0][0], x)
    plain.set_grad_checkpointing(False)
    assert not plain._recomputes(plain.max_blocks[0][0], x)


@pytest.mark.numerics
def test_frozen_stages_are_not_recomputed_and_the_rest_matches():
    plain, checkpointed = twins()
    x = paddle.randn([4, 3, 32, 32])
    for model in (plain, checkpointed):
        model.frozen_stages = 1
        for part in model._frozen_parts():
            for p in part.parameters():
                p.stop_gradient = True
    _, grads_a, _, _ = step(plain, x)
    _, grads_b, _, _ = step(checkpointed, x)
    assert set(grads_a) == set(grads_b) and not any(n.startswith(('conv_stem', 'max_blocks.0.')) for n in grads_b)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_recompute_must_be_a_bool():
    with pytest.raises(ValueError, match="recompute is 'yes'; it must be true or false"):
        maxvit.check_args(dict(tiny_args, recompute='yes'))
    with pytest.raises(ConfigError, match=r'Model.recompute is 1; it must be true or false'):
        load_config(None, ['Model.recompute=1'])
    assert load_config(None, ['Model.recompute=true'])['Model']['recompute'] is True


def test_training_run_with_recompute_matches_and_its_checkpoint_loads_without(train_args, tmp_path):
    common = ['Global.epochs=1', 'Global.max_steps_per_epoch=2', 'Data.mixup=0.8']
    plain = train.main(train_args(*common, output=tmp_path / 'plain'))
    checkpointed = train.main(train_args(*common, 'Model.recompute=true', output=tmp_path / 'recompute'))
    np.testing.assert_allclose(checkpointed['history'], plain['history'], rtol=1e-5)
    a, _, _ = load_checkpoint(str(tmp_path / 'plain' / 'latest'))
    b, _, states = load_checkpoint(str(tmp_path / 'recompute' / 'latest'))
    assert list(a) == list(b) and states['config']['Model']['recompute'] is True
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    model = MaxViT(dict(states['config']['Model'], recompute=False))  # interchangeable checkpoints
    model.set_state_dict(b)


def test_two_process_run_with_recompute_equals_the_plain_one(two_process_run, tmp_path):
    # DataParallel's all-reduce hooks cannot follow recompute's second backward pass: train.py all-reduces the
    # gradients after the backward pass instead (fused_allreduce_gradients), with the same result. The plain run
    # is the shared 2-process run of tests/test_train.py; this one reads the data that run wrote.
    data = two_process_run['data']
    launch_two_processes(quickstart_args(data / 'train', data / 'val', tmp_path / 'recompute', *TWO_PROCESS,
                                         'Model.recompute=true'), tmp_path / 'launch_log')
    plain = load_checkpoint(str(two_process_run['out'] / 'latest'))[0]
    checkpointed = load_checkpoint(str(tmp_path / 'recompute' / 'latest'))[0]
    assert list(plain) == list(checkpointed)
    for k in plain:
        np.testing.assert_allclose(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, err_msg=k)
