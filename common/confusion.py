"""Per-class results from a confusion matrix (rows: true class, columns: predicted top-1, counts, as
common.evaluate.evaluate returns it under 'confusion'): per-class top-1, the most confused pairs, the lines eval.py
prints, the matrix as CSV and as a PNG heat map (Pillow only), and the same picture in VisualDL.

The picture: the matrix is row-normalised, so a cell's colour is the share of the true class's images (its row)
whose top-1 was the column's class, from white (0%) through light blue to dark blue (100%) on one linear scale
(``colour``), drawn as a colour bar with 0/25/50/75/100% beside the matrix. Each class is a square of ``cell``
pixels (32 for up to 25 classes, 800 // classes above that: one pixel per cell from 401 classes on). A
class with no validation image has a grey row (no share to show). Class names label the rows and columns when a
cell is at least as tall as a line of text (up to 66 classes), cut to 24 characters.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_LISTED = 100          # eval.py prints the per-class table up to this many classes
PAIRS = 10                # ... and this many most confused pairs
WHITE = np.array([255, 255, 255], dtype=np.float64)
DARK = np.array([8, 48, 107], dtype=np.float64)  # the dark end of ColorBrewer's Blues
EMPTY_ROW = (190, 190, 190)  # grey: a class without images (no shade of the blue scale is grey)
NAME_CHARS = 24
CAPTION = 'rows: true class, columns: predicted top-1; colour: share of the row'


def class_names_for(matrix: np.ndarray, names: Sequence[str]) -> List[str]:
    """``names`` for every row of ``matrix``; a model with more classes than names (a file list without its last
    classes) gets their indices as names."""
    names = [str(n) for n in names]
    return names + [str(i) for i in range(len(names), matrix.shape[0])]


def per_class(matrix: np.ndarray) -> List[Tuple[int, Optional[float]]]:
    """[(images, top-1 % or None when the class has no image)] for every true class (row)."""
    images = matrix.sum(axis=1)
    return [(int(n), 100.0 * matrix[i, i] / n if n else None) for i, n in enumerate(images)]


def confused_pairs(matrix: np.ndarray, top: int = PAIRS) -> List[Tuple[int, int, int, float]]:
    """The ``top`` largest off-diagonal counts: [(true, predicted, count, share of the true class's images %)],
    by count, then share, then (true, predicted); zero counts are left out."""
    images = matrix.sum(axis=1)
    pairs = [(int(t), int(p), int(matrix[t, p]), 100.0 * matrix[t, p] / images[t])
             for t, p in zip(*np.nonzero(matrix)) if t != p]
    return sorted(pairs, key=lambda x: (-x[2], -x[3], x[0], x[1]))[:top]


def report_lines(matrix: np.ndarray, names: Sequence[str], where: str) -> List[str]:
    """What eval.py prints after its summary: per-class top-1 and the most confused pairs for up to MAX_LISTED
    classes, else one line saying where the matrix is (``where``)."""
    names = class_names_for(matrix, names)
    if matrix.shape[0] > MAX_LISTED:
        return [f'{matrix.shape[0]} classes: no per-class table above {MAX_LISTED}; the confusion matrix is in {where}']
    width = max(len('class'), *(len(n) for n in names))
    lines = ['per-class top-1:', f'  {"class":<{width}}  {"images":>6}  {"top-1":>7}']
    for name, (n, top1) in zip(names, per_class(matrix)):
        lines.append(f'  {name:<{width}}  {n:>6}  ' + (f'{top1:>6.2f}%' if top1 is not None else f'{"-":>7}'))
    pairs = confused_pairs(matrix)
    lines.append('most confused (true -> predicted: images, share of the true class):' if pairs else
                 'most confused: none (every image was classified correctly)')
    for t, p, count, share in pairs:
        lines.append(f'  {names[t]} -> {names[p]}: {count} ({share:.1f}%)')
    lines.append(f'confusion matrix: {where}')
    return lines


def write_csv(path: str, matrix: np.ndarray, names: Sequence[str]) -> None:
    """The counts as CSV: a header row ``true \\ predicted,NAME0,NAME1,...``, then one row per true class, its name
    first (read back with ``read_csv``, or pandas.read_csv(path, index_col=0))."""
    names = class_names_for(matrix, names)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        out = csv.writer(f)
        out.writerow(['true \\ predicted'] + names)
        for name, row in zip(names, matrix):
            out.writerow([name] + [int(v) for v in row])


def read_csv(path: str) -> Tuple[np.ndarray, List[str]]:
    """(matrix, class names) from a file write_csv wrote."""
    with open(path, newline='', encoding='utf-8') as f:
        rows = list(csv.reader(f))
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=np.int64), rows[0][1:]


def colour(share: float) -> Tuple[int, int, int]:
    """The RGB of a row-normalised share in [0, 1]: white at 0, dark blue at 1, linear in between."""
    return tuple(int(v) for v in np.rint(WHITE + (DARK - WHITE) * float(share)))


@dataclass
class Layout:
    """Where the picture puts things: cell (i, j) covers x in [left + j*cell, left + (j+1)*cell), y likewise from
    top + i*cell; the colour bar covers x in [bar_x, bar_x + 16), y in [top, top + bar_height), 100% at its top."""
    classes: int
    cell: int
    left: int
    top: int
    bar_x: int
    bar_height: int
    width: int
    height: int
    names_shown: bool


def _font():
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def layout(classes: int, names: Sequence[str]) -> Layout:
    cell = max(1, min(32, 800 // classes))
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    font = _font()
    line = _text_size(probe, 'Ag', font)[1] + 2
    names_shown = cell >= line
    label = max(_text_size(probe, n[:NAME_CHARS], font)[0] for n in names) + 6 if names_shown else 0
    left = top = 8 + line + label  # the axis title, then the names
    side = classes * cell
    bar_height = max(side, 120)
    bar_x = left + side + 16
    width = max(bar_x + 16 + 6 + _text_size(probe, "100%", font)[0] + 8,
                16 + _text_size(probe, CAPTION + " (000000 images)", font)[0])
    height = top + bar_height + 2 * line + 8  # the caption below
    return Layout(classes, cell, left, top, bar_x, bar_height, width, height, names_shown)


def picture(matrix: np.ndarray, names: Sequence[str]) -> Image.Image:
    """The row-normalised confusion matrix as an RGB heat map (see the module docstring for what a pixel means)."""
    names = class_names_for(matrix, names)
    c = matrix.shape[0]
    at = layout(c, names)
    images = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    shares = np.divide(matrix, images, out=np.zeros(matrix.shape), where=images > 0)
    rgb = np.rint(WHITE + (DARK - WHITE) * shares[..., None])
    rgb[images[:, 0] == 0] = EMPTY_ROW
    img = Image.new('RGB', (at.width, at.height), 'white')
    cells = Image.fromarray(rgb.astype(np.uint8), 'RGB').resize((c * at.cell, c * at.cell), Image.NEAREST)
    img.paste(cells, (at.left, at.top))
    draw, font = ImageDraw.Draw(img), _font()
    side = c * at.cell
    draw.rectangle([at.left - 1, at.top - 1, at.left + side, at.top + side], outline=(120, 120, 120))
    # the scale: 100% at the top, 0% at the bottom, ticks every 25%
    for y in range(at.bar_height):
        draw.line([at.bar_x, at.top + y, at.bar_x + 15, at.top + y], fill=colour(1 - y / (at.bar_height - 1)))
    draw.rectangle([at.bar_x - 1, at.top - 1, at.bar_x + 16, at.top + at.bar_height], outline=(120, 120, 120))
    for pct in (0, 25, 50, 75, 100):
        y = at.top + round((1 - pct / 100) * (at.bar_height - 1))
        draw.line([at.bar_x + 16, y, at.bar_x + 19, y], fill='black')
        h = _text_size(draw, '0%', font)[1]
        draw.text((at.bar_x + 22, y - h // 2 - 1), f'{pct}%', fill='black', font=font)
    # axis titles and class names
    draw.text((at.left, 4), 'predicted', fill='black', font=font)
    _vertical_text(img, 'true', (4, at.top), font)
    if at.names_shown:
        for i, name in enumerate(names):
            name = name[:NAME_CHARS]
            w, h = _text_size(draw, name, font)
            y = at.top + i * at.cell + (at.cell - h) // 2 - 1
            draw.text((at.left - 4 - w, y), name, fill='black', font=font)
            _vertical_text(img, name, (at.left + i * at.cell + (at.cell - h) // 2 - 1, at.top - 7 - w), font)
    caption = f'{CAPTION} ({int(matrix.sum())} images)'
    draw.text((8, at.top + at.bar_height + 8), caption, fill='black', font=font)
    return img


def _vertical_text(img: Image.Image, text: str, xy: Tuple[int, int], font) -> None:
    """``text`` rotated to read bottom to top, its top-left corner at ``xy``."""
    probe = ImageDraw.Draw(img)
    box = probe.textbbox((0, 0), text, font=font)
    tile = Image.new('L', (box[2] + 2, box[3] + 2), 0)
    ImageDraw.Draw(tile).text((0, 0), text, fill=255, font=font)
    tile = tile.rotate(90, expand=True)
    img.paste((0, 0, 0), xy, mask=tile)


def write_picture(path: str, matrix: np.ndarray, names: Sequence[str]) -> None:
    picture(matrix, names).save(path)


def log_confusion(log, tag: str, matrix: np.ndarray, names: Sequence[str], step: int) -> None:
    """The picture as a VisualDL image ``tag`` at ``step`` through a common.logger.Logger (nothing when the Logger
    is disabled or has no VisualDL writer), e.g. after train.py's evaluation of an epoch."""
    if getattr(log, 'enabled', False) and getattr(log, 'vdl', None) is not None:
        log.vdl.add_image(tag=tag, img=np.asarray(picture(matrix, names)), step=int(step), dataformats='HWC')
