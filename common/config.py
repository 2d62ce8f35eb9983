"""Configs: YAML files with PaddleClas-style sections, `-o Section.key=value` overrides, strict validation.

Every valid key is listed in DEFAULTS below (Model keys: maxvit.DEFAULT_ARGS). A key that is not there is an
error naming the closest valid key; an override value is parsed with yaml.safe_load (never eval) and must have
the type of the default.
"""
from __future__ import annotations

import copy
import difflib
from typing import Dict, Iterable, List, Optional

import yaml

from maxvit import DEFAULT_ARGS, MaxViT, check_args

# Paper recipe (ImageNet-1K, Table 12 of arXiv:2204.01697) unless a comment says otherwise.
DEFAULTS: Dict[str, Dict[str, object]] = {
    'Global': {
        'output_dir': 'output/maxvit',  # checkpoints, train.log and VisualDL logs go here
        'epochs': 300,
        'seed': 42,
        'device': 'auto',                # 'auto' (GPU if this Paddle build has one), 'gpu', 'cpu'
        'print_freq': 50,                # console/VisualDL line every N optimizer steps
        'eval_freq': 1,                  # evaluate every N epochs (and after the last)
        'save_epoch_freq': 10,           # keep epoch_N checkpoints every N epochs (latest/best always kept)
        'pretrained_model': None,        # .pdparams to initialise from (fine-tuning), or to evaluate
        'resume': None,                  # checkpoint prefix to resume, or 'auto' for OUTPUT_DIR/latest
        'eval_weights': 'ema',           # eval.py: 'ema' or 'raw' weights of a training checkpoint
        'max_steps_per_epoch': None,     # cap on optimizer steps per epoch (smoke tests, debugging)
        'use_visualdl': True,
    },
    'Model': dict(DEFAULT_ARGS),
    'Data': {
        'format': 'folder',              # 'folder': ROOT/<class>/*.jpg; 'filelist': lines "relative/path label";
                                         # 'shapes': the built-in quickstart data, written to the roots if missing
        'train_root': 'data/ILSVRC2012/train',
        'val_root': 'data/ILSVRC2012/val',
        'train_list': None,              # filelist format: list files, paths relative to *_root
        'val_list': None,
        'label_names': None,             # filelist format: optional file with one class name per line
        'img_size': 224,
        'batch_size': 64,                # per device (process)
        'num_workers': 8,
        'use_shared_memory': True,       # faster worker -> trainer transfer; false where /dev/shm is small (Docker)
        'interpolation': 'bicubic',
        'crop_pct': 0.95,                # eval: resize short side to img_size / crop_pct, center crop
        'crop_mode': 'center',           # eval: 'center' (keep aspect, center crop) or 'squash' (resize to a square)
        'mean': [0.485, 0.456, 0.406],
        'std': [0.229, 0.224, 0.225],
        'scale': [0.08, 1.0],            # RandomResizedCrop area range
        'hflip': 0.5,
        'randaugment_ops': 2,            # RandAugment layers (0 disables)
        'randaugment_magnitude': 15,
        'mixup': 0.8,                    # Mixup alpha (0 disables)
        'cutmix': 0.0,                   # CutMix alpha (0 disables); with both, each batch picks one
        'mix_prob': 1.0,                 # probability that a batch is mixed at all
        'label_smoothing': 0.1,
    },
    'Optimizer': {
        'lr': 3e-3,                      # peak lr at base_batch_size, scaled linearly to the global batch
        'base_batch_size': 4096,
        'global_batch_size': 4096,       # gradient accumulation reaches it (None: no accumulation)
        'min_lr': 1e-5,
        'warmup_steps': 10000,           # linear warmup, in optimizer steps
        'weight_decay': 0.05,            # not applied to biases, norms and relative bias tables
        'beta1': 0.9,
        'beta2': 0.999,
        'epsilon': 1e-8,
        'clip_grad': 1.0,                # global-norm clipping (0 disables)
    },
    'EMA': {
        'decay': 0.9999,                 # 0 disables the EMA
    },
    'AMP': {
        'enable': False,
        'dtype': 'bfloat16',             # 'bfloat16' or 'float16' (dynamic loss scaling)
        'level': 'O1',                   # 'O1' (per-op casts) or 'O2' (fp16/bf16 weights, fp32 master copy)
        'init_loss_scaling': 65536.0,
    },
}

_CHOICES = {
    ('Global', 'device'): ('auto', 'gpu', 'cpu'),
    ('Global', 'eval_weights'): ('ema', 'raw'),
    ('Data', 'format'): ('folder', 'filelist', 'shapes'),
    ('Data', 'interpolation'): ('bilinear', 'bicubic', 'nearest'),
    ('Data', 'crop_mode'): ('center', 'squash'),
    ('AMP', 'dtype'): ('bfloat16', 'float16'),
    ('AMP', 'level'): ('O1', 'O2'),
}

# Keys whose default is None (unset): an example of what they take when set. Keys that must be positive.
_NULLABLE = {('Global', 'pretrained_model'): 'output/run/best', ('Global', 'resume'): 'auto',
             ('Global', 'max_steps_per_epoch'): 100, ('Data', 'train_list'): 'train_list.txt',
             ('Data', 'val_list'): 'val_list.txt', ('Data', 'label_names'): 'labels.txt',
             ('Optimizer', 'global_batch_size'): 4096}
_POSITIVE = [('Global', k) for k in ('epochs', 'print_freq', 'eval_freq', 'save_epoch_freq', 'max_steps_per_epoch')] \
    + [('Data', 'img_size'), ('Data', 'batch_size'), ('Optimizer', 'base_batch_size'),
       ('Optimizer', 'global_batch_size')]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


def _closest(name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{match[0]}'?" if match else ''
    return f"{hint} Valid: {', '.join(valid)}."


def _check_type(where: str, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__} like {default!r}, got {value!r}")
    return value


def validate(cfg: Dict[str, Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """Fill defaults and check every section, key, type and choice. Returns a new dict."""
    if not isinstance(cfg, dict):
        raise ConfigError(f'a config must be a mapping of sections, got {type(cfg).__name__}')
    out = copy.deepcopy(DEFAULTS)
    for section, values in cfg.items():
        if section not in DEFAULTS:
            raise ConfigError(f"unknown config section '{section}'.{_closest(section, DEFAULTS)}")
        values = values or {}
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"unknown key '{section}.{key}'.{_closest(key, DEFAULTS[section])}")
            default = DEFAULTS[section][key]
            out[section][key] = _check_type(f'{section}.{key}', value,
                                            _NULLABLE.get((section, key)) if default is None else default)
    for section, key in _POSITIVE:
        if out[section][key] is not None and out[section][key] <= 0:
            raise ConfigError(f'{section}.{key}={out[section][key]!r} must be positive')
    for (section, key), choices in _CHOICES.items():
        if out[section][key] not in choices:
            raise ConfigError(f"{section}.{key}={out[section][key]!r} is not one of {choices}")
    try:
        out['Model'] = check_args(out['Model'])
    except (KeyError, ValueError) as e:
        raise ConfigError(f'Model: {e.args[0]}') from None
    return out


def parse_override(text: str):
    """'Section.key=value' -> (section, key, value); the value is YAML ('1e-3', '[7, 7]', 'null', 'true')."""
    if '=' not in text or '.' not in text.split('=', 1)[0]:
        raise ConfigError(f"override {text!r} must look like Section.key=value, e.g. Global.epochs=10")
    path, raw = text.split('=', 1)
    section, key = path.strip().split('.', 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f'override {text!r}: value is not valid YAML ({e})') from None
    return section, key, value


def load_config(path: Optional[str] = None, overrides: List[str] = ()) -> Dict[str, Dict[str, object]]:
    """Read a YAML config (or start from DEFAULTS when path is None), apply overrides, validate."""
    cfg: Dict[str, Dict[str, object]] = {}
    if path is not None:
        try:
            with open(path, encoding='utf-8') as f:
                cfg = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f'config file not found: {path} (configs live in configs/*.yaml)') from None
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in DEFAULTS:
            raise ConfigError(f"unknown config section '{section}' in override {text!r}.{_closest(section, DEFAULTS)}")
        cfg.setdefault(section, {})
        cfg[section] = dict(cfg[section] or {}, **{key: value})
    return validate(cfg)


def build_model(cfg: Dict[str, Dict[str, object]]) -> MaxViT:
    """The one way a config becomes a model."""
    return MaxViT(cfg['Model'])


def add_config_args(parser, required: bool = True):
    """The -c/-o flags shared by train.py, eval.py and tools/."""
    parser.add_argument('-c', '--config', required=required, help='YAML config, e.g. configs/maxvit_t.yaml')
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value',
                        help='override a config value (repeatable), e.g. -o Global.epochs=10')
    return parser
