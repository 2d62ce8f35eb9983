"""Checkpoints: PaddleClas-style PREFIX.pdparams / .pdopt / .pdstates, written so that a kill at any moment (kill -9,
an out-of-memory kill, a power cut) leaves PREFIX.* one whole checkpoint, checked against the size and sha256 its
save recorded every time it is read, and read without executing code.

Files of a checkpoint PREFIX (output/run/latest, best, epoch_N):

    PREFIX.pdparams, .pdopt, .pdstates   the checkpoint: model; optimizer + lr schedule; everything else
    PREFIX.sha256.json                   the record: JSON with the size and sha256 of each of the three files
    PREFIX.tmp.<ext>                     a file being written: never trusted, deleted by the next recovery
    PREFIX.pending.<ext>                 a complete, fsynced file of the set being saved
    PREFIX.pending.complete              the completion marker: the record of the new set. Its rename into place
                                         is the commit point of a save.
    DIR/.checkpoint.lock                 flock()ed by whoever saves, copies, recovers or loads a set in DIR

Saving (save_checkpoint), holding the lock:
  1. recover DIR (below): no temporary, pending or marker file of any checkpoint in DIR is left; then check that
     the file system has room for the new set (its size estimated from the tensors), else fail before writing;
  2. for .pdparams, .pdopt, .pdstates in turn: write PREFIX.tmp.<ext>, fsync it, rename it to PREFIX.pending.<ext>;
  3. fsync the directory, so that the three pending names are on disk before the marker can be;
  4. write the marker as PREFIX.tmp.complete, fsync it, rename it to PREFIX.pending.complete (THE COMMIT POINT),
     fsync the directory;
  5. promote: rename PREFIX.pending.<ext> over PREFIX.<ext> for the three files, fsync the directory, rename the
     marker to PREFIX.sha256.json (the record of the set now in place), fsync the directory.
A save that fails (a full disk, a read-only file system, Ctrl-C) recovers PREFIX before it re-raises, so its
temporary files do not stay; an OSError becomes one DiskError naming the folder, the space needed and the space
free. copy_checkpoint(src, dst) recovers and runs the same steps for dst, with a copy of each of src's files in
place of step 2's writes: each byte read from src is hashed and checked against src's record, so a damaged src is
an error, never a copy. Copies share no bytes with src (no hard or reflinks): damage to one file of latest stays
in latest, and best and epoch_N keep theirs.

Recovery, holding the lock (run first by save_checkpoint, copy_checkpoint, load_checkpoint and load_file for a
checkpoint's files; recover(), which train.py's resume=auto and load_weights use, takes the lock only when DIR has
such files), for each checkpoint PREFIX of DIR that has leftovers:
  * every PREFIX.tmp.* is deleted (a kill during a write leaves one partial);
  * no marker: the pending files are deleted (a save killed before its commit point); PREFIX.* is untouched, so
    it is still the previous checkpoint;
  * a marker: the new set is verified: each of its three files, at its pending name or, when an interrupted
    promotion already moved it, at its final name, has the size and sha256 the marker records, and each pending
    file loads with the safe loader. Then the promotion (step 5) is finished. A set that fails the check is
    discarded with a warning (marker first, then the pending files) and the previous checkpoint stays; if part of
    it had already been promoted no whole set is left, and that is a CheckpointError (only damage from outside,
    not a kill, gets there).
So a kill before the commit point leaves the previous checkpoint and a kill after it the new one: never a mix.
The lock (fcntl.flock, which the kernel releases when its holder dies) keeps a reader in another process, such
as eval.py during training, from recovering a save that is still running, or from reading a set half promoted.
Without fcntl (Windows), without a writable directory (a read-only copy of a checkpoint) or on a file system
without locks, all runs unlocked.

Reading (load_file) never runs code: a restricted unpickler rebuilds only numpy arrays and plain containers for
.pdparams/.pdopt/.pdstates; weights also load from .safetensors (the safetensors package) and .npz
(np.load without pickle). A file of a checkpoint is read once into memory and its size and sha256 compared with
PREFIX.sha256.json before it is unpickled: a flipped byte or a truncated file is a CheckpointError naming the file,
what the record holds and what was found, and the run's other checkpoints to use instead. A checkpoint saved before
records were kept (no PREFIX.sha256.json) loads with one warning; its next save writes one. Checkpoint files are
pickled numpy trees, byte for byte what paddle.save writes for them, so paddle.load reads them too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
RECORD = '.sha256.json'  # PREFIX.sha256.json: the promoted marker, the size and sha256 of each file of the set
LOCK_FILE = '.checkpoint.lock'
PICKLE_PROTOCOL = 4  # paddle.save's: a numpy tree pickled so is byte for byte the file paddle.save writes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says which file and why."""


class FileFormatError(CheckpointError, ValueError):
    """A file that is not what it should be (damaged, another format, Python objects where arrays belong). Also a
    ValueError, which tools/convert_weights.py reports as an error line."""


class DiskError(CheckpointError):
    """A checkpoint that cannot be written: a full disk, a read-only file system, a folder that is a file or
    not a place for files (/proc). The message names the folder, the space the save needs and the space free, and
    says whether the previous checkpoint is intact."""


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
    """Load a .pdparams/.pdopt/.pdstates (restricted unpickler), .safetensors or .npz file; arrays as numpy. A file
    of a checkpoint (one with a record, or beside a .pdparams and .pdstates) is checked against the record first."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'file not found: {path}')
    if path.endswith('.safetensors'):
        return read_safetensors(path)
    if path.endswith('.npz'):
        return _read_npz(path)
    return _unpickle(_read_checked(path), path)


def _unpickle(data: bytes, path: str):
    try:
        obj = _SafeUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise FileFormatError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from None
    if isinstance(obj, dict):
        obj.pop('StructuredToParameterName@@', None)  # paddle.save's bookkeeping, not a tensor
    return obj


# ------------------------------------------------------------------------------------------------ integrity
def _read_bytes(path: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f'file not found: {path}') from None


def _parse_record(raw: bytes) -> Dict[str, Tuple[int, str]]:
    """{ext: (bytes, sha256)} of a marker or record file's content."""
    files = json.loads(raw.decode('utf-8'))['files']
    return {ext: (int(files[ext]['bytes']), str(files[ext]['sha256'])) for ext in EXTS}


def _read_record(prefix: str) -> Optional[Dict[str, Tuple[int, str]]]:
    """PREFIX.sha256.json as {ext: (bytes, sha256)}; None when the set has none (saved by an older version)."""
    path = prefix + RECORD
    try:
        with open(path, 'rb') as f:
            return _parse_record(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path} is damaged ({type(e).__name__}: {e}), so the files of {prefix} cannot be '
                              f'checked: {_instead(prefix)}, or delete {path} to load {prefix} unchecked') from None


def _mismatch(data: bytes, expected: Tuple[int, str], record: str) -> str:
    """'' when ``data`` has the size and sha256 ``expected``, else what was expected and what was found."""
    size, digest = expected
    if len(data) != size:
        return (f'expected {size} bytes ({record}), found {len(data)}'
                + (' (truncated)' if len(data) < size else ''))
    found = hashlib.sha256(data).hexdigest()
    if found != digest:
        return (f'expected sha256 {digest[:16]}... ({record}), found {found[:16]}... (its bytes changed after it '
                f'was saved: a disk, copy or memory fault)')
    return ''


def _other_checkpoints(prefix: str) -> List[str]:
    """The other whole-looking checkpoints in PREFIX's directory: best, latest, then epoch_N newest first."""
    directory, own = os.path.dirname(prefix), os.path.basename(prefix)
    try:
        names = set(os.listdir(directory or '.'))
    except OSError:
        return []
    found = [n[:-len('.pdstates')] for n in names if n.endswith('.pdstates')]
    found = [n for n in found if n != own and n + '.pdparams' in names and not n.endswith((TMP, PENDING))]

    def order(name):
        epoch = re.fullmatch(r'epoch_(\d+)', name)
        return (0, 0, '') if name == 'best' else (1, 0, '') if name == 'latest' else \
            (2, -int(epoch.group(1)), '') if epoch else (3, 0, name)
    return [os.path.join(directory, n) for n in sorted(found, key=order)]


def _instead(prefix: str) -> str:
    others = _other_checkpoints(prefix)
    if not others:
        return f'no other checkpoint is in {_directory(prefix)} to use instead; restore it from a copy'
    return (f'use another checkpoint of the run instead (as Global.resume or Global.pretrained_model): '
            f'{", ".join(others[:6])}' + (f' and {len(others) - 6} more' if len(others) > 6 else ''))


_unchecked: set = set()  # checkpoints without a record that this process has already warned about


def _read_checked(path: str) -> bytes:
    """The bytes of ``path``; for a file of a checkpoint, checked against the set's record, under the directory's
    lock (a save holds it until its set and record are both in place), after recovering what a kill left."""
    prefix, ext = next(((path[:-len(e)], e) for e in EXTS if path.endswith(e)), (path, None))
    if ext is None or not (os.path.lexists(prefix + RECORD) or checkpoint_prefix(prefix)):
        return _read_bytes(path)  # a plain weights file (paddle.save of a state dict)
    with _locked(prefix):
        _recover_directory(prefix)
        record = _read_record(prefix)
        data = _read_bytes(path)
    if record is None:
        if os.path.abspath(prefix) not in _unchecked:
            _unchecked.add(os.path.abspath(prefix))
            warnings.warn(f'{prefix}: saved without {os.path.basename(prefix)}{RECORD} (by a version that kept no '
                          f'sha256 of its files), so loaded unchecked; its next save records one')
        return data
    problem = _mismatch(data, record[ext], prefix + RECORD)
    if problem:
        raise CheckpointError(f'{path} is damaged: {problem}; nothing of it was loaded: {_instead(prefix)}')
    return data


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


_LEFTOVER_ENDINGS = tuple(kind + ext for kind in (TMP, PENDING) for ext in EXTS + (MARKER,))


def _unfinished(directory: str) -> List[str]:
    """The prefixes of the checkpoints in ``directory`` that have temporary, pending or marker files."""
    try:
        names = os.listdir(directory)
    except OSError:  # no such directory (yet), or not one
        return []
    return sorted({os.path.join(directory, n[:-len(end)]) for n in names for end in _LEFTOVER_ENDINGS
                   if n.endswith(end) and len(n) > len(end)})


def _check_new_set(prefix: str) -> str:
    """'' when the marker's record fits the new set (pending files, and the ones an interrupted promotion already
    moved to their final names) and every pending file loads, else what is wrong."""
    marker = _pending(prefix, MARKER)
    try:
        with open(marker, 'rb') as f:
            record = _parse_record(f.read())
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'unreadable marker {marker} ({type(e).__name__}: {e})'
    for ext in EXTS:
        pending = os.path.lexists(_pending(prefix, ext))
        path = _pending(prefix, ext) if pending else prefix + ext
        if not os.path.isfile(path):
            return f'{path} is missing'
        with open(path, 'rb') as f:
            data = f.read()
        if _mismatch(data, record[ext], marker):
            size, digest = record[ext]
            return f'{path} is not the file the marker records ({size} bytes, sha256 {digest[:12]}...)'
        if pending:
            try:
                _unpickle(data, path)
            except CheckpointError as e:
                return str(e)
    return ''


def _promote(prefix: str) -> None:
    """Step 5: the committed pending set becomes PREFIX.*; the marker, last, becomes its record."""
    for ext in EXTS:
        pending = _pending(prefix, ext)
        if os.path.lexists(pending):
            os.replace(pending, prefix + ext)
            if os.path.lexists(pending):  # a rename between two links of one file does nothing (POSIX)
                os.unlink(pending)
    _fsync_dir(_directory(prefix))
    os.replace(_pending(prefix, MARKER), prefix + RECORD)
    _fsync_dir(_directory(prefix))


def _recover(prefix: str) -> None:
    """recover() of PREFIX alone, for a caller that holds the lock."""
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
                                  f'previous nor the new checkpoint is whole: {_instead(prefix)}')
        warnings.warn(f'{prefix}: discarding an interrupted save whose files fail the check ({problem}); the '
                      f'previous checkpoint stays')
        os.unlink(_pending(prefix, MARKER))  # first: pending files without a marker are never promoted
        _fsync_dir(directory)
    for path in pending:
        os.unlink(path)
        changed = True
    if changed:
        _fsync_dir(directory)


def _recover_directory(prefix: str) -> None:
    """_recover() PREFIX and every other checkpoint of its directory that a kill left unfinished (an epoch_N copy
    killed half-way, ...), for a caller that holds the directory's lock. PREFIX's own damage raises; another
    set's is a warning, so that a damaged best does not stop a save of latest. In a folder that cannot be written
    (a read-only copy of a run), what a kill left before its commit point stays, with a warning: PREFIX.* is still
    the previous checkpoint; a committed set that cannot be promoted there is a CheckpointError."""
    try:
        _recover(prefix)
    except OSError as e:
        if e.errno not in (getattr(errno, 'EROFS', None), errno.EACCES, errno.EPERM):
            raise
        if os.path.lexists(_pending(prefix, MARKER)):
            raise CheckpointError(f'{prefix}: a save was interrupted after its commit point and cannot be finished '
                                  f'in {_directory(prefix)} ({e.strerror}): make the folder writable, or copy it to '
                                  f'one that is, and load it from there') from None
        warnings.warn(f'{prefix}: the files of an interrupted save stay in {_directory(prefix)} ({e.strerror}); '
                      f'the previous checkpoint is read')
    own = os.path.abspath(prefix)
    for other in _unfinished(_directory(prefix)):
        if os.path.abspath(other) != own:
            try:
                _recover(other)
            except (CheckpointError, OSError) as e:
                warnings.warn(f'{other}: {e}')


def recover(prefix: str) -> None:
    """Finish or undo the saves that a kill interrupted in PREFIX's directory (see the module docstring):
    afterwards PREFIX.* is one whole checkpoint (or absent) and no temporary, pending or marker file of any
    checkpoint in the directory is left. train.py calls it on OUTPUT_DIR/latest at start-up."""
    prefix = str(prefix)
    if _unfinished(_directory(prefix)):  # nothing to do (the usual case) needs no lock, nor a lock file
        with _locked(prefix):
            _recover_directory(prefix)


def _commit(prefix: str, files: Dict[str, Dict]) -> None:
    """Steps 3-5: the three pending files are in place; make them the checkpoint."""
    directory = _directory(prefix)
    _fsync_dir(directory)
    record = json.dumps({'format': 1, 'files': files}, indent=1).encode('utf-8')
    _write_file(_tmp(prefix, MARKER), lambda sink: sink.write(record))
    os.replace(_tmp(prefix, MARKER), _pending(prefix, MARKER))  # the commit point
    _fsync_dir(directory)
    _promote(prefix)


# ------------------------------------------------------------------------------------------------ disk space
_BLOCK = 4096  # what a file takes on disk is rounded up to blocks
_RECORD_BYTES = 2 * _BLOCK  # the marker, then the record: about 500 bytes, one block each


def pickled_size(obj) -> int:
    """About the bytes pickle writes for ``obj`` once its tensors are numpy arrays (to_numpy_tree), from shapes
    and dtypes alone: an array's bytes plus 256 for its header (pickle's is 130-160 plus the key), a little for
    everything else. A few hundred bytes above the file per array, so that a save the check lets through fits."""
    if isinstance(obj, paddle.Tensor):
        return int(obj.size) * (4 if obj.dtype == paddle.bfloat16 else obj.element_size()) + 256
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 256
    if isinstance(obj, dict):
        return 16 + sum(pickled_size(k) + pickled_size(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return 16 + sum(pickled_size(v) for v in obj)
    if isinstance(obj, str):
        return 16 + len(obj.encode('utf-8', 'surrogatepass'))
    if isinstance(obj, bytes):
        return 16 + len(obj)
    return 256 if isinstance(obj, np.generic) else 16  # numbers, None, bools


def _on_disk(sizes) -> int:
    """The space files of these sizes take, and the set's marker and record."""
    return sum(-(-int(n) // _BLOCK) * _BLOCK for n in sizes) + _RECORD_BYTES


def _existing_dir(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _free_bytes(path: str) -> Optional[int]:
    """The bytes an ordinary user may still write on the file system of ``path`` (or of its nearest existing
    parent); None where statvfs is missing (Windows) or fails."""
    try:
        st = os.statvfs(_existing_dir(path))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _mount(path: str) -> str:
    """'<type> <mount point>' of the file system that holds ``path`` (Linux, /proc/self/mounts), else ''."""
    path, best = os.path.realpath(_existing_dir(path)), ('', '')
    try:
        with open('/proc/self/mounts', encoding='utf-8', errors='replace') as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace('\\040', ' ')
                if (path == point or path.startswith(point.rstrip('/') + '/')) and len(point) >= len(best[1]):
                    best = (fields[2], point)
    except OSError:
        return ''
    return f'{best[0]} {best[1]}' if best[1] else ''


def _mb(n: int) -> str:
    return f'{n / 1e6:.1f} MB' if n >= 100_000 else f'{n / 1e3:.0f} kB'


def _whole(prefix: str) -> bool:
    return bool(prefix) and all(os.path.isfile(prefix + ext) for ext in EXTS)


def _disk_error(action: str, prefix: str, e: OSError, needed: int, source: str = '') -> DiskError:
    """One line for an OSError of a save (or of a copy of ``source``) to PREFIX: what failed, the folder, the space
    needed and free, what to do, and what is still whole."""
    directory = _directory(prefix)
    free, mount = _free_bytes(directory), _mount(directory)
    space = ((f'needs about {_mb(needed)}, ' if needed else '')
             + (f'{_mb(free)} free' if free is not None else 'free space unknown') + (f' on {mount}' if mount else ''))
    code, where = e.errno, e.filename or directory
    blocker = next((p for p in [directory, *map(str, Path(directory).parents)]
                    if os.path.lexists(p) and not os.path.isdir(p)), None)
    if code in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)):
        why = f'not enough space in {directory} ({space}): free some, or set Global.output_dir to a disk with room'
    elif code == getattr(errno, 'EROFS', None):
        why = f'{directory} is on a read-only file system ({space}): set Global.output_dir to a writable folder'
    elif code in (errno.EACCES, errno.EPERM):
        why = (f'no permission to write in {directory} ({space}): fix its permissions or set Global.output_dir to a '
               f'folder of yours')
    elif blocker:
        why = f'{blocker} is a file, not a folder ({space}): move it away or set Global.output_dir to another path'
    else:
        why = (f'{where}: {e.strerror or e} ({space}): set Global.output_dir to a folder on an ordinary disk'
               + (' (/proc and /sys hold no files)' if mount.split(' ')[0] in ('proc', 'sysfs') else ''))
    if source:
        kept = f'{source} is intact' + (f', and so is the previous {prefix}' if _whole(prefix) else '')
    else:
        kept = 'the previous checkpoint there is intact' if _whole(prefix) else 'nothing was written'
    return DiskError(f'cannot {action}: {why}; {kept}')


class _DiskErrors:
    """``with _DiskErrors(action, prefix, needed, source):`` turns an OSError of the block into one DiskError."""

    def __init__(self, action: str, prefix: str, needed: int = 0, source: str = ''):
        self.action, self.prefix, self.needed, self.source = action, prefix, needed, source

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError):
            raise _disk_error(self.action, self.prefix, e, self.needed, self.source) from None
        return False

    def check_space(self) -> None:
        """Fail before writing when the file system has less room than the set needs."""
        free = _free_bytes(_directory(self.prefix))
        if free is not None and self.needed > free:
            raise _disk_error(self.action, self.prefix, OSError(errno.ENOSPC, 'not enough space'), self.needed,
                              self.source)


def check_output_dir(directory: str) -> int:
    """Create ``directory`` (Global.output_dir) if needed and write and delete a file in it: a DiskError naming it
    when that fails (read-only, a file, /proc, no permission, full). Returns the bytes free there."""
    directory = str(directory)
    with _DiskErrors(f'write in Global.output_dir {directory}', os.path.join(directory, '')):
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f'.write_test.{os.getpid()}')
        try:
            with open(probe, 'wb') as f:
                f.write(b'0')
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return _free_bytes(directory) or 0


# ------------------------------------------------------------------------------------------------ save, copy, load
def save_checkpoint(prefix: str, model_state: Dict, opt_state: Dict, states: Dict) -> None:
    """Write PREFIX.pdparams (model), .pdopt (optimizer + lr schedule), .pdstates (everything else) and their
    record. A full disk, a read-only or unusable folder is one DiskError; the previous checkpoint stays."""
    prefix = str(prefix)
    trees = (model_state, opt_state, states)
    with _DiskErrors(f'save checkpoint {prefix}', prefix, _on_disk(map(pickled_size, trees))) as guard:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        with _locked(prefix):
            _recover_directory(prefix)
            guard.check_space()
            try:
                files = {}
                for ext, obj in zip(EXTS, trees):
                    files[ext] = _write_file(_tmp(prefix, ext), _pickled(to_numpy_tree(obj)))
                    os.replace(_tmp(prefix, ext), _pending(prefix, ext))
                _commit(prefix, files)
            except BaseException:  # a full disk, Ctrl-C: free the space now (a committed set is promoted instead)
                with contextlib.suppress(Exception):
                    _recover(prefix)
                raise


def copy_checkpoint(src: str, dst: str) -> None:
    """dst = a copy of the complete checkpoint src, committed like a save. Every byte is read from src, checked
    against src's record and written to dst's own files: a damaged src is a CheckpointError, never a copy."""
    src, dst = str(src), str(dst)
    with _DiskErrors(f'copy checkpoint {src} to {dst}', dst, source=src) as guard:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        with _locked(src, dst):
            _recover_directory(src)
            _recover_directory(dst)
            _require_whole(src)
            record = _read_record(src)
            guard.needed = _on_disk(os.path.getsize(src + ext) for ext in EXTS)
            guard.check_space()
            try:
                files = {}
                for ext in EXTS:
                    with open(src + ext, 'rb') as f:
                        files[ext] = _write_file(_tmp(dst, ext), lambda sink: shutil.copyfileobj(f, sink, 1 << 20))
                    copied = files[ext]
                    if record and (copied['bytes'], copied['sha256']) != record[ext]:
                        size, digest = record[ext]
                        raise CheckpointError(
                            f'{src}{ext} is damaged: expected {size} bytes with sha256 {digest[:16]}... ({src}{RECORD}'
                            f'), found {copied["bytes"]} bytes with sha256 {copied["sha256"][:16]}...; not copied to '
                            f'{dst}, which is unchanged')
                    os.replace(_tmp(dst, ext), _pending(dst, ext))
                _commit(dst, files)
            except BaseException:
                with contextlib.suppress(Exception):
                    _recover(dst)
                raise


def _require_whole(prefix: str) -> None:
    missing = [prefix + ext for ext in EXTS if not Path(prefix + ext).is_file()]
    if missing:
        raise CheckpointError(f'checkpoint {prefix} is incomplete or missing: no {", ".join(missing)}')


def load_checkpoint(prefix: str) -> Tuple[Dict, Dict, Dict]:
    """(model state, optimizer state, states) of a complete checkpoint PREFIX.*, each file checked against the
    set's record (a damaged one is a CheckpointError naming it)."""
    prefix = str(prefix)
    with _locked(prefix):
        _recover_directory(prefix)
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
