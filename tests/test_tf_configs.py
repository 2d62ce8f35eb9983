"""configs/: every YAML loads and builds; the official-layout ones are timm's maxvit_*_tf_* models with timm's
eval preprocessing and the paper's recipes (from scratch at 224, fine-tuning at 384/512)."""
import math
from pathlib import Path

import paddle
import pytest
import yaml

import maxvit
from common.config import build_model, load_config

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'

# Trainable parameters of timm.create_model(NAME) (1000 classes), summed over its state dict without BatchNorm
# statistics: bias tables grow with the window, so the counts differ by resolution.
TIMM_PARAMS = {
    'maxvit_t_tf_224': 30_916_528, 'maxvit_t_tf_384': 30_977_008, 'maxvit_t_tf_512': 31_049_584,
    'maxvit_s_tf_224': 68_927_956, 'maxvit_s_tf_384': 69_018_676, 'maxvit_s_tf_512': 69_127_540,
    'maxvit_b_tf_224': 119_467_708, 'maxvit_b_tf_384': 119_653_468, 'maxvit_b_tf_512': 119_876_380,
    'maxvit_l_tf_224': 211_785_560, 'maxvit_l_tf_384': 212_033_240, 'maxvit_l_tf_512': 212_330_456,
    'maxvit_xl_tf_384': 475_323_472, 'maxvit_xl_tf_512': 475_769_296,
}
VARIANT = {'t': 'tiny_tf', 's': 'small_tf', 'b': 'base_tf', 'l': 'large_tf', 'xl': 'xlarge_tf'}
DROP_PATH = {'t': 0.2, 's': 0.3, 'b': 0.4, 'l': 0.6, 'xl': 0.6}  # paper (T/S/B/L); XL: no published value, L's


def trainable(model) -> int:
    return sum(math.prod(p.shape) for p in model.parameters() if not p.stop_gradient)


@pytest.mark.parametrize('path', sorted(CONFIGS.glob('*.yaml')), ids=lambda p: p.name)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path)
    with paddle.LazyGuard():            # the layers and shapes, without initialising 475M parameters
        model = build_model(cfg)
    assert model.args == cfg['Model']
    assert trainable(model) > 0 and len(model.feature_info) == len(cfg['Model']['stage_num_block']) + 1


def test_there_is_a_config_for_every_converted_model():
    assert sorted(p.stem for p in CONFIGS.glob('maxvit_*_tf_*.yaml')) == sorted(TIMM_PARAMS)


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_official_layout_config_is_the_timm_model_and_recipe(name):
    path = CONFIGS / f'{name}.yaml'
    raw = yaml.safe_load(path.read_text())
    assert list(raw['Model']) == list(maxvit.DEFAULT_ARGS)          # every key written out, in the documented order
    cfg = load_config(path)
    short, img = name.split('_')[1], int(name.split('_')[-1])
    window = [img // 32, img // 32]
    assert cfg['Model'] == maxvit.check_args(dict(maxvit.MODEL_ARGS[VARIANT[short]], block_size=window,
                                                  grid_size=window, drop_path=DROP_PATH[short]))
    with paddle.LazyGuard():
        assert trainable(build_model(cfg)) == TIMM_PARAMS[name]

    data, opt, glob = cfg['Data'], cfg['Optimizer'], cfg['Global']
    assert data['img_size'] == img and data['interpolation'] == 'bicubic'
    if img == 224:   # timm maxvit_*_tf_224.in1k pretrained cfg; the paper's from-scratch recipe (the defaults)
        assert (data['crop_pct'], data['crop_mode']) == (0.95, 'center')
        assert data['mean'] == [0.485, 0.456, 0.406] and data['std'] == [0.229, 0.224, 0.225]
        assert (glob['epochs'], opt['lr'], opt['base_batch_size'], opt['weight_decay']) == (300, 3e-3, 4096, 0.05)
    else:            # timm 384/512 pretrained cfg; the paper's fine-tuning recipe
        assert (data['crop_pct'], data['crop_mode']) == (1.0, 'squash')
        assert data['mean'] == data['std'] == [0.5, 0.5, 0.5]
        assert glob['epochs'] == 30 and opt['lr'] == opt['min_lr'] == 5e-5 and opt['warmup_steps'] == 0
        assert opt['base_batch_size'] == opt['global_batch_size'] == 512 and opt['weight_decay'] == 1e-8
    assert glob['pretrained_model'] is None and f'weights/{name}.pdparams' in path.read_text()
    assert glob['output_dir'] == f'output/{name}'


def test_every_config_writes_to_its_own_output_dir():
    """resume=auto reads OUTPUT_DIR/latest: two configs sharing a folder would resume each other's runs."""
    dirs = {p.stem: load_config(p)['Global']['output_dir'] for p in CONFIGS.glob('*.yaml')}
    assert {name: d for name, d in dirs.items() if d != f'output/{name}'} == {}
