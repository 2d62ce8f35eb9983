"""Shared pieces of train.py, eval.py and tools/: one job per module.

Importing this package first (the scripts do, before Paddle) silences three known lines of third-party noise,
each by its exact text, so that every other warning, the project's own included, still shows:
* "No ccache found ..." (Paddle, at import: about compiling C++ extensions, which nothing here does);
* "When training, we now always track global mean and variance." (Paddle's BatchNorm, on every training forward:
  it describes Paddle's own behaviour, which is what we want);
* "DataLoader N workers exit unexpectedly" (Paddle's reader thread, at the end of an epoch whose workers had
  already finished; a worker that really fails also raises an error in the training loop, which still shows).
"""
import logging
import warnings

warnings.filterwarnings('ignore', message=r'No ccache found', category=UserWarning)
warnings.filterwarnings('ignore', message=r'When training, we now always track global mean and variance',
                        category=UserWarning)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith('DataLoader ') and 'workers exit unexpectedly' in record.getMessage())


logging.getLogger().addFilter(_KnownNoise())
