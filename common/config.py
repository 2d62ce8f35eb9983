"""Configs: YAML files with PaddleClas-style sections, `-o Section.key=value` overrides, strict validation.

Every valid key is listed in DEFAULTS below (Model keys: maxvit.DEFAULT_ARGS). A key that is not there is an
error naming the closest valid key; an override value is parsed with yaml.safe_load (never eval) and must have
the type of the default. Every value is then checked against its rule (_RULES: ranges, choices, lengths, and the
cross-key rules: Optimizer.min_lr <= lr, Data.mean/std of Model.input_dim values, Data.img_size >= the model's
stride). A file is read as UTF-8 by a SafeLoader that refuses duplicate keys. Every error is one ConfigError line
naming the file (or the -o override), the key, its value and what it must be, e.g.
    configs/quickstart.yaml: Optimizer.lr is -1.0; it must be > 0 (the peak learning rate at Optimizer.base_batch_size)
"""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml

import maxvit
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
        'save_interval_steps': None,     # also save OUTPUT_DIR/latest every N optimizer steps (mid-epoch resume)
        'use_visualdl': True,
        'to_static': False,              # train (and evaluate) through paddle.jit.to_static: one compiled program
                                         # per input shape (CINN behind it on GPU builds); same results
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
_CHOICES.update({('Model', key): choices for key, choices in getattr(maxvit, '_CHOICES', {}).items()})

# Keys that may be null (unset): an example of what they take when set (for keys whose default is None).
_NULLABLE = {('Global', 'pretrained_model'): 'output/run/best', ('Global', 'resume'): 'auto',
             ('Global', 'max_steps_per_epoch'): 100, ('Global', 'save_interval_steps'): 1000,
             ('Data', 'train_list'): 'train_list.txt', ('Data', 'val_list'): 'val_list.txt',
             ('Data', 'label_names'): 'labels.txt',
             ('Optimizer', 'global_batch_size'): 4096, ('Model', 'qk_scale'): 0.125}
_NUMBER_LISTS = {('Data', 'mean'), ('Data', 'std'), ('Data', 'scale')}
_INT_LISTS = {('Model', 'stage_num_block'), ('Model', 'block_size'), ('Model', 'grid_size')}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message (one line) says where and what to change."""


class _Invalid(Exception):
    """Raised by the checks below with what the value must be; validate() adds the key, value and source."""


def _closest(name, valid: Iterable[str]) -> str:
    valid = list(valid)
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{match[0]}'?" if match else ''
    return f"{hint} Valid: {', '.join(valid)}."


def _show(value) -> str:
    """A value as YAML spells it (null, true) or as Python shows it."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split('\n')[0]
    return repr(value)


def _kind(example) -> str:
    if isinstance(example, bool):
        return 'true or false'
    if isinstance(example, int):
        return f'an int like {example}'
    if isinstance(example, float):
        return f'a finite number like {example}'
    if isinstance(example, str):
        return f"a string like '{example}'"
    return f'a list like {example}'


def _number(value) -> float:
    if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid
    return float(value)


def _check_type(section: str, key: str, value):
    """The value with the type of its default (ints accepted for floats, null for nullable keys), or _Invalid."""
    default = DEFAULTS[section][key]
    nullable = default is None or (section, key) in _NULLABLE
    example = _NULLABLE[(section, key)] if default is None else default
    kind = ('null or ' if nullable else '') + _kind(example)
    if value is None:
        if nullable:
            return None
        raise _Invalid(kind)
    if isinstance(example, bool):
        ok = isinstance(value, bool)
    elif isinstance(example, float):
        try:
            return _number(value)
        except _Invalid:
            raise _Invalid(kind) from None
    elif isinstance(example, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(example, list):
        if (section, key) in (('Model', 'block_size'), ('Model', 'grid_size')) and isinstance(value, int) \
                and not isinstance(value, bool):
            value = [value, value]  # one int: a square window, as maxvit.check_args takes it
        ok = isinstance(value, list)
        if ok and (section, key) in _NUMBER_LISTS:
            try:
                return [_number(v) for v in value]  # ints are fine: [0, 0, 0] -> [0.0, 0.0, 0.0]
            except _Invalid:
                raise _Invalid(f'a list of numbers like {example}') from None
        if ok and (section, key) in _INT_LISTS:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise _Invalid(f'a list of ints like {example}')
    else:
        ok = isinstance(value, type(example))
    if not ok:
        raise _Invalid(kind)
    return value


# ------------------------------------------------------------------------------------------------ value rules
# (section, key) -> (check(value, cfg) -> bool, what the value must be: text or f(cfg) -> text). Checked in
# DEFAULTS order (Model before Data: Data.img_size/mean/std depend on Model keys) after every type is right;
# null values of nullable keys are not checked. Choices (_CHOICES) are checked too.
def _range(lo=None, hi=None, lo_open=False, hi_open=False, what=''):
    if hi is None:
        text = f"{'>' if lo_open else '>='} {lo}"
    else:
        text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(v, cfg):
        return (lo is None or (lo < v if lo_open else lo <= v)) and (hi is None or (v < hi if hi_open else v <= hi))
    return check, text + (f' ({what})' if what else '')


def _model_stride(cfg) -> int:
    return 2 * cfg['Model']['pooling_size'] ** len(cfg['Model']['stage_num_block'])


def _channels(cfg) -> int:
    return cfg['Model']['input_dim']


_PATH = (lambda v, cfg: v.strip() != '', 'a non-empty path')
_PROB = 'a probability'
_RULES = {
    ('Global', 'output_dir'): _PATH,
    ('Global', 'epochs'): _range(0, lo_open=True),
    ('Global', 'seed'): _range(0, 2 ** 32 - 1, what='numpy takes seeds up to 2**32 - 1'),
    ('Global', 'print_freq'): _range(0, lo_open=True, what='log every N optimizer steps'),
    ('Global', 'eval_freq'): _range(0, lo_open=True, what='evaluate every N epochs'),
    ('Global', 'save_epoch_freq'): _range(0, lo_open=True, what='keep a checkpoint every N epochs'),
    ('Global', 'pretrained_model'): (lambda v, cfg: v.strip() != '', 'null or a non-empty path'),
    ('Global', 'resume'): (lambda v, cfg: v.strip() != '', "null, 'auto' or a non-empty checkpoint prefix"),
    ('Global', 'max_steps_per_epoch'): _range(0, lo_open=True, what='or null for no cap'),
    ('Global', 'save_interval_steps'): _range(0, lo_open=True, what='or null to save at epoch ends only'),
    ('Global', 'to_static'): (lambda v, cfg: not (v and cfg['Model']['recompute']),
                              'false when Model.recompute is true (recompute is an eager-mode memory saving; '
                              'a compiled program plans its memory itself)'),

    ('Model', 'stage_num_block'): (lambda v, cfg: len(v) >= 1 and min(v) >= 1,
                                   'a non-empty list of ints >= 1 (Max_Blocks per stage)'),
    ('Model', 'input_dim'): _range(1, what='image channels'),
    ('Model', 'stem_dim'): _range(1, what='channels'),
    ('Model', 'stage_dim'): _range(1, what='channels of stage 0'),
    ('Model', 'num_heads'): (lambda v, cfg: v >= 1 and cfg['Model']['stage_dim'] % v == 0,
                             lambda cfg: f">= 1 and divide Model.stage_dim ({cfg['Model']['stage_dim']}): "
                                         f"every stage splits its channels evenly into heads"),
    ('Model', 'mbconv_ksize'): (lambda v, cfg: v >= 1 and v % 2 == 1,
                                'an odd int >= 1 (an even kernel changes the map size and breaks the residual)'),
    ('Model', 'pooling_size'): _range(1, what='stride of the first MBConv of every stage'),
    ('Model', 'num_classes'): _range(0, what='0 builds a model without classifier'),
    ('Model', 'block_size'): (lambda v, cfg: len(v) == 2 and min(v) >= 1, 'two ints >= 1 (height, width)'),
    ('Model', 'grid_size'): (lambda v, cfg: len(v) == 2 and min(v) >= 1, 'two ints >= 1 (height, width)'),
    ('Model', 'mbconv_expand_rate'): _range(1, what='MBConv hidden channels = expand_rate x channels'),
    ('Model', 'se_rate'): _range(0, lo_open=True, what='SE hidden channels = se_rate x channels'),
    ('Model', 'mlp_ratio'): _range(1, what='MLP hidden channels = mlp_ratio x channels'),
    ('Model', 'qk_scale'): _range(0, lo_open=True, what='or null for head_dim ** -0.5'),
    ('Model', 'drop'): _range(0, 1, hi_open=True, what='dropout rate'),
    ('Model', 'attn_drop'): _range(0, 1, hi_open=True, what='dropout rate'),
    ('Model', 'drop_path'): _range(0, 1, hi_open=True, what='stochastic depth rate of the last block'),
    ('Model', 'bn_eps'): _range(0, lo_open=True),
    ('Model', 'bn_momentum'): _range(0, 1, hi_open=True, what='running = momentum x running + (1 - momentum) x batch'),

    ('Data', 'train_root'): _PATH,
    ('Data', 'val_root'): _PATH,
    ('Data', 'train_list'): (lambda v, cfg: v.strip() != '', 'null or a non-empty path'),
    ('Data', 'val_list'): (lambda v, cfg: v.strip() != '', 'null or a non-empty path'),
    ('Data', 'label_names'): (lambda v, cfg: v.strip() != '', 'null or a non-empty path'),
    ('Data', 'img_size'): (lambda v, cfg: v >= _model_stride(cfg), lambda cfg: (
        f">= {_model_stride(cfg)}, the model's total stride (2 in the stem x Model.pooling_size "
        f"{cfg['Model']['pooling_size']} in each of {len(cfg['Model']['stage_num_block'])} stages; below it the "
        f"last stages get a padded map of less than one image pixel)")),
    ('Data', 'batch_size'): _range(0, lo_open=True, what='images per device'),
    ('Data', 'num_workers'): _range(0, what='0 loads images in the main process'),
    ('Data', 'crop_pct'): _range(0, 1, lo_open=True, what='eval resizes the short side to img_size / crop_pct'),
    ('Data', 'mean'): (lambda v, cfg: len(v) == _channels(cfg), lambda cfg: (
        f'a list of Model.input_dim = {_channels(cfg)} numbers (one per image channel)')),
    ('Data', 'std'): (lambda v, cfg: len(v) == _channels(cfg) and min(v) > 0, lambda cfg: (
        f'a list of Model.input_dim = {_channels(cfg)} numbers > 0 (one per image channel; pixels are divided '
        f'by it)')),
    ('Data', 'scale'): (lambda v, cfg: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                        '[low, high] with 0 < low <= high <= 1 (RandomResizedCrop area fraction)'),
    ('Data', 'hflip'): _range(0, 1, what=f'{_PROB} of a horizontal flip'),
    ('Data', 'randaugment_ops'): _range(0, what='RandAugment layers; 0 disables'),
    ('Data', 'randaugment_magnitude'): _range(0, what='RandAugment magnitude, 10 = the ops\' full range'),
    ('Data', 'mixup'): _range(0, what='Mixup alpha; 0 disables'),
    ('Data', 'cutmix'): _range(0, what='CutMix alpha; 0 disables'),
    ('Data', 'mix_prob'): _range(0, 1, what=f'{_PROB} that a batch is mixed'),
    ('Data', 'label_smoothing'): _range(0, 1, hi_open=True, what='1 would leave no label'),

    ('Optimizer', 'lr'): _range(0, lo_open=True, what='the peak learning rate at Optimizer.base_batch_size'),
    ('Optimizer', 'base_batch_size'): _range(0, lo_open=True, what='the batch size Optimizer.lr is given for'),
    ('Optimizer', 'global_batch_size'): _range(0, lo_open=True, what='or null for no gradient accumulation'),
    ('Optimizer', 'min_lr'): (lambda v, cfg: 0 <= v <= cfg['Optimizer']['lr'], lambda cfg: (
        f">= 0 and <= Optimizer.lr ({cfg['Optimizer']['lr']!r}) (the learning rate at the end of the cosine "
        f"decay)")),
    ('Optimizer', 'warmup_steps'): _range(0, what='linear warmup, in optimizer steps'),
    ('Optimizer', 'weight_decay'): _range(0),
    ('Optimizer', 'beta1'): _range(0, 1, hi_open=True, what='AdamW first-moment decay'),
    ('Optimizer', 'beta2'): _range(0, 1, hi_open=True, what='AdamW second-moment decay'),
    ('Optimizer', 'epsilon'): _range(0, lo_open=True, what='AdamW denominator term'),
    ('Optimizer', 'clip_grad'): _range(0, what='the global gradient norm to clip to; 0 disables'),

    ('EMA', 'decay'): _range(0, 1, hi_open=True, what='0 disables the EMA; 1 would never update it'),

    ('AMP', 'init_loss_scaling'): _range(0, lo_open=True, what='the initial float16 loss scale'),
}
for (_section, _key), _choices in _CHOICES.items():
    _RULES[(_section, _key)] = (lambda v, cfg, c=_choices: v in c, f"one of {', '.join(map(repr, _choices))}")


def _prefix(source: Optional[str]) -> str:
    return f'{source}: ' if source else ''


def validate(cfg, sources: Optional[Dict[tuple, str]] = None, origin: Optional[str] = None
             ) -> Dict[str, Dict[str, object]]:
    """Fill defaults and check every section, key, type, range and choice. Returns a new dict.

    ``sources`` maps (section, key) (and (section, None) for a section) to where the value came from (the file
    or '-o Section.key=value'); ``origin`` names the file for errors about defaults and the file as a whole.
    Every error is a ConfigError of one line: where, the key, its value, and what it must be.
    """
    sources = sources or {}

    def fail(section, key, value, must):
        source = sources.get((section, key))
        note = '' if source or key is None else ' (the default)'
        name = section if key is None else f'{section}.{key}'
        raise ConfigError(f'{_prefix(source or origin)}{name} is {_show(value)}{note}; it must be {must}')

    if not isinstance(cfg, dict):
        kind = 'a list' if isinstance(cfg, list) else _show(cfg)
        raise ConfigError(f'{_prefix(origin)}the top level must be a mapping of sections ({", ".join(DEFAULTS)}), '
                          f'got {kind}')
    out = copy.deepcopy(DEFAULTS)
    for section, values in cfg.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{_prefix(sources.get((section, None), origin))}unknown config section "
                              f"'{section}'.{_closest(section, DEFAULTS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            fail(section, None, values, f"a mapping of 'key: value' lines, e.g. {section}: "
                                        f"{{{next(iter(DEFAULTS[section]))}: ...}}")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{_prefix(sources.get((section, key), origin))}unknown key '{section}.{key}'."
                                  f"{_closest(key, DEFAULTS[section])}")
            try:
                out[section][key] = _check_type(section, key, value)
            except _Invalid as e:
                fail(section, key, value, e.args[0])
    for section, defaults in DEFAULTS.items():
        for key in defaults:
            rule, value = _RULES.get((section, key)), out[section][key]
            if rule is None or value is None:
                continue
            check, must = rule
            if not check(value, out):
                fail(section, key, value, must(out) if callable(must) else must)
    try:
        out['Model'] = check_args(out['Model'])
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:  # the rules above should leave nothing
        model = [s for (sec, _), s in sources.items() if sec == 'Model']
        raise ConfigError(f'{_prefix(model[-1] if model else origin)}Model: {e.args[0]}') from None
    return out


def _one_line(error: yaml.YAMLError) -> str:
    """A PyYAML error on one line: 'line L, column C: problem (context on line N)'."""
    mark = getattr(error, 'problem_mark', None)
    if isinstance(error, yaml.MarkedYAMLError) and mark is not None:
        text = f'line {mark.line + 1}, column {mark.column + 1}: {error.problem}'
        if error.context:
            context_mark = error.context_mark
            text += f' ({error.context}' + (f' on line {context_mark.line + 1}' if context_mark else '') + ')'
    else:
        text = str(error)
    return ' '.join(text.split())


class _DuplicateKey(Exception):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last one silently).
    Raises _DuplicateKey(dotted key, line, first line) before anything is constructed."""

    def construct_document(self, node):
        self._check_unique(node, (), set())
        return super().construct_document(node)

    def _check_unique(self, node, path, visited):
        if id(node) in visited:  # an alias of a node already checked
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key_node.tag != 'tag:yaml.org,2002:merge':
                    if key in first:
                        raise _DuplicateKey('.'.join(path + (key,)), key_node.start_mark.line + 1, first[key])
                    first[key] = key_node.start_mark.line + 1
                self._check_unique(value_node, path + (str(key),), visited)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._check_unique(item, path, visited)


def read_yaml(path) -> dict:
    """The sections of a YAML config file; ConfigError (one line, naming the file) when it cannot be one."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {name} (configs live in configs/*.yaml)') from None
    except OSError as e:
        raise ConfigError(f'{name}: cannot read the config file ({e.strerror or e})') from None
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ConfigError(f'{name}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}, offset {e.start}); '
                          f'save the config as UTF-8') from None
    try:
        cfg = yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKey as e:
        key, line, first = e.args
        raise ConfigError(f"{name}: line {line}: duplicate key '{key}' (first on line {first}); YAML would keep "
                          f"only the last value silently: delete one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{name}: not valid YAML: {_one_line(e)}') from None
    if cfg is None or cfg == {}:
        raise ConfigError(f'{name}: the config is empty; it must set sections such as Global, Model, Data '
                          f'(see configs/quickstart.yaml)')
    if not isinstance(cfg, dict):
        kind = 'a list' if isinstance(cfg, list) else _show(cfg)
        raise ConfigError(f'{name}: the top level must be a mapping of sections ({", ".join(DEFAULTS)}), '
                          f'got {kind}')
    return cfg


def parse_override(text: str):
    """'Section.key=value' -> (section, key, value); the value is YAML ('1e-3', '[7, 7]', 'null', 'true')."""
    if '=' not in text or '.' not in text.split('=', 1)[0]:
        raise ConfigError(f"-o {text}: an override must look like Section.key=value, e.g. -o Global.epochs=10")
    path, raw = text.split('=', 1)
    section, key = path.strip().split('.', 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f'-o {text}: the value is not valid YAML: {_one_line(e)}') from None
    return section, key, value


def load_config(path: Optional[str] = None, overrides: List[str] = ()) -> Dict[str, Dict[str, object]]:
    """Read a YAML config (or start from DEFAULTS when path is None), apply overrides, validate."""
    cfg: Dict[str, Dict[str, object]] = {}
    sources: Dict[tuple, str] = {}
    origin = None if path is None else str(path)
    if path is not None:
        cfg = read_yaml(path)
        for section, values in cfg.items():
            sources[(section, None)] = origin
            if isinstance(values, dict):
                sources.update({(section, key): origin for key in values})
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in DEFAULTS:
            raise ConfigError(f"-o {text}: unknown config section '{section}'.{_closest(section, DEFAULTS)}")
        if cfg.get(section) is not None and not isinstance(cfg[section], dict):
            continue  # validate() reports the section of the file
        cfg[section] = dict(cfg.get(section) or {}, **{key: value})
        sources[(section, key)] = f'-o {text}'
    return validate(cfg, sources, origin)


def build_model(cfg: Dict[str, Dict[str, object]]) -> MaxViT:
    """The one way a config becomes a model."""
    return MaxViT(cfg['Model'])


def add_config_args(parser, required: bool = True):
    """The -c/-o flags shared by train.py, eval.py and tools/."""
    parser.add_argument('-c', '--config', required=required, help='YAML config, e.g. configs/maxvit_t.yaml')
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value',
                        help='override a config value (repeatable), e.g. -o Global.epochs=10')
    return parser
