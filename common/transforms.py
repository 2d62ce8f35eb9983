"""Image transforms: the training augmentation (RandomResizedCrop, flip, RandAugment) and the eval resize/crop,
each ending in a normalised float32 CHW array.

RandAugment is the official TF code's (see RandAugment's docstring for what follows it and what does not).
Randomness comes from Python's ``random``, which ImageDataset seeds per sample (common/data.py).
"""
from __future__ import annotations

import math
import random
from typing import Dict

import paddle.vision.transforms as T
from PIL import Image, ImageEnhance, ImageOps


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
