"""Per-class results: the confusion matrix common/evaluate.py accumulates, the per-class lines and the picture
(common/confusion.py), and eval.py printing and writing them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import train
from common import confusion
from common.checkpoint import load_checkpoint
from common.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent

# 9 images of 3 classes: (true, predicted top-1)
CASES = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (1, 2), (2, 2), (2, 2), (2, 0)]
EXPECTED = np.array([[2, 1, 0],
                     [0, 1, 2],
                     [1, 0, 2]])
NAMES = ['cat', 'dog', 'bird']


class Predicts(paddle.nn.Layer):
    """A stub classifier: an image's first pixel is the class it predicts (one-hot logits)."""
    args = {'num_classes': 3}

    def forward(self, images):
        return paddle.nn.functional.one_hot(images[:, 0, 0, 0].astype('int64'), 3) * 5.0


def batches(cases, size):
    out = []
    for start in range(0, len(cases), size):
        part = cases[start:start + size]
        images = paddle.zeros([len(part), 3, 2, 2])
        images[:, 0, 0, 0] = paddle.to_tensor([float(p) for _, p in part])
        out.append((images, paddle.to_tensor([t for t, _ in part], 'int64'), None, []))
    return out


def test_evaluate_counts_true_class_by_top1():
    metrics = evaluate(Predicts(), batches(CASES, 4))  # batches of 4, 4 and 1
    np.testing.assert_array_equal(metrics['confusion'], EXPECTED)
    assert metrics['confusion'].dtype == np.int64
    assert metrics['top1'] == pytest.approx(100 * 5 / 9) and metrics['images'] == 9


def test_per_class_top1_and_confused_pairs():
    assert confusion.per_class(EXPECTED) == [(3, pytest.approx(200 / 3)), (3, pytest.approx(100 / 3)),
                                             (3, pytest.approx(200 / 3))]
    assert confusion.confused_pairs(EXPECTED) == [(1, 2, 2, pytest.approx(200 / 3)), (0, 1, 1, pytest.approx(100 / 3)),
                                                  (2, 0, 1, pytest.approx(100 / 3))]
    # a class without images has no top-1; its row gives no pair
    m = np.array([[3, 1, 0], [0, 0, 0], [0, 2, 6]])
    assert confusion.per_class(m) == [(4, 75.0), (0, None), (8, 75.0)]
    assert confusion.confused_pairs(m, top=1) == [(2, 1, 2, 25.0)]


def test_printed_lines():
    assert confusion.report_lines(EXPECTED, NAMES, 'out/best.confusion.csv') == [
        'per-class top-1:',
        '  class  images    top-1',
        '  cat         3   66.67%',
        '  dog         3   33.33%',
        '  bird        3   66.67%',
        'most confused (true -> predicted: images, share of the true class):',
        '  dog -> bird: 2 (66.7%)',
        '  cat -> dog: 1 (33.3%)',
        '  bird -> cat: 1 (33.3%)',
        'confusion matrix: out/best.confusion.csv']
    # names missing from a file list are the indices; a perfect matrix has no pairs
    lines = confusion.report_lines(np.diag([2, 0, 1]), ['a'], 'm.csv')
    assert lines[2:5] == ['  a           2  100.00%', '  1           0        -', '  2           1  100.00%']
    assert lines[5] == 'most confused: none (every image was classified correctly)'
    assert confusion.report_lines(np.eye(101, dtype=np.int64), [], 'm.csv') == [
        '101 classes: no per-class table above 100; the confusion matrix is in m.csv']


def test_csv_round_trip(tmp_path):
    confusion.write_csv(str(tmp_path / 'm.csv'), EXPECTED, ['cat', 'dog, spotted', 'bird'])
    assert (tmp_path / 'm.csv').read_text().splitlines()[:2] == ['true \\ predicted,cat,"dog, spotted",bird',
                                                                 'cat,2,1,0']
    matrix, names = confusion.read_csv(str(tmp_path / 'm.csv'))
    np.testing.assert_array_equal(matrix, EXPECTED)
    assert names == ['cat', 'dog, spotted', 'bird']


def cell_colour(img, at, i, j):
    """The colour of cell (i, j) at its centre, and whether the whole cell has that one colour."""
    box = (at.left + j * at.cell, at.top + i * at.cell, at.left + (j + 1) * at.cell, at.top + (i + 1) * at.cell)
    colours = img.crop(box).getcolors()
    return img.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)), len(colours) == 1


def test_picture_diagonal_is_dark_and_the_rest_white():
    names = [f'class {i}' for i in range(6)]
    img = confusion.picture(np.diag([5, 3, 1, 7, 2, 4]), names)
    at = confusion.layout(6, names)
    assert (img.width, img.height) == (at.width, at.height) and at.cell == 32 and at.names_shown
    for i in range(6):
        for j in range(6):
            rgb, uniform = cell_colour(img, at, i, j)
            assert uniform, (i, j)
            assert rgb == ((8, 48, 107) if i == j else (255, 255, 255)), (i, j, rgb)


def test_picture_cell_has_the_colour_of_its_share():
    img = confusion.picture(EXPECTED, NAMES)
    at = confusion.layout(3, NAMES)
    for i in range(3):
        for j in range(3):
            rgb, uniform = cell_colour(img, at, i, j)
            assert uniform and rgb == confusion.colour(EXPECTED[i, j] / 3), (i, j, rgb)
    assert confusion.colour(1 / 3) == (173, 186, 206) and confusion.colour(2 / 3) == (90, 117, 156)
    # the scale: dark at its top (100%), white at its bottom (0%), a middle shade half-way
    assert img.getpixel((at.bar_x + 8, at.top)) == (8, 48, 107)
    assert img.getpixel((at.bar_x + 8, at.top + at.bar_height - 1)) == (255, 255, 255)
    assert img.getpixel((at.bar_x + 8, at.top + (at.bar_height - 1) // 2)) == confusion.colour(
        1 - ((at.bar_height - 1) // 2) / (at.bar_height - 1))
    # class names are drawn left of the rows: dark pixels there, none in a plain margin row
    label = np.asarray(img.crop((0, at.top, at.left - 2, at.top + at.cell)).convert('L'))
    assert label.min() < 100


def test_picture_grey_row_without_images_and_one_pixel_cells():
    m = np.array([[1, 0], [0, 0]])
    img = confusion.picture(m, ['a', 'b'])
    at = confusion.layout(2, ['a', 'b'])
    assert cell_colour(img, at, 1, 0)[0] == cell_colour(img, at, 1, 1)[0] == confusion.EMPTY_ROW
    big = np.eye(1000, dtype=np.int64)
    at = confusion.layout(1000, [str(i) for i in range(1000)])
    assert at.cell == 1 and not at.names_shown
    img = confusion.picture(big, [])
    assert img.getpixel((at.left + 500, at.top + 500)) == (8, 48, 107)
    assert img.getpixel((at.left + 501, at.top + 500)) == (255, 255, 255)


def test_eval_py_prints_per_class_table_and_writes_the_matrix(train_args, tmp_path):
    train.main(train_args('Global.epochs=1'))
    ckpt = tmp_path / 'out' / 'latest'
    run = subprocess.run([sys.executable, str(ROOT / 'eval.py'), *train_args(f'Global.pretrained_model={ckpt}')],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    start = lines.index('per-class top-1:')
    assert lines[start - 1].startswith(f'{ckpt} (EMA weights')
    rows = [line.split() for line in lines[start + 2:start + 12]]
    assert [r[0] for r in rows] == ['arrow', 'circle', 'crescent', 'cross', 'diamond', 'hexagon', 'ring', 'square',
                                    'star', 'triangle']
    assert all(r[1] == '4' for r in rows)  # 4 validation images per class
    matrix, names = confusion.read_csv(str(ckpt) + '.confusion.csv')
    assert matrix.sum() == 40 and names[0] == 'arrow'
    top1 = float(lines[start - 1].split('top-1 ')[1].split('%')[0])
    assert 100 * np.trace(matrix) / 40 == pytest.approx(top1, abs=0.01)
    for (name, n, pct), i in zip(rows, range(10)):
        assert float(pct.rstrip('%')) == pytest.approx(100 * matrix[i, i] / 4, abs=0.01)
    assert lines[-1] == f'confusion matrix: {ckpt}.confusion.csv, {ckpt}.confusion.png'
    img = Image.open(str(ckpt) + '.confusion.png')
    at = confusion.layout(10, names)
    assert img.size == (at.width, at.height)
    assert cell_colour(img.convert('RGB'), at, 0, 0)[0] == confusion.colour(matrix[0, 0] / 4)
    # --out elsewhere; an unwritable folder is one error line before any evaluation
    run = subprocess.run([sys.executable, str(ROOT / 'eval.py'), *train_args(f'Global.pretrained_model={ckpt}'),
                          '--out', '/proc/nowhere/cm'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(
        'error: cannot make the folder /proc/nowhere for the confusion matrix')


def test_two_processes_reduce_the_matrix(two_process_run):
    """train.py's evaluation with 2 processes: the matrix in the checkpoint counts every image once."""
    _, _, states = load_checkpoint(str(two_process_run['out'] / 'latest'))
    m = states['metrics']['raw']
    assert m['confusion'].shape == (10, 10) and m['confusion'].sum() == m['images']
    assert 100 * np.trace(m['confusion']) / m['images'] == pytest.approx(m['top1'])


def test_log_confusion_writes_the_picture_to_visualdl(tmp_path):
    import io
    from visualdl import LogReader
    from common.logger import Logger
    with Logger(str(tmp_path), use_visualdl=True) as log:
        confusion.log_confusion(log, 'eval_ema/confusion', EXPECTED, NAMES, 3)
    with Logger(str(tmp_path / 'off'), use_visualdl=False) as log:
        confusion.log_confusion(log, 'eval_ema/confusion', EXPECTED, NAMES, 3)  # no VisualDL writer: nothing
    [record] = LogReader(file_path=str(next((tmp_path / 'vdl').iterdir()))).get_data('image', 'eval_ema/confusion')
    assert record.id == 3
    logged = Image.open(io.BytesIO(record.image.encoded_image_string)).convert('RGB')
    np.testing.assert_array_equal(np.asarray(logged), np.asarray(confusion.picture(EXPECTED, NAMES)))
    assert not (tmp_path / 'off' / 'vdl').exists()


def test_training_writes_each_evaluations_confusion_picture_to_visualdl(train_args, tmp_path):
    """train.py: after each evaluation, the picture of that epoch's matrix (raw and EMA weights) in VisualDL, and the
    matrix in the checkpoint's metrics."""
    import io
    from visualdl import LogReader
    out = train.main(train_args('Global.epochs=1', 'Global.max_steps_per_epoch=2', 'Global.use_visualdl=true'))
    names = load_checkpoint(str(tmp_path / 'out' / 'latest'))[2]['class_names']
    reader = LogReader(file_path=str(next((tmp_path / 'out' / 'vdl').iterdir())))
    for kind in ('raw', 'ema'):
        [record] = reader.get_data('image', f'eval_{kind}/confusion')
        matrix = out['metrics'][kind]['confusion']
        assert record.id == 1 and matrix.sum() == out['metrics'][kind]['images'] == 40
        logged = Image.open(io.BytesIO(record.image.encoded_image_string)).convert('RGB')
        np.testing.assert_array_equal(np.asarray(logged), np.asarray(confusion.picture(matrix, names)))
