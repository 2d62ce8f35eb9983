"""tools/transfer_demo.py end to end at a small scale (4 letters and 4 shapes per class, 1-2 epochs per run): the
data it writes, the train.py runs it makes with what each way of learning promises in its log, the table, the reuse
of finished runs (and the refusal of another command's), the lr sweep, and the deployed accuracy through OpenVINO
where requirements-deploy.txt is installed. The demonstration's numbers are in docs/training.md, "What transfer
does"; about 30 s on 2 CPU cores."""
import importlib.util
import re

import pytest

import common.shapes
from tools import transfer_demo


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('transfer')
    argv = ['--out', str(root / 'out'), '--data', str(root / 'data'), '--labels', '2', '--seeds', '0',
            '--epochs', '2', '--pretrain-epochs', '1']
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer_demo, 'GLYPHS_PER_CLASS', {'train': 4, 'val': 2})
        mp.setattr(common.shapes, 'SHAPES_PER_CLASS', {'train': 4, 'val': 3})
        table = transfer_demo.main(argv)
    return {'root': root, 'out': root / 'out', 'table': table, 'argv': argv}


def test_the_data_and_the_few_labels(demo):
    data = demo['root'] / 'data'
    assert sorted(p.name for p in (data / 'glyphs' / 'train').iterdir()) == common.shapes.GLYPHS
    assert len(list((data / 'glyphs' / 'train').rglob('*.png'))) == 26 * 4
    few = demo['out'] / 'shapes_k2' / 'train'
    assert sorted(p.name for p in few.iterdir()) == sorted(common.shapes.SHAPES)
    for name in common.shapes.SHAPES:  # the first two files of each class of the shapes' training images
        assert sorted(p.name for p in (few / name).iterdir()) == ['0000.png', '0001.png']
        assert (few / name / '0000.png').read_bytes() == (data / 'shapes' / 'train' / name / '0000.png').read_bytes()


def test_each_way_of_learning_does_what_it_says(demo):
    out = demo['out']
    logs = {mode: (out / transfer_demo.run_name(mode, 2, 2, 0) / 'train.log').read_text()
            for mode in transfer_demo.MODES}
    assert 'initialised from' not in logs['scratch']
    for mode in ('fine-tune', 'fine-tune, layer decay 0.6', 'linear probe'):
        assert f'initialised from {out / "pretrain_e1" / "best"}' in logs[mode]
        assert 'new classifier (not loaded): proj.weight, proj.bias' in logs[mode]  # 26 letters -> 10 shapes
        assert '20 train / 30 val images, 10 classes' in logs[mode]
    assert 'layer-wise lr decay 0.6: lr x 1 for the head, x 0.6, 0.36, 0.216 for stages 3..1' in \
        logs['fine-tune, layer decay 0.6']
    assert 'trainable parameters (Global.linear_probe' in logs['linear probe']
    assert 'Global.linear_probe' not in logs['fine-tune'] and 'layer-wise' not in logs['fine-tune']


def test_the_table(demo):
    table = demo['table']
    assert (demo['out'] / 'results.md').read_text() == table + '\n'
    assert re.search(r'^pretraining: 26 letters, 104 images, 1 epochs: top-1 [\d.]+% on 52 validation letters$',
                     table, re.M), table
    assert '| labels per class | scratch | fine-tune | fine-tune, layer decay 0.6 | linear probe |' in table
    row = re.search(r'^\| 2 \(20 images\) \| (.*) \|$', table, re.M)
    assert row and all(0 <= float(cell) <= 100 for cell in row[1].split(' | ')), table
    assert 'top-1 % on the 30 validation shapes after 2 epochs' in table


def test_finished_runs_are_reused_and_others_refused(demo, capsys):
    transfer_demo.main(demo['argv'] + ['--no-deploy'])
    printed = capsys.readouterr().out
    assert printed.count('finished before, reused') == 1 + len(transfer_demo.MODES)
    assert 'train.py' not in printed  # no training ran
    record = demo['out'] / transfer_demo.run_name('scratch', 2, 2, 0) / 'command.txt'
    record.write_text(record.read_text().replace('Optimizer.lr=4e-3', 'Optimizer.lr=1e-3'))  # as another recipe
    with pytest.raises(SystemExit, match=f'{record.parent} holds a finished run of another command'):
        transfer_demo.main(demo['argv'] + ['--no-deploy'])


def test_the_deployed_accuracy(demo):
    line = next(x for x in demo['table'].splitlines() if x.startswith('deployed '))
    if any(importlib.util.find_spec(m) is None for m in ('paddle2onnx', 'openvino')):
        assert 'skipped, ' in line and 'pip install -r requirements-deploy.txt' in line
        return
    found = re.search(r'Paddle ([\d.]+)%, OpenVINO fp32 ([\d.]+)%, OpenVINO bf16 (.*)$', line)
    assert found, line
    # the same weights on the same 30 images: fp32 differs from Paddle by at most a near-tie (one image, 3.3%)
    assert abs(float(found[1]) - float(found[2])) <= 100 / 30 + 1e-9
    assert re.match(r'[\d.]+% \(\d+ of 30 predictions changed by bf16\)|not run \(error: bf16 needs a CPU', found[3])


def test_the_lr_sweep(demo, monkeypatch):
    """--sweep: each mode of SWEEP at each of its lrs, from the same pretraining, into sweep.md."""
    monkeypatch.setattr(transfer_demo, 'SWEEP', {'scratch': ([], ['1e-3', '2e-3']),
                                                 'linear probe': (['Global.linear_probe=true'], ['1e-2'])})
    table = transfer_demo.main(demo['argv'] + ['--sweep'])
    assert (demo['out'] / 'sweep.md').read_text() == table + '\n'
    lines = table.splitlines()
    assert lines[0] == 'lr sweep, 2 labels per class, seed 0, 2 epochs: top-1 % on 30 validation shapes'
    assert re.fullmatch(r'scratch: [\d.]+ at 1e-3, [\d.]+ at 2e-3', lines[1]), table
    assert re.fullmatch(r'linear probe: [\d.]+ at 1e-2', lines[2]), table
    probe = demo['out'] / ('sweep_' + transfer_demo.run_name('linear probe lr 1e-2', 2, 2, 0))
    assert 'Optimizer.lr=1e-2' in (probe / 'command.txt').read_text()
    assert 'trainable parameters (Global.linear_probe' in (probe / 'train.log').read_text()
