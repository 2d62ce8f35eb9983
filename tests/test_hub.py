"""hubconf.py through paddle.hub itself (source='local'): list, help, load with and without weights, backbones."""
from pathlib import Path

import numpy as np
import paddle
import pytest

from common.checkpoint import CheckpointError
from common.config import load_config
from maxvit import MaxViT

ROOT = str(Path(__file__).resolve().parent.parent)
CONFIGS = sorted(p.stem for p in (Path(ROOT) / 'configs').glob('maxvit_*.yaml'))
SMALL = dict(stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, block_size=[2, 2],
             grid_size=[2, 2], num_classes=10)


def load(name, **kwargs):
    return paddle.hub.load(ROOT, name, source='local', **kwargs)


def numpy_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """(path, state): a small official-layout model from the hub, every tensor random, saved as .pdparams."""
    model = load('maxvit_t_tf_224', **SMALL)
    rng = np.random.default_rng(0)
    for v in model.state_dict().values():
        v.set_value(rng.uniform(0.5, 1.5, v.shape).astype('float32') if 'variance' in v.name
                    else rng.normal(0, 0.2, v.shape).astype('float32'))
    path = tmp_path_factory.mktemp('hub') / 'small.pdparams'
    paddle.save(model.state_dict(), str(path))
    return path, numpy_state(model)


def test_list_shows_one_entry_per_model_config_and_nothing_else():
    entries = paddle.hub.list(ROOT, source='local')
    assert sorted(entries) == CONFIGS and len(CONFIGS) == 18
    assert {'maxvit_t', 'maxvit_s', 'maxvit_b', 'maxvit_l', 'maxvit_t_tf_224', 'maxvit_xl_tf_512'} <= set(entries)


def test_load_builds_the_configs_model():
    model = load('maxvit_t')                                           # the article's MaxViT-T
    assert isinstance(model, MaxViT) and model.training
    assert model.args == load_config(str(Path(ROOT) / 'configs' / 'maxvit_t.yaml'))['Model']
    assert sum(int(v.numel()) for v in model.state_dict().values()) == 31_001_840   # paddle.summary's total

    model = load('maxvit_t_tf_384', num_classes=7, drop_path=0.0, **{k: v for k, v in SMALL.items()
                                                                     if k != 'num_classes'})
    assert model.args['block_size'] == [2, 2] and model.args['head'] == 'norm_mlp' and model.args['drop_path'] == 0
    assert model.proj.weight.shape == [128, 7]
    with pytest.raises(KeyError, match="did you mean 'stem_dim'"):
        load('maxvit_t', stem_dims=8)


def test_timm_names_load_the_same_entries():
    a, b = load('maxvit_tiny_tf_224', **SMALL), load('maxvit_t_tf_224', **SMALL)
    assert a.args == b.args and a.args['block_size'] == [2, 2] and a.args['act_layer'] == 'gelu_tanh'
    assert load('maxvit_xlarge_tf_512', **SMALL).args['stage_num_block'] == [1, 1, 1, 1]
    assert 'maxvit_tiny_tf_224' not in paddle.hub.list(ROOT, source='local')
    with pytest.raises(RuntimeError, match='maxvit_tiny_tf_999'):
        load('maxvit_tiny_tf_999')


def test_help_describes_the_entry():
    text = paddle.hub.help(ROOT, 'maxvit_t_tf_384', source='local')
    assert 'configs/maxvit_t_tf_384.yaml' in text and 'official' in text and '12x12 windows' in text
    assert 'weights' in text and 'out_indices' in text
    assert "article's" in paddle.hub.help(ROOT, 'maxvit_t', source='local')


def test_load_with_weights(weights):
    path, state = weights
    model = load('maxvit_t_tf_224', weights=path, **SMALL)
    got = numpy_state(model)
    assert sorted(got) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k], err_msg=k)
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal([2, 3, 40, 56]).astype('float32'))
    reference = MaxViT(model.args)
    reference.set_state_dict(paddle.load(str(path)))
    reference.eval()
    np.testing.assert_array_equal(model(x).numpy(), reference(x).numpy())  # the same ops on the same input: exact

    # another number of classes: a fresh classifier, everything else from the file
    five = numpy_state(load('maxvit_t_tf_224', weights=path, **dict(SMALL, num_classes=5)))
    assert five['proj.weight'].shape == (128, 5)
    np.testing.assert_array_equal(five['pre_logits.0.weight'], state['pre_logits.0.weight'])
    # weights of another model are an error that names the tensors
    with pytest.raises(CheckpointError, match='do not fit this model'):
        load('maxvit_t', weights=path, **SMALL)


def test_backbone_with_weights_takes_the_stages_it_has(weights):
    path, state = weights
    backbone = load('maxvit_t_tf_224', weights=path, out_indices=(0, 1, 2), frozen_stages=1, **SMALL)
    got = numpy_state(backbone)
    assert got and all(k.startswith(('conv_stem.', 'max_blocks.0.', 'max_blocks.1.')) for k in got)
    for k in got:
        np.testing.assert_array_equal(got[k], state[k], err_msg=k)
    assert [(f['num_chs'], f['reduction']) for f in backbone.feature_info] == [(8, 2), (16, 4), (32, 8)]
    assert all(p.stop_gradient for p in backbone.conv_stem.parameters())
    assert not backbone.max_blocks[1][0].mbconv.expand_conv[0].weight.stop_gradient
