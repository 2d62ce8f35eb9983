"""common/config.py: YAML configs, -o overrides, strict keys; configs/*.yaml build the article's models; the Model
section is checked by maxvit.check_args alone."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import maxvit
from common import config
from common.config import DEFAULTS, ConfigError, build_model, load_config

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


def test_defaults_are_valid_plain_dicts_and_every_key_is_described():
    cfg = load_config(None)
    assert cfg == DEFAULTS and list(cfg) == ['Global', 'Model', 'Data', 'Optimizer', 'EMA', 'AMP']
    assert all(type(section) is dict for section in cfg.values())
    assert type(cfg['Data']['mean']) is list and type(cfg['Optimizer']['lr']) is float
    for name, section in config._SECTIONS.items():
        if section is not None:
            assert list(section.model_fields) == list(DEFAULTS[name])
            assert all(field.description for field in section.model_fields.values()), name


def test_check_args_states_the_model_rules():
    with pytest.raises(maxvit.ArgumentError) as info:
        maxvit.check_args(dict(maxvit.tiny_args, drop=1))
    assert (info.value.key, info.value.value, info.value.allowed) == ('drop', 1.0, 'in [0, 1) (a drop rate)')
    assert str(info.value) == 'MaxViT argument drop is 1.0; it must be in [0, 1) (a drop rate)'
    with pytest.raises(ValueError, match=r"^MaxViT argument se_rate is '0.25'; it must be a finite number like 0.25$"):
        maxvit.check_args({'se_rate': '0.25'})
    with pytest.raises(ValueError, match=r'num_heads is 3; it must be a divisor of stage_dim \(64\)'):
        maxvit.check_args({'num_heads': 3})
    args = maxvit.check_args({'block_size': 4, 'grid_size': (2, 3), 'drop': 0, 'stage_num_block': (1, 1)})
    assert args['block_size'] == [4, 4] and args['grid_size'] == [2, 3] and args['stage_num_block'] == [1, 1]
    assert type(args['drop']) is float and args == maxvit.check_args(args)


def test_maxvit_checks_its_args_without_pydantic_or_yaml(tmp_path):
    """maxvit.py copied into an empty folder, with pydantic and yaml made unimportable."""
    shutil.copy(Path(maxvit.__file__), tmp_path / 'maxvit.py')
    code = ("import sys; sys.modules.update(pydantic=None, yaml=None); sys.path.insert(0, sys.argv[1]); import maxvit; "
            "assert maxvit.__file__.startswith(sys.argv[1]); "
            "print(maxvit.check_args({'act_layer': 'gelu_tanh'})['act_layer']); maxvit.check_args({'drop': 2})")
    proc = subprocess.run([sys.executable, '-I', '-c', code, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == 'gelu_tanh\n', proc.stderr
    assert proc.stderr.rstrip().endswith('maxvit.ArgumentError: MaxViT argument drop is 2.0; it must be in [0, 1) '
                                         '(a drop rate)'), proc.stderr
