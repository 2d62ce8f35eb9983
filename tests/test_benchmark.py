"""tools/benchmark.py: side-by-side workers, the table, and the global-attention baseline of the sweep."""
import json

import numpy as np
import paddle

from conftest import ROOT, TINY
from maxvit import MaxViT, tiny_args
from tools.benchmark import main, make_global

CONFIG = str(ROOT / 'configs' / 'quickstart.yaml')
MODEL = [o for o in TINY if o.startswith('Model.')]


def test_engines_run_side_by_side(tmp_path, capsys):
    args = ['-c', CONFIG, '--batch', '2', '--size', '32', '--engines', 'eager', 'inference-mkldnn', 'train',
            '--warmup', '1', '--rounds', '2', '--json', str(tmp_path / 'r.json')]
    for o in MODEL:
        args += ['-o', o]
    rows = main(args)
    assert [r['label'] for r in rows] == ['eager b2', 'inference-mkldnn b2', 'train b2']
    for r in rows:
        assert r['iterations'] == 2 and r['median_s'] > 0 and r['peak_gb'] > 0.1
        assert abs(r['images_per_sec'] - 2 / r['median_s']) < 1e-9
    assert json.loads((tmp_path / 'r.json').read_text()) == rows
    table = capsys.readouterr().out
    assert 'inference-mkldnn b2' in table and 'x first' in table


def test_sweep_reports_growth_against_global_attention(capsys):
    args = ['-c', CONFIG, '--sweep', '32', '64', '--warmup', '0', '--rounds', '1']
    for o in MODEL:
        args += ['-o', o]
    rows = main(args)
    assert [r['label'] for r in rows] == ['MaxViT 32', 'global attention 32', 'MaxViT 64', 'global attention 64']
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ['size', 'pixels', 'x', 'MaxViT', 'x', 'global', 'x']
    assert lines[-1].split()[:2] == ['64', '4.00']


def test_global_baseline_attends_to_the_whole_stage_map():
    paddle.seed(0)
    model = MaxViT(dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1,
                        block_size=[2, 2], grid_size=[2, 2], num_classes=10))
    make_global(model, 64)  # stage maps 16, 8, 4, 2
    block = model.max_blocks[0][0].block_attn
    assert block.partition_size == [16, 16] and block.attn.relative_bias_table.shape == [31 * 31, 1]
    block.eval()
    x = paddle.randn([1, 16, 16, 16])
    y0 = block(x).numpy()
    x2 = x.numpy().copy()
    x2[0, 3, 5] += np.random.RandomState(0).randn(16)
    changed = np.abs(block(paddle.to_tensor(x2)).numpy() - y0).max(-1)[0] > 1e-7
    assert changed.all()  # every position sees the poked one: global attention
    model.eval()
    assert model(paddle.randn([1, 3, 64, 64])).shape == [1, 10]
