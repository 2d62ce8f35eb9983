"""Logging for the main process: console (with a progress bar in a terminal), OUTPUT_DIR/train.log and
VisualDL scalars under OUTPUT_DIR/vdl (`visualdl --logdir OUTPUT_DIR/vdl`). Other ranks stay silent."""
from __future__ import annotations

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
        if self.file:
            self.file.write(line + '\n')
            self.file.flush()

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
            self.file.close()


def eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))
