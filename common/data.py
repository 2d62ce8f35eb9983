"""Datasets and loaders: image files on disk -> batches of (images, labels, indices, unreadable).

Layouts on disk (docs/training.md, "Preparing data"):
* folder:   ROOT/<class name>/<image>  (class index = position of the name in sorted order)
* filelist: a text file of "relative/path label" lines, paths relative to ROOT (PaddleClas style)
* shapes:   the built-in quickstart dataset (common/shapes.py): rendered shapes written once as PNG files into
            ROOT/<class>/, then read exactly like `folder`.

Augmentation is deterministic given (seed, epoch, sample index): each sample seeds Python's and NumPy's RNGs
itself, so results do not depend on the number of workers and a resumed run sees the same images.
A corrupt or unreadable image is dropped from its batch; the loader reports which ones (ImageDataset.collate).
Memory stays bounded: an image with more than Data.max_image_pixels pixels is decoded reduced where its format
allows it (JPEG: at 1/2, 1/4 or 1/8 of its sides, from the file's DCT data) and skipped, before any pixel is
decoded, where it does not (PNG and the rest); SkipReport logs each such image once.
"""
from __future__ import annotations

import functools
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
from PIL import Image

from common.device import die_with_parent
from common.shapes import SHAPES, SHAPES_PER_CLASS, make_dataset
from common.transforms import build_transform

DATA_HELP = 'see docs/training.md, section "Preparing data"'
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')


class DataError(FileNotFoundError):
    """A dataset that is missing or unusable; the message names the path and where the docs explain it."""


# Transparent pixels are composited onto white: images with alpha are mostly logos and cut-outs made for a page.
_BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping what the pixels mean. Pillow's own convert('RGB') saturates 16- and
    32-bit images ('I;16', 'I': 99.6% of a 16-bit PNG became 255) and drops transparency to whatever colour
    hides under it ('LA', 'P' with a transparent index, 'RGBA'). Here: 16-bit modes ('I;16*', and 'I', which
    is how Pillow opens 16-bit PNGs) scale 0..65535 to 0..255; 'F' (float TIFF) scales 0..1 to 0..255 when all
    values are within [0, 1], else clips to 0..255; alpha is composited onto white; 'CMYK', '1', 'L', 'YCbCr'
    use Pillow's conversion."""
    if img.mode.startswith('I;16') or img.mode == 'I':
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')
    elif img.mode == 'F':
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            values = values * 255.0
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P' and 'transparency' in img.info or img.mode in ('LA', 'PA', 'La', 'RGBa'):
        img = img.convert('RGBA')
    if img.mode == 'RGBA':
        background = Image.new('RGBA', img.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(background, img)
    return img if img.mode == 'RGB' else img.convert('RGB')  # convert would copy an RGB image


class ImageTooLarge(ValueError):
    """An image above Data.max_image_pixels that its format cannot decode reduced (all but JPEG)."""


def reduction(size: Tuple[int, int], max_pixels: Optional[int]) -> int:
    """The factor (1, 2, 4 or 8) by which a JPEG of ``size`` is decoded so that it has at most ``max_pixels``
    pixels; 1 when it has no more already (or there is no cap), 0 when even 1/8 of its sides is too many."""
    w, h = size
    return next((s for s in (1, 2, 4, 8) if not max_pixels or -(-w // s) * -(-h // s) <= max_pixels), 0)


def _megapixels(size: Tuple[int, int]) -> str:
    return f'{size[0]} x {size[1]} pixels ({size[0] * size[1] / 1e6:.1f} megapixels)'


def read_image(path: str, max_pixels: Optional[int] = None) -> Tuple[Image.Image, int]:
    """(the image file at ``path`` as 8-bit RGB (to_rgb), the factor its sides were reduced by, 1 for none).
    With ``max_pixels``, an image with more pixels is decoded reduced (JPEG: Image.draft, 1/2, 1/4 or 1/8 of each
    side, ``reduction``) or refused with ImageTooLarge before its pixels are decoded (other formats); Pillow's
    DecompressionBombWarning, which such images raise at open, is then left out. PIL's errors for unreadable files
    (and its DecompressionBombError beyond twice Image.MAX_IMAGE_PIXELS) pass through."""
    with warnings.catch_warnings():
        if max_pixels and max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # the cap below handles these sizes
        img = Image.open(path)
    with img:
        size, factor = img.size, reduction(img.size, max_pixels)
        if factor > 1:
            img.draft(None, (size[0] // factor, size[1] // factor))  # JPEG decodes its DCT data at 1/factor
        if max_pixels and img.size[0] * img.size[1] > max_pixels:
            how = (f'{img.format or "such"} images cannot be decoded reduced (JPEG can)' if factor
                   else 'even 1/8 of its sides is above it')
            raise ImageTooLarge(f'{_megapixels(size)}, above Data.max_image_pixels ({max_pixels / 1e6:.1f} '
                                f'megapixels), and {how}: shrink the file, or raise Data.max_image_pixels (3 '
                                f'bytes of memory a pixel)')
        img.load()
        return to_rgb(img), factor


def read_rgb(path: str, max_pixels: Optional[int] = None) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (to_rgb), capped at ``max_pixels`` as read_image says; PIL's
    errors for unreadable files pass through."""
    return read_image(path, max_pixels)[0]


class ImageDataset(paddle.io.Dataset):
    """(path, label) samples read from disk with PIL. ``__getitem__`` returns (image CHW float32, label, index,
    reduction): the image is None when the file cannot be read (the loader's collate drops it and reports the
    index), and ``reduction`` is the factor its sides were decoded at (1: as they are) when it has more than
    ``max_pixels`` pixels (Data.max_image_pixels; None: no cap), see read_image."""

    def __init__(self, samples: List[Tuple[str, int]], class_names: List[str], transform, seed: int = 0,
                 max_pixels: Optional[int] = None):
        self.samples, self.class_names, self.transform = samples, class_names, transform
        self.seed, self.epoch, self.max_pixels = seed, 0, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> Image.Image:
        return self.read(index)[0]

    def read(self, index: int) -> Tuple[Image.Image, int]:
        """(image, reduction) of sample ``index``: read_image with this dataset's cap."""
        return read_image(self.samples[index][0], self.max_pixels)

    def __getitem__(self, index: int):
        try:
            img, factor = self.read(index)
        except Exception:  # any reason: truncated, not an image, unreadable, too large; reported by the main process
            return None, None, np.int64(index), 1
        seed = (self.seed * 1_000_003 + self.epoch * 10_007_869 + index) % (2 ** 32)
        random.seed(seed)
        np.random.seed(seed)
        return self.transform(img), np.int64(self.samples[index][1]), np.int64(index), factor

    def collate(self, items):
        """Stack the readable samples of a batch -> (images, labels, indices, notes): ``notes`` has one entry
        per sample: -1 for an image read as it is, the dataset index of an unreadable one, -2 - index for one
        decoded reduced (SkipReport logs both kinds). No array is ever empty (Paddle's shared-memory transfer from
        workers cannot carry zero-size arrays): a batch without one readable image is a single placeholder with
        label -1, which the loops skip (batch_is_empty)."""
        good = [it for it in items if it[0] is not None]
        notes = np.array([it[2] if it[0] is None else -2 - it[2] if it[3] > 1 else -1 for it in items], 'int64')
        if not good:
            return np.zeros([1, 3, 1, 1], 'float32'), np.array([-1]), np.array([-1]), notes
        return (np.stack([g[0] for g in good]), np.array([g[1] for g in good], 'int64'),
                np.array([g[2] for g in good], 'int64'), notes)

    def failure_reason(self, index: int) -> str:
        try:
            self.read(index)
            return 'unreadable'
        except Exception as e:
            return f'{type(e).__name__}: {e}'

    def reduction_note(self, index: int) -> str:
        """What reading sample ``index`` reduced (from the file's header: no pixels are decoded)."""
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(self.samples[index][0]) as img:
                size = img.size
        factor = reduction(size, self.max_pixels)
        return (f'{_megapixels(size)} decoded at 1/{factor} of its sides, {-(-size[0] // factor)} x '
                f'{-(-size[1] // factor)}, under Data.max_image_pixels ({self.max_pixels / 1e6:.1f} megapixels)')


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


def build_dataset(cfg: Dict, split: str, log=print) -> ImageDataset:
    """split: 'train' or 'val'. ``log`` says where the built-in dataset comes from (written or reused)."""
    d = cfg['Data']
    root = d[f'{split}_root']
    if d['format'] == 'filelist':
        samples, names = filelist_samples(root, d[f'{split}_list'], d['label_names'])
    else:
        if d['format'] == 'shapes':
            count = SHAPES_PER_CLASS[split] * len(SHAPES)
            if Path(root).is_dir():
                log(f'{split}: the built-in shapes dataset in {root}/ (written before; delete it to write it anew)')
            else:
                start = time.perf_counter()
                make_dataset(root, 'shapes', SHAPES_PER_CLASS[split], seed={'train': 0, 'val': 1}[split])
                log(f'{split}: wrote the built-in shapes dataset, {count} PNG files ({len(SHAPES)} classes x '
                    f'{SHAPES_PER_CLASS[split]}), to {root}/ in {time.perf_counter() - start:.1f} s')
        samples, names = folder_samples(root)
    return ImageDataset(samples, names, build_transform(cfg, split == 'train'), seed=cfg['Global']['seed'],
                        max_pixels=d['max_image_pixels'])


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


class TrainBatchSampler(paddle.io.DistributedBatchSampler):
    """Paddle's shuffling, sharding batch sampler, told at each epoch which of its batches to give:
    ``set_epoch(seed, start, stop)`` yields batches start .. stop - 1 of the epoch's order (the order depends on
    ``seed`` only). A mid-epoch resume starts at the first batch not yet used, passing over the earlier ones
    without reading them; ``stop`` is the batch after the last one an optimizer step uses. Ending here, not by
    leaving the loop early, lets the loader finish its epoch and shut its worker processes down (a loop left
    early keeps two idle workers per epoch alive until the run ends)."""
    start, stop = 0, None

    def set_epoch(self, epoch: int, start: int = 0, stop: Optional[int] = None) -> None:
        """``epoch``: the seed of this epoch's shuffle (Paddle's meaning); ``start``, ``stop``: the batches to
        give, as in range(start, stop); stop None: to the end of the epoch."""
        super().set_epoch(epoch)
        self.start, self.stop = start, stop

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.stop is not None and i >= self.stop:
                return
            if i >= self.start:
                yield batch


def _worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def build_loader(dataset: ImageDataset, cfg: Dict, train: bool, rank: int = 0,
                 world_size: int = 1) -> paddle.io.DataLoader:
    """Each process reads its own shard. Train: shuffled per epoch (set_epoch), last partial batch dropped."""
    batch_size = cfg['Data']['batch_size']
    if train:
        sampler = TrainBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank, shuffle=True,
                                    drop_last=True)
    else:
        sampler = paddle.io.BatchSampler(sampler=ShardSampler(len(dataset), rank, world_size),
                                         batch_size=batch_size, drop_last=False)
    # workers die with this process, even when it is killed with SIGKILL (they outlived it by minutes before)
    return paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg['Data']['num_workers'],
                                collate_fn=dataset.collate, use_shared_memory=cfg['Data']['use_shared_memory'],
                                worker_init_fn=functools.partial(_worker_init, os.getpid()))


class SkipReport:
    """Reports each unreadable image once (path and reason) through ``log`` and counts them; reports each image
    decoded reduced (above Data.max_image_pixels) once too."""

    def __init__(self, dataset: ImageDataset, log):
        self.dataset, self.log, self.seen, self.reduced = dataset, log, set(), set()

    def __call__(self, notes) -> None:
        """``notes``: the last item of a batch (ImageDataset.collate)."""
        for note in np.asarray(notes).reshape(-1).tolist():
            if note >= 0 and note not in self.seen:
                self.seen.add(note)
                self.log(f'skipped unreadable image {self.dataset.samples[note][0]}: '
                         f'{self.dataset.failure_reason(note)}')
            elif note <= -2 and -2 - note not in self.reduced:
                index = -2 - note
                self.reduced.add(index)
                self.log(f'reduced large image {self.dataset.samples[index][0]}: {self.dataset.reduction_note(index)}')

    @property
    def count(self) -> int:
        return len(self.seen)
