"""Datasets, transforms, Mixup/CutMix and loaders.

Layouts on disk (README, "Preparing data"):
* folder:   ROOT/<class name>/<image>  (class index = position of the name in sorted order)
* filelist: a text file of "relative/path label" lines, paths relative to ROOT (PaddleClas style)
* shapes:   the built-in quickstart dataset: rendered shapes written once as PNG files into ROOT/<class>/,
            then read exactly like `folder`.

Augmentation is deterministic given (seed, epoch, sample index): each sample seeds Python's and NumPy's RNGs
itself, so results do not depend on the number of workers and a resumed run sees the same images.
A corrupt or unreadable image is dropped from its batch; the loader reports which ones (ImageDataset.collate).
"""
from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.vision.transforms as T
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

DATA_HELP = 'see README.md, section "Preparing data"'
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')


class DataError(FileNotFoundError):
    """A dataset that is missing or unusable; the message names the path and where the README explains it."""


# ------------------------------------------------------------------------------------------------ RandAugment
# The official TF code's RandAugment, with PIL ops: RandAugment's docstring says what follows it and what does not.
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)                     # replace_value = [128] * 3
_TRANSLATE_CONST, _CUTOUT_CONST = 100, 40   # augmentation_params: pixels (of ImageNet crops, see _pixels)


def _enhance_arg(m: float) -> float:
    return m / _MAX_LEVEL * 1.8 + 0.1


# Magnitude -> argument of each op (level_to_arg), before the random sign; in the official op order.
RA_LEVEL_TO_ARG = {
    'AutoContrast': lambda m: None,
    'Equalize': lambda m: None,
    'Invert': lambda m: None,
    'Rotate': lambda m: m / _MAX_LEVEL * 30.0,                  # degrees
    'Posterize': lambda m: int(m / _MAX_LEVEL * 4),             # bits kept
    'Solarize': lambda m: int(m / _MAX_LEVEL * 256),            # threshold: pixels >= it are inverted
    'Color': _enhance_arg,
    'Contrast': _enhance_arg,
    'Brightness': _enhance_arg,
    'Sharpness': _enhance_arg,
    'ShearX': lambda m: m / _MAX_LEVEL * 0.3,
    'ShearY': lambda m: m / _MAX_LEVEL * 0.3,
    'TranslateX': lambda m: m / _MAX_LEVEL * _TRANSLATE_CONST,  # pixels
    'TranslateY': lambda m: m / _MAX_LEVEL * _TRANSLATE_CONST,
    'Cutout': lambda m: int(m / _MAX_LEVEL * _CUTOUT_CONST),    # half side of the square, pixels
    'SolarizeAdd': lambda m: int(m / _MAX_LEVEL * 110),         # added to pixels < 128
}
_RA_SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')  # _randomly_negate_tensor


def _pixels(img: Image.Image, v: float) -> float:
    """The official pixel constants are for ImageNet crops (224 and larger): applied as they are there, scaled
    by size / 224 on smaller images (the quickstart's 48 pixels), which they would otherwise mostly blank out."""
    return v * min(1.0, min(img.size) / 224)


def _affine(img: Image.Image, matrix) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=_FILL)


def _cutout(img: Image.Image, pad: int) -> Image.Image:
    pad, (w, h) = int(_pixels(img, pad)), img.size
    cy, cx = random.randrange(h), random.randrange(w)
    img = img.copy()
    if pad > 0:
        img.paste(_FILL, (max(0, cx - pad), max(0, cy - pad), min(w, cx + pad), min(h, cy + pad)))
    return img


def _solarize_add(img: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


_RA_OPS = {
    'AutoContrast': lambda img, v: ImageOps.autocontrast(img),
    'Equalize': lambda img, v: ImageOps.equalize(img),
    'Invert': lambda img, v: ImageOps.invert(img),
    'Rotate': lambda img, v: img.rotate(v, resample=Image.NEAREST, fillcolor=_FILL),
    'Posterize': lambda img, v: ImageOps.posterize(img, min(8, max(1, v))),  # TF clamps the shift to 0..7
    'Solarize': lambda img, v: ImageOps.solarize(img, v),
    'Color': lambda img, v: ImageEnhance.Color(img).enhance(v),
    'Contrast': lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    'Brightness': lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    'Sharpness': lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    'ShearX': lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)),
    'ShearY': lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)),
    'TranslateX': lambda img, v: _affine(img, (1, 0, _pixels(img, v), 0, 1, 0)),
    'TranslateY': lambda img, v: _affine(img, (1, 0, 0, 0, 1, _pixels(img, v))),
    'Cutout': _cutout,
    'SolarizeAdd': _solarize_add,
}


def randaugment_op(img: Image.Image, name: str, magnitude: float) -> Image.Image:
    """Apply one RandAugment op at ``magnitude`` (rotate, shear and translate get a random sign)."""
    v = RA_LEVEL_TO_ARG[name](float(magnitude))
    if name in _RA_SIGNED and random.random() < 0.5:
        v = -v
    return _RA_OPS[name](img, v)


class RandAugment:
    """RandAugment of the official TF code: ``distort_image_with_randaugment`` in autoaugment.py
    (google/automl efficientnetv2; tensorflow/tpu models/official/efficientnet), ``_MAX_LEVEL = 10``.

    As there: the 16 ops of ``available_ops`` in its order; each of the ``num_ops`` layers picks one uniformly
    (with replacement) and always applies it (the code draws ``prob = uniform(0.2, 0.8)`` per op and discards it:
    ``func, _, args = _parse_policy_info(...)``); the magnitude becomes each op's argument as in ``level_to_arg``
    (RA_LEVEL_TO_ARG), beyond its range when magnitude > 10 (at 15 Solarize's threshold is 384: no pixel
    changes); rotate/shear/translate are negated half the time; empty pixels and the cutout square are 128 grey;
    geometric ops sample the nearest pixel. Unlike there: the ops are PIL's, which the TF ops re-implement, so
    pixels can differ by rounding, and Contrast blends toward the mean grey level, as PIL does (TF's ``contrast``
    blends toward pixel count / 256); translate and cutout sizes shrink on images under 224 pixels (_pixels).
    (tensorflow/models official/vision/ops/augment.py ``RandAugment``, a later version, adds an identity branch.)
    Randomness comes from Python's ``random``, which ImageDataset seeds per sample."""

    def __init__(self, num_ops: int = 2, magnitude: float = 15):
        self.num_ops, self.magnitude = num_ops, float(magnitude)

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(list(_RA_OPS), k=self.num_ops):
            img = randaugment_op(img, name, self.magnitude)
        return img


# ------------------------------------------------------------------------------------------------ transforms
def build_transform(cfg: Dict, train: bool):
    """PIL image -> float32 CHW array, normalised. Train: RandomResizedCrop, flip, RandAugment.
    Eval: resize the short side to img_size / crop_pct and center-crop (or squash to a square)."""
    d = cfg['Data']
    size = d['img_size']
    if train:
        ops = [T.RandomResizedCrop(size, scale=tuple(d['scale']), interpolation=d['interpolation'])]
        if d['hflip'] > 0:
            ops.append(T.RandomHorizontalFlip(d['hflip']))
        if d['randaugment_ops'] > 0:
            ops.append(RandAugment(d['randaugment_ops'], d['randaugment_magnitude']))
    elif d['crop_mode'] == 'squash':
        ops = [T.Resize((size, size), interpolation=d['interpolation'])]
    else:
        ops = [T.Resize(int(math.floor(size / d['crop_pct'])), interpolation=d['interpolation']),
               T.CenterCrop(size)]
    ops += [T.ToTensor(data_format='CHW'), T.Normalize(d['mean'], d['std'], data_format='CHW')]
    return T.Compose(ops)


# ------------------------------------------------------------------------------------------------ datasets
class ImageDataset(paddle.io.Dataset):
    """(path, label) samples read from disk with PIL. ``__getitem__`` returns (image CHW float32, label, index);
    the image is None when the file cannot be read (the loader's collate drops it and reports the index)."""

    def __init__(self, samples: List[Tuple[str, int]], class_names: List[str], transform, seed: int = 0):
        self.samples, self.class_names, self.transform = samples, class_names, transform
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as img:
            return img.convert('RGB')

    def __getitem__(self, index: int):
        try:
            img = self.load(index)
        except Exception:  # any reason: truncated, not an image, unreadable; reported by the main process
            return None, None, np.int64(index)
        seed = (self.seed * 1_000_003 + self.epoch * 10_007_869 + index) % (2 ** 32)
        random.seed(seed)
        np.random.seed(seed)
        return self.transform(img), np.int64(self.samples[index][1]), np.int64(index)

    def collate(self, items):
        """Stack the readable samples of a batch -> (images, labels, indices, unreadable): ``unreadable`` has one
        entry per sample, the dataset index of an unreadable one or -1. No array is ever empty (Paddle's
        shared-memory transfer from workers cannot carry zero-size arrays): a batch without one readable image
        is a single placeholder with label -1, which the loops skip (batch_is_empty)."""
        good = [it for it in items if it[0] is not None]
        unreadable = np.array([-1 if it[0] is not None else it[2] for it in items], 'int64')
        if not good:
            return np.zeros([1, 3, 1, 1], 'float32'), np.array([-1]), np.array([-1]), unreadable
        return (np.stack([g[0] for g in good]), np.array([g[1] for g in good], 'int64'),
                np.array([g[2] for g in good], 'int64'), unreadable)

    def failure_reason(self, index: int) -> str:
        try:
            self.load(index)
            return 'unreadable'
        except Exception as e:
            return f'{type(e).__name__}: {e}'


def folder_samples(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f'dataset folder not found: {root} (expected ROOT/<class>/<image>; {DATA_HELP})')
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    samples = [(str(p), label) for label, name in enumerate(classes)
               for p in sorted((root_path / name).rglob('*')) if p.suffix.lower() in IMG_EXTENSIONS]
    if not samples:
        raise DataError(f'no images found under {root} (expected ROOT/<class>/<image>; {DATA_HELP})')
    return samples, classes


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read {what} {path}: {getattr(e, "strerror", None) or e} ({DATA_HELP})') from None


def filelist_samples(root: str, list_file: str, label_names: Optional[str]) -> Tuple[List, List[str]]:
    """Samples of a "relative/path label" list file; labels are class indices 0, 1, ... Class names: the lines
    of the ``label_names`` file (one per class, in label order), else "0" .. "<largest label>"."""
    if not list_file or not Path(list_file).is_file():
        raise DataError(f'file list not found: {list_file} (lines "relative/path label"; {DATA_HELP})')
    rows = []
    for n, line in enumerate(_read_text(list_file, 'file list').splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r'-?[0-9]+', parts[1]):
            raise DataError(f'{list_file}:{n}: expected "relative/path label", got {line!r} ({DATA_HELP})')
        if int(parts[1]) < 0:
            raise DataError(f'{list_file}:{n}: label {parts[1]} is negative; labels are class indices 0, 1, 2, ... '
                            f'(number the classes from 0; {DATA_HELP})')
        rows.append((n, os.path.join(root, parts[0]), int(parts[1])))
    if not rows:
        raise DataError(f'file list {list_file} is empty (expected lines "relative/path label"; {DATA_HELP})')
    if label_names:
        names = [s.strip() for s in _read_text(label_names, 'label names file').splitlines() if s.strip()]
        if not names:
            raise DataError(f'label names file {label_names} is empty (expected one class name per line; '
                            f'{DATA_HELP})')
        for n, _, label in rows:
            if label >= len(names):
                raise DataError(f'{list_file}:{n}: label {label} is out of range: {label_names} names '
                                f'{len(names)} classes (labels 0..{len(names) - 1}); add the missing class names '
                                f'or fix the label ({DATA_HELP})')
    else:
        names = [str(i) for i in range(max(label for _, _, label in rows) + 1)]
    return [(path, label) for _, path, label in rows], names


def build_dataset(cfg: Dict, split: str) -> ImageDataset:
    """split: 'train' or 'val'."""
    d = cfg['Data']
    root = d[f'{split}_root']
    if d['format'] == 'filelist':
        samples, names = filelist_samples(root, d[f'{split}_list'], d['label_names'])
    else:
        if d['format'] == 'shapes' and not Path(root).is_dir():
            make_shapes_dataset(root, images_per_class=SHAPES_PER_CLASS[split], seed={'train': 0, 'val': 1}[split])
        samples, names = folder_samples(root)
    return ImageDataset(samples, names, build_transform(cfg, split == 'train'), seed=cfg['Global']['seed'])


def batch_is_empty(labels) -> bool:
    """True for the placeholder of a batch in which no image could be read (see ImageDataset.collate)."""
    return int(labels[0]) < 0


class ShardSampler(paddle.io.Sampler):
    """Every world_size-th sample starting at rank, in order, without the padding DistributedBatchSampler adds:
    evaluation counts each image exactly once."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset: ImageDataset, cfg: Dict, train: bool, rank: int = 0,
                 world_size: int = 1) -> paddle.io.DataLoader:
    """Each process reads its own shard. Train: shuffled per epoch (set_epoch), last partial batch dropped."""
    batch_size = cfg['Data']['batch_size']
    if train:
        sampler = paddle.io.DistributedBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank,
                                                    shuffle=True, drop_last=True)
    else:
        sampler = paddle.io.BatchSampler(sampler=ShardSampler(len(dataset), rank, world_size),
                                         batch_size=batch_size, drop_last=False)
    return paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg['Data']['num_workers'],
                                collate_fn=dataset.collate, use_shared_memory=cfg['Data']['use_shared_memory'])


# ------------------------------------------------------------------------------------------------ Mixup / CutMix
def one_hot_smooth(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    off = smoothing / num_classes
    return paddle.nn.functional.one_hot(labels, num_classes) * (1.0 - smoothing) + off


class Mixup:
    """Batch-level Mixup / CutMix with label smoothing (as timm's Mixup, batch mode): each batch is mixed with
    its reverse. Returns (images, soft targets (B, classes)); targets sum to 1."""

    def __init__(self, mixup: float, cutmix: float, prob: float, smoothing: float, num_classes: int, seed: int = 0):
        self.mixup, self.cutmix, self.prob = mixup, cutmix, prob
        self.smoothing, self.num_classes = smoothing, num_classes
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor):
        targets = one_hot_smooth(labels, self.num_classes, self.smoothing)
        use_mix = self.mixup > 0 or self.cutmix > 0
        if not use_mix or self.rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or self.rng.random() < 0.5)
        lam = float(self.rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        flipped = images.flip(0)
        if use_cutmix:
            H, W = images.shape[2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(self.rng.integers(H)), int(self.rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            mask = paddle.zeros([1, 1, H, W], images.dtype)
            mask[:, :, y0:y1, x0:x1] = 1.0
            images = images * (1 - mask) + flipped * mask
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)   # the area actually kept
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)


# ------------------------------------------------------------------------------------------------ shapes dataset
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


def render_shape(kind: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image: a shape of random colour, position, scale and rotation on a random two-tone background."""
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new('RGB', (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3)):  # distractor strokes
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)],
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randrange(1, 3))
    while True:  # a foreground colour that stands out from the background
        fg = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(fg, bg)) > 160:
            break
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


def make_shapes_dataset(root: str, images_per_class: int, seed: int, size: int = 64) -> None:
    """Write the quickstart dataset: ROOT/<shape>/<n>.png, the same files for the same seed."""
    tmp = Path(str(root) + '.partial')
    for label, kind in enumerate(SHAPES):
        (tmp / kind).mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1000 + label)
        for n in range(images_per_class):
            render_shape(kind, rng, size).save(tmp / kind / f'{n:04d}.png')
    os.replace(tmp, root)  # appears complete or not at all


class SkipReport:
    """Reports each unreadable image once (path and reason) through ``log`` and counts them."""

    def __init__(self, dataset: ImageDataset, log):
        self.dataset, self.log, self.seen = dataset, log, set()

    def __call__(self, unreadable) -> None:
        for index in np.asarray(unreadable).reshape(-1).tolist():
            if index >= 0 and index not in self.seen:
                self.seen.add(index)
                self.log(f'skipped unreadable image {self.dataset.samples[index][0]}: '
                         f'{self.dataset.failure_reason(index)}')

    @property
    def count(self) -> int:
        return len(self.seen)
