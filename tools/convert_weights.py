"""Convert timm's MaxViT checkpoints (the official TensorFlow weights, ``maxvit_*_tf_*``) to MaxViT-Paddle.

    # a timm model name picks the architecture (block/grid size = image size // 32); classes come from the file
    python -m tools.convert_weights --src model.safetensors --model maxvit_tiny_tf_224 --out maxvit_t_tf_224.pdparams
    python -m tools.convert_weights --src pytorch_model.bin --model maxvit_base_tf_224.in21k --out maxvit_b_tf_224_in21k.pdparams

    # or a config: 224 weights into the 384 model, relative position bias tables resized bilinearly
    python -m tools.convert_weights --src model.safetensors -c configs/maxvit_t_tf_384.yaml --out maxvit_t_tf_224to384.pdparams
    # ... keeping the config's fresh classifier instead of the checkpoint's (e.g. 21k-class weights, 10 classes)
    python -m tools.convert_weights --src model.safetensors -c my.yaml -o Model.num_classes=10 --drop-head --out x.pdparams

Inputs: timm state dicts as ``.safetensors`` (read with the safetensors package by ``read_safetensors``) or torch ``.pth``/``.bin``
zip files (read by ``read_torch_zip``, which never runs pickled code: a restricted unpickler builds numpy arrays
and refuses every global a state dict does not need). torch is never imported.

Output: ``paddle.save`` of a flat state dict {name: float32 paddle.Tensor} with exactly the keys of
``MaxViT.state_dict()``: ``model.set_state_dict(paddle.load(path))`` loads it.

Every source tensor is mapped by name and shape (``convert_state_dict``): an unmapped source tensor, a model
tensor left without a value, or a shape that does not fit is an error that lists all of them. The only source
tensors deliberately skipped are BatchNorm ``num_batches_tracked`` counters, which Paddle does not have.
How timm's layout becomes ours:
* Linear weights are transposed (torch stores (out, in), Paddle (in, out)).
* timm's relative position bias table [heads, 2h-1, 2w-1] is indexed by key - query offset; ours,
  ((2h-1)(2w-1), heads), by query - key (as Swin and the article). So the table is flipped on both spatial axes,
  flattened and transposed. A table for another window size is resized bilinearly
  (``maxvit.resize_relative_bias_table``), as the official code does when fine-tuning at a new resolution.
* BatchNorm running_mean / running_var become Paddle's _mean / _variance.
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.convert_weights ...')

from common.checkpoint import bfloat16_to_float32, read_safetensors

__all__ = ['ConversionError', 'UnsafeCheckpointError', 'read_safetensors', 'read_torch_zip', 'load_timm_checkpoint',
           'timm_to_paddle_name', 'convert_state_dict', 'checkpoint_num_classes', 'timm_model_args', 'main']


class ConversionError(ValueError):
    """A checkpoint that does not fit the target model; the message lists every offending tensor."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A torch checkpoint whose pickle asks for a global that a plain state dict never needs."""


# ----------------------------------------------------------------------------------------------------------------
# torch zip checkpoints (.pth / .bin), without torch and without running pickled code.
# ----------------------------------------------------------------------------------------------------------------
_TORCH_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16, 'BFloat16Storage': 'bfloat16',
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
    """Stands in for torch.FloatStorage & co.: only says which dtype the storage's bytes hold."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _TORCH_STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 for numpy: a strided view into the storage, bounds-checked, copied."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError(f'a tensor must be built from a storage, got {type(storage).__name__}')
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or min(size, default=1) < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f'bad tensor geometry: offset {offset}, size {size}, stride {stride}')
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise pickle.UnpicklingError(f'tensor (offset {offset}, size {size}, stride {stride}) reads past the '
                                         f'end of its {storage.size}-element storage')
    else:
        return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view, copy=True, order='C')


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    """torch._utils._rebuild_parameter: an nn.Parameter is just its data here."""
    return data


# The only globals a state dict needs. Everything else (os.system, builtins.eval, argparse.Namespace, ...) is refused.
_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}
_SAFE_GLOBALS.update({('torch', name): _StorageType(name) for name in _TORCH_STORAGE_DTYPES})


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl with numpy stand-ins; any other global raises UnsafeCheckpointError."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': a plain state dict never needs it, and unpickling it "
                f"could run arbitrary code. Allowed: {', '.join(f'{m}.{n}' for m, n in _SAFE_GLOBALS)}. "
                f"Save model.state_dict() alone (timm: clean_checkpoint.py), or use the .safetensors file.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f'unsupported persistent id in torch checkpoint: {pid!r}')
        _, storage_type, key, _location, numel = pid
        return self._load_storage(storage_type.dtype, str(key), int(numel))


def read_torch_zip(path):
    """Unpickle a torch.save zip file (torch >= 1.6 format) into Python objects with numpy arrays for tensors.

    No pickled code runs: only collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter and
    the torch.*Storage types are allowed, each replaced by a numpy stand-in; anything else raises
    UnsafeCheckpointError naming the global. Storage bytes come from the archive's data/ entries."""
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f'{path}: not a torch zip checkpoint (legacy pre-1.6 torch files are not supported; '
                         f're-save it with a recent torch.save, or convert it to .safetensors)')
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pickles) != 1:
            raise ValueError(f'{path}: expected one <archive>/data.pkl in the zip, found {pickles or "none"}')
        prefix = pickles[0][:-len('data.pkl')]
        names = set(zf.namelist())
        byteorder = zf.read(prefix + 'byteorder').decode().strip() if prefix + 'byteorder' in names else 'little'
        if byteorder not in ('little', 'big'):
            raise ValueError(f'{path}: unknown byteorder {byteorder!r}')
        cache: Dict[str, np.ndarray] = {}

        def load_storage(dtype, key: str, numel: int) -> np.ndarray:
            entry = f'{prefix}data/{key}'
            if entry not in names:
                raise ValueError(f'{path}: storage {key!r} has no {entry} entry')
            if key not in cache:
                raw = zf.read(entry)
                bf16 = isinstance(dtype, str)
                dt = np.dtype('u2' if bf16 else dtype)
                if dt.itemsize > 1:
                    dt = dt.newbyteorder('<' if byteorder == 'little' else '>')
                if len(raw) < numel * dt.itemsize:
                    raise ValueError(f'{path}: storage {key!r} holds {len(raw)} bytes, needs {numel * dt.itemsize}')
                arr = np.frombuffer(raw, dtype=dt, count=numel).astype(dt.newbyteorder('='))
                cache[key] = bfloat16_to_float32(arr) if bf16 else arr
            return cache[key]

        return _StateDictUnpickler(io.BytesIO(zf.read(pickles[0])), load_storage).load()


def load_timm_checkpoint(path) -> Dict[str, np.ndarray]:
    """A timm state dict {name: numpy array} from a .safetensors or torch zip (.pth/.bin) file.

    A checkpoint that wraps the weights in a 'state_dict' (timm training checkpoints) or 'model' entry is
    unwrapped."""
    path = str(path)
    with open(path, 'rb') as f:
        magic = f.read(4)
    obj = read_torch_zip(path) if magic[:2] == b'PK' else read_safetensors(path)
    if isinstance(obj, dict):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f'{path}: expected a state dict of tensors, got {type(obj).__name__} '
                         f'with keys {list(obj)[:8] if isinstance(obj, dict) else "-"}')
    return dict(obj)


# ----------------------------------------------------------------------------------------------------------------
# Names: timm maxvit_*_tf_* -> maxvit.MaxViT (one rule per module kind; a key no rule matches is an error)
# ----------------------------------------------------------------------------------------------------------------
_BN = r'(weight|bias|running_mean|running_var)'
_WB = r'(weight|bias)'
_BLOCK = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OUR_BLOCK = r'max_blocks.\1.\2.'
_RULES: List[Tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r'stem\.conv1\.' + _WB, r'conv_stem.0.\1'),
    (r'stem\.norm1\.' + _BN, r'conv_stem.1.\1'),
    (r'stem\.conv2\.' + _WB, r'conv_stem.3.\1'),
    (_BLOCK + r'conv\.pre_norm\.' + _BN, _OUR_BLOCK + r'mbconv.bn.\3'),
    (_BLOCK + r'conv\.conv1_1x1\.weight', _OUR_BLOCK + r'mbconv.expand_conv.0.weight'),
    (_BLOCK + r'conv\.norm1\.' + _BN, _OUR_BLOCK + r'mbconv.expand_conv.1.\3'),
    (_BLOCK + r'conv\.conv2_kxk\.weight', _OUR_BLOCK + r'mbconv.dw_conv.0.weight'),
    (_BLOCK + r'conv\.norm2\.' + _BN, _OUR_BLOCK + r'mbconv.dw_conv.1.\3'),
    (_BLOCK + r'conv\.se\.fc1\.' + _WB, _OUR_BLOCK + r'mbconv.se.gate.0.\3'),
    (_BLOCK + r'conv\.se\.fc2\.' + _WB, _OUR_BLOCK + r'mbconv.se.gate.2.\3'),
    (_BLOCK + r'conv\.conv3_1x1\.' + _WB, _OUR_BLOCK + r'mbconv.out_conv.0.\3'),
    (_BLOCK + r'conv\.shortcut\.expand\.' + _WB, _OUR_BLOCK + r'mbconv.proj.1.\3'),  # after the 2x2 avg pool
    (_BLOCK + r'attn_(block|grid)\.attn\.rel_pos\.relative_position_bias_table',
     _OUR_BLOCK + r'\3_attn.attn.relative_bias_table'),
    (_BLOCK + r'attn_(block|grid)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.' + _WB,
     _OUR_BLOCK + r'\3_attn.\4.\5'),
    (r'head\.norm\.' + _WB, r'norm.\1'),
    (r'head\.pre_logits\.fc\.' + _WB, r'pre_logits.0.\1'),
    (r'head\.fc\.' + _WB, r'proj.\1'),
]]
_SKIPPED = re.compile(r'.*\.num_batches_tracked')  # BatchNorm step counters: no Paddle counterpart, unused in eval
_HEAD = re.compile(r'head\.fc\.(weight|bias)')


def timm_to_paddle_name(key: str) -> Optional[str]:
    """Our state-dict name for a timm key, or None when no rule knows it."""
    for pattern, repl in _RULES:
        if pattern.fullmatch(key):
            name = pattern.sub(repl, key)
            return name.replace('.running_mean', '._mean').replace('.running_var', '._variance')
    return None


def convert_state_dict(timm_sd: Dict[str, np.ndarray], model, *, resize_bias_tables: bool = True,
                       drop_head: bool = False, resized: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Map a timm maxvit_*_tf_* state dict onto ``model`` (a maxvit.MaxViT): {our name: numpy array}.

    Checks names and shapes of everything and raises one ConversionError listing every unmapped source tensor,
    every shape that does not fit and every model tensor left without a value. Relative bias tables of another
    window size are resized bilinearly unless ``resize_bias_tables`` is False. ``drop_head`` leaves out the
    classifier (head.fc -> proj), so that the model keeps its own freshly initialised one. The names of resized
    tables are appended to ``resized`` when a list is given."""
    import paddle
    from maxvit import resize_relative_bias_table

    target = {k: list(v.shape) for k, v in model.state_dict().items()}
    windows = model.bias_table_windows()
    out: Dict[str, np.ndarray] = {}
    unmapped, mismatched, seen = [], [], set()
    for key, value in timm_sd.items():
        value = np.asarray(value)
        if _SKIPPED.fullmatch(key) or (drop_head and _HEAD.fullmatch(key)):
            continue
        name = timm_to_paddle_name(key)
        if name is None or name not in target:
            unmapped.append(f'{key} {list(value.shape)}' + (f' (-> {name}, not in the model)' if name else ''))
            continue
        seen.add(name)
        if value.dtype.kind == 'f':
            value = value.astype(np.float32, copy=False)
        if name.endswith('.relative_bias_table'):
            if value.ndim != 3 or value.shape[1] % 2 == 0 or value.shape[2] % 2 == 0:
                mismatched.append(f'{key} {list(value.shape)} -> {name} {target[name]} '
                                  f'(expected a [heads, 2h-1, 2w-1] table)')
                continue
            heads = value.shape[0]
            # key - query (TF) -> query - key (ours): flip both offset axes; then rows = offsets, columns = heads
            value = np.ascontiguousarray(value[:, ::-1, ::-1].reshape(heads, -1).T)
            old_window = [(side + 1) // 2 for side in timm_sd[key].shape[1:]]
            new_window = windows[name]
            if heads == target[name][1] and old_window != new_window and resize_bias_tables:
                value = resize_relative_bias_table(paddle.to_tensor(value), new_window, old_window).numpy()
                if resized is not None:
                    resized.append(name)
        elif value.ndim == 2 and key.endswith('.weight'):
            value = np.ascontiguousarray(value.T)        # nn.Linear: torch (out, in) -> Paddle (in, out)
        if list(value.shape) != target[name]:
            mismatched.append(f'{key} {list(timm_sd[key].shape)} -> {name}: converted {list(value.shape)}, '
                              f'model needs {target[name]}')
            continue
        out[name] = value
    missing = [f'{k} {s}' for k, s in target.items()
               if k not in seen and not (drop_head and k.startswith('proj.'))]
    if unmapped or mismatched or missing:
        parts = []
        if unmapped:
            parts.append(f'{len(unmapped)} checkpoint tensor(s) with no place in the model:\n  ' + '\n  '.join(unmapped))
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatch(es):\n  ' + '\n  '.join(mismatched))
        if missing:
            parts.append(f'{len(missing)} model tensor(s) the checkpoint does not provide:\n  ' + '\n  '.join(missing))
        raise ConversionError('the checkpoint does not fit the model (is it the right variant and size?)\n'
                              + '\n'.join(parts))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models and the command line
# ----------------------------------------------------------------------------------------------------------------
_TIMM_NAME = re.compile(r'maxvit_(tiny|small|base|large|xlarge)_tf_(\d+)(\.[\w-]+)?')


def checkpoint_num_classes(timm_sd: Dict[str, np.ndarray]) -> int:
    """Classes of the checkpoint's classifier (1000 for in1k, 21843 for in21k; 0 when it has none)."""
    return int(timm_sd['head.fc.weight'].shape[0]) if 'head.fc.weight' in timm_sd else 0


def timm_model_args(name: str, num_classes: int = 1000) -> Dict[str, object]:
    """Model args for a timm name like 'maxvit_tiny_tf_224' or 'maxvit_base_tf_384.in21k_ft_in1k'."""
    from maxvit import MODEL_ARGS
    m = _TIMM_NAME.fullmatch(name)
    if not m:
        raise ValueError(f"unknown model {name!r}: expected maxvit_{{tiny,small,base,large,xlarge}}_tf_{{224,384,512}}"
                         f"[.tag], e.g. maxvit_tiny_tf_224")
    size, img = m.group(1), int(m.group(2))
    if img % 32:
        raise ValueError(f'{name}: the image size must be a multiple of 32, got {img}')
    window = [img // 32, img // 32]
    return dict(MODEL_ARGS[f'{size}_tf'], block_size=window, grid_size=list(window), num_classes=num_classes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.split('\n')[1:10]))
    parser.add_argument('--src', required=True, help='timm checkpoint: .safetensors, or torch zip .pth/.bin')
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument('--model', help='timm model name, e.g. maxvit_tiny_tf_224 (classes from the checkpoint)')
    target.add_argument('-c', '--config', help='YAML config whose Model to convert into, e.g. configs/maxvit_t_tf_384.yaml')
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value',
                        help='config override (with -c), e.g. -o Model.num_classes=21843')
    parser.add_argument('--out', required=True, help='output .pdparams')
    parser.add_argument('--drop-head', action='store_true',
                        help="leave out the checkpoint's classifier (the model keeps a freshly initialised one)")
    args = parser.parse_args(argv)
    try:
        return _convert(args, parser)
    except (ConversionError, UnsafeCheckpointError, ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def _convert(args, parser) -> int:
    from maxvit import MaxViT
    sd = load_timm_checkpoint(args.src)
    classes = checkpoint_num_classes(sd)
    if args.model:
        if args.override:
            parser.error('-o/--override needs -c/--config')
        model_args = timm_model_args(args.model, classes if classes and not args.drop_head else 1000)
        where = args.model
    else:
        from common.config import load_config
        cfg = load_config(args.config, args.override)
        model_args, where = cfg['Model'], args.config
        if classes and not args.drop_head and classes != model_args['num_classes']:
            raise ConversionError(f"{args.src} has a {classes}-class classifier but {args.config} builds "
                                  f"{model_args['num_classes']} classes: add -o Model.num_classes={classes} to keep "
                                  f"it, or --drop-head to start from a fresh classifier")
    model = MaxViT(model_args)
    resized: List[str] = []
    state = convert_state_dict(sd, model, drop_head=args.drop_head, resized=resized)
    import paddle
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, args.out)
    n = sum(int(v.size) for k, v in state.items() if not k.endswith(('._mean', '._variance')))
    print(f'{args.src} -> {args.out}: {len(state)} tensors, {n:,} parameters, {model_args["num_classes"]} classes, '
          f'model {where} (block {model_args["block_size"]}, grid {model_args["grid_size"]})'
          + (f'; {len(resized)} relative bias tables resized' if resized else '')
          + ('; classifier left out' if args.drop_head else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
