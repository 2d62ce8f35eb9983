"""tools/benchmark.py: engines in their own processes timed round by round, their parity checks, the table with its
CPU header, and --json."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT, TINY
from maxvit import MaxViT
from common.cpu_info import ISA_FLAGS, cpu_header, cpu_summary
from tools.benchmark import _paddle_worker, main, parity, report, speedup

CONFIG = str(ROOT / 'configs' / 'quickstart.yaml')
MODEL = [o for o in TINY if o.startswith('Model.')]
CPU = {'cpu_model': 'X', 'cpu_cores': 2, 'cpu_flags': ['avx2'], 'cpu_flags_absent': ['amx_tile']}


def test_engines_run_side_by_side(tmp_path, capsys):
    args = ['-c', CONFIG, '--batch', '2', '--size', '32', '--engines', 'eager', 'inference-mkldnn', 'train',
            '--warmup', '1', '--rounds', '3', '--json', str(tmp_path / 'r.json')]
    for o in MODEL:
        args += ['-o', o]
    rows = main(args)
    assert [r['label'] for r in rows] == ['eager b2', 'inference-mkldnn b2', 'train b2']
    for r in rows:
        assert len(r['iterations_s']) == 3 and r['median_s'] == sorted(r['iterations_s'])[1] > 0
        assert r['max_s'] == max(r['iterations_s']) and r['images_per_sec'] == pytest.approx(2 / r['median_s'])
        assert 0.1 < r['peak_gb'] < 64 and r['device'] == 'cpu'
        assert r['vs_timm_eager'] is None and r['vs_fastest_peer'] is None  # no --timm-python
    assert rows[0]['vs_first'] == 1.0
    assert json.loads((tmp_path / 'r.json').read_text()) == rows
    eager, mkldnn, train = rows
    # inference rows against the model as built, in eager Paddle; trained-like weights give logits of a few units
    for r in (eager, mkldnn):
        assert r['parity_ref'] == 'eager Paddle' and r['parity_ok'] and r['max_abs_logit'] > 1
        assert r['max_abs_diff'] <= 1e-4 * r['max_abs_logit']
    assert train['parity_ref'] is None and mkldnn['cpu_kernels'] is None
    # eager and training rows ran after use_fast_layers: on this CPU the kernels are built and in use
    from common import cpu_kernels
    assert eager['cpu_kernels'] is train['cpu_kernels'] is cpu_kernels.load()
    lines = capsys.readouterr().out.splitlines()
    cpu = cpu_summary()
    assert lines[:2] == cpu_header(cpu) and lines[0].startswith(f"CPU: {cpu['cpu_model']}, ")
    state = 'on' if cpu_kernels.load() else 'off (not built, or MAXVIT_CPU_KERNELS=0)'
    assert lines[2] == f'MaxViT CPU kernels (eager and training rows): {state}'
    header = next(line for line in lines if line.startswith('engine'))
    assert header.split() == ['engine', 's/iter', 'max', 's', 'img/s', 'x', 'timm', 'x', 'peer', 'x', 'first',
                              'max|diff|', 'rel', 'diff', 'peak', 'GB']
    assert any(line.startswith('s/iter: the median of 3 round(s)') for line in lines)
    assert f'runtimes: paddle {paddle.__version__}; paddle {paddle.__version__} inference + oneDNN' in lines
    assert rows[0]['cpu_model'] == cpu['cpu_model'] and rows[0]['cpu_flags'] == cpu['cpu_flags']


def test_missing_package_skips_the_engine(monkeypatch, capsys):
    """An engine whose optional package is not installed is left out with the reason; nothing else changes. Without
    --size, the images are Data.img_size square."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'openvino' else
                        find_spec(name, *a))
    args = ['-c', CONFIG, '--batch', '1', '--engines', 'eager', 'openvino', '--warmup', '0', '--rounds', '1',
            '-o', 'Data.img_size=32'] + [a for o in MODEL for a in ('-o', o)]
    rows = main(args)
    assert [r['label'] for r in rows] == ['eager b1'] and rows[0]['size'] == 32
    # (paddle2onnx may be missing too, where requirements-deploy.txt is not installed: it is then named as well)
    assert any(re.match(r'skipped openvino b1: openvino(, paddle2onnx)? not installed in ', line)
               for line in capsys.readouterr().out.splitlines())


def test_train_static_engine_steps_through_to_static(monkeypatch):
    """train-static is the train engine's step through paddle.jit.to_static(full_graph=True), as train.py's
    Global.to_static (tracing itself is tested in test_to_static.py; here it is recorded, not run)."""
    wrapped, calls = [], []

    def to_static(layer, full_graph):
        wrapped.append((layer, full_graph))
        return lambda x: calls.append(x.shape) or layer(x)
    monkeypatch.setattr(paddle.jit, 'to_static', to_static)
    spec = dict(engine='train-static', config=CONFIG, overrides=MODEL, batch=2, size=32)
    step, info = _paddle_worker(spec)
    assert info['device'] == 'cpu' and math.isfinite(step()) and [full for _, full in wrapped] == [True]
    assert isinstance(wrapped[0][0], MaxViT) and wrapped[0][0].training and calls == [[2, 3, 32, 32]]


def test_parity_marks_outputs_that_differ():
    ref = np.array([[10.0, -20.0, 5.0]])
    same = parity(ref + 1e-6, ref, 'eager Paddle')
    assert same['parity_ok'] and same['max_abs_diff'] == pytest.approx(1e-6) and same['max_abs_logit'] == 20.0
    assert same['rel_diff'] == pytest.approx(5e-8)
    off = parity(ref + [[0.0, 2e-3, 0.0]], ref, 'eager Paddle')
    assert not off['parity_ok'] and off['max_abs_diff'] == pytest.approx(2e-3)
    assert off['rel_diff'] == pytest.approx(1e-4)
    small = np.array([[1e-6, -2e-6]])  # within 1e-4 absolutely, 50% off relatively
    assert not parity(small * 1.5, small, 'x')['parity_ok']
    wrong_shape = parity(np.zeros((2, 3)), ref, 'eager Paddle')
    assert not wrong_shape['parity_ok'] and wrong_shape['max_abs_diff'] is None


def test_eager_parity_fails_when_the_fast_layers_change_the_output(monkeypatch):
    """The eager row's logits are compared with the model as built: a fast-layer switch that changed the
    network shows as a marked parity, not as a faster row."""
    import common.fast_layers

    def broken(model):  # logits 10% off, as a wrong kernel would make them
        model.register_forward_post_hook(lambda layer, inputs, out: out * 1.1)
        return model
    monkeypatch.setattr(common.fast_layers, 'use_fast_layers', broken)
    _, info = _paddle_worker(dict(engine='eager', config=CONFIG, overrides=MODEL, batch=2, size=32))
    assert info['parity_ref'] == 'eager Paddle' and not info['parity_ok'] and info['rel_diff'] > 1e-2


def test_cpu_header_names_the_model_and_isa_flags():
    cpu = cpu_summary()
    assert cpu['cpu_model'] and cpu['cpu_cores'] >= 1 and set(cpu['cpu_flags']) <= set(ISA_FLAGS)
    assert not set(cpu['cpu_flags']) & set(cpu['cpu_flags_absent'])
    flags = open('/proc/cpuinfo').read() if cpu['cpu_flags'] or cpu['cpu_flags_absent'] else ''
    assert all(f' {f}' in flags for f in cpu['cpu_flags'])
    lines = cpu_header(dict(cpu, cpu_model='X', cpu_cores=2, cpu_flags=['avx2', 'avx512f'],
                            cpu_flags_absent=['amx_tile']))
    assert lines == ['CPU: X, 2 cores for this process', 'ISA: avx2 avx512f (absent: amx_tile)']
    assert cpu_header(dict(cpu, cpu_flags=[], cpu_flags_absent=[]))[1] == 'ISA: - (absent: unknown (no /proc/cpuinfo))'
    assert cpu_header() == cpu_header(cpu)


def test_imports_without_paddle():
    """timm's workers import the benchmark (and through it common.cpu_info) in a Python that has no Paddle."""
    code = 'import sys; sys.modules["paddle"] = None; import tools.benchmark as b; print(b.cpu_header()[0])'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # an import of paddle raises ImportError here
    assert out.stdout.splitlines() == [cpu_header()[0]]


def _row(label, engine, batch, seconds, **extra):
    times = extra.pop('times', [seconds])
    return dict({'label': label, 'engine': engine, 'batch': batch, 'size': 224, 'median_s': seconds,
                 'max_s': max(times), 'images_per_sec': batch / seconds, 'iterations_s': times, 'peak_gb': 1.0},
                **extra)


def test_ratios_against_timm_eager_and_the_fastest_peer():
    """The table's arithmetic on made-up rows (nothing timed): x timm is timm eager's time over the row's, x peer
    the fastest timm engine's, per batch and per kind (inference, training); a parity above 1e-4 is marked."""
    bad = {'parity_ref': 'eager Paddle', 'max_abs_diff': 1e-3, 'rel_diff': 1e-3, 'parity_ok': False}
    rows = [_row('eager b1', 'eager', 1, 0.4, cpu_kernels=True), _row('onnxruntime b1', 'onnxruntime', 1, 0.1, **bad),
            _row('timm eager b1', 'timm-eager', 1, 0.2), _row('timm compile b1', 'timm-compile', 1, 0.16),
            _row('eager b8', 'eager', 8, 2.0, cpu_kernels=True), _row('timm eager b8', 'timm-eager', 8, 1.0),
            _row('train b8', 'train', 8, 6.0, cpu_kernels=True), _row('timm train b8', 'timm-train', 8, 3.0)]
    text = report(rows, CPU, skipped=[('openvino b1', 'openvino not installed')])
    assert [r['vs_timm_eager'] for r in rows] == pytest.approx([0.5, 2.0, 1.0, 1.25, 0.5, 1.0, 0.5, 1.0])
    assert [r['vs_fastest_peer'] for r in rows] == pytest.approx([0.4, 1.6, 0.8, 1.0, 0.5, 1.0, 0.5, 1.0])
    assert [r['vs_first'] for r in rows] == pytest.approx([1.0, 4.0, 2.0, 2.5, 1.0, 2.0, 1.0, 2.0])  # per batch, kind
    assert rows[0]['fastest_peer'] == 'timm compile b1' and rows[6]['fastest_peer'] == 'timm train b8'
    lines = text.splitlines()
    assert lines[:3] == ['CPU: X, 2 cores for this process', 'ISA: avx2 (absent: amx_tile)',
                         'MaxViT CPU kernels (eager and training rows): on']
    assert 'fastest peer, infer b1: timm compile b1 (6.25 img/s)' in lines
    assert 'fastest peer, train b8: timm train b8 (2.67 img/s)' in lines
    onnx = next(line for line in lines if line.startswith('onnxruntime b1')).split()
    assert onnx[2:] == ['0.100', '0.100', '10.00', '2.00', '1.60', '4.00', '1.0e-03!', '1.0e-03', '1.00']
    assert next(line for line in lines if line.startswith('eager b1')).split()[-3:] == ['-', '-', '1.00']
    assert lines[-1] == 'skipped openvino b1: openvino not installed'
    rows[0]['cpu_kernels'] = False
    assert 'MaxViT CPU kernels (eager and training rows): on in some rows only' in report(rows, CPU)


def test_ratios_pair_the_rounds():
    """A ratio is the median over the rounds of the two rows' ratio within each round. When the machine changes
    speed (here twice as slow in rounds 1 and 2, and in round 3 between the two rows), the medians of two rows can
    fall in different states (0.1 s, fast, against 0.3 s, slow: 3x); the rounds' ratios are 1.5x but for round 3's."""
    row = {'iterations_s': [0.2, 0.2, 0.1, 0.1, 0.1]}
    ref = {'iterations_s': [0.3, 0.3, 0.3, 0.15, 0.15]}
    assert speedup(row, ref) == pytest.approx(1.5)
    assert speedup(row, row) == 1.0
    with pytest.raises(ValueError):  # rows from different runs have no rounds in common
        speedup(row, {'iterations_s': ref['iterations_s'][:4]})
