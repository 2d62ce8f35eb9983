"""Shared fixtures: a small shapes dataset on disk and a tiny training config, so that tests run real
training on real image files in seconds."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from common.device import setup
from common.fast_layers import use_fast_layers
from common.shapes import make_dataset

# The suite runs on the CPU with eager Paddle tuned as train.py tunes it (common.device.setup). Models built here
# run Paddle's own layers unless a test calls use_fast_layers, as train.py and eval.py do (tests/test_fast_layers.py
# and tests/test_cpu_kernels.py compare the two).
setup('cpu')

ROOT = Path(__file__).resolve().parent.parent

# A tiny MaxViT and recipe on 32x32 shapes: every test that trains starts from these overrides.
TINY = [
    'Model.stage_num_block=[1, 1, 1, 1]', 'Model.stem_dim=8', 'Model.stage_dim=16', 'Model.num_heads=1',
    'Model.block_size=[2, 2]', 'Model.grid_size=[2, 2]', 'Model.drop_path=0.1',
    'Data.img_size=32', 'Data.batch_size=16', 'Data.num_workers=0', 'Data.format=folder',
    'Global.print_freq=1', 'Global.use_visualdl=false', 'Optimizer.warmup_steps=5',
    'Optimizer.base_batch_size=16', 'Optimizer.global_batch_size=null',
    # pinned here so that the tests do not move when the quickstart recipe is tuned
    'Model.mbconv_ksize=3', 'Model.mbconv_expand_rate=4', 'Model.mlp_ratio=4', 'Global.eval_freq=1',
    'Optimizer.lr=1e-3', 'Data.scale=[0.6, 1.0]', 'Data.randaugment_ops=2', 'Data.randaugment_magnitude=4',
]


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    """(train_root, val_root): 10 classes x 12 train and x 4 val rendered shapes, as PNG files."""
    root = tmp_path_factory.mktemp('shapes')
    make_dataset(str(root / 'train'), 'shapes', 12, seed=0, size=32)
    make_dataset(str(root / 'val'), 'shapes', 4, seed=1, size=32)
    return str(root / 'train'), str(root / 'val')


def quickstart_args(train_root, val_root, output, *overrides):
    """Arguments for train.main/eval.main: the quickstart config shrunk by TINY, on the given data and output."""
    args = ['-c', str(ROOT / 'configs' / 'quickstart.yaml')]
    for o in TINY + [f'Data.train_root={train_root}', f'Data.val_root={val_root}', f'Global.output_dir={output}',
                     *overrides]:
        args += ['-o', o]
    return args


@pytest.fixture
def train_args(shapes, tmp_path):
    """make(*overrides, output=None): quickstart_args on the shapes fixture, writing into tmp_path/out."""
    def make(*overrides, output=None):
        return quickstart_args(*shapes, output or tmp_path / 'out', *overrides)
    return make


def launch_two_processes(args, log_dir):
    """python -m paddle.distributed.launch --nproc_per_node 2 train.py ARGS on the CPU, which must succeed: its
    worker logs ({file name: text})."""
    result = subprocess.run([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                             '--log_dir', str(log_dir), str(ROOT / 'train.py')] + args,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text() for p in Path(log_dir).glob('workerlog.*')}
    assert result.returncode == 0, result.stderr[-2000:] + ''.join(logs.values())[-3000:]
    return logs


# One optimizer step of 64 images (16 per process x 2 processes x 2 accumulation steps) on the built-in data
TWO_PROCESS = ['Global.epochs=1', 'Optimizer.global_batch_size=64', 'Data.format=shapes',
               'Global.max_steps_per_epoch=1']


@pytest.fixture(scope='session')
def two_process_run(tmp_path_factory):
    """A 2-process CPU run of train.py on the built-in data, not written yet: rank 0 writes it while rank 1 waits
    (README: Training). {'out', 'data', 'logs'}; tests/test_recompute.py compares its own 2-process run with it."""
    root = tmp_path_factory.mktemp('two_process')
    data, out = root / 'shapes', root / 'dist'
    logs = launch_two_processes(quickstart_args(data / 'train', data / 'val', out, *TWO_PROCESS),
                                root / 'launch_log')
    return {'out': out, 'data': data, 'logs': logs}


@pytest.fixture
def copy_of(tmp_path):
    """Copy a folder into tmp_path (to damage a dataset without touching the shared one)."""
    def copy(src, name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


def step_as_built_then_fast(model, x, kernels):
    """[(logits, {name: gradient}) of one training step of ``model`` as built (Paddle's layers), the same after
    use_fast_layers(model, kernels) (in place)], with the same stochastic-depth draws."""
    results = []
    for fast in (False, True):
        if fast:
            use_fast_layers(model, kernels=kernels)
        paddle.seed(1)
        model.clear_gradients()
        logits = model(x)
        logits.sum().backward()
        results.append((logits.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()
                                           if p.grad is not None}))
    assert results[0][1].keys() == results[1][1].keys()
    return results


def assert_gradients_close(grads, reference):
    """Every gradient within 1e-3 relative, or 1e-5 of the largest gradient of all: some biases before a BatchNorm
    have a gradient of zero in exact arithmetic, so their own scale is rounding noise."""
    scale = max(np.abs(g).max() for g in reference.values())
    for key, ref in reference.items():
        np.testing.assert_allclose(grads[key], ref, rtol=1e-3, atol=1e-5 * scale, err_msg=key)
