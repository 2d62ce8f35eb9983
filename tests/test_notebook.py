"""notebooks/maxvit_walkthrough.ipynb runs top to bottom in a fresh kernel, as a user runs it, started from
notebooks/, with its data and checkpoints in a temporary folder (MAXVIT_WORKDIR). The notebook file itself is never
written. Its parameters cell is set to a run of 8 optimizer steps, as a tool like papermill would: the default run
(6 epochs, about 80 s; the notebook states what it reached) is a measurement, not a test, and training that learns
is tested in tests/test_train.py. Needs nbclient and ipykernel (requirements-dev.txt); about 20 s on 2 CPU cores."""
import json
import re
import time
from pathlib import Path

import pytest

try:
    import nbclient
    import nbformat
except ImportError as e:  # only a missing nbclient skips; a missing kernel is a failure
    pytest.skip(f'the notebook test needs nbclient (pip install nbclient ipykernel): {e}', allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / 'notebooks' / 'maxvit_walkthrough.ipynb'


def text_of(cell) -> str:
    """Everything a code cell showed: streams, results and display data as text."""
    parts = []
    for out in cell.get('outputs', []):
        if out['output_type'] == 'stream':
            parts.append(out['text'])
        elif out['output_type'] in ('execute_result', 'display_data'):
            parts.append(out['data'].get('text/plain', ''))
    return ''.join(parts)


def cell_with(nb, source_fragment):
    cells = [c for c in nb.cells if c.cell_type == 'code' and source_fragment in c.source]
    assert len(cells) == 1, f'expected one code cell containing {source_fragment!r}'
    return cells[0]


# The parameters cell as the notebook ships it, and as this test runs it.
DEFAULT_PARAMETERS = ['EPOCHS = 6 ', 'MAX_STEPS = None ', "OVERRIDES = ['Optimizer.warmup_steps=62']",
                      'CHECKPOINT = None ']
TEST_PARAMETERS = "EPOCHS = 1\nMAX_STEPS = 8\nOVERRIDES = ['Optimizer.warmup_steps=4']\nCHECKPOINT = None\n"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    before = NOTEBOOK.read_bytes()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters = cell_with(nb, 'EPOCHS = ')
    assert all(line in parameters.source for line in DEFAULT_PARAMETERS), parameters.source
    parameters.source = TEST_PARAMETERS
    monkeypatch.setenv('MAXVIT_WORKDIR', str(tmp_path))
    start = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                            resources={'metadata': {'path': str(ROOT / 'notebooks')}}).execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, tmp_path / 'executed.ipynb')  # for a look after a failure; the original is untouched
    assert NOTEBOOK.read_bytes() == before
    print(f'notebook executed in {seconds:.1f} s')

    # the article's steps
    assert '[2, 1000]' in text_of(cell_with(nb, 'paddle.zeros([2, 3, 224, 224])'))
    summary = text_of(cell_with(nb, 'paddle.summary('))
    assert 'Total params: 31,001,840' in summary
    assert re.search(r"'total_params': (np\.int64\()?31001840", summary), summary[-300:]   # the returned dict

    # training wrote to the temporary folder, not into the repository
    out = tmp_path / 'output' / 'notebook'
    for name in ('best.pdparams', 'best.pdstates', 'latest.pdparams', 'config.yaml', 'train.log', 'attention.png'):
        assert (out / name).is_file(), name
    assert len(list((tmp_path / 'data' / 'shapes' / 'val').rglob('*.png'))) == 500
    log = (out / 'train.log').read_text()
    assert 'epoch 1/1 step 8/8' in log and 'epoch 1 eval (ema): top-1' in log

    # the prediction: three classes with probabilities, from the checkpoint's class names
    prediction = text_of(cell_with(nb, 'model.predict(x)'))
    assert 'true class star' in prediction and 'EMA weights' in prediction
    names = json.dumps(['arrow', 'circle', 'crescent', 'cross', 'diamond', 'hexagon', 'ring', 'square', 'star',
                        'triangle'])
    rows = [line.split() for line in prediction.splitlines() if line.strip().endswith('%')]
    assert len(rows) == 3 and all(name in names for name, _ in rows), prediction
    probabilities = [float(p.rstrip('%')) for _, p in rows]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 100.1, prediction

    # the attention picture is shown inline
    attention = cell_with(nb, 'visualize_attention.main(')
    assert any(o['output_type'] == 'execute_result' and 'image/png' in o['data'] for o in attention.outputs)
