"""common/config.py: YAML configs, -o overrides, strict keys; configs/*.yaml build the article's models."""
from pathlib import Path

import pytest
import yaml

import maxvit
from common.config import ConfigError, build_model, load_config

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'


@pytest.mark.parametrize('name, args', [('t', maxvit.tiny_args), ('s', maxvit.small_args),
                                        ('b', maxvit.base_args), ('l', maxvit.large_args)])
def test_variant_configs_hold_the_article_model_dicts(name, args):
    cfg = load_config(CONFIGS / f'maxvit_{name}.yaml')
    # The configs differ from the article's dicts only in drop_path, which carries the paper's recipe.
    assert {k: v for k, v in cfg['Model'].items() if k != 'drop_path'} == \
        {k: v for k, v in maxvit.check_args(args).items() if k != 'drop_path'}
    assert cfg['Model']['drop_path'] == {'t': 0.2, 's': 0.3, 'b': 0.4, 'l': 0.6}[name]


def test_config_builds_the_model():
    model = build_model(load_config(CONFIGS / 'maxvit_t.yaml'))
    assert sum(int(p.numel()) for p in model.parameters()) == 31_001_840


def test_typo_in_a_model_key_names_the_key_and_the_valid_ones(tmp_path):
    cfg = yaml.safe_load((CONFIGS / 'maxvit_t.yaml').read_text())
    cfg['Model']['stem_dims'] = cfg['Model'].pop('stem_dim')
    path = tmp_path / 'typo.yaml'
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"'Model.stem_dims'. Did you mean 'stem_dim'\? Valid: stage_num_block"):
        load_config(path)


def test_overrides_are_yaml_typed_and_strict():
    cfg = load_config(CONFIGS / 'maxvit_t.yaml', ['Global.epochs=3', 'Optimizer.lr=1e-3',
                                                   'Model.block_size=[4, 4]', 'Global.resume=null'])
    assert cfg['Global']['epochs'] == 3 and cfg['Optimizer']['lr'] == 1e-3
    assert cfg['Model']['block_size'] == [4, 4] and cfg['Global']['resume'] is None
    with pytest.raises(ConfigError, match=r"'Global.epoch'.*Did you mean 'epochs'"):
        load_config(CONFIGS / 'maxvit_t.yaml', ['Global.epoch=3'])
    with pytest.raises(ConfigError, match=r"'Optimiser'.*Did you mean 'Optimizer'"):
        load_config(None, ['Optimiser.lr=1'])
    with pytest.raises(ConfigError,
                       match=r"^-o Global.epochs=ten: Global.epochs is 'ten'; it must be an int like 300$"):
        load_config(None, ['Global.epochs=ten'])
    with pytest.raises(ConfigError, match='Section.key=value'):
        load_config(None, ['epochs=3'])
    with pytest.raises(ConfigError, match=r"AMP.dtype is 'fp8'; it must be one of 'bfloat16', 'float16'"):
        load_config(None, ['AMP.dtype=fp8'])


@pytest.mark.parametrize('override, message', [
    ('Global.print_freq=0', r'Global.print_freq is 0; it must be > 0'),
    ('Data.batch_size=-8', r'Data.batch_size is -8; it must be > 0'),
    ('Global.max_steps_per_epoch=abc', r"Global.max_steps_per_epoch is 'abc'; it must be null or an int like 100"),
    ('Global.resume=5', r"Global.resume is 5; it must be null or a string like 'auto'")])
def test_values_are_checked_before_the_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / 'quickstart.yaml', [override])


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match='config file not found: nope.yaml'):
        load_config('nope.yaml')
