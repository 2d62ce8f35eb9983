"""tools/benchmark.py: side-by-side workers, the table, and the global-attention baseline of the sweep."""
import argparse
import json
import math
import os
import shutil

import numpy as np
import paddle
import pytest

from conftest import ROOT, TINY
from maxvit import MaxViT, tiny_args
from tools.benchmark import (ISA_FLAGS, _paddle_worker, cpu_info, cpu_lines, main, make_global, report,
                             round_trip_probe)

CONFIG = str(ROOT / 'configs' / 'quickstart.yaml')
MODEL = [o for o in TINY if o.startswith('Model.')]


def test_train_static_engine_steps_through_to_static(monkeypatch):
    """train-static is the train engine's step through paddle.jit.to_static(full_graph=True), as train.py's
    Global.to_static (tracing itself is tested in test_to_static.py; here it is recorded, not run)."""
    wrapped, calls = [], []

    def to_static(layer, full_graph):
        wrapped.append((layer, full_graph))
        return lambda x: calls.append(x.shape) or layer(x)
    monkeypatch.setattr(paddle.jit, 'to_static', to_static)
    spec = dict(engine='train-static', config=CONFIG, overrides=MODEL, batch=2, size=32)
    step, device, _ = _paddle_worker(spec)
    assert device == 'cpu' and math.isfinite(step()) and [full for _, full in wrapped] == [True]
    assert isinstance(wrapped[0][0], MaxViT) and wrapped[0][0].training and calls == [[2, 3, 32, 32]]


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
        assert r['vs_timm_eager'] is None and r['vs_fastest_peer'] is None  # no --timm-python
    assert json.loads((tmp_path / 'r.json').read_text()) == rows
    eager, mkldnn, _ = rows
    assert eager['parity_ref'] is None  # the reference itself
    assert mkldnn['parity_ref'] == 'eager Paddle' and mkldnn['parity_ok'] and mkldnn['max_abs_diff'] < 1e-4
    # no pretrained weights: trained-like ones (logits of a few units; the bare initialisation gives ~2e-3)
    assert mkldnn['max_abs_logit'] > 1
    lines = capsys.readouterr().out.splitlines()
    cpu = cpu_info()
    assert lines[0].startswith(f"CPU: {cpu['cpu_model']}") and lines[1].startswith('ISA: ')
    assert set(cpu['cpu_flags']) <= set(ISA_FLAGS) and set(lines[1][5:].split(' (')[0].split()) <= set(ISA_FLAGS)
    header = next(line for line in lines if line.startswith('engine'))
    assert header.split()[:7] == ['engine', 's/iter', 'p90', 's', 'img/s', 'x', 'timm']
    assert 'x peer' in header and 'x first' in header and 'max|diff|' in header
    assert any(line.startswith('quiet iterations: ') for line in lines)
    # the workers ran setup('cpu'): the table says that eager and training rows ran MaxViT's CPU kernels
    assert [r['cpu_kernels'] for r in rows] == [True, True, True]
    assert 'MaxViT CPU kernels (eager and training rows): on' in lines
    # the core round trip before each iteration, where it can run (two CPUs and a C compiler, as in CI)
    assert all(len(r['iterations_s']) == len(r['iterations_round_trip_ns']) == 2 for r in rows)
    if round_trip_probe() is not None:
        assert all(5 < r['round_trip_ns'] < 1e5 for r in rows) and header.split()[-2:] == ['rt', 'ns']
        assert all(min(r['iterations_round_trip_ns']) <= r['round_trip_ns'] <= max(r['iterations_round_trip_ns'])
                   for r in rows)
        assert any(line.startswith('core-to-core round trip (tools/core_round_trip.c') for line in lines)


def test_round_trip_probe_times_a_cache_line_between_two_cpus():
    """tools/core_round_trip.c, built with the system compiler: a round trip between two of this process's CPUs
    takes tens to hundreds of ns on a machine like CI's (50-360 ns measured here); with one CPU there is none."""
    assert round_trip_probe({0}) is None
    probe = round_trip_probe()
    if len(os.sched_getaffinity(0)) < 2 or not (shutil.which('cc') or shutil.which('gcc')):
        assert probe is None
        return
    assert all(5 < probe() < 1e5 for _ in range(3))


def test_cpu_info_reads_model_and_isa_flags():
    cpu = cpu_info()
    assert cpu['cpu_model'] and cpu['cpu_cores'] >= 1
    assert not set(cpu['cpu_flags']) & set(cpu['cpu_flags_absent'])
    lines = cpu_lines(dict(cpu, cpu_model='X', cpu_cores=2, cpu_flags=['avx2', 'avx512f'],
                           cpu_flags_absent=['amx_tile']))
    assert lines == ['CPU: X, 2 cores for this process', 'ISA: avx2 avx512f (absent: amx_tile)']


def test_ratios_against_timm_eager_and_the_fastest_peer():
    """The table's arithmetic on made-up rows (nothing timed): x timm is timm eager's time over the row's, x peer
    the fastest timm engine's, per batch; a parity above 1e-4, absolute or relative, is marked."""
    def row(label, engine, batch, seconds, **parity):
        return dict({'label': label, 'engine': engine, 'batch': batch, 'size': 224, 'median_s': seconds,
                     'p90_s': seconds, 'images_per_sec': batch / seconds, 'quiet_iterations': 1, 'iterations': 2,
                     'peak_gb': 1.0}, **parity)
    bad = {'parity_ref': 'eager Paddle', 'max_abs_diff': 1e-3, 'rel_diff': 1e-3, 'parity_ok': False}
    rows = [row('eager b1', 'eager', 1, 0.4), row('onnxruntime b1', 'onnxruntime', 1, 0.1, **bad),
            row('timm eager b1', 'timm-eager', 1, 0.2), row('timm compile b1', 'timm-compile', 1, 0.16),
            row('eager b8', 'eager', 8, 2.0), row('timm eager b8', 'timm-eager', 8, 1.0)]
    args = argparse.Namespace(gflops=None, sweep=None, quiet=0.15)
    text = report(rows, args, cpu={'cpu_model': 'X', 'cpu_cores': 2, 'cpu_flags': ['avx2'], 'cpu_flags_absent': []})
    assert [r['vs_timm_eager'] for r in rows] == pytest.approx([0.5, 2.0, 1.0, 1.25, 0.5, 1.0])
    assert [r['vs_fastest_peer'] for r in rows] == pytest.approx([0.4, 1.6, 0.8, 1.0, 0.5, 1.0])
    assert rows[0]['fastest_peer'] == 'timm compile b1' and rows[4]['fastest_peer'] == 'timm eager b8'
    assert 'fastest peer, infer b1: timm compile b1 (6.25 img/s)' in text
    assert next(line for line in text.splitlines() if line.startswith('onnxruntime b1')).split()[8] == '1.0e-03!'
    assert 'quiet iterations: 6/12 (50%' in text
    assert 'rt ns' not in text  # no probe, no column
    rows[0]['round_trip_ns'], rows[1]['round_trip_ns'] = 51.0, 336.4
    text = report(rows, args, cpu={'cpu_model': 'X', 'cpu_cores': 2, 'cpu_flags': ['avx2'], 'cpu_flags_absent': []})
    assert ': 51-336 ns (row medians: rt ns)' in text
    assert [line.split()[-1] for line in text.splitlines() if line.startswith(('eager b1', 'onnxruntime b1',
                                                                               'eager b8'))] == ['51', '336', '-']


def test_ratios_pair_the_rounds():
    """With per-round times, a ratio is the median of the ratios within each round. When the machine changes state
    (here twice as slow in rounds 1 and 2, and in round 3 between the two rows), the medians of two rows can fall
    in different states (0.1 s, fast, against 0.3 s, slow: 3x); the rounds' ratios are 1.5x but for round 3's.
    Rounds in which either row was not quiet are left out (round 6)."""
    from tools.benchmark import speedup
    row = {'median_s': 0.1, 'iterations_s': [0.2, 0.2, 0.1, 0.1, 0.1, 0.01], 'iterations_quiet': [True] * 5 + [False]}
    ref = {'median_s': 0.3, 'iterations_s': [0.3, 0.3, 0.3, 0.15, 0.15, 1.0], 'iterations_quiet': [True] * 6}
    assert speedup(row, ref) == pytest.approx(1.5)
    assert speedup(row, dict(ref, iterations_s=ref['iterations_s'][:5])) == pytest.approx(3.0)  # unpaired: medians
    assert speedup(row, row) == 1.0


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
