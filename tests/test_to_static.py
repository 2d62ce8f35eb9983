"""Global.to_static: training through paddle.jit.to_static follows eager training, with the same checkpoints."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import train
from common.checkpoint import load_checkpoint
from common import cpu_kernels
from common.config import ConfigError, load_config
from common.fast_layers import use_fast_layers
from maxvit import MaxViT, tiny_args

SMALL = dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, block_size=[2, 2],
             grid_size=[2, 2], num_classes=10, drop_path=0.5)


@pytest.mark.numerics
def test_static_forward_and_backward_equal_eager():
    # as train.py runs them, with the fast layers: the memory-saving PyLayers (FastDropPath's _ScaleSamples,
    # FastMlp's _LinearFn) take their plain form in the static program, the C++ kernels their static form;
    # DropPath draws the same masks from the same seed
    paddle.seed(0)
    eager = use_fast_layers(MaxViT(SMALL))
    static = use_fast_layers(MaxViT(SMALL))
    assert (eager.conv_stem[0]._kernels is not None) == cpu_kernels.load()  # (off: MAXVIT_CPU_KERNELS=0)
    static.set_state_dict(eager.state_dict())
    static = paddle.jit.to_static(static, full_graph=True)
    x = paddle.randn([4, 3, 32, 32])
    results = []
    for model in (eager, static):
        model.train()
        paddle.seed(3)
        out = model(x)
        (out * paddle.linspace(-1, 1, 10)).sum().backward()
        results.append((out.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()
                                              if not p.stop_gradient}))
    (out_a, grads_a), (out_b, grads_b) = results
    np.testing.assert_allclose(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_training_through_to_static_follows_eager_and_resumes(train_args, tmp_path):
    # batches of 20: the 40 val images make one eval shape, so each compiled run traces two programs, not three
    common = ['Global.epochs=2', 'Global.max_steps_per_epoch=2', 'Global.save_epoch_freq=1', 'Data.batch_size=20']
    eager = train.main(train_args(*common, output=tmp_path / 'eager'))
    static = train.main(train_args(*common, 'Global.to_static=true', output=tmp_path / 'static'))
    np.testing.assert_allclose(static['history'], eager['history'], rtol=1e-5)  # drop_path 0.1, Mixup on
    for kind in ('raw', 'ema'):
        assert static['metrics'][kind]['top1'] == eager['metrics'][kind]['top1']
        assert static['metrics'][kind]['loss'] == pytest.approx(eager['metrics'][kind]['loss'], rel=1e-5)
    a, opt_a, _ = load_checkpoint(str(tmp_path / 'eager' / 'latest'))
    b, opt_b, states = load_checkpoint(str(tmp_path / 'static' / 'latest'))
    assert list(a) == list(b) and opt_a.keys() == opt_b.keys() and states['config']['Global']['to_static']
    # the weights, as a whole (a bias in front of a BatchNorm has a gradient of float noise only, which AdamW
    # turns into full-size steps of any sign: compared one by one, those would differ)
    flat_a, flat_b = (np.concatenate([w[k].ravel() for k in a]) for w in (a, b))
    assert np.linalg.norm(flat_b - flat_a) < 1e-3 * np.linalg.norm(flat_a)  # measured: 1.3e-4
    log = (tmp_path / 'static' / 'train.log').read_text()
    assert 'compiled: paddle.jit.to_static' in log and 'epoch 2/2 step 2/2 loss' in log

    # resumed from the compiled run's epoch 1, compiled again: its second epoch, exactly
    resumed = train.main(train_args(*common, 'Global.to_static=true',
                                    f'Global.resume={tmp_path / "static" / "epoch_1"}', output=tmp_path / 'resumed'))
    assert resumed['history'] == static['history'][2:]
    c, _, _ = load_checkpoint(str(tmp_path / 'resumed' / 'latest'))
    for k in b:
        np.testing.assert_array_equal(c[k], b[k], err_msg=k)


def test_to_static_with_recompute_is_a_config_error():
    with pytest.raises(ConfigError, match=r'Global.to_static is true; it must be false when Model.recompute'):
        load_config(None, ['Global.to_static=true', 'Model.recompute=true'])
    with pytest.raises(ConfigError, match=r'Global.to_static is 1; it must be true or false'):
        load_config(None, ['Global.to_static=1'])


def test_static_step_runs_under_bf16_autocast():
    # bf16 on the CPU build is plumbing only (auto_cast is a no-op there): the program builds and trains
    paddle.seed(0)
    model = paddle.jit.to_static(MaxViT(SMALL), full_graph=True)
    model.train()
    with paddle.amp.auto_cast(level='O1', dtype='bfloat16'):
        logits = model(paddle.randn([2, 3, 32, 32]))
    loss = F.cross_entropy(logits.astype('float32'), paddle.to_tensor([1, 2]))
    loss.backward()
    assert np.isfinite(float(loss)) and model.proj.weight.grad is not None
