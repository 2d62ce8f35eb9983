"""The README's commands, run as a user runs them (fresh processes, the built-in data written on first use), say
what they do and print none of the third-party noise that common/__init__.py silences."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY
from tools.export import PADDLE2ONNX_PROGRESS

ROOT = Path(__file__).resolve().parent.parent

NOISE = ['No ccache found', 'always track global mean and variance', 'workers exit unexpectedly',
         'not support input out tensor', 'ReduceMeanCheckIfOneDNNSupport', "interface for pir graph mode",
         'Traceback', *PADDLE2ONNX_PROGRESS]


def run(*args, cwd):
    """python ARGS in cwd, a user's working directory elsewhere: the tools (python -m tools.NAME) find the
    repository through PYTHONPATH, as they would from a user's own folder."""
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert [n for n in NOISE if n in out] == [], out[-3000:]
    return out


def test_readme_commands_say_what_they_do_and_print_no_noise(tmp_path):
    # the quickstart as the README gives it, shrunk by TINY (and a few steps) to take seconds; built-in data, and
    # two data loader workers as the quickstart config has them
    small = [a for o in TINY if not o.startswith(('Data.format', 'Data.num_workers', 'Global.print_freq'))
             for a in ('-o', o)] + ['-o', 'Global.epochs=2', '-o', 'Global.max_steps_per_epoch=3']
    config = ['-c', str(ROOT / 'configs' / 'quickstart.yaml')] + small
    best = config + ['-o', 'Global.pretrained_model=output/quickstart/best']

    first = run(str(ROOT / 'train.py'), *config, cwd=tmp_path)
    assert 'train: wrote the built-in shapes dataset, 2000 PNG files (10 classes x 200), to data/shapes/train/' in first
    assert 'val: wrote the built-in shapes dataset, 500 PNG files' in first
    assert first.rstrip().splitlines()[-3].split('] ', 1)[1].startswith('next: python eval.py -c ')
    assert 'visualdl --logdir output/quickstart/vdl' in first and 'python -m tools.export -c ' in first

    evaluated = run(str(ROOT / 'eval.py'), *best, cwd=tmp_path)
    assert 'top-1' in evaluated
    assert 'val: the built-in shapes dataset in data/shapes/val/ (written before' in evaluated  # reused, not rewritten
    assert 'exported output/quickstart/best' in run('-m', 'tools.export', *best, cwd=tmp_path)
    predicted = run('-m', 'tools.predict', '--model', 'inference/quickstart', '--images',
                    'data/shapes/val/star/0000.png', cwd=tmp_path)
    assert '1 images classified with inference/quickstart' in predicted
    if importlib.util.find_spec('paddle2onnx') and importlib.util.find_spec('openvino'):  # requirements-deploy.txt
        assert '(OpenVINO ' in predicted and (tmp_path / 'inference' / 'quickstart.onnx').is_file()
    drawn = run('-m', 'tools.visualize_attention', *best, '--image', 'data/shapes/val/star/0000.png',
                '--query', '10', '10', '--out', 'attention.png', cwd=tmp_path)
    assert 'wrote attention.png' in drawn
