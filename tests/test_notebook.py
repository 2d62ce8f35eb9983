"""notebooks/maxvit_walkthrough.ipynb runs top to bottom in a fresh kernel, as a user runs it, started from
notebooks/, with its data and checkpoints in a temporary folder (MAXVIT_WORKDIR). The notebook file itself is never
written. Its parameters cell is set to a run of 8 optimizer steps and a fine-tuning of one epoch (3 steps), as a
tool like papermill would: the default run (6 epochs, 30 to 40 s, then 15 epochs of fine-tuning, about 10 s; the
notebook states what they reached) is a measurement, not a test, and training that learns is tested in
tests/test_train.py. Needs nbclient and ipykernel (requirements-dev.txt); about 20 s on 2 CPU cores."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import nbclient
    import nbformat
except ImportError as e:  # only a missing nbclient skips; a missing kernel is a failure
    pytest.skip(f'the notebook test needs nbclient (pip install nbclient ipykernel): {e}', allow_module_level=True)

from common.checkpoint import load_file
from common.confusion import read_csv

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
                      'CHECKPOINT = None ', 'FT_EPOCHS = 15 ']
TEST_PARAMETERS = ("EPOCHS = 1\nMAX_STEPS = 8\nOVERRIDES = ['Optimizer.warmup_steps=4']\nCHECKPOINT = None\n"
                   "FT_EPOCHS = 1\n")
LETTERS = ['A', 'E', 'F', 'O', 'X']


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    before = NOTEBOOK.read_bytes()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get('outputs') or c.get('execution_count') for c in nb.cells if c.cell_type == 'code'), \
        'the notebook is stored without outputs'
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

    # 5. fine-tuning on a folder of letters: five class folders, 20 training and 10 validation images each
    letters = tmp_path / 'data' / 'letters'
    for split, count in (('train', 20), ('val', 10)):
        assert sorted(p.name for p in (letters / split).iterdir()) == LETTERS, split
        assert all(len(list((letters / split / c).glob('*.png'))) == count for c in LETTERS), split
    data = cell_with(nb, "make_dataset(LETTERS_DIR / split, 'glyphs'")
    assert 'train: A 20, E 20, F 20, O 20, X 20\nval: A 10, E 10, F 10, O 10, X 10' in text_of(data)
    assert any(o['output_type'] == 'display_data' and 'image/png' in o['data'] for o in data.outputs)

    # the classes came from the folders and the 10-way classifier of section 2's best checkpoint was replaced
    finetune = text_of(cell_with(nb, 'finetuned = train.main(args)'))
    ft = tmp_path / 'output' / 'notebook_letters'
    assert f"Model.num_classes: 5, the classes of {letters / 'train'} (auto)" in finetune, finetune
    assert '100 train / 50 val images, 5 classes' in finetune and '3 steps/epoch' in finetune
    assert f"initialised from {out / 'best'} (EMA weights" in finetune
    assert 'new classifier (not loaded): proj.weight, proj.bias' in finetune
    assert 'warmup 1 epochs = 3 steps' in finetune and 'peak 0.0005 = Optimizer.lr 0.0005' in finetune
    assert 'epoch 1/1 step 3/3' in finetune and 'epoch 1 eval (ema): top-1' in finetune
    states = load_file(str(ft / 'best.pdstates'))
    assert states['class_names'] == LETTERS and states['config']['Model']['num_classes'] == 5
    best_top1 = re.search(r'saved \S+ and best \(top-1 ([\d.]+)%, ema\)', finetune)
    assert best_top1, finetune

    # per-class evaluation of the fine-tuned best: the run's own number, a line per letter, the matrix as CSV and PNG
    evaluation = cell_with(nb, 'eval_script.main(')
    report = text_of(evaluation)
    summary = rf"best \(EMA weights, \d+ updates\): top-1 {best_top1[1]}%  top-5 [\d.]+%  .*\(50 images"
    assert re.search(summary, report), report
    rows = re.findall(r'^  ([A-Z])\s+10\s+(\d+\.\d\d)%$', report, re.M)
    assert [letter for letter, _ in rows] == LETTERS, report
    assert sum(float(top1) for _, top1 in rows) / 5 == pytest.approx(float(best_top1[1]), abs=0.01)  # 10 each
    assert 'most confused' in report and f"{ft / 'confusion'}.csv" in report
    matrix, names = read_csv(str(ft / 'confusion.csv'))
    assert names == LETTERS and matrix.shape == (5, 5) and (matrix.sum(axis=1) == 10).all()
    picture = np.asarray(Image.open(ft / 'confusion.png').convert('RGB'))
    assert picture.shape[0] > 5 * 32 and picture.shape[1] > 5 * 32, picture.shape  # 32-pixel cells, labels, scale
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 20  # the blue scale, text and cells, not a blank image
    assert any(o['output_type'] == 'execute_result' and 'image/png' in o['data'] for o in evaluation.outputs)
