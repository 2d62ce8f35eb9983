"""Saves on a disk that cannot take them, and checkpoints damaged after their save, as a user meets them.

A full disk (a real tmpfs of a few hundred kB, mounted for the test), a read-only mount, an output path that is a
file and a path under /proc: each save fails with one DiskError that names the folder and the space needed and
free, the previous checkpoint stays whole and loadable, and no temporary or pending file is left, neither at once
nor after the next start. A byte flipped in latest after training is one `error:` line in eval.py, a resume and
tools/export.py, which name the copies to use instead, and those copies still load.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the tmpfs tests are skipped, saying so.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import common.checkpoint as ckpt
from common.checkpoint import (DiskError, check_output_dir, copy_checkpoint, load_checkpoint, recover,
                               save_checkpoint)
from test_checkpoint_kill import in_child

ROOT = Path(__file__).resolve().parent.parent
KB = 1024


def version_set(v: int, kb: int = 200):
    """A checkpoint of about 2 x ``kb`` kB whose files all carry version ``v``."""
    return ({'w': np.full(kb * KB // 4, v, 'float32')}, {'m': np.full(kb * KB // 4, -v, 'float32')},
            {'version': v, 'class_names': ['a', 'b']})


def version_of(prefix) -> int:
    model, opt, states = load_checkpoint(str(prefix))
    assert model['w'][0] == -opt['m'][0] == states['version'], f'{prefix} is a mixed set'
    return states['version']


def listing(directory) -> list:
    return sorted(p.name for p in Path(directory).iterdir())


def whole(*prefixes) -> list:
    """The names a directory of these whole checkpoints holds, and nothing else (the lock file aside)."""
    return sorted([ckpt.LOCK_FILE] + [p + ext for p in prefixes for ext in ckpt.EXTS + (ckpt.RECORD,)])


def free_bytes(directory) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, *options): a tmpfs of ``size`` mounted at tmp_path/disk (unmounted after the test)."""
    mounted = []

    def mount(size: str, *options):
        if os.geteuid() != 0:
            pytest.skip(f'mounting a small tmpfs needs root; this test runs as uid {os.geteuid()}')
        point = tmp_path / 'disk'
        point.mkdir()
        try:
            r = subprocess.run(['mount', '-t', 'tmpfs', '-o', ','.join((f'size={size}',) + options), 'tmpfs',
                                str(point)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip('no mount command here')
        if r.returncode:
            pytest.skip(f'mount -t tmpfs is not permitted here: {r.stderr.strip()}')
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(['umount', str(point)], check=True)


def remount(point, *options):
    subprocess.run(['mount', '-o', ','.join(('remount',) + options), str(point)], check=True)


# ------------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_fails_the_save_before_writing_and_keeps_the_checkpoint(small_disk):
    disk = small_disk('700k')
    prefix = str(disk / 'latest')
    save_checkpoint(prefix, *version_set(1))  # 400 kB of 700
    free = free_bytes(disk)
    assert 250 * KB < free < 400 * KB
    with pytest.raises(DiskError) as err:
        save_checkpoint(prefix, *version_set(2))
    assert str(err.value) == (f'cannot save checkpoint {prefix}: not enough space in {disk} (needs about 0.4 MB, '
                              f'{free / 1e6:.1f} MB free on tmpfs {disk}): free some, or set Global.output_dir to a '
                              f'disk with room; the previous checkpoint there is intact')
    assert free_bytes(disk) == free and listing(disk) == whole('latest')  # nothing was written
    assert version_of(prefix) == 1
    # best and epoch_N are copies now (they shared latest's bytes before): the copy is checked the same way
    with pytest.raises(DiskError, match=rf'^cannot copy checkpoint {prefix} to {disk}/best: not enough space in '
                                        rf'{disk} \(needs about 0.4 MB, 0.3 MB free on tmpfs {disk}\): .*; {prefix} '
                                        r'is intact$'):
        copy_checkpoint(prefix, str(disk / 'best'))
    assert listing(disk) == whole('latest') and version_of(prefix) == 1
    remount(disk, 'size=2m')  # space freed: the next save works
    save_checkpoint(prefix, *version_set(3))
    copy_checkpoint(prefix, str(disk / 'best'))
    assert version_of(prefix) == version_of(disk / 'best') == 3 and listing(disk) == whole('best', 'latest')
    remount(disk, 'size=1200k')  # room for latest and best, not for a third set
    with pytest.raises(DiskError, match=rf': .*; {prefix} is intact, and so is the previous {disk}/best$'):
        copy_checkpoint(prefix, str(disk / 'best'))


def test_a_disk_that_fills_during_the_save_leaves_nothing_behind(small_disk, monkeypatch):
    """The estimate can be wrong (another process writes to the disk): the write itself fails, as one error."""
    disk = small_disk('700k')
    prefix = str(disk / 'latest')
    save_checkpoint(prefix, *version_set(1))
    free = free_bytes(disk)
    monkeypatch.setattr(ckpt._DiskErrors, 'check_space', lambda self: None)  # no check before writing
    with pytest.raises(DiskError, match=rf'^cannot save checkpoint {prefix}: not enough space in {disk} \(needs '
                                        rf'about 0.4 MB, .* free on tmpfs {disk}\): .*; the previous checkpoint there '
                                        rf'is intact$'):
        save_checkpoint(prefix, *version_set(2))  # .pdparams fits, .pdopt does not
    assert listing(disk) == whole('latest') and free_bytes(disk) == free  # the partial files are gone at once
    assert version_of(prefix) == 1


# ------------------------------------------------------------------------------------------------ unwritable
def test_a_read_only_disk_fails_the_save_and_the_checkpoint_still_loads(small_disk):
    disk = small_disk('1m')
    prefix = str(disk / 'latest')
    save_checkpoint(prefix, *version_set(1))
    before = {name: (disk / name).read_bytes() for name in listing(disk)}
    remount(disk, 'ro')
    with pytest.raises(DiskError, match=rf'^cannot save checkpoint {prefix}: {disk} is on a read-only file system '
                                        rf'\(needs about 0.4 MB, .* free on tmpfs {disk}\): set Global.output_dir to a '
                                        rf'writable folder; the previous checkpoint there is intact$'):
        save_checkpoint(prefix, *version_set(2))
    with pytest.raises(DiskError, match=rf'^cannot write in Global.output_dir {disk}: {disk} is on a read-only file'):
        check_output_dir(str(disk))
    assert version_of(prefix) == 1  # read where no lock file can be taken
    assert {name: (disk / name).read_bytes() for name in listing(disk)} == before
    # a kill's leftovers in a folder that cannot be written: the checkpoint before them still loads
    remount(disk, 'rw')
    Path(prefix + '.tmp.pdopt').write_bytes(b'half a file')
    remount(disk, 'ro')
    with pytest.warns(UserWarning, match=rf'^{prefix}: the files of an interrupted save stay in {disk} \(Read-only '
                                         r'file system\); the previous checkpoint is read$'):
        assert version_of(prefix) == 1


def test_an_output_path_that_is_a_file_or_under_proc_is_one_error(tmp_path):
    (tmp_path / 'out').write_text('notes')
    prefix = str(tmp_path / 'out' / 'run' / 'latest')
    with pytest.raises(DiskError, match=rf'^cannot save checkpoint {prefix}: {tmp_path}/out is a file, not a folder '
                                        r'\(needs about 0.4 MB, .* MB free on .*\): move it away or set '
                                        r'Global.output_dir to another path; nothing was written$'):
        save_checkpoint(prefix, *version_set(1))
    with pytest.raises(DiskError, match=rf'^cannot write in Global.output_dir {tmp_path}/out: {tmp_path}/out is a '
                                        r'file, not a folder'):
        check_output_dir(str(tmp_path / 'out'))
    assert listing(tmp_path) == ['out'] and (tmp_path / 'out').read_text() == 'notes'
    if not os.path.isdir('/proc/self'):
        return
    prefix = f'/proc/maxvit-{os.getpid()}/latest'
    with pytest.raises(DiskError, match=rf'^cannot save checkpoint {prefix}: /proc/maxvit-{os.getpid()}: No such '
                                        r'file or directory \(needs about 0.4 MB, 0 kB free on proc /proc\): set '
                                        r'Global.output_dir to a folder on an ordinary disk \(/proc and /sys hold no '
                                        r'files\); nothing was written$'):
        save_checkpoint(prefix, *version_set(1))
    assert check_output_dir(str(tmp_path / 'new' / 'run')) > 0 and listing(tmp_path / 'new' / 'run') == []


# ------------------------------------------------------------------------------------------------ leftovers
def test_the_next_start_leaves_no_temporary_or_pending_file_of_any_checkpoint(tmp_path):
    """Kills inside a copy to epoch_N, a save of best and a save of latest (real SIGKILLs, tests/
    test_checkpoint_kill.py) leave files of three checkpoints; the start-up recovery (train.py: recover on
    OUTPUT_DIR/latest) clears them all, and so does a first save without it."""
    run, stash = tmp_path / 'run', tmp_path / 'stash'
    latest, best, epoch_2 = (str(run / n) for n in ('latest', 'best', 'epoch_2'))

    def killed_midway():
        """The leftovers of three kills together (each save or copy would clear the ones before it)."""
        save_checkpoint(latest, *version_set(1, 100))
        copy_checkpoint(latest, best)
        stash.mkdir()
        for operation, kill in ((lambda: copy_checkpoint(latest, epoch_2), ('byte', 1, 50_000)),  # in its .pdopt
                                (lambda: save_checkpoint(best, *version_set(2, 100)), ('byte', 2, 10)),
                                (lambda: save_checkpoint(latest, *version_set(3, 100)), ('byte', 0, 70_000))):
            assert in_child(operation, kill)
            for name in set(listing(run)) - set(whole('best', 'latest')):
                os.replace(run / name, stash / name)
        for name in listing(stash):
            os.replace(stash / name, run / name)
        stash.rmdir()
        assert set(listing(run)) - set(whole('best', 'latest')) == {
            'epoch_2.pending.pdparams', 'epoch_2.tmp.pdopt', 'best.pending.pdparams', 'best.pending.pdopt',
            'best.tmp.pdstates', 'latest.tmp.pdparams'}

    killed_midway()
    recover(latest)
    assert listing(run) == whole('best', 'latest') and version_of(latest) == version_of(best) == 1
    for path in run.iterdir():
        path.unlink()
    killed_midway()
    save_checkpoint(latest, *version_set(4, 100))
    assert listing(run) == whole('best', 'latest') and version_of(latest) == 4 and version_of(best) == 1


def test_ctrl_c_inside_a_save_leaves_no_file_behind(tmp_path):
    """A real SIGINT, sent 100 kB into the .pdopt: the save cleans up before KeyboardInterrupt ends it."""
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            real_write_file = ckpt._write_file

            def write_file(path, dump):
                def interrupted(sink):
                    write = sink.write

                    def write_then_signal(data):
                        n = write(data)
                        if sink.size > 100_000:
                            os.kill(os.getpid(), signal.SIGINT)
                        return n
                    sink.write = write_then_signal  # what the pickler writes to
                    return dump(sink)
                return real_write_file(path, interrupted if path.endswith('.tmp.pdopt') else dump)
            ckpt._write_file = write_file
            save_checkpoint(prefix, *version_set(2))
        except KeyboardInterrupt:
            code = 130
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130
    assert listing(tmp_path) == whole('latest') and version_of(prefix) == 1


# ------------------------------------------------------------------------------------------------ bit rot
def test_a_flipped_byte_is_one_error_line_in_eval_resume_and_export(train_args, tmp_path):
    import train
    out = tmp_path / 'out'
    train.main(train_args('Global.epochs=1', 'Global.max_steps_per_epoch=1', 'Global.save_epoch_freq=1',
                          'EMA.decay=0'))
    assert {'latest.sha256.json', 'best.sha256.json', 'epoch_1.sha256.json'} <= set(listing(out))
    path = out / 'latest.pdparams'
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    path.write_bytes(bytes(data))
    args = train_args('Global.eval_weights=raw')
    commands = {'eval': [sys.executable, 'eval.py', *args, '-o', f'Global.pretrained_model={out}/latest'],
                'resume': [sys.executable, 'train.py', *args, '-o', 'Global.resume=auto', '-o', 'Global.epochs=2'],
                'export': [sys.executable, '-m', 'tools.export', *args, '-o', f'Global.pretrained_model={out}/latest',
                           '--no-onnx', '--output', str(tmp_path / 'inference' / 'm')]}
    runs = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, cmd in commands.items()}
    for name, run in runs.items():
        _, err = run.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert run.returncode == 1 and 'Traceback' not in err, (name, err[-2000:])
        assert lines[-1].startswith(f'error: {path} is damaged: expected sha256 '), (name, lines[-1])
        assert lines[-1].endswith(f'use another checkpoint of the run instead (as Global.resume or '
                                  f'Global.pretrained_model): {out}/best, {out}/epoch_1'), (name, lines[-1])
    assert not (tmp_path / 'inference').exists()
    for prefix in ('best', 'epoch_1'):  # the copies have their own bytes
        model, _, states = load_checkpoint(str(out / prefix))
        assert states['epoch'] == 1 and model['proj.weight'].shape[-1] == 10
