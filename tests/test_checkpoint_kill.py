"""A kill -9 at any moment of a save, a copy or a recovery leaves one whole checkpoint: the previous set or the new
one, bit for bit, with the record of its files' sha256, never a mix; and the next save works.

Real processes die: a child forked from this process (paddle is already imported, so a child costs milliseconds)
runs save_checkpoint / copy_checkpoint / recover with hooks (``install``) that SIGKILL it at a chosen byte offset
of a file it writes, or right after a chosen file-system step (rename, unlink, fsync of a file, fsync of the
directory). The parent then reads the checkpoint as resume=auto and eval.py do (load_checkpoint,
load_weights; both recover first), compares it with the two candidate sets and saves the next one. Kill points
come from a recorded run of the same operation (``record``), so the campaign is deterministic: no sleeps, no
timing. One more kill uses a fresh interpreter (subprocess) that imports only common.checkpoint.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest

import common.checkpoint as ckpt
from common.checkpoint import copy_checkpoint, load_checkpoint, load_weights, recover, save_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, 'fork'), reason='forks children and SIGKILLs them (POSIX)')
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ sets
def version_set(v: int):
    """A checkpoint whose three files all carry version ``v``. Arrays above pickle's 64 KiB frame make each file
    several writes; the file sizes do not depend on v (< 256), so recorded byte offsets fit every version."""
    assert 0 <= v < 256
    rng = np.random.default_rng(v)
    model = {'stem.weight': rng.standard_normal(20000).astype('float32'), 'stem.bias': np.full(3, v, 'float32'),
             'head.weight': rng.standard_normal(30000).astype('float32'), 'version': np.array(v)}
    opt = {'stem.weight@moment1': rng.standard_normal(25000), 'LR_Scheduler': {'last_epoch': v, 'last_lr': v / 7},
           'version': v}
    states = {'version': v, 'epoch': v, 'best': {'metric': v / 10, 'epoch': v}, 'class_names': ['a', 'b'],
              'ema': {'state': {'stem.weight': rng.standard_normal(17000).astype('float32')}, 'updates': v}}
    return model, opt, states


def same(a, b) -> bool:
    """Bit-identical trees: same keys and types, arrays with the same dtype, shape and bytes."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def whole_version(prefix: str, reader: str = 'load_checkpoint') -> int:
    """The version of the whole set at ``prefix``, read as resume (load_checkpoint) or eval.py (load_weights,
    then the rest) would; fails unless every file belongs to one set, bit for bit, and no leftover remains."""
    if reader == 'load_weights':
        weights, _ = load_weights(prefix)
    got = load_checkpoint(prefix)
    v = got[2]['version']
    assert same(got, version_set(v)), f'{prefix} is not exactly version {v}: a mixed or damaged set'
    if reader == 'load_weights':
        assert same(weights, version_set(v)[0])
    names = {p.name for p in Path(prefix).parent.iterdir() if p.name.startswith(Path(prefix).name + '.')}
    assert names == {Path(prefix).name + ext for ext in ckpt.EXTS + (ckpt.RECORD,)}, f'left over: {sorted(names)}'
    return v


# ------------------------------------------------------------------------------------------------ kill hooks
def install(events: list, sizes: list, kill=None, stop=None) -> None:
    """Hook the file-system steps of common.checkpoint in THIS process (a child about to die): each step is
    appended to ``events``, each written file's byte count kept in ``sizes``. ``kill`` = ('step', n): SIGKILL
    right after step n returns; ('byte', i, offset): SIGKILL once the i-th written file holds ``offset`` bytes
    (flushed, so exactly those bytes are in the file). ``stop`` = n: SIGSTOP after step n (the parent resumes it)."""
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    depth = [0]  # an fsync inside _fsync_dir is part of that step, not another

    def step(kind, real):
        def hooked(*args):
            if depth[0]:
                return real(*args)
            depth[0] += 1
            try:
                result = real(*args)
            finally:
                depth[0] -= 1
            events.append([kind] + [os.path.basename(a) for a in args if isinstance(a, str) and kind != 'fsync_dir'])
            if kill == ('step', len(events) - 1):
                die()
            if stop == len(events) - 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            return result
        return hooked

    for name in ('replace', 'unlink', 'fsync'):
        setattr(os, name, step(name, getattr(os, name)))
    ckpt._fsync_dir = step('fsync_dir', ckpt._fsync_dir)

    class KillingSink(ckpt._Sink):
        def __init__(self, file):
            super().__init__(file)
            self.index = len(sizes)
            sizes.append(0)

        def write(self, data):
            data = memoryview(data).cast('B')
            if kill is not None and kill[:2] == ('byte', self.index) and kill[2] - self.size < len(data):
                self.file.write(data[:kill[2] - self.size])
                self.file.flush()
                die()
            n = super().write(data)
            sizes[self.index] = self.size
            if kill == ('byte', self.index, self.size):
                self.file.flush()
                die()
            return n
    ckpt._Sink = KillingSink


def in_child(operation, kill=None, stop=None, log=None, wait=True):
    """Fork; the child installs the hooks and runs ``operation()``. Returns the child's pid when not ``wait``,
    else whether SIGKILL ended it (a child that finishes exits 0; one that raises, 70)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            events, sizes = [], []
            install(events, sizes, kill, stop)
            operation()
            if log:
                Path(log).write_text(json.dumps({'events': events, 'sizes': sizes}))
        except BaseException:
            traceback.print_exc()
            code = 70
        os._exit(code)
    if not wait:
        return pid
    _, status = os.waitpid(pid, 0)
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 70), 'the child raised (see captured stderr)'
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def record(operation, tmp_path):
    """The steps and written file sizes of ``operation`` run to the end in a child (nothing killed)."""
    log = tmp_path / 'record.json'
    assert not in_child(operation, log=str(log))
    out = json.loads(log.read_text())
    log.unlink()
    return [tuple(e) for e in out['events']], out['sizes']


def byte_offsets(size: int, n: int):
    """n offsets spread over a file of ``size`` bytes: nothing written, 1 byte, ..., all but 1, all (not fsynced)."""
    inner = [size * k // (n - 3) for k in range(1, n - 3)]
    return sorted({0, 1, *inner, size - 1, size})


# ------------------------------------------------------------------------------------------------ campaigns
def test_kills_during_saves_never_lose_the_checkpoint(tmp_path):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    steps, sizes = record(lambda: save_checkpoint(prefix, *version_set(2)), tmp_path)
    v = whole_version(prefix)
    assert v == 2 and len(sizes) == 4  # .pdparams, .pdopt, .pdstates, the marker
    # the protocol of the module docstring, step by step
    assert [s[0] for s in steps] == ['fsync', 'replace'] * 3 + ['fsync_dir', 'fsync', 'replace', 'fsync_dir'] + \
        ['replace'] * 3 + ['fsync_dir', 'replace', 'fsync_dir']
    assert steps[1] == ('replace', 'latest.tmp.pdparams', 'latest.pending.pdparams')
    commit = steps.index(('replace', 'latest.tmp.complete', 'latest.pending.complete'))
    assert steps[-3:] == [('fsync_dir',), ('replace', 'latest.pending.complete', 'latest.sha256.json'), ('fsync_dir',)]

    kills = [('byte', i, off) for i, size in enumerate(sizes) for off in byte_offsets(size, 10 if i < 3 else 5)]
    kills += [('step', n) for n in range(len(steps))]
    assert len(kills) >= 50
    outcomes = {'old': 0, 'new': 0}
    for k, kill in enumerate(kills):
        new = v + 1
        assert in_child(lambda: save_checkpoint(prefix, *version_set(new)), kill), f'{kill}: the child was not killed'
        want = new if kill[0] == 'step' and kill[1] >= commit else v
        got = whole_version(prefix, reader=('load_checkpoint', 'load_weights')[k % 2])
        assert got == want, f'kill at {kill}: found version {got}, expected {want}'
        outcomes['new' if got == new else 'old'] += 1
        v = new + 1  # resume: the next save works and is whole
        save_checkpoint(prefix, *version_set(v))
        assert whole_version(prefix) == v
    print(f'{len(kills)} kills during saves: {outcomes}, 0 lost checkpoints')
    assert outcomes['new'] == len(steps) - commit


def test_kills_during_copies_never_lose_either_checkpoint(tmp_path):
    src, dst = str(tmp_path / 'latest'), str(tmp_path / 'best')
    save_checkpoint(dst, *version_set(1))
    save_checkpoint(src, *version_set(2))
    steps, sizes = record(lambda: copy_checkpoint(src, dst), tmp_path)
    assert whole_version(dst) == 2 and whole_version(src) == 2
    # the copy is written as a save writes: three files of its own, then the marker
    assert [s[0] for s in steps[:6]] == ['fsync', 'replace'] * 3 and len(sizes) == 4
    commit = steps.index(('replace', 'best.tmp.complete', 'best.pending.complete'))

    def copy():
        copy_checkpoint(src, dst)

    kills = [('step', n) for n in range(len(steps))]
    kills += [('byte', i, off) for i, size in enumerate(sizes) for off in byte_offsets(size, 5 if i < 3 else 4)]
    v = 2
    for kill in kills:
        save_checkpoint(dst, *version_set(v + 1))  # best is an older set than latest
        save_checkpoint(src, *version_set(v + 2))
        assert in_child(copy, kill), f'{kill}: the child was not killed'
        want = v + 2 if kill[0] == 'step' and kill[1] >= commit else v + 1
        assert whole_version(dst) == want, f'kill at {kill}'
        assert whole_version(src) == v + 2  # the source is never touched
        copy_checkpoint(src, dst)
        assert whole_version(dst) == v + 2
        v += 2
    print(f'{len(kills)} kills during copies, 0 lost checkpoints')


def test_kills_during_recovery_never_lose_the_checkpoint(tmp_path):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    steps, _ = record(lambda: save_checkpoint(prefix, *version_set(2)), tmp_path)
    commit = steps.index(('replace', 'latest.tmp.complete', 'latest.pending.complete'))
    before_marker = steps.index(('replace', 'latest.tmp.pdopt', 'latest.pending.pdopt'))
    # a committed save that was not promoted: recovery promotes it ...
    assert in_child(lambda: save_checkpoint(prefix, *version_set(3)), ('step', commit))
    rec_steps, _ = record(lambda: recover(prefix), tmp_path)
    assert whole_version(prefix) == 3
    assert rec_steps == [('replace', 'latest.pending' + ext, 'latest' + ext) for ext in ckpt.EXTS] + \
        [('fsync_dir',), ('replace', 'latest.pending.complete', 'latest.sha256.json'), ('fsync_dir',)]
    kills, v = 1, 3
    for n in range(len(rec_steps)):  # ... and a kill inside that recovery leaves it to the next one
        assert in_child(lambda: save_checkpoint(prefix, *version_set(v + 1)), ('step', commit))
        assert in_child(lambda: recover(prefix), ('step', n))
        kills += 2
        assert whole_version(prefix) == v + 1
        v += 1
    # an uncommitted save is undone (its tmp and pending files deleted); a kill half-way leaves the rest to the
    # next recovery
    for kill, undo in ((('byte', 2, 5000), 3), (('step', before_marker), 2)):
        for n in range(undo):  # undo: the unlinks of the leftovers that kill leaves
            assert in_child(lambda: save_checkpoint(prefix, *version_set(v + 1)), kill)
            assert in_child(lambda: recover(prefix), ('step', n))
            kills += 2
            assert whole_version(prefix) == v
    save_checkpoint(prefix, *version_set(v + 1))
    assert whole_version(prefix) == v + 1
    print(f'{kills} kills around recoveries, 0 lost checkpoints')


def test_a_reader_waits_for_a_save_in_progress(tmp_path):
    """eval.py reading latest while train.py saves it: the reader must neither promote nor discard the
    writer's files. The writer is stopped half-way (SIGSTOP, after its pending files, before its marker)."""
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    pid = in_child(lambda: save_checkpoint(prefix, *version_set(2)), stop=6, wait=False)  # 6: the first fsync_dir
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    assert all(Path(prefix + '.pending' + ext).exists() for ext in ckpt.EXTS)
    with open(tmp_path / ckpt.LOCK_FILE) as f:  # the writer holds the directory's lock
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = {}
    reader = threading.Thread(target=lambda: result.update(v=load_checkpoint(prefix)[2]['version']))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not result  # blocked on the lock (it would otherwise have read version 1)
    os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # the save finished: nobody took its files
    reader.join()
    assert result == {'v': 2} and whole_version(prefix) == 2


def test_a_fresh_interpreter_killed_mid_write(tmp_path):
    """The same kill without fork: a new python process that imports only common.checkpoint."""
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    script = textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        import common.checkpoint as ckpt
        from test_checkpoint_kill import install, version_set
        install([], [], kill=('byte', 1, 100000))  # inside the .pdopt, past its first array
        ckpt.save_checkpoint({prefix!r}, *version_set(2))
    ''')
    proc = subprocess.run([sys.executable, '-c', script], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Path(prefix + '.pending.pdparams').exists() and Path(prefix + '.tmp.pdopt').stat().st_size == 100000
    assert whole_version(prefix) == 1
    save_checkpoint(prefix, *version_set(3))
    assert whole_version(prefix) == 3
