"""The built-in datasets, rendered and written once as PNG files; the same seed writes the same files.

* shapes (the quickstart's): 10 classes, each image one large shape of random colour, position, scale and rotation
  on a plain random background, with up to two distractor strokes.
* glyphs (the pretraining set of the transfer demonstration, tools/transfer_demo.py): the 26 capital letters, each
  image one letter of Pillow's built-in font at random colour, size, position and tilt on the same backgrounds.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


SHAPES = ['circle', 'square', 'triangle', 'star', 'cross', 'ring', 'hexagon', 'diamond', 'arrow', 'crescent']
SHAPES_PER_CLASS = {'train': 200, 'val': 50}


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float):
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]
    if kind == 'square':
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if kind == 'diamond':
        return rot([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])
    if kind == 'triangle':
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if kind == 'hexagon':
        return rot([(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)])
    if kind == 'star':
        return rot([((r if k % 2 == 0 else 0.4 * r) * math.cos(k * math.pi / 5 - math.pi / 2),
                     (r if k % 2 == 0 else 0.4 * r) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)])
    if kind == 'cross':
        t = 0.3 * r
        return rot([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t),
                    (-r, -t), (-t, -t)])
    if kind == 'arrow':
        return rot([(-r, -0.25 * r), (0.2 * r, -0.25 * r), (0.2 * r, -0.6 * r), (r, 0), (0.2 * r, 0.6 * r),
                    (0.2 * r, 0.25 * r), (-r, 0.25 * r)])
    raise ValueError(kind)


def _background(rng: random.Random, size: int):
    """A plain random background with up to two distractor strokes, and a foreground colour that stands out."""
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new('RGB', (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3)):
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)],
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randrange(1, 3))
    while True:
        fg = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(fg, bg)) > 160:
            return img, draw, bg, fg


def render_shape(kind: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image: a shape of random colour, position, scale and rotation on a random background."""
    img, draw, bg, fg = _background(rng, size)
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == 'circle':
        draw.ellipse(box, fill=fg)
    elif kind == 'ring':
        draw.ellipse(box, outline=fg, width=max(2, int(r * 0.3)))
    elif kind == 'crescent':
        draw.ellipse(box, fill=fg)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], fill=bg)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=fg)
    return img


GLYPHS = [chr(c) for c in range(ord('A'), ord('Z') + 1)]


def render_glyph(letter: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image: a letter of random colour, size (half to four fifths of the image), position and tilt (up to 25
    degrees either way: an M stays an M) on a random background."""
    img, _, _, fg = _background(rng, size)
    font = ImageFont.load_default(size=round(rng.uniform(0.5, 0.8) * size))
    left, top, right, bottom = font.getbbox(letter)
    tile = Image.new('L', (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(tile).text((2 - left, 2 - top), letter, fill=255, font=font)
    tile = tile.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR, expand=True)
    x, y = (rng.randrange(max(1, size - t + 1)) for t in tile.size)
    img.paste(fg, (x, y), tile)  # the glyph's coverage as the mask: smooth edges
    return img


def make_dataset(root: str, kind: str, images_per_class: int, seed: int, size: int = 64) -> None:
    """Write a built-in dataset (kind 'shapes' or 'glyphs'): ROOT/<class>/<n>.png, the same files for the same
    seed. The folder appears complete or not at all."""
    classes, render = {'shapes': (SHAPES, render_shape), 'glyphs': (GLYPHS, render_glyph)}[kind]
    tmp = Path(str(root) + '.partial')
    for label, name in enumerate(classes):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1000 + label)
        for n in range(images_per_class):
            render(name, rng, size).save(tmp / name / f'{n:04d}.png')
    os.replace(tmp, root)
