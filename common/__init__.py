"""Shared pieces of train.py, eval.py and tools/: one job per module. This file holds one more: known third-party
noise, each piece silenced by its exact text, so that every other warning (the project's own included) shows.

Importing the package first (the scripts do, before Paddle) silences Python-level noise:
* "No ccache found ..." (Paddle, at import: ccache would only speed up recompiling C++ extensions; MaxViT's CPU
  kernels compile once per machine and Paddle version, common/cpu_kernels.py);
* "When training, we now always track global mean and variance." (Paddle's BatchNorm, every training forward);
* "Tensor do not have 'place' interface for pir graph mode" (Paddle, while paddle.jit.save traces a model);
* "DataLoader N workers exit unexpectedly" (Paddle's reader thread, at the end of an epoch whose workers had
  already finished; a worker that really fails also raises an error in the training loop, which still shows).
``native_output_filtered()`` does the same for lines that Paddle's C++ code writes straight to the process's
stdout/stderr, where no Python filter reaches.
"""
import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import warnings

warnings.filterwarnings('ignore', message=r'No ccache found', category=UserWarning)
warnings.filterwarnings('ignore', message=r'When training, we now always track global mean and variance',
                        category=UserWarning)
warnings.filterwarnings('ignore', message=r"Tensor do not have 'place' interface for pir graph mode",
                        category=UserWarning)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith('DataLoader ') and 'workers exit unexpectedly' in message)


logging.getLogger().addFilter(_KnownNoise())

# What Paddle's C++ code prints: PIR's jit.save warning (glog, stderr) and a bare line of its oneDNN passes (stdout).
NATIVE_NOISE = ('Paddle static graph(PIR) not support input out tensor', 'ReduceMeanCheckIfOneDNNSupport')


@contextlib.contextmanager
def native_output_filtered(noise=NATIVE_NOISE):
    """Run the block with file descriptors 1 and 2 captured; then write every captured line, except those that
    contain one of ``noise``, to stderr (stdout stays for a tool's results, e.g. tools/predict.py --json)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    captured = tempfile.TemporaryFile()
    try:
        for fd in (1, 2):
            os.dup2(captured.fileno(), fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers, while they still point at the capture
        except (OSError, AttributeError, TypeError):
            pass  # no C library to flush (Windows)
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        captured.seek(0)
        kept = [line for line in captured.read().decode(errors='replace').splitlines(keepends=True)
                if not any(text in line for text in noise)]
        captured.close()
        if kept:
            os.write(2, ''.join(kept).encode())
