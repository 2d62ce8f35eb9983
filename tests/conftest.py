"""Shared fixtures: a small shapes dataset on disk and a tiny training config, so that tests run real
training on real image files in seconds."""
import shutil
from pathlib import Path

import pytest

from common.shapes import make_shapes_dataset

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
    make_shapes_dataset(str(root / 'train'), images_per_class=12, seed=0, size=32)
    make_shapes_dataset(str(root / 'val'), images_per_class=4, seed=1, size=32)
    return str(root / 'train'), str(root / 'val')


@pytest.fixture
def train_args(shapes, tmp_path):
    """Arguments for train.main/eval.main: the quickstart config shrunk by TINY, writing into tmp_path."""
    train_root, val_root = shapes

    def make(*overrides, output=None):
        args = ['-c', str(ROOT / 'configs' / 'quickstart.yaml')]
        for o in TINY + [f'Data.train_root={train_root}', f'Data.val_root={val_root}',
                         f'Global.output_dir={output or tmp_path / "out"}'] + list(overrides):
            args += ['-o', o]
        return args
    return make


@pytest.fixture
def copy_of(tmp_path):
    """Copy a folder into tmp_path (to damage a dataset without touching the shared one)."""
    def copy(src, name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy
