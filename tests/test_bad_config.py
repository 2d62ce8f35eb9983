"""Bad config values: each is a ConfigError of ONE line naming the file (or the -o override), the key and what is
allowed, raised by load_config before anything runs; train.py prints it as one `error:` line."""
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
QUICKSTART = ROOT / 'configs' / 'quickstart.yaml'


def case(name, source, *fragments, marks=()):
    """source: the text (str or bytes) of a config file, or a list of -o overrides of configs/quickstart.yaml.
    fragments: what the message must contain besides the file/override (the key, the value, the rule)."""
    return pytest.param(source, fragments, id=name, marks=marks)


BAD = [
    # silently accepted before
    case('lr_negative', 'Optimizer:\n  lr: -1\n', 'Optimizer.lr is -1.0', 'it must be > 0 (the peak learning rate'),
    case('lr_negative_override', ['Optimizer.lr=-1'], 'Optimizer.lr is -1.0', 'it must be > 0'),
    case('lr_zero', ['Optimizer.lr=0'], 'Optimizer.lr is 0.0', 'it must be > 0'),
    case('lr_nan', 'Optimizer:\n  lr: .nan\n', 'Optimizer.lr is nan', 'a finite number'),
    case('lr_null', 'Optimizer:\n  lr: null\n', 'Optimizer.lr is null', 'a finite number'),
    case('mixup_negative', 'Data:\n  mixup: -0.5\n', 'Data.mixup is -0.5', '>= 0 (Mixup alpha'),
    case('cutmix_negative', ['Data.cutmix=-1'], 'Data.cutmix is -1.0', '>= 0 (CutMix alpha'),
    case('ema_decay_2', 'EMA:\n  decay: 2.0\n', 'EMA.decay is 2.0', 'in [0, 1)'),
    case('ema_decay_1', ['EMA.decay=1'], 'EMA.decay is 1.0', 'in [0, 1)'),
    case('label_smoothing_1.5', 'Data:\n  label_smoothing: 1.5\n', 'Data.label_smoothing is 1.5', 'in [0, 1)'),
    case('hflip_negative', 'Data:\n  hflip: -3\n', 'Data.hflip is -3.0', 'in [0, 1]'),
    case('mix_prob_1.5', ['Data.mix_prob=1.5'], 'Data.mix_prob is 1.5', 'in [0, 1]'),
    case('clip_grad_negative', 'Optimizer:\n  clip_grad: -1\n', 'Optimizer.clip_grad is -1.0', '>= 0'),
    case('img_size_10', 'Data:\n  img_size: 10\n', 'Data.img_size is 10', ">= 32, the model's total stride"),
    case('img_size_vs_2_stage_model', 'Model:\n  stage_num_block: [1, 1]\nData:\n  img_size: 6\n',
         'Data.img_size is 6', '>= 8', 'Model.pooling_size 2 in each of 2 stages'),
    case('duplicate_key', 'Optimizer:\n  lr: 0.001\n  min_lr: 0.0\n  lr: 0.002\n',
         "line 4: duplicate key 'Optimizer.lr' (first on line 2)"),
    case('duplicate_section', 'Data:\n  img_size: 64\nGlobal:\n  epochs: 3\nData:\n  img_size: 32\n',
         "line 5: duplicate key 'Data' (first on line 1)"),
    case('empty_file', '', 'the config is empty', 'Global, Model, Data'),
    case('comments_only', '# nothing here yet\n', 'the config is empty'),
    # raw tracebacks before
    case('malformed_yaml', 'Global:\n  epochs: [1, 2\nModel:\n  drop: 0.1\n', 'not valid YAML: line '),
    case('bad_indentation', 'Global:\n  epochs: 3\n   seed: 1\n', 'not valid YAML: line 3'),
    case('top_level_list', '- Global\n- Model\n', 'the top level must be a mapping of sections', 'got a list'),
    case('top_level_scalar', 'hello\n', 'the top level must be a mapping of sections', "got 'hello'"),
    case('section_not_mapping', 'Global: 5\n', 'Global is 5', "it must be a mapping of 'key: value' lines"),
    case('non_utf8', b'Global:\n  output_dir: caf\xe9\n', 'not UTF-8 text (byte 0xe9 on line 2, offset 25)'),
    case('num_workers_negative', 'Data:\n  num_workers: -1\n', 'Data.num_workers is -1', '>= 0'),
    case('crop_pct_0', 'Data:\n  crop_pct: 0\n', 'Data.crop_pct is 0.0', 'in (0, 1]'),
    case('crop_pct_over_1', ['Data.crop_pct=1.2'], 'Data.crop_pct is 1.2', 'in (0, 1]'),
    case('seed_negative', 'Global:\n  seed: -5\n', 'Global.seed is -5', 'in [0, 4294967295]'),
    case('seed_too_big', ['Global.seed=4294967296'], 'Global.seed is 4294967296', 'in [0, 4294967295]'),
    case('mean_2_values', 'Data:\n  mean: [0.5, 0.5]\n', 'Data.mean is [0.5, 0.5]', 'Model.input_dim = 3 numbers'),
    case('mean_not_numbers', 'Data:\n  mean: [red, green, blue]\n', 'Data.mean is', 'a list of numbers'),
    case('mean_not_a_list', ['Data.mean=0.5'], 'Data.mean is 0.5', 'a list like [0.485'),
    case('std_zero', 'Data:\n  std: [0.2, 0, 0.2]\n', 'Data.std is [0.2, 0.0, 0.2]', 'numbers > 0'),
    case('std_4_values', ['Data.std=[1, 1, 1, 1]'], 'Data.std is', 'Model.input_dim = 3 numbers > 0'),
    case('scale_reversed', 'Data:\n  scale: [2.0, 1.0]\n', 'Data.scale is [2.0, 1.0]', '0 < low <= high <= 1'),
    case('scale_one_value', ['Data.scale=[0.5]'], 'Data.scale is [0.5]', '0 < low <= high <= 1'),
    case('scale_zero', ['Data.scale=[0, 1]'], 'Data.scale is [0.0, 1.0]', '0 < low <= high <= 1'),
    # range rules of every other key that can be wrong
    case('min_lr_negative', ['Optimizer.min_lr=-1e-5'], 'Optimizer.min_lr is -1e-05', '>= 0 and <= Optimizer.lr'),
    case('min_lr_above_lr', 'Optimizer:\n  lr: 1.0e-3\n  min_lr: 1.0e-2\n', 'Optimizer.min_lr is 0.01',
         '<= Optimizer.lr (0.001)'),
    case('weight_decay_negative', ['Optimizer.weight_decay=-0.05'], 'Optimizer.weight_decay is -0.05', '>= 0'),
    case('beta1_1', ['Optimizer.beta1=1.0'], 'Optimizer.beta1 is 1.0', 'in [0, 1)'),
    case('beta2_negative', ['Optimizer.beta2=-0.1'], 'Optimizer.beta2 is -0.1', 'in [0, 1)'),
    case('epsilon_0', ['Optimizer.epsilon=0'], 'Optimizer.epsilon is 0.0', '> 0'),
    case('warmup_negative', ['Optimizer.warmup_steps=-1'], 'Optimizer.warmup_steps is -1', '>= 0'),
    case('warmup_in_steps_and_epochs', 'Optimizer:\n  warmup_steps: 100\n  warmup_epochs: 2\n',
         'Optimizer.warmup_steps is 100', 'null when Optimizer.warmup_epochs is set (2.0)', 'not both'),
    case('warmup_in_neither', ['Optimizer.warmup_steps=null'], 'Optimizer.warmup_steps is null',
         'an int >= 0 when Optimizer.warmup_epochs is null'),
    case('warmup_epochs_negative', ['Optimizer.warmup_steps=null', 'Optimizer.warmup_epochs=-0.5'],
         'Optimizer.warmup_epochs is -0.5', '>= 0'),
    case('num_classes_a_word', ['Model.num_classes=all'], "Model.num_classes is 'all'",
         "an int like 1000 or 'auto' (the classes of the training data)"),
    case('base_batch_0', ['Optimizer.base_batch_size=0'], 'Optimizer.base_batch_size is 0', '> 0'),
    case('randaugment_ops_negative', ['Data.randaugment_ops=-1'], 'Data.randaugment_ops is -1', '>= 0'),
    case('randaugment_magnitude_negative', ['Data.randaugment_magnitude=-2'], 'Data.randaugment_magnitude is -2',
         '>= 0'),
    case('init_loss_scaling_0', ['AMP.init_loss_scaling=0'], 'AMP.init_loss_scaling is 0.0', '> 0'),
    case('amp_dtype', ['AMP.dtype=fp8'], "AMP.dtype is 'fp8'", "one of 'bfloat16', 'float16'"),
    case('batch_size_0', ['Data.batch_size=0'], 'Data.batch_size is 0', '> 0'),
    case('save_interval_0', ['Global.save_interval_steps=0'], 'Global.save_interval_steps is 0', '> 0'),
    case('epochs_float', ['Global.epochs=2.5'], 'Global.epochs is 2.5', 'an int like 300'),
    case('output_dir_empty', ['Global.output_dir=""'], "Global.output_dir is ''", 'a non-empty path'),
    case('use_visualdl_int', ['Global.use_visualdl=1'], 'Global.use_visualdl is 1', 'true or false'),
    case('model_drop_1', 'Model:\n  drop: 1.0\n', 'Model.drop is 1.0', 'in [0, 1)'),
    case('model_attn_drop_negative', ['Model.attn_drop=-0.1'], 'Model.attn_drop is -0.1', 'in [0, 1)'),
    case('model_drop_path_1', ['Model.drop_path=1'], 'Model.drop_path is 1.0', 'in [0, 1)'),
    case('model_num_heads_0', ['Model.num_heads=0'], 'Model.num_heads is 0', 'it must be >= 1'),
    case('model_heads_do_not_divide', ['Model.num_heads=3'], 'Model.num_heads is 3', 'a divisor of stage_dim (32)'),
    case('model_even_kernel', ['Model.mbconv_ksize=4'], 'Model.mbconv_ksize is 4', 'an odd int >= 1'),
    case('model_block_size_strings', ['Model.block_size=[a, b]'], "Model.block_size is ['a', 'b']",
         'a list of ints'),
    case('model_grid_size_0', ['Model.grid_size=[0, 3]'], 'Model.grid_size is [0, 3]', 'two ints >= 1'),
    case('model_no_stages', ['Model.stage_num_block=[]'], 'Model.stage_num_block is []', 'a non-empty list'),
    case('model_input_dim_0', ['Model.input_dim=0'], 'Model.input_dim is 0', '>= 1'),
    case('model_num_classes_negative', ['Model.num_classes=-1'], 'Model.num_classes is -1', '>= 0'),
    case('model_qk_scale_string', ['Model.qk_scale=abc'], "Model.qk_scale is 'abc'", 'null or a finite number'),
    case('model_qk_scale_negative', ['Model.qk_scale=-1'], 'Model.qk_scale is -1.0', '> 0'),
    case('model_bn_eps_0', ['Model.bn_eps=0'], 'Model.bn_eps is 0.0', '> 0'),
    case('model_bn_momentum_1', ['Model.bn_momentum=1'], 'Model.bn_momentum is 1.0', 'in [0, 1)'),
    case('model_act_layer', ['Model.act_layer=relu'], "Model.act_layer is 'relu'", "one of 'gelu', 'gelu_tanh'"),
    case('override_value_not_yaml', ['Data.mean=[1,'], 'the value is not valid YAML: line 1'),
    # unknown keys, types and cross-key rules of each kind of section
    case('unknown_key_in_file', 'Data:\n  img_sizes: 64\n', "unknown key 'Data.img_sizes'. Did you mean 'img_size'?"),
    case('model_unknown_key', ['Model.stem_dims=8'], "unknown key 'Model.stem_dims'. Did you mean 'stem_dim'?"),
    case('model_int_given_a_float', ['Model.stage_dim=64.0'], 'Model.stage_dim is 64.0', 'an int like 64'),
    case('model_int_given_a_bool', ['Model.num_classes=true'], 'Model.num_classes is true', 'an int like 1000'),
    case('model_blocks_not_a_list', ['Model.stage_num_block=3'], 'Model.stage_num_block is 3',
         'a list of ints like [2, 2, 5, 2]'),
    case('device_choice', ['Global.device=tpu'], "Global.device is 'tpu'", "one of 'auto', 'gpu', 'cpu'"),
    case('resume_blank', ['Global.resume=" "'], "Global.resume is ' '", 'null or a non-empty path'),
    case('to_static_with_recompute', ['Model.recompute=true', 'Global.to_static=true'], 'Global.to_static is true',
         'false when Model.recompute is true'),
    case('exponent_numbers_in_a_file', 'Optimizer:\n  lr: 1e-3\n  min_lr: 2E-2\n', 'Optimizer.min_lr is 0.02',
         '<= Optimizer.lr (0.001)'),
]


@pytest.mark.parametrize('source, fragments', BAD)
def test_bad_config_is_one_line_naming_file_key_and_rule(source, fragments, tmp_path):
    if isinstance(source, list):
        path, where = QUICKSTART, f'-o {source[-1]}: '
        with pytest.raises(ConfigError) as info:
            load_config(str(QUICKSTART), source)
    else:
        path = tmp_path / 'bad.yaml'
        path.write_bytes(source if isinstance(source, bytes) else source.encode())
        where = f'{path}: '
        with pytest.raises(ConfigError) as info:
            load_config(str(path), [])
    message = str(info.value)
    assert '\n' not in message, message
    assert message.startswith(where), message
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'


def test_a_default_that_no_longer_fits_is_reported_against_the_file():
    """Data.mean keeps its 3 default values while -o Model.input_dim=1 makes 1-channel images."""
    with pytest.raises(ConfigError) as info:
        load_config(str(QUICKSTART), ['Model.input_dim=1'])
    assert str(info.value) == (f'{QUICKSTART}: Data.mean is [0.485, 0.456, 0.406] (the default); it must be a list '
                               f'of Model.input_dim = 1 numbers (one per image channel)')



def test_a_value_given_without_a_source_is_not_called_the_default():
    """validate() without sources, as tools/predict.py checks an export's preprocessing."""
    with pytest.raises(ConfigError, match=r"^Data.crop_mode is 'zoom'; it must be one of 'center', 'squash'"):
        validate({'Data': {'crop_mode': 'zoom'}})
    with pytest.raises(ConfigError, match=r"^Data.mean is \[0.485, 0.456, 0.406\] \(the default\); it must be a list "
                                          r"of Model.input_dim = 1 numbers"):
        validate({'Model': {'input_dim': 1}})

def test_numbers_are_coerced_and_good_edge_values_load(tmp_path):
    path = tmp_path / 'ok.yaml'
    path.write_bytes('\ufeffData:\n  mean: [0, 0, 0]\n  std: [1, 1, 1]\n  scale: [1, 1]\n'
                     'Model:\n  block_size: 4\n'.encode())  # a BOM is fine too
    cfg = load_config(str(path), ['Optimizer.lr=1e-3', 'Optimizer.min_lr=1e-3', 'EMA.decay=0', 'Data.hflip=1',
                                  'Data.label_smoothing=0', 'Data.crop_pct=1', 'Global.seed=0', 'Data.img_size=32',
                                  'Model.input_dim=1', 'Data.mean=[0]', 'Data.std=[1]'])
    d = cfg['Data']
    assert d['mean'] == [0.0] and all(isinstance(v, float) for v in d['mean'] + d['std'] + d['scale'])
    assert cfg['Optimizer']['lr'] == cfg['Optimizer']['min_lr'] == 1e-3  # '1e-3' (a YAML 1.1 string) is a number
    assert cfg['Model']['block_size'] == [4, 4] and cfg['Model']['grid_size'] == [7, 7]


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_still_loads(path):
    load_config(str(path))


@pytest.mark.parametrize('source', ['file', 'override'])
def test_train_py_prints_one_error_line_and_no_traceback(source, tmp_path):
    if source == 'file':
        bad = tmp_path / 'bad.yaml'
        bad.write_text(QUICKSTART.read_text() + 'EMA:\n  decay: 0.999\n')  # EMA: twice
        args, expected = ['-c', str(bad)], f"error: {bad}: line "
    else:
        args, expected = ['-c', 'configs/quickstart.yaml', '-o', 'Optimizer.lr=-1'], \
            'error: -o Optimizer.lr=-1: Optimizer.lr is -1.0; it must be > 0'
    proc = subprocess.run([sys.executable, 'train.py'] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert 'Traceback' not in proc.stderr and proc.stderr.rstrip().endswith(errors[0])
