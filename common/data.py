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
# RandAugment (Cubuk et al. 2020) with the operations and magnitude scale of the official TF code that MaxViT
# used (EfficientNet's autoaugment.py): magnitude m maps an op to (m / 10) of its maximum, so the paper's
# m = 15 goes beyond the maximum (e.g. rotations up to 45 degrees). Every signed op is negated half the time.
_FILL = (128, 128, 128)


def _signed(v: float) -> float:
    return -v if random.random() < 0.5 else v


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


_RA_OPS = {
    'AutoContrast': lambda img, m: ImageOps.autocontrast(img),
    'Equalize': lambda img, m: ImageOps.equalize(img),
    'Invert': lambda img, m: ImageOps.invert(img),
    'Rotate': lambda img, m: img.rotate(_signed(30 * m), resample=Image.BILINEAR, fillcolor=_FILL),
    'Posterize': lambda img, m: ImageOps.posterize(img, max(1, int(4 * m))),
    'Solarize': lambda img, m: ImageOps.solarize(img, max(0, 256 - int(256 * m))),
    'Color': lambda img, m: ImageEnhance.Color(img).enhance(max(0.0, 1 + _signed(0.9 * m))),
    'Contrast': lambda img, m: ImageEnhance.Contrast(img).enhance(max(0.0, 1 + _signed(0.9 * m))),
    'Brightness': lambda img, m: ImageEnhance.Brightness(img).enhance(max(0.0, 1 + _signed(0.9 * m))),
    'Sharpness': lambda img, m: ImageEnhance.Sharpness(img).enhance(max(0.0, 1 + _signed(0.9 * m))),
    'ShearX': lambda img, m: _affine(img, (1, _signed(0.3 * m), 0, 0, 1, 0)),
    'ShearY': lambda img, m: _affine(img, (1, 0, 0, _signed(0.3 * m), 1, 0)),
    'TranslateX': lambda img, m: _affine(img, (1, 0, _signed(0.45 * m) * img.size[0], 0, 1, 0)),
    'TranslateY': lambda img, m: _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m) * img.size[1])),
}


class RandAugment:
    """Apply ``num_ops`` random operations of magnitude ``magnitude`` (0..10 scale, may exceed 10) to a PIL image."""

    def __init__(self, num_ops: int = 2, magnitude: float = 15):
        self.num_ops, self.m = num_ops, magnitude / 10.0

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(list(_RA_OPS), k=self.num_ops):
            img = _RA_OPS[name](img, self.m)
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


def filelist_samples(root: str, list_file: str, label_names: Optional[str]) -> Tuple[List, List[str]]:
    if not list_file or not Path(list_file).is_file():
        raise DataError(f'file list not found: {list_file} (lines "relative/path label"; {DATA_HELP})')
    samples = []
    for n, line in enumerate(Path(list_file).read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
            raise DataError(f'{list_file}:{n}: expected "relative/path label", got {line!r} ({DATA_HELP})')
        samples.append((os.path.join(root, parts[0]), int(parts[1])))
    if label_names:
        names = [s.strip() for s in Path(label_names).read_text(encoding='utf-8').splitlines() if s.strip()]
    else:
        names = [str(i) for i in range(max(label for _, label in samples) + 1)]
    return samples, names


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
