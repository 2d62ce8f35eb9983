"""SIGTERM and Ctrl-C end a training run normally, and one run owns its output directory: real `python train.py`
and `eval.py` processes on the tiny config, real signals, and what is on disk afterwards.

The runs start through HOOKED, which makes them slow enough to be signalled at a chosen moment and changes
nothing else: every optimizer step sleeps STEP_S seconds more (rank 1 of a launched job twice that, so that rank 0
waits for it in the all-reduce after each step) and prints 'hooked step N' once it is done, every
evaluation batch sleeps EVAL_S (the first one writes OUT/evaluating), and once the test has written
OUT/signalled, every checkpoint file written is followed by a pause of SAVE_S inside the save (announced by
OUT/saving). The resumed runs and the reference run are plain `python train.py`. Every run is a fresh process:
float sums depend on MKL's thread count, fixed when a process first multiplies (tests/test_train.py).
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.checkpoint import load_checkpoint
from conftest import ROOT, quickstart_args

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='signals, flock and /proc (Linux)')

HOOKED = '''
import os, runpy, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import paddle, common.checkpoint as ckpt, common.evaluate as ev
out, (step_s, eval_s, save_s), script = Path(sys.argv[1]), map(float, sys.argv[2:5]), sys.argv[5]
step, is_empty, write, done = paddle.optimizer.AdamW.step, ev.batch_is_empty, ckpt._write_file, [0]

def slow_step(self, *args, **kwargs):
    time.sleep(step_s * (1 + int(os.environ.get('PADDLE_TRAINER_ID', 0))))
    result = step(self, *args, **kwargs)
    done[0] += 1
    print(f'hooked step {done[0]}', flush=True)
    return result

def slow_eval_batch(labels):
    (out / 'evaluating').touch()
    time.sleep(eval_s)
    return is_empty(labels)

def paused_write(path, dump):
    entry = write(path, dump)
    if (out / 'signalled').exists():
        (out / 'saving').touch()
        time.sleep(save_s)
    return entry

paddle.optimizer.AdamW.step, ev.batch_is_empty, ckpt._write_file = slow_step, slow_eval_batch, paused_write
sys.argv = [script] + sys.argv[6:]
runpy.run_path(script, run_name='__main__')
'''
COMMON = ['Global.epochs=2']  # 7 steps of 16 images per epoch
STOP_LINE = re.compile(r'stopped by (SIG[A-Z]+) (?:at epoch (\d+) step (\d+)/7|after epoch (\d+)([^:]*)): '
                       r'(\S+)/latest holds step (\d+) of (\d+); resume: (.+)$')


class Hooked:
    """A train.py or eval.py process started through HOOKED, its console in files."""
    started = []  # what no_process_left ends after each test

    def __init__(self, shapes, out: Path, *overrides, script='train.py', step_s=0.0, eval_s=0.0, save_s=0.0,
                 new_session=False, launch=False):
        self.out, self.logs = Path(out), Path(str(out) + '_console')
        self.logs.mkdir(parents=True)
        self.out.mkdir(parents=True, exist_ok=True)
        args = quickstart_args(*shapes, out, *COMMON, *overrides)
        hooks = [str(out), str(step_s), str(eval_s), str(save_s), script]
        if launch:  # the launcher runs HOOKED as a file
            (self.logs / 'hooked.py').write_text(HOOKED)
            cmd = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
                   str(self.logs / 'launch'), str(self.logs / 'hooked.py')]
        else:
            cmd = [sys.executable, '-c', HOOKED]
        self.files = [open(self.logs / name, 'w') for name in ('stdout', 'stderr')]
        self.proc = subprocess.Popen(cmd + hooks + args, cwd=ROOT, stdout=self.files[0], stderr=self.files[1],
                                     start_new_session=new_session)
        Hooked.started.append(self)

    def wait_for(self, ready, what: str, seconds: float = 120) -> None:
        deadline = time.time() + seconds
        while not ready():
            assert self.proc.poll() is None, f'ended before {what}: {self.console()[-3000:]}'
            assert time.time() < deadline, f'no {what} in {seconds} s'
            time.sleep(0.05)

    def wait_for_log(self, text: str) -> None:
        log = self.out / 'train.log'
        self.wait_for(lambda: log.exists() and text in log.read_text(), repr(text))

    def signal(self, sig, group=False) -> float:
        """Send ``sig`` to the process (group: to its process group, as Ctrl-C in a terminal does); the time."""
        (self.out / 'signalled').touch()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        return time.time()

    def finish(self, seconds: float = 120):
        """(exit status, console output) once the process has ended."""
        self.proc.wait(seconds)
        return self.proc.returncode, self.console()

    def console(self) -> str:
        return (self.logs / 'stdout').read_text() + (self.logs / 'stderr').read_text()


@pytest.fixture(autouse=True)
def no_process_left():
    """A run that a failed test left going is killed (its trainers and workers die with it); files are closed."""
    yield
    while Hooked.started:
        run = Hooked.started.pop()
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for f in run.files:
            f.close()


def descendants(pid: int):
    """Every process below ``pid``, from /proc."""
    found, todo = [], [str(pid)]
    while todo:
        parent = todo.pop()
        for task in (os.listdir(f'/proc/{parent}/task') if os.path.isdir(f'/proc/{parent}/task') else []):
            try:
                kids = Path(f'/proc/{parent}/task/{task}/children').read_text().split()
            except OSError:
                continue
            found, todo = found + kids, todo + kids
    return found


def alive(pid: str) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def assert_gone(pids, seconds=5) -> None:
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)]


def assert_clean(text: str) -> None:
    for bad in ('Traceback', 'FatalError', 'KeyboardInterrupt', 'Termination signal'):
        assert bad not in text, text[-3000:]


def the_stop_line(console: str, out: Path):
    """The one stop line, on the console and in train.log (the same); its regex match."""
    lines = [line for line in console.splitlines() if 'stopped by SIG' in line]
    logged = [line for line in (out / 'train.log').read_text().splitlines() if 'stopped by SIG' in line]
    assert len(lines) == 1 and logged == lines, console[-3000:]
    match = STOP_LINE.search(lines[0])
    assert match and match[6] == str(out), lines[0]
    return match


def one_set(out: Path):
    """latest's (model, optimizer, states), read as resume=auto reads it; its optimizer and states are of one step."""
    model, opt, states = load_checkpoint(str(out / 'latest'))
    assert opt['LR_Scheduler']['last_epoch'] == states['step']
    return model, opt, states


def whole_checkpoint(out: Path):
    """one_set(out), after checking that no save of it was left half-done (no temporary or pending file)."""
    names = {p.name for p in out.glob('latest.*')}
    assert {'latest.pdopt', 'latest.pdparams', 'latest.pdstates'} <= names
    assert not [n for n in names if n.startswith(('latest.tmp.', 'latest.pending.'))], names
    return one_set(out)


def steps_done(console: str) -> int:
    """The optimizer steps a HOOKED run did."""
    return int(re.findall(r'^hooked step (\d+)$', console, re.M)[-1])


def resume(match, out: Path):
    """Run the stop line's resume command as it is printed (python -> this interpreter)."""
    cmd = shlex.split(match[9])
    assert cmd[:2] == ['python', 'train.py'] and cmd[-2:] == ['-o', 'Global.resume=auto']
    done = subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / 'train.log').read_text()


def assert_same_run(a: Path, b: Path) -> None:
    """Both latest checkpoints hold the same weights, EMA, step and best, bit for bit."""
    (ma, _, sa), (mb, _, sb) = load_checkpoint(str(a / 'latest')), load_checkpoint(str(b / 'latest'))
    assert sa['step'] == sb['step'] and sa['best'] == sb['best']
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    for k in sa['ema']['state']:
        np.testing.assert_array_equal(sa['ema']['state'][k], sb['ema']['state'][k], err_msg=k)


@pytest.fixture(scope='module')
def reference(shapes, tmp_path_factory):
    """The uninterrupted run (2 epochs, 14 steps): its output directory."""
    out = tmp_path_factory.mktemp('reference') / 'out'
    done = subprocess.run([sys.executable, 'train.py'] + quickstart_args(*shapes, out, *COMMON), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sigterm_mid_epoch_saves_that_step_and_the_resumed_run_ends_bit_identical(shapes, tmp_path, reference):
    out = tmp_path / 'out'
    run = Hooked(shapes, out, step_s=0.3)
    run.wait_for_log('epoch 1/2 step 2/7')
    sent = run.signal(signal.SIGTERM)
    code, console = run.finish()
    # bound: the step in progress (0.3 s slower here), the save of a tiny model, and the process's exit
    assert code == 128 + signal.SIGTERM and time.time() - sent < 10
    assert_clean(console)
    stop = the_stop_line(console, out)
    step = int(stop[3])
    assert stop[1] == 'SIGTERM' and stop[2] == '1' and 2 <= step < 7 and stop[7] == str(step) and stop[8] == '14'
    assert 'done:' not in console
    _, _, states = whole_checkpoint(out)
    assert (states['epoch'], states['epoch_step'], states['step']) == (0, step, step)  # nothing lost
    assert steps_done(console) == step  # and no step begun after it

    log = resume(stop, out)
    assert f'resumed {out}/latest: epoch 0 (+{step} steps), step {step}' in log
    assert 'resuming with changes' not in log
    assert_same_run(reference, out)


def test_ctrl_c_stops_workers_quietly_and_more_signals_during_the_save_do_not_corrupt_it(shapes, tmp_path):
    out = tmp_path / 'out'
    run = Hooked(shapes, out, 'Data.num_workers=2', step_s=0.3, save_s=0.4, new_session=True)
    run.wait_for_log('epoch 1/2 step 2/7')
    workers = descendants(run.proc.pid)
    assert len(workers) >= 2
    run.signal(signal.SIGINT, group=True)  # Ctrl-C: the whole process group, the loader workers included
    run.wait_for(lambda: (out / 'saving').exists(), 'the save after the signal')
    run.signal(signal.SIGTERM, group=True)  # inside that save (paused 4 x 0.4 s), twice more
    run.signal(signal.SIGINT, group=True)
    time.sleep(0.3)
    assert run.proc.poll() is None and all(alive(p) for p in workers)  # the workers ignored all three
    code, console = run.finish()
    assert code == 128 + signal.SIGINT  # the first signal's
    assert_clean(console)  # no KeyboardInterrupt from the workers or the trainer
    stop = the_stop_line(console, out)
    assert stop[1] == 'SIGINT' and stop[2] == '1'
    _, _, states = whole_checkpoint(out)  # the save completed, nothing left over
    assert (states['epoch'], states['epoch_step'], states['step']) == (0, int(stop[3]), int(stop[7]))
    assert_gone(workers)


def test_a_signal_during_evaluation_saves_the_epoch_and_the_resumed_run_evaluates_it_first(shapes, tmp_path,
                                                                                          reference):
    out = tmp_path / 'out'
    run = Hooked(shapes, out, eval_s=0.5)
    run.wait_for(lambda: (out / 'evaluating').exists(), 'the evaluation')
    run.signal(signal.SIGTERM)
    code, console = run.finish()
    assert code == 128 + signal.SIGTERM
    assert_clean(console)
    stop = the_stop_line(console, out)
    assert stop[4] == '1' and stop[5] == ' (its evaluation runs first on resume)' and stop[7] == '7'
    _, _, states = whole_checkpoint(out)
    assert (states['epoch'], states['epoch_step'], states['eval_pending'], states['metrics']) == (1, 0, True, {})
    assert 'eval (raw)' not in console

    log = resume(stop, out)
    resumed = log[log.index('resumed '):]
    assert resumed.index('epoch 1 eval (raw)') < resumed.index('epoch 2/2 step 1/7')
    assert_same_run(reference, out)


def test_a_signal_while_python_imports_stops_the_run_before_its_first_step(shapes, tmp_path):
    out = tmp_path / 'out'
    run = subprocess.Popen([sys.executable, 'train.py'] + quickstart_args(*shapes, out, *COMMON), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def held_back() -> bool:  # whether train.py (not the child before its exec) holds back SIGINT and SIGTERM
        status, cmdline = (Path(f'/proc/{run.pid}/{name}').read_bytes() for name in ('status', 'cmdline'))
        mask = int(re.search(rb'^SigBlk:\s*([0-9a-f]+)$', status, re.M)[1], 16)
        stop_signals = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)
        return b'train.py' in cmdline and mask == stop_signals  # (Paddle blocks all for a moment at times)
    deadline = time.time() + 30
    while not held_back():  # train.py holds them back while it imports Paddle
        assert run.poll() is None and time.time() < deadline
    os.kill(run.pid, signal.SIGINT)
    console, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGINT
    assert_clean(console)  # no KeyboardInterrupt out of an import, no C++ banner
    assert console.count('stopped by SIGINT before its first step: nothing trained yet; resume: python train.py ') == 1
    assert not (out / 'latest.pdparams').exists()


def test_eval_py_ends_on_a_signal_with_one_line(shapes, tmp_path, reference):
    run = Hooked(shapes, tmp_path / 'eval', f'Global.pretrained_model={reference}/latest', script='eval.py',
                 eval_s=0.5)
    run.wait_for(lambda: (tmp_path / 'eval' / 'evaluating').exists(), 'the evaluation')
    run.signal(signal.SIGINT)
    code, console = run.finish()
    assert code == 128 + signal.SIGINT
    assert console.count('stopped by SIGINT: the evaluation was interrupted, no result\n') == 1, console[-3000:]
    assert_clean(console)
    assert 'top-1' not in console


def test_one_run_per_output_directory_and_eval_reads_whole_checkpoints_meanwhile(shapes, tmp_path):
    out = tmp_path / 'out'
    longer = ['Global.epochs=4', 'Global.save_interval_steps=1']
    first = Hooked(shapes, out, *longer, step_s=0.3)
    first.wait_for_log('epoch 1/4 step 2/7')  # it holds the directory and saves latest after every step
    args = quickstart_args(*shapes, out, *COMMON, *longer)
    second = subprocess.Popen([sys.executable, 'train.py'] + args, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    evaluator = subprocess.Popen([sys.executable, 'eval.py'] + args + ['-o', f'Global.pretrained_model={out}/latest'],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps, deadline = set(), time.monotonic() + 60
    # read latest as resume does while it is saved, until the other two have ended and the reads have spanned saves
    # (the first run saves every 0.3 s step; the other two may end before its next save)
    while second.poll() is None or evaluator.poll() is None or (len(steps) < 3 and time.monotonic() < deadline):
        steps.add(one_set(out)[2]['step'])
        time.sleep(0.05)
    assert len(steps) >= 3  # it read across saves
    (_, stderr), (evaluated, eval_errors) = second.communicate(), evaluator.communicate()
    assert second.returncode == 1 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f'error: {out} is in use by another run: pid {first.proc.pid} on '
                             f'{socket.gethostname()} since ') and 'train.py -c' in stderr
    assert evaluator.returncode == 0 and 'top-1' in evaluated, eval_errors[-3000:]
    assert (out / 'train.log').read_text().count('processes x 1 accumulation') == 1  # the second wrote nothing
    assert first.proc.poll() is None

    first.proc.kill()  # kill -9: the kernel releases the lock, so the next run is not refused
    first.proc.wait()
    resumed = subprocess.run([sys.executable, 'train.py'] + args + ['-o', 'Global.resume=auto'], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed {out}/latest' in resumed.stdout and 'done:' in resumed.stdout


def test_two_processes_stop_at_the_same_step(shapes, tmp_path):
    out = tmp_path / 'out'
    run = Hooked(shapes, out, 'Global.epochs=4', step_s=0.3, launch=True)  # 3 steps of 2 x 16 images per epoch
    run.wait_for_log('epoch 1/4 step 2/3')
    trainers = [p for p in descendants(run.proc.pid) if 'PADDLE_TRAINER_ID=' in Path(f'/proc/{p}/environ')
                .read_text(errors='replace')]
    run.signal(signal.SIGTERM)  # to the launcher, as a scheduler does: it sends SIGTERM to each trainer
    run.finish()
    logs = {p.name: p.read_text() for p in (run.logs / 'launch').glob('workerlog.*')}
    assert set(logs) == {'workerlog.0', 'workerlog.1'}
    for text in logs.values():
        assert_clean(text)
    log = (out / 'train.log').read_text()
    lines = [line for line in log.splitlines() if 'stopped by SIG' in line]
    assert len(lines) == 1 and 'paddle.distributed.launch (its launch options) train.py' in lines[0], log[-2000:]
    match = re.search(r'holds step (\d+) of 12', lines[0])
    _, _, states = whole_checkpoint(out)
    assert states['step'] == int(match[1]) and states['plan']['world_size'] == 2
    assert [steps_done(text) for text in logs.values()] == [states['step']] * 2  # both ranks stopped there
    assert_gone(trainers)
