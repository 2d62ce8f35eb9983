"""Logging for the main process: console (with a progress bar in a terminal), OUTPUT_DIR/train.log and
VisualDL scalars under OUTPUT_DIR/vdl (`visualdl --logdir OUTPUT_DIR/vdl`). Other ranks stay silent."""
from __future__ import annotations

import contextlib
import datetime
import sys
import time
from pathlib import Path
from typing import Optional


class Logger:
    def __init__(self, output_dir: Optional[str], enabled: bool = True, use_visualdl: bool = True):
        self.enabled = enabled
        self.file = None
        self.vdl = None
        self.tty = sys.stdout.isatty()
        if enabled and output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(output_dir) / 'train.log', 'a', encoding='utf-8')
            if use_visualdl:
                from visualdl import LogWriter  # imported here: only the logging process needs it
                self.vdl = LogWriter(logdir=str(Path(output_dir) / 'vdl'))

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] {msg}'
        if self.tty:
            sys.stdout.write('\r\033[K')  # clear a progress bar
        print(line, flush=True)
        self._to_file(line)

    def _to_file(self, line: str) -> None:
        """Append to train.log; a full or vanished disk stops the file, not the run (the console still has it)."""
        if self.file:
            try:
                self.file.write(line + '\n')
                self.file.flush()
            except OSError as e:
                print(f'note: train.log can no longer be written ({e}); the log goes on here only', file=sys.stderr)
                self.file = None

    def progress(self, done: int, total: int, text: str = '') -> None:
        """A one-line bar, only when the console is a terminal (not in logs or pipes)."""
        if self.enabled and self.tty and total:
            filled = int(30 * done / total)
            sys.stdout.write(f'\r[{"#" * filled}{"." * (30 - filled)}] {done}/{total} {text}')
            sys.stdout.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled and self.vdl:
            self.vdl.add_scalar(tag=tag, value=float(value), step=int(step))

    def close(self) -> None:
        if self.vdl:
            self.vdl.close()
        if self.file:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close; an exception that ends the run leaves its 'error:' line in train.log too (the command prints it
        on the console), so the log says how the run ended."""
        if error is not None and self.enabled and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            self._to_file(f'[{time.strftime("%Y-%m-%d %H:%M:%S")}] error: {error}')
        self.close()


class StepTimer:
    """The time left in a run, from moving averages of the seconds per optimizer step and per evaluation, so the
    estimate follows the machine's current speed (a loaded machine, a slower epoch) rather than the run's mean.
    The first 10 samples are averaged plainly, later ones weigh 10%."""

    def __init__(self, steps_left: int, evals_left: int):
        self.steps_left, self.evals_left = steps_left, evals_left
        self.step_avg = self.eval_avg = None
        self.steps = self.evals = 0
        self.last = time.perf_counter()

    @staticmethod
    def _update(avg, n, value):
        return value if avg is None else avg + (value - avg) * max(0.1, 1.0 / n)

    def step(self) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.step_avg = self._update(self.step_avg, self.steps, now - self.last)
        self.steps_left, self.last = self.steps_left - 1, now

    def pause(self) -> None:
        self.paused = time.perf_counter()

    def resume(self, evaluated: bool = False) -> None:
        now = time.perf_counter()
        if evaluated:
            self.evals += 1
            self.eval_avg = self._update(self.eval_avg, self.evals, now - self.paused)
            self.evals_left -= 1
        self.last = now

    def eta(self) -> str:
        seconds = self.steps_left * (self.step_avg or 0.0) + self.evals_left * (self.eval_avg or 0.0)
        return str(datetime.timedelta(seconds=int(max(seconds, 0))))
