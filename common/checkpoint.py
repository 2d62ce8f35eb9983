"""Checkpoints: PaddleClas-style PREFIX.pdparams / .pdopt / .pdstates, written so that a kill at any moment (kill -9,
an out-of-memory kill, a power cut) leaves PREFIX.* one whole checkpoint, and read without executing code.

Files of a checkpoint PREFIX (output/run/latest, best, epoch_N):

    PREFIX.pdparams, .pdopt, .pdstates   the checkpoint: model; optimizer + lr schedule; everything else
    PREFIX.tmp.<ext>                     a file being written: never trusted, deleted by the next recovery
    PREFIX.pending.<ext>                 a complete, fsynced file of the set being saved
    PREFIX.pending.complete              the completion marker: JSON with the size and sha256 of the three new
                                         files. Its rename into place is the commit point of a save.
    DIR/.checkpoint.lock                 flock()ed by whoever saves, copies, recovers or loads a set in DIR

Saving (save_checkpoint), holding the lock:
  1. recover PREFIX (below): no temporary, pending or marker file of PREFIX is left;
  2. for .pdparams, .pdopt, .pdstates in turn: write PREFIX.tmp.<ext>, fsync it, rename it to PREFIX.pending.<ext>;
  3. fsync the directory, so that the three pending names are on disk before the marker can be;
  4. write the marker as PREFIX.tmp.complete, fsync it, rename it to PREFIX.pending.complete (THE COMMIT POINT),
     fsync the directory;
  5. promote: rename PREFIX.pending.<ext> over PREFIX.<ext> for the three files, fsync the directory, delete the
     marker, fsync the directory.
A save that fails with an exception (a full disk, ...) recovers PREFIX before it re-raises, so its temporary files
do not stay. copy_checkpoint(src, dst) recovers src and runs the same steps for dst, with a hard link of each of
src's files (a copy, written like step 2, where the file system has no hard links) in place of step 2's writes.
Saves replace files by rename and never write into them, so a link keeps its content when src is saved again.

Recovery, holding the lock (run first by save_checkpoint, copy_checkpoint and load_checkpoint; recover(), which
train.py's resume=auto and load_weights use, takes the lock only when PREFIX has such files):
  * every PREFIX.tmp.* is deleted (a kill during a write leaves one partial);
  * no marker: the pending files are deleted (a save killed before its commit point); PREFIX.* is untouched, so
    it is still the previous checkpoint;
  * a marker: the new set is verified: each of its three files, at its pending name or, when an interrupted
    promotion already moved it, at its final name, has the size and sha256 the marker records, and each pending
    file loads with the safe loader (load_file). Then the promotion (step 5) is finished. A set that fails the
    check is discarded with a warning (marker first, then the pending files) and the previous checkpoint stays;
    if part of it had already been promoted no whole set is left, and that is a CheckpointError (only damage
    from outside, not a kill, gets there).
So a kill before the commit point leaves the previous checkpoint and a kill after it the new one: never a mix.
The lock (fcntl.flock, which the kernel releases when its holder dies) keeps a reader in another process, such
as eval.py during training, from recovering a save that is still running. Without fcntl (Windows), without a
writable directory (a read-only copy of a checkpoint) or on a file system without locks, all runs unlocked.

Reading (load_file) never runs code: a restricted unpickler rebuilds only numpy arrays and plain containers for
.pdparams/.pdopt/.pdstates; weights also load from .safetensors (the safetensors package) and .npz
(np.load without pickle). Checkpoint files are pickled numpy trees, byte for byte what paddle.save writes for
them, so paddle.load reads them too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import paddle
import safetensors
import safetensors.numpy

from maxvit import MaxViT, resize_relative_bias_table

try:
    import fcntl
except ImportError:  # Windows: no flock; saves and reads run unlocked
    fcntl = None

EXTS = ('.pdparams', '.pdopt', '.pdstates')  # written and promoted in this order
TMP, PENDING, MARKER = '.tmp', '.pending', '.complete'  # PREFIX.tmp.<ext>, PREFIX.pending.<ext>, the marker's ext
LOCK_FILE = '.checkpoint.lock'
PICKLE_PROTOCOL = 4  # paddle.save's: a numpy tree pickled so is byte for byte the file paddle.save writes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says which file and why."""


class FileFormatError(CheckpointError, ValueError):
    """A file that is not what it should be (damaged, another format, Python objects where arrays belong). Also a
    ValueError, which tools/convert_weights.py reports as an error line."""


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


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as uint16) -> float32: bfloat16 is the upper half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


# safetensors dtypes that numpy holds (what safetensors.numpy returns); BF16 is widened to float32 below
_SAFETENSORS_NUMPY = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'C64': np.complex64,
                      'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
                      'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_}


def read_safetensors(path) -> Dict[str, np.ndarray]:
    """A .safetensors file as {name: numpy array}, read by the safetensors package; bfloat16 becomes float32.
    A malformed file raises FileFormatError (a CheckpointError and a ValueError) naming the file."""
    path = str(path)
    try:
        with safetensors.safe_open(path, framework='numpy') as f:  # reads and validates the header only
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        other = [f'{name} ({dtype})' for name, dtype in dtypes.items()
                 if dtype != 'BF16' and dtype not in _SAFETENSORS_NUMPY]
        if other:
            raise FileFormatError(f'{path}: tensors of a type numpy cannot hold: {", ".join(other[:5])}'
                                  + (f' and {len(other) - 5} more' if len(other) > 5 else ''))
        if 'BF16' not in dtypes.values():
            return safetensors.numpy.load_file(path)
        # numpy has no bfloat16, so safetensors.numpy refuses BF16 tensors ("data type 'bfloat16' not understood")
        # and safe_open(framework='numpy') cannot return them either. safetensors.deserialize gives every tensor's
        # raw little-endian bytes: BF16 ones are widened here, the others become arrays as safetensors.numpy does.
        with open(path, 'rb') as f:
            views = safetensors.deserialize(f.read())
    except safetensors.SafetensorError as e:
        raise FileFormatError(f'{path}: not a safetensors file, or a damaged one (safetensors: {e})') from None
    out = {}
    for name, view in views:
        if view['dtype'] == 'BF16':
            out[name] = bfloat16_to_float32(np.frombuffer(view['data'], dtype='<u2')).reshape(view['shape'])
        else:
            dtype = np.dtype(_SAFETENSORS_NUMPY[view['dtype']]).newbyteorder('<')
            out[name] = np.frombuffer(view['data'], dtype=dtype).reshape(view['shape']).astype(
                dtype.newbyteorder('='))
    return out


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as e:
        if isinstance(e, ValueError) and 'pickle' in str(e):  # neither zip nor .npy: np.load would unpickle it
            raise FileFormatError(f'{path}: not a .npz archive (not a zip file; pickles are not loaded)') from None
        raise FileFormatError(f'{path}: not a readable .npz file ({type(e).__name__}: {e})') from None
    if not hasattr(archive, 'files'):
        raise FileFormatError(f'{path}: one bare array (.npy), not a .npz archive of named arrays')
    out = {}
    with archive:
        for name in archive.files:
            try:
                out[name] = archive[name]
            except unreadable as e:
                if isinstance(e, ValueError) and 'allow_pickle' in str(e):
                    raise FileFormatError(f'{path}: {name!r} is an array of Python objects, which would need '
                                          f'unpickling: a .npz weights file may only hold numeric arrays') from None
                raise FileFormatError(f'{path}: {name!r} is not readable ({type(e).__name__}: {e})') from None
    return out


def load_file(path: str):
    """Load a .pdparams/.pdopt/.pdstates (restricted unpickler), .safetensors or .npz file; arrays as numpy."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'file not found: {path}')
    if path.endswith('.safetensors'):
        return read_safetensors(path)
    if path.endswith('.npz'):
        return _read_npz(path)
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = _SafeUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise FileFormatError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from None
    if isinstance(obj, dict):
        obj.pop('StructuredToParameterName@@', None)  # paddle.save's bookkeeping, not a tensor
    return obj


def _as_dict(obj, what: str) -> Dict:
    if not isinstance(obj, dict):
        raise FileFormatError(f'{what}: holds a {type(obj).__name__}, not a dict')
    return obj


def _as_weights(obj, what: str) -> Dict[str, np.ndarray]:
    """``obj`` when it is a state dict {tensor name: array}, else a one-line FileFormatError about ``what``."""
    if not isinstance(obj, dict):
        raise FileFormatError(f'{what}: not a weights file: it holds a {type(obj).__name__}, where a dict '
                              f'{{tensor name: array}} (paddle.save(model.state_dict(), path)) is expected')
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        shown = ', '.join(f'{k!r} ({type(obj[k]).__name__})' for k in bad[:3]) + (', ...' if len(bad) > 3 else '')
        raise FileFormatError(f'{what}: not a weights file: {len(bad)} of its {len(obj)} entries are not named '
                              f'arrays: {shown}; a weights file is a dict {{tensor name: array}}')
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


class _Sink:
    """The one way checkpoint bytes reach a file: counts and hashes them for the completion marker."""

    def __init__(self, file):
        self.file, self.size, self.sha256 = file, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.file.write(data)
        self.sha256.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n


def _write_file(path: str, dump: Callable[[_Sink], object]) -> Dict:
    """Create ``path`` with what ``dump(sink)`` writes, fsync it; its marker entry {bytes, sha256}."""
    with open(path, 'wb') as f:
        sink = _Sink(f)
        dump(sink)
        f.flush()
        os.fsync(f.fileno())
    return {'bytes': sink.size, 'sha256': sink.sha256.hexdigest()}


def _pickled(tree) -> Callable[[_Sink], object]:
    return lambda sink: pickle.Pickler(sink, PICKLE_PROTOCOL).dump(tree)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: str) -> None:
    """Make the renames and deletions in ``directory`` durable (Windows cannot open a directory: a no-op there)."""
    if os.name == 'nt':
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a file system that cannot sync directories
            raise
    finally:
        os.close(fd)


_held: Dict[str, int] = {}  # lock files this process holds -> depth, so that it never waits for itself


@contextlib.contextmanager
def _dir_lock(directory: str):
    path = os.path.join(os.path.abspath(directory), LOCK_FILE)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only or missing directory: nobody saves there
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some network mounts): unlocked, as without fcntl
                os.close(fd)
                fd = None
        _held[path] = 1
        yield
    finally:
        _held.pop(path, None)
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def _locked(*prefixes: str):
    """The lock of every directory that holds one of ``prefixes``, taken in a fixed order."""
    with contextlib.ExitStack() as stack:
        for directory in sorted({os.path.abspath(os.path.dirname(p) or '.') for p in prefixes}):
            stack.enter_context(_dir_lock(directory))
        yield


def _tmp(prefix: str, ext: str) -> str:
    return prefix + TMP + ext


def _pending(prefix: str, ext: str) -> str:
    return prefix + PENDING + ext


def _directory(prefix: str) -> str:
    return os.path.dirname(prefix) or '.'


def _leftovers(prefix: str) -> List[str]:
    """Temporary, pending and marker files of PREFIX (a save that did not finish)."""
    return [p for ext in EXTS + (MARKER,) for p in (_tmp(prefix, ext), _pending(prefix, ext)) if os.path.lexists(p)]


def _check_new_set(prefix: str) -> str:
    """'' when the marker's record fits the new set (pending files, and the ones an interrupted promotion already
    moved to their final names) and every pending file loads, else what is wrong."""
    try:
        with open(_pending(prefix, MARKER), 'rb') as f:
            files = json.loads(f.read().decode('utf-8'))['files']
        record = {ext: (int(files[ext]['bytes']), str(files[ext]['sha256'])) for ext in EXTS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'unreadable marker {_pending(prefix, MARKER)} ({type(e).__name__}: {e})'
    for ext in EXTS:
        pending = os.path.lexists(_pending(prefix, ext))
        path = _pending(prefix, ext) if pending else prefix + ext
        size, digest = record[ext]
        if not os.path.isfile(path):
            return f'{path} is missing'
        if os.path.getsize(path) != size or _sha256(path) != digest:
            return f'{path} is not the file the marker records ({size} bytes, sha256 {digest[:12]}...)'
        if pending:
            try:
                load_file(path)
            except CheckpointError as e:
                return str(e)
    return ''


def _promote(prefix: str) -> None:
    """Step 5: the committed pending set becomes PREFIX.*; the marker goes last."""
    for ext in EXTS:
        pending = _pending(prefix, ext)
        if os.path.lexists(pending):
            os.replace(pending, prefix + ext)
            if os.path.lexists(pending):  # a rename between two links of one file does nothing (POSIX)
                os.unlink(pending)
    _fsync_dir(_directory(prefix))
    os.unlink(_pending(prefix, MARKER))
    _fsync_dir(_directory(prefix))


def _recover(prefix: str) -> None:
    """recover() for a caller that holds the lock."""
    directory, changed = _directory(prefix), False
    for ext in EXTS + (MARKER,):
        if os.path.lexists(_tmp(prefix, ext)):
            os.unlink(_tmp(prefix, ext))
            changed = True
    pending = [_pending(prefix, ext) for ext in EXTS if os.path.lexists(_pending(prefix, ext))]
    if os.path.lexists(_pending(prefix, MARKER)):
        problem = _check_new_set(prefix)
        if not problem:
            _promote(prefix)
            return
        if len(pending) < len(EXTS):
            raise CheckpointError(f'checkpoint {prefix} is damaged: a save was interrupted while it replaced the '
                                  f'files, and its new files do not match its marker ({problem}); neither the '
                                  f'previous nor the new checkpoint is whole')
        warnings.warn(f'{prefix}: discarding an interrupted save whose files fail the check ({problem}); the '
                      f'previous checkpoint stays')
        os.unlink(_pending(prefix, MARKER))  # first: pending files without a marker are never promoted
        _fsync_dir(directory)
    for path in pending:
        os.unlink(path)
        changed = True
    if changed:
        _fsync_dir(directory)


def recover(prefix: str) -> None:
    """Finish or undo a save that a kill interrupted (see the module docstring): afterwards PREFIX.* is one whole
    checkpoint (or absent) and no temporary, pending or marker file of PREFIX is left."""
    prefix = str(prefix)
    if _leftovers(prefix):  # nothing to do (the usual case) needs no lock, nor a lock file
        with _locked(prefix):
            _recover(prefix)


def _commit(prefix: str, files: Dict[str, Dict]) -> None:
    """Steps 3-5: the three pending files are in place; make them the checkpoint."""
    directory = _directory(prefix)
    _fsync_dir(directory)
    record = json.dumps({'format': 1, 'files': files}, indent=1).encode('utf-8')
    _write_file(_tmp(prefix, MARKER), lambda sink: sink.write(record))
    os.replace(_tmp(prefix, MARKER), _pending(prefix, MARKER))  # the commit point
    _fsync_dir(directory)
    _promote(prefix)


def save_checkpoint(prefix: str, model_state: Dict, opt_state: Dict, states: Dict) -> None:
    """Write PREFIX.pdparams (model), .pdopt (optimizer + lr schedule), .pdstates (everything else)."""
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with _locked(prefix):
        _recover(prefix)
        try:
            files = {}
            for ext, obj in zip(EXTS, (model_state, opt_state, states)):
                files[ext] = _write_file(_tmp(prefix, ext), _pickled(to_numpy_tree(obj)))
                os.replace(_tmp(prefix, ext), _pending(prefix, ext))
            _commit(prefix, files)
        except Exception:  # a full disk, ...: free the space now (a committed set is promoted instead)
            with contextlib.suppress(Exception):
                _recover(prefix)
            raise


def copy_checkpoint(src: str, dst: str) -> None:
    """dst = a copy of the complete checkpoint src, committed like a save (hard links where possible)."""
    src, dst = str(src), str(dst)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with _locked(src, dst):
        _recover(src)
        _require_whole(src)
        _recover(dst)
        try:
            files = {}
            for ext in EXTS:
                tmp = _tmp(dst, ext)
                try:
                    os.link(src + ext, tmp)
                except OSError:  # no hard links on this file system: a copy
                    with open(src + ext, 'rb') as f:
                        files[ext] = _write_file(tmp, lambda sink: shutil.copyfileobj(f, sink, 1 << 20))
                else:  # src's content is on disk since its own save; the link is made durable in _commit
                    files[ext] = {'bytes': os.path.getsize(tmp), 'sha256': _sha256(tmp)}
                os.replace(tmp, _pending(dst, ext))
            _commit(dst, files)
        except Exception:
            with contextlib.suppress(Exception):
                _recover(dst)
            raise


def _require_whole(prefix: str) -> None:
    missing = [prefix + ext for ext in EXTS if not Path(prefix + ext).is_file()]
    if missing:
        raise CheckpointError(f'checkpoint {prefix} is incomplete or missing: no {", ".join(missing)}')


def load_checkpoint(prefix: str) -> Tuple[Dict, Dict, Dict]:
    """(model state, optimizer state, states) of a complete checkpoint PREFIX.*"""
    prefix = str(prefix)
    with _locked(prefix):
        _recover(prefix)
        _require_whole(prefix)
        model, opt, states = (load_file(prefix + ext) for ext in EXTS)
    return (_as_weights(model, prefix + '.pdparams'), _as_dict(opt, prefix + '.pdopt'),
            _as_dict(states, prefix + '.pdstates'))


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
    Any other missing, unexpected or mis-shaped tensor is a CheckpointError listing each of them once."""
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
    # a key the file has but that did not fit is listed above, not again as missing
    problems += [f'missing {k}' for k in target if k not in state and k not in skipped]
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
    path = str(path)
    recover(resolve_prefix(path))  # a first save killed after its commit point has only pending files so far
    prefix = checkpoint_prefix(path)
    if prefix:
        if ema:
            saved = _as_dict(load_file(prefix + '.pdstates'), prefix + '.pdstates').get('ema')
            if not saved:
                raise CheckpointError(f'{prefix}.pdstates has no EMA weights (EMA.decay was 0): use its raw '
                                      f'weights with -o Global.eval_weights=raw')
            return (_as_weights(saved['state'], f'{prefix}.pdstates (EMA weights)'),
                    f'{prefix} (EMA weights, {saved["updates"]} updates)')
        return _as_weights(load_file(prefix + '.pdparams'), prefix + '.pdparams'), f'{prefix}.pdparams'
    if not Path(path).is_file():
        raise CheckpointError(f'weights not found: {path} (a .pdparams/.safetensors/.npz file or a checkpoint '
                              f'prefix such as output/run/best)')
    return _as_weights(load_file(path), path), path


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
    saved as float32 or float16; an AMP O2 model may hold bfloat16, which numpy has no type for). Tensors the
    state leaves out (a fresh classifier, which the caller reports) keep their values, without Paddle's
    "Skip loading" warning for each."""
    target = model.state_dict()
    loaded = {k: paddle.to_tensor(np.asarray(v)).astype(target[k].dtype) for k, v in state.items()}
    model.set_state_dict({**target, **loaded})
