"""Configs: YAML files with PaddleClas-style sections, `-o Section.key=value` overrides, strict validation.

The Model section is maxvit's own argument dict: its keys are maxvit.DEFAULT_ARGS and maxvit.check_args checks
them, except that Model.num_classes may be 'auto' (AUTO): train.py sets it to the classes of the training data
(resolve_num_classes) before building the model. Every other section is a pydantic model below (Global, Data,
Optimizer, EMA, AMP), whose fields list every key with its default, its type, its rule and a description. A key
that is not there is an error naming the closest valid key; a value must have the key's type (an int is accepted
for a float), and then meet its rule: a range, a choice, or a cross-key rule (Optimizer.min_lr <= lr; exactly one
of Optimizer.warmup_steps and warmup_epochs; Data.mean/std of Model.input_dim values; Data.img_size >= the model's
stride; Global.to_static not with Model.recompute). A file, and an override's value, is read by a YAML
SafeLoader that refuses duplicate keys and reads 1e-3 as a number (never eval). Every error is one ConfigError line
naming the file (or the -o override), the key, its value and what it must be, e.g.
    -o Optimizer.lr=-1: Optimizer.lr is -1.0; it must be > 0 (the peak learning rate at Optimizer.base_batch_size, ...)
"""
import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Dict, Iterable, List, Literal, Optional, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from common.checkpoint import load_weights
from maxvit import DEFAULT_ARGS, ArgumentError, MaxViT, check_args


AUTO = 'auto'  # Model.num_classes: as many as the training data has


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message (one line) says where and what to change."""


# ------------------------------------------------------------------------------------------------------ sections
# Paper recipe (ImageNet-1K, Table 12 of arXiv:2204.01697) unless a description says otherwise. A description is
# what an error message adds after the rule, so it says what the key is for.
_Path = Annotated[str, Field(pattern=r'\S')]  # a path: not empty, not blank


class _Section(BaseModel):
    # strict: no '3' for 3, no 1 for true, no 2.0 for an int; an int for a float is fine. The cross-key rules
    # read the validated Model section from the validation context, defaults included.
    model_config = ConfigDict(extra='forbid', strict=True, allow_inf_nan=False, validate_default=True)


class Global(_Section):
    output_dir: _Path = Field('output/maxvit', description='checkpoints, train.log and VisualDL logs go here')
    epochs: int = Field(300, gt=0, description='training epochs')
    seed: int = Field(42, ge=0, le=2 ** 32 - 1, description='numpy takes seeds up to 2**32 - 1')
    device: Literal['auto', 'gpu', 'cpu'] = Field('auto', description="'auto': the GPU if this Paddle build has one")
    print_freq: int = Field(50, gt=0, description='a console/VisualDL line every N optimizer steps')
    eval_freq: int = Field(1, gt=0, description='evaluate every N epochs, and after the last')
    save_epoch_freq: int = Field(10, gt=0, description='keep an epoch_N checkpoint every N epochs; latest and best '
                                                       'are always kept')
    pretrained_model: Optional[_Path] = Field(None, examples=['output/run/best'],
                                              description='weights to initialise from (fine-tuning), or to evaluate')
    resume: Optional[_Path] = Field(None, examples=['auto'], description="a checkpoint prefix to resume, or 'auto' "
                                                                         "for OUTPUT_DIR/latest")
    resume_changes: Literal['refuse', 'allow'] = Field(
        'refuse', description="'allow': resume with a changed recipe (lr, augmentation, drop path, ...); the model, "
                              "the classes and a mid-epoch batch plan never change (docs/training.md, Stopping, "
                              "preemption and resuming)")
    eval_weights: Literal['ema', 'raw'] = Field('ema', description='eval.py: the weights of a training checkpoint')
    linear_probe: bool = Field(False, description='train only the classifier (Model proj): every other parameter '
                                                  'frozen, every BatchNorm with its statistics fixed, the backbone '
                                                  'in eval mode')
    max_steps_per_epoch: Optional[int] = Field(None, gt=0, examples=[100],
                                               description='a cap on optimizer steps per epoch, for smoke tests and '
                                                           'debugging; null: no cap')
    save_interval_steps: Optional[int] = Field(None, gt=0, examples=[1000],
                                               description='also save OUTPUT_DIR/latest every N optimizer steps, for a '
                                                           'mid-epoch resume; null: at epoch ends only')
    use_visualdl: bool = Field(True, description='VisualDL logs in output_dir')
    to_static: bool = Field(False, description='train and evaluate through paddle.jit.to_static: one compiled '
                                               'program per input shape (CINN behind it on GPU builds); same results')

    @field_validator('linear_probe')
    @classmethod
    def _probe_needs_weights(cls, value, info: ValidationInfo):
        if value and not info.data.get('pretrained_model'):  # a resumed probe names its weights too
            raise ValueError('true only with Global.pretrained_model, the weights whose features the classifier '
                             'probes (a probe of random features learns nothing worth keeping)')
        return value

    @field_validator('to_static')
    @classmethod
    def _not_with_recompute(cls, value, info: ValidationInfo):
        if value and info.context['Model']['recompute']:
            raise ValueError('false when Model.recompute is true (recompute is an eager-mode memory saving; a '
                             'compiled program plans its memory itself)')
        return value


class Data(_Section):
    format: Literal['folder', 'filelist', 'shapes'] = Field(
        'folder', description="'folder': ROOT/<class>/*.jpg; 'filelist': lines 'relative/path label'; 'shapes': the "
                              "built-in quickstart data, written to the roots if missing")
    train_root: _Path = Field('data/ILSVRC2012/train', description='the training images, as Data.format says')
    val_root: _Path = Field('data/ILSVRC2012/val', description='the validation images, as Data.format says')
    train_list: Optional[_Path] = Field(None, examples=['train_list.txt'],
                                        description='filelist format: the list file, paths relative to train_root')
    val_list: Optional[_Path] = Field(None, examples=['val_list.txt'],
                                      description='filelist format: the list file, paths relative to val_root')
    label_names: Optional[_Path] = Field(None, examples=['labels.txt'],
                                         description='filelist format: a file with one class name per line')
    img_size: int = Field(224, description='the side of the square training crop and eval image')
    batch_size: int = Field(64, gt=0, description='images per device process')
    num_workers: int = Field(8, ge=0, description='loader processes; 0 loads images in the main process')
    use_shared_memory: bool = Field(True, description='faster worker -> trainer transfer; false where /dev/shm is '
                                                      'small (Docker)')
    max_image_pixels: Optional[int] = Field(40_000_000, gt=0, examples=[100_000_000],
                                            description='an image with more pixels is decoded at 1/2, 1/4 or 1/8 of '
                                                        'its sides (JPEG) or skipped (other formats), one log line '
                                                        'each: it bounds a loader process\'s memory (3 bytes a pixel); '
                                                        'null: no cap below Pillow\'s own')
    interpolation: Literal['bilinear', 'bicubic', 'nearest'] = Field('bicubic', description='the resize filter')
    crop_pct: float = Field(0.95, gt=0, le=1, description='eval resizes the short side to img_size / crop_pct')
    crop_mode: Literal['center', 'squash'] = Field(
        'center', description="eval: 'center' keeps the aspect and crops the center, 'squash' resizes to a square")
    mean: List[float] = Field([0.485, 0.456, 0.406], description='subtracted from pixels in [0, 1], per channel')
    std: List[float] = Field([0.229, 0.224, 0.225], description='pixels are divided by it, per channel')
    scale: List[float] = Field([0.08, 1.0], description='RandomResizedCrop area range')
    hflip: float = Field(0.5, ge=0, le=1, description='the probability of a horizontal flip')
    randaugment_ops: int = Field(2, ge=0, description='RandAugment layers; 0 disables')
    randaugment_magnitude: int = Field(15, ge=0, description="RandAugment magnitude, 10 = the ops' full range")
    mixup: float = Field(0.8, ge=0, description='Mixup alpha; 0 disables')
    cutmix: float = Field(0.0, ge=0, description='CutMix alpha; 0 disables; with both, each batch picks one')
    mix_prob: float = Field(1.0, ge=0, le=1, description='the probability that a batch is mixed at all')
    label_smoothing: float = Field(0.1, ge=0, lt=1, description='1 would leave no label')

    @field_validator('img_size')
    @classmethod
    def _at_least_the_stride(cls, value, info: ValidationInfo):
        model = info.context['Model']
        stages, pool = len(model['stage_num_block']), model['pooling_size']
        if value < 2 * pool ** stages:
            raise ValueError(f">= {2 * pool ** stages}, the model's total stride (2 in the stem x Model.pooling_size "
                             f"{pool} in each of {stages} stages; below it the last stages get a padded map of less "
                             f"than one image pixel)")
        return value

    @field_validator('mean', 'std')
    @classmethod
    def _one_per_channel(cls, value, info: ValidationInfo):
        channels = info.context['Model']['input_dim']
        if info.field_name == 'mean' and len(value) != channels:
            raise ValueError(f'a list of Model.input_dim = {channels} numbers (one per image channel)')
        if info.field_name == 'std' and (len(value) != channels or min(value) <= 0):
            raise ValueError(f'a list of Model.input_dim = {channels} numbers > 0 (one per image channel; pixels are '
                             f'divided by it)')
        return value

    @field_validator('scale')
    @classmethod
    def _area_range(cls, value):
        if not (len(value) == 2 and 0 < value[0] <= value[1] <= 1):
            raise ValueError('[low, high] with 0 < low <= high <= 1 (RandomResizedCrop area fraction)')
        return value


class Optimizer(_Section):
    lr: float = Field(3e-3, gt=0, description='the peak learning rate at Optimizer.base_batch_size, scaled linearly '
                                              'to the global batch')
    base_batch_size: int = Field(4096, gt=0, description='the batch size Optimizer.lr is given for')
    global_batch_size: Optional[int] = Field(4096, gt=0, description='gradient accumulation reaches it; null: no '
                                                                     'accumulation')
    min_lr: float = Field(1e-5, description='the learning rate at the end of the cosine decay')  # <= lr
    warmup_epochs: Optional[float] = Field(None, ge=0, examples=[1.0],
                                           description='linear warmup, in epochs of this run (a fraction is fine: '
                                                       'rounded to optimizer steps); null when '
                                                       'Optimizer.warmup_steps gives it')
    warmup_steps: Optional[int] = Field(10000, ge=0, examples=[10000],
                                        description='linear warmup, in optimizer steps; null when '
                                                    'Optimizer.warmup_epochs gives it')
    weight_decay: float = Field(0.05, ge=0, description='AdamW weight decay; not applied to biases, norms and '
                                                        'relative bias tables')
    layer_decay: Optional[float] = Field(None, gt=0, le=1, examples=[0.8],
                                         description='layer-wise lr decay as timm groups MaxViT: the head gets the '
                                                     'lr, the last stage lr x d, ..., the stem lr x d**(stages+1); '
                                                     'null: the same lr everywhere')
    beta1: float = Field(0.9, ge=0, lt=1, description='AdamW first-moment decay')
    beta2: float = Field(0.999, ge=0, lt=1, description='AdamW second-moment decay')
    epsilon: float = Field(1e-8, gt=0, description='AdamW denominator term')
    clip_grad: float = Field(1.0, ge=0, description='the global gradient norm to clip to; 0 disables')

    @field_validator('layer_decay')
    @classmethod
    def _not_for_a_probe(cls, value, info: ValidationInfo):
        if value is not None and info.context['Global']['linear_probe']:
            raise ValueError('null when Global.linear_probe is true: a probe trains only the classifier, at the lr '
                             'itself')
        return value

    @field_validator('min_lr')
    @classmethod
    def _at_most_lr(cls, value, info: ValidationInfo):
        lr = info.data.get('lr')  # absent when lr itself is wrong: that error is reported
        if lr is not None and not 0 <= value <= lr:
            raise ValueError(f'>= 0 and <= Optimizer.lr ({lr!r}) (the learning rate at the end of the cosine decay)')
        return value

    @field_validator('warmup_steps')
    @classmethod
    def _one_warmup(cls, value, info: ValidationInfo):
        if 'warmup_epochs' not in info.data:  # warmup_epochs itself is wrong: that is reported
            return value
        epochs = info.data['warmup_epochs']
        if value is not None and epochs is not None:
            raise ValueError(f'null when Optimizer.warmup_epochs is set ({epochs!r}): the warmup is given in steps or '
                             f'in epochs, not both')
        if value is None and epochs is None:
            raise ValueError('an int >= 0 when Optimizer.warmup_epochs is null (the warmup in optimizer steps)')
        return value


class EMA(_Section):
    decay: float = Field(0.9999, ge=0, lt=1, description='0 disables the EMA; 1 would never update it')


class AMP(_Section):
    enable: bool = Field(False, description='automatic mixed precision')
    dtype: Literal['bfloat16', 'float16'] = Field('bfloat16', description="'float16' uses dynamic loss scaling")
    level: Literal['O1', 'O2'] = Field('O1', description="'O1': per-op casts; 'O2': float16/bfloat16 weights with a "
                                                         "float32 master copy")
    init_loss_scaling: float = Field(65536.0, gt=0, description='the initial float16 loss scale')


# The sections in file order; Model is maxvit's argument dict (maxvit.DEFAULT_ARGS, checked by maxvit.check_args).
_SECTIONS = {'Global': Global, 'Model': None, 'Data': Data, 'Optimizer': Optimizer, 'EMA': EMA, 'AMP': AMP}
DEFAULTS: Dict[str, Dict[str, object]] = {
    name: dict(DEFAULT_ARGS) if section is None else section.model_construct().model_dump()
    for name, section in _SECTIONS.items()}


# ------------------------------------------------------------------------------------------------------ messages
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


def _kind(annotation, example, item: bool = False) -> str:
    """What a value of this type is, e.g. 'an int like 300', 'null or a string like 'auto''."""
    if get_origin(annotation) is Union:  # Optional[X]
        return 'null or ' + _kind(next(a for a in get_args(annotation) if a is not type(None)), example, item)
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return 'one of ' + ', '.join(map(repr, get_args(annotation)))
    if get_origin(annotation) in (list, List):
        return f'a list of numbers like {example}' if item else f'a list like {example}'
    return {bool: 'true or false', int: f'an int like {example}', float: f'a finite number like {example}',
            str: f"a string like '{example}'"}[annotation]


def _bounds(field) -> str:
    """A field's range: '> 0', 'in [0, 1)'."""
    bound = {type(m): m for m in field.metadata}
    lo = bound.get(annotated_types.Gt) or bound.get(annotated_types.Ge)
    hi = bound.get(annotated_types.Lt) or bound.get(annotated_types.Le)
    lo_open, hi_open = isinstance(lo, annotated_types.Gt), isinstance(hi, annotated_types.Lt)
    lo, hi = lo and (lo.gt if lo_open else lo.ge), hi and (hi.lt if hi_open else hi.le)
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _must(section, key: str, error: dict) -> str:
    """What the value of section.key must be, from pydantic's first error about it and the field's declaration."""
    field, kind = section.model_fields[key], error['type']
    if kind == 'value_error':  # a rule of a validator above: its message says it all
        return str(error['ctx']['error'])
    if kind in ('greater_than', 'greater_than_equal', 'less_than', 'less_than_equal'):
        rule = _bounds(field)
    elif kind == 'string_pattern_mismatch':
        rule = ('null or ' if type(None) in get_args(field.annotation) else '') + 'a non-empty path'
    elif kind == 'literal_error':
        rule = _kind(field.annotation, None)
    else:  # the wrong type
        example = field.default if field.default is not None else field.examples[0]
        return _kind(field.annotation, example, item=len(error['loc']) > 1)
    return rule + (f' ({field.description})' if field.description else '')


def _as_held(section, key: str, value):
    """A value of the right type as the section holds it (1 -> 1.0 for a float), to show it in a message."""
    try:
        return TypeAdapter(section.model_fields[key].annotation).validate_python(value)
    except ValidationError:  # a path of the wrong pattern, say: shown as given
        return value


# ---------------------------------------------------------------------------------------------------- validation
def _prefix(source: Optional[str]) -> str:
    return f'{source}: ' if source else ''


def validate(cfg, sources: Optional[Dict[tuple, str]] = None, origin: Optional[str] = None
             ) -> Dict[str, Dict[str, object]]:
    """Fill defaults and check every section, key, type, range and choice. Returns a new dict of plain dicts.

    ``sources`` maps (section, key) (and (section, None) for a section) to where the value came from (the file
    or '-o Section.key=value'); ``origin`` names the file for errors about defaults and the file as a whole.
    Every error is a ConfigError of one line: where, the key, its value, and what it must be.
    """
    sources = sources or {}

    def fail(section, key, value, must):
        source = sources.get((section, key))
        note = '' if key is None or key in (cfg.get(section) or {}) else ' (the default)'
        name = section if key is None else f'{section}.{key}'
        raise ConfigError(f'{_prefix(source or origin)}{name} is {_show(value)}{note}; it must be {must}')

    def unknown(section, key, valid):
        raise ConfigError(f"{_prefix(sources.get((section, key), origin))}unknown key '{section}.{key}'."
                          f"{_closest(key, valid)}")

    if not isinstance(cfg, dict):
        kind = 'a list' if isinstance(cfg, list) else _show(cfg)
        raise ConfigError(f'{_prefix(origin)}the top level must be a mapping of sections ({", ".join(DEFAULTS)}), '
                          f'got {kind}')
    for section, values in cfg.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{_prefix(sources.get((section, None), origin))}unknown config section "
                              f"'{section}'.{_closest(section, DEFAULTS)}")
        if values is not None and not isinstance(values, dict):
            fail(section, None, values, f"a mapping of 'key: value' lines, e.g. {section}: "
                                        f"{{{next(iter(DEFAULTS[section]))}: ...}}")
    given = {section: copy.deepcopy(cfg.get(section) or {}) for section in DEFAULTS}
    out = {}
    auto = given['Model'].get('num_classes') == AUTO  # the training data decides it (resolve_num_classes)
    if auto:
        given['Model']['num_classes'] = 1  # checked as a number; 'auto' again below
    try:  # first: the other sections' rules read it
        out['Model'] = check_args(given['Model'])
    except KeyError:
        unknown('Model', next(k for k in given['Model'] if k not in DEFAULT_ARGS), DEFAULT_ARGS)
    except ArgumentError as e:
        fail('Model', e.key, e.value, e.allowed + (f" or '{AUTO}' (the classes of the training data)"
                                                   if e.key == 'num_classes' else ''))
    if auto:
        out['Model']['num_classes'] = AUTO
    for name, section in _SECTIONS.items():
        if section is None:
            continue
        try:
            # the cross-section rules read Model and the sections before this one (Global first)
            out[name] = section.model_validate(given[name], context=out).model_dump()
        except ValidationError as e:
            error = min(e.errors(), key=lambda x: x['type'] != 'extra_forbidden')  # an unknown key first
            key = error['loc'][0]
            if error['type'] == 'extra_forbidden':
                unknown(name, key, section.model_fields)
            value = given[name].get(key, DEFAULTS[name][key])
            fail(name, key, value if error['type'].endswith('_type') else _as_held(section, key, value),
                 _must(section, key, error))
    return {name: out[name] for name in DEFAULTS}


# ---------------------------------------------------------------------------------------------------------- YAML
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
    Raises _DuplicateKey(dotted key, line, first line) before anything is constructed. It reads 1e-3 and 1.0e3 as
    numbers, as YAML 1.2 does (PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent)."""

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


_EXPONENT_FLOAT = re.compile(r'^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$')  # 1e-3, 1.0e3, 2E+5
UniqueKeyLoader.add_implicit_resolver('tag:yaml.org,2002:float', _EXPONENT_FLOAT, list('-+0123456789'))


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
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
    except (yaml.YAMLError, _DuplicateKey) as e:
        problem = _one_line(e) if isinstance(e, yaml.YAMLError) else f"duplicate key '{e.args[0]}'"
        raise ConfigError(f'-o {text}: the value is not valid YAML: {problem}') from None
    return section, key, value


# ---------------------------------------------------------------------------------------------------- public API
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


def resolve_num_classes(cfg: Dict[str, Dict[str, object]], class_names: List[str], where: str) -> int:
    """Model.num_classes from the training data: 'auto' becomes len(class_names) (in ``cfg``, so the model, the
    checkpoints and their stored config have the number); a stated number must match. ``where`` names the data."""
    stated, found = cfg['Model']['num_classes'], len(class_names)
    if stated == AUTO:
        cfg['Model']['num_classes'] = found
    elif stated != found:
        raise ConfigError(f"Model.num_classes is {stated} but {where} has {found} classes: set "
                          f"-o Model.num_classes={found} (or {AUTO})")
    return found


def build_model(cfg: Dict[str, Dict[str, object]]) -> MaxViT:
    """The one way a config becomes a model; with Global.linear_probe only its classifier trains. Model.num_classes
    'auto', which train.py resolves from the training data before it builds the model (resolve_num_classes), is
    elsewhere (eval, export, predict, summary) the width of the classifier of the weights Global.pretrained_model
    names, or 0 (no classifier) without weights; ``cfg`` takes the number too."""
    if cfg['Model']['num_classes'] == AUTO:
        path = cfg['Global']['pretrained_model']
        weights = load_weights(path)[0] if path else {}
        cfg['Model']['num_classes'] = int(weights['proj.weight'].shape[-1]) if 'proj.weight' in weights else 0
    if not cfg['Global']['linear_probe']:
        return MaxViT(cfg['Model'])
    # a linear probe: the stem and every stage frozen and in eval mode, every BatchNorm's statistics fixed (the
    # MaxViT keywords a detector's frozen backbone uses), and the head before the classifier frozen too
    model = MaxViT(cfg['Model'], frozen_stages=len(cfg['Model']['stage_num_block']), norm_eval=True)
    for name, param in model.named_parameters():
        param.stop_gradient = not name.startswith('proj.')
    return model


def add_config_args(parser, required: bool = True):
    """The -c/-o flags shared by train.py, eval.py and tools/."""
    parser.add_argument('-c', '--config', required=required, help='YAML config, e.g. configs/maxvit_t.yaml')
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value',
                        help='override a config value (repeatable), e.g. -o Global.epochs=10')
    return parser
