"""Checkpoints: PaddleClas-style PREFIX.pdparams / .pdopt / .pdstates, written so a kill never loses one,
and read without executing code.

* Writing (save_checkpoint) is a small roll-forward journal: the three files are written to PREFIX.tmp.*
  (the .pdstates last, which marks the set complete), then renamed over PREFIX.* with the .pdstates last.
  A kill before the marker leaves the old set untouched; a kill after it is finished by the next reader
  (recover), so PREFIX.* is always one whole checkpoint.
* Reading (load_file) uses a restricted unpickler that only rebuilds numpy arrays and plain containers, so a
  .pdparams from anywhere cannot run code. Weights also load from .safetensors and .npz (no pickle at all).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import paddle

from maxvit import MaxViT, resize_relative_bias_table

EXTS = ('.pdparams', '.pdopt', '.pdstates')  # the .pdstates is written and renamed last: it marks completion


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says which file and why."""


# ------------------------------------------------------------------------------------------------ reading
class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain Python containers; refuses every other global (os.system, ...)."""
    ALLOWED = {('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', 'scalar'), ('numpy.core.multiarray', 'scalar'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict')}

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refusing to load '{module}.{name}': a weights file may only hold "
                              f"arrays, numbers, strings and containers (is it from an untrusted source?)")


# .safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': 'bfloat16',
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as uint16) -> float32: bfloat16 is the upper half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _from_buffer(buf, dtype, shape, what: str) -> np.ndarray:
    """A C-contiguous array of ``shape`` from the bytes ``buf``, with bfloat16 widened to float32."""
    count = int(np.prod(shape, dtype=np.int64))
    if isinstance(dtype, str) and dtype == 'bfloat16':
        raw = np.frombuffer(buf, dtype='<u2', count=count)
        return bfloat16_to_float32(raw).reshape(shape)
    dt = np.dtype(dtype).newbyteorder('<') if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    if len(buf) != count * dt.itemsize:
        raise ValueError(f'{what}: {len(buf)} bytes for {count} values of {dt}')
    return np.frombuffer(buf, dtype=dt, count=count).astype(dt.newbyteorder('='), copy=True).reshape(shape)


def read_safetensors(path) -> Dict[str, np.ndarray]:
    """Read a .safetensors file into {name: numpy array} (bfloat16 becomes float32). Only numpy is needed."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f'{path}: not a safetensors file (shorter than 8 bytes)')
        n = int.from_bytes(head, 'little')
        if n <= 0 or 8 + n > size:
            raise ValueError(f'{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)')
        try:
            header = json.loads(f.read(n).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f'{path}: not a safetensors file (header is not JSON: {e})') from None
    if not isinstance(header, dict):
        raise ValueError(f'{path}: safetensors header is not a JSON object')
    data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info['dtype']]
            shape = tuple(int(s) for s in info['shape'])
            begin, end = (int(v) for v in info['data_offsets'])
        except KeyError as e:
            raise ValueError(f'{path}: tensor {name!r}: unsupported dtype or missing field {e}') from None
        itemsize = 2 if isinstance(dtype, str) else np.dtype(dtype).itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= data.size or end - begin != count * itemsize or min(shape, default=0) < 0:
            raise ValueError(f'{path}: tensor {name!r} ({info["dtype"]} {list(shape)}) has bad data offsets '
                             f'[{begin}, {end}) for a {data.size}-byte buffer')
        out[name] = _from_buffer(bytes(data[begin:end]), dtype, shape, f'{path}: {name}')
    del data
    return out


def load_file(path: str):
    """Load a .pdparams/.pdopt/.pdstates (restricted unpickler), .safetensors or .npz file; arrays as numpy."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'file not found: {path}')
    if path.endswith('.safetensors'):
        try:
            return read_safetensors(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if path.endswith('.npz'):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = _SafeUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from None
    if isinstance(obj, dict):
        obj.pop('StructuredToParameterName@@', None)  # paddle.save's bookkeeping, not a tensor
    return obj


# ------------------------------------------------------------------------------------------------ writing
def to_numpy_tree(obj):
    """Every tensor in nested dicts/lists as a numpy array (bfloat16 widened to float32, which numpy lacks), so
    a checkpoint holds only what _SafeUnpickler rebuilds: paddle.save pickles tensors nested below the top
    level (AMP O2's master weights) as Paddle objects."""
    if isinstance(obj, paddle.Tensor):
        return (obj.astype('float32') if obj.dtype == paddle.bfloat16 else obj).numpy()
    if isinstance(obj, dict):
        return {k: to_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy_tree(v) for v in obj)
    return obj


def _fsync_save(obj, path: Path) -> None:
    paddle.save(to_numpy_tree(obj), str(path))
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def recover(prefix: str) -> None:
    """Finish a save that was interrupted after its files were complete (PREFIX.tmp.pdstates exists)."""
    if not Path(prefix + '.tmp' + EXTS[-1]).exists():
        return
    for ext in EXTS:  # the marker (.pdstates) moves last
        if Path(prefix + '.tmp' + ext).exists():
            os.replace(prefix + '.tmp' + ext, prefix + ext)


def _commit(prefix: str) -> None:
    for ext in EXTS:
        os.replace(prefix + '.tmp' + ext, prefix + ext)


def save_checkpoint(prefix: str, model_state: Dict, opt_state: Dict, states: Dict) -> None:
    """Write PREFIX.pdparams (model), .pdopt (optimizer + lr schedule), .pdstates (everything else)."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    recover(prefix)
    for ext in EXTS:  # stale pieces of a save killed before its marker
        Path(prefix + '.tmp' + ext).unlink(missing_ok=True)
    for ext, obj in zip(EXTS, (model_state, opt_state, states)):
        _fsync_save(obj, Path(prefix + '.tmp' + ext))
    _commit(prefix)


def copy_checkpoint(src: str, dst: str) -> None:
    """dst = a copy of the complete checkpoint src, with the same journal (hard links where possible)."""
    recover(src)
    for ext in EXTS:
        Path(dst + '.tmp' + ext).unlink(missing_ok=True)
    for ext in EXTS:
        try:
            os.link(src + ext, dst + '.tmp' + ext)
        except OSError:
            shutil.copyfile(src + ext, dst + '.tmp' + ext)
    _commit(dst)


def load_checkpoint(prefix: str) -> Tuple[Dict, Dict, Dict]:
    """(model state, optimizer state, states) of a complete checkpoint PREFIX.*"""
    recover(prefix)
    missing = [prefix + ext for ext in EXTS if not Path(prefix + ext).is_file()]
    if missing:
        raise CheckpointError(f'checkpoint {prefix} is incomplete or missing: no {", ".join(missing)}')
    return tuple(load_file(prefix + ext) for ext in EXTS)


def resolve_prefix(path: str) -> str:
    """Accept 'output/x/latest', 'output/x/latest.pdparams' or any of the three files."""
    for ext in EXTS:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


# ------------------------------------------------------------------------------------------------ weights
CLASSIFIER_KEYS = ('proj.weight', 'proj.bias')


def adapt_state_dict(model: MaxViT, state: Dict[str, np.ndarray], new_classifier: bool = False
                     ) -> Tuple[Dict, List[str], List[str]]:
    """Fit a state dict to ``model``: resize relative bias tables to the model's window sizes and, with
    ``new_classifier`` (fine-tuning), drop a classifier whose number of classes differs so that the model's
    fresh one stays. Returns (state, resized keys, skipped keys).
    Any other missing, unexpected or mis-shaped tensor is a CheckpointError listing all of them."""
    target = model.state_dict()
    windows = model.bias_table_windows()
    out, resized, skipped, problems = {}, [], [], []
    for key, value in state.items():
        if key not in target:
            problems.append(f'unexpected {key} {list(np.shape(value))}')
            continue
        want = list(target[key].shape)
        if list(np.shape(value)) != want:
            if key in CLASSIFIER_KEYS and new_classifier:
                skipped.append(key)
                continue
            if key.endswith('relative_bias_table') and np.shape(value)[1:] == tuple(want[1:]):  # same heads
                try:
                    table = paddle.to_tensor(np.asarray(value, dtype='float32'))
                    value = resize_relative_bias_table(table, windows[key]).numpy()
                except ValueError as e:
                    problems.append(f'{key}: {e}')
                    continue
                resized.append(key)
            if list(np.shape(value)) != want:
                problems.append(f'shape of {key}: checkpoint {list(np.shape(value))}, model {want}')
                continue
        out[key] = value
    if new_classifier:  # a headless file (convert_weights.py --drop-head) keeps the model's fresh classifier
        skipped += [k for k in CLASSIFIER_KEYS if k in target and k not in state]
    problems += [f'missing {k}' for k in target if k not in out and k not in skipped]
    if problems:
        raise CheckpointError('weights do not fit this model:\n  ' + '\n  '.join(problems))
    return out, resized, skipped


def checkpoint_prefix(path: str):
    """The prefix of the training checkpoint ``path`` names (PREFIX or one of its files), or None when ``path``
    is not one (a plain weights file)."""
    prefix = resolve_prefix(str(path))
    return prefix if Path(prefix + '.pdstates').is_file() and Path(prefix + '.pdparams').is_file() else None


def load_weights(path: str, ema: bool = False) -> Tuple[Dict[str, np.ndarray], str]:
    """Weights from a .pdparams/.safetensors/.npz file or a training checkpoint prefix; with ``ema``, a training
    checkpoint's EMA weights. Returns (state dict, description of what was loaded)."""
    prefix = checkpoint_prefix(path)
    if prefix:
        recover(prefix)
        if ema:
            saved = load_file(prefix + '.pdstates').get('ema')
            if not saved:
                raise CheckpointError(f'{prefix}.pdstates has no EMA weights (EMA.decay was 0): use its raw '
                                      f'weights with -o Global.eval_weights=raw')
            return saved['state'], f'{prefix} (EMA weights, {saved["updates"]} updates)'
        return load_file(prefix + '.pdparams'), f'{prefix}.pdparams'
    if not Path(path).is_file():
        raise CheckpointError(f'weights not found: {path} (a .pdparams/.safetensors/.npz file or a checkpoint '
                              f'prefix such as output/run/best)')
    return load_file(path), str(path)


def load_pretrained(model: MaxViT, path: str, ema: bool = False, new_classifier: bool = False
                    ) -> Tuple[List[str], List[str], str]:
    """Initialise ``model`` from weights (see load_weights; fine-tuning, evaluation, export). Bias tables of
    another window size are resized; with ``new_classifier`` a classifier of another size is left fresh.
    Returns (resized keys, skipped keys, description)."""
    state, what = load_weights(path, ema)
    state, resized, skipped = adapt_state_dict(model, state, new_classifier)
    set_model_state(model, state)
    return resized, skipped, what


def set_model_state(model, state: Dict[str, np.ndarray]) -> None:
    """model.set_state_dict for a state that adapt_state_dict checked, cast to each tensor's dtype (weights are
    saved as float32 or float16; an AMP O2 model may hold bfloat16, which numpy has no type for)."""
    target = model.state_dict()
    model.set_state_dict({k: paddle.to_tensor(np.asarray(v)).astype(target[k].dtype) for k, v in state.items()})
