"""common/data.py: RandAugment against the official TF code, the checks of the file-list format, and images that
cannot be read or are too large (skipped once each with their reason; JPEGs decoded reduced; memory measured).

The official code is ``distort_image_with_randaugment`` / ``level_to_arg`` in autoaugment.py (google/automl
efficientnetv2; the same in tensorflow/tpu models/official/efficientnet), ``_MAX_LEVEL = 10``. The expected
values below are worked out by hand from it.
"""
import copy
import json
import random
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.transforms as transforms
from common.config import DEFAULTS
from common.data import DataError, ImageDataset, SkipReport, TrainBatchSampler, filelist_samples, reduction
from common.transforms import RA_LEVEL_TO_ARG, RandAugment, build_transform, randaugment_op

OFFICIAL_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
                'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd']

# level_to_arg at magnitude m: m/10 * 30 degrees, int(m/10 * 4) bits, int(m/10 * 256), m/10 * 1.8 + 0.1, m/10 * 0.3,
# m/10 * 100 pixels (translate_const), int(m/10 * 40) pixels (cutout_const), int(m/10 * 110)
EXPECTED = {
    15: dict(Rotate=45.0, Posterize=6, Solarize=384, Color=2.8, Contrast=2.8, Brightness=2.8, Sharpness=2.8,
             ShearX=0.45, ShearY=0.45, TranslateX=150.0, TranslateY=150.0, Cutout=60, SolarizeAdd=165),
    5: dict(Rotate=15.0, Posterize=2, Solarize=128, Color=1.0, Contrast=1.0, Brightness=1.0, Sharpness=1.0,
            ShearX=0.15, ShearY=0.15, TranslateX=50.0, TranslateY=50.0, Cutout=20, SolarizeAdd=55),
}


def arr(img):
    return np.asarray(img).astype(np.int64)


def gradient(size=16):
    """Every value 0..255 once per channel."""
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return Image.fromarray(np.stack([v, v[::-1], v.T], -1)).resize((size, size), Image.NEAREST)


def noise(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(10, 246, (size, size, 3), dtype=np.uint8))


def constant(value, size=224):
    return Image.new('RGB', (size, size), value)


def coordinates(size=224):
    """R = x, G = 7, B = y: where each output pixel came from, and G = 128 marks the 128-grey fill."""
    x, y = np.meshgrid(np.arange(size), np.arange(size))
    return Image.fromarray(np.stack([x, np.full_like(x, 7), y], -1).astype(np.uint8))


def each_seed(img, name, m, seeds=range(8)):
    out = []
    for s in seeds:
        random.seed(s)
        out.append(arr(randaugment_op(img, name, m)))
    return out


# ------------------------------------------------------------------------------------------------ RandAugment
def test_randaugment_has_the_official_ops_in_order():
    assert list(RA_LEVEL_TO_ARG) == OFFICIAL_OPS
    assert list(transforms._RA_OPS) == OFFICIAL_OPS


@pytest.mark.parametrize('m', [15, 5])
def test_randaugment_magnitude_to_argument_is_official(m):
    for name in ('AutoContrast', 'Equalize', 'Invert'):
        assert RA_LEVEL_TO_ARG[name](m) is None
    for name, expected in EXPECTED[m].items():
        got = RA_LEVEL_TO_ARG[name](m)
        assert got == pytest.approx(expected), name
        if isinstance(expected, int):
            assert isinstance(got, int), name


def test_solarize_threshold_is_official():
    img = gradient()
    for out in each_seed(img, 'Solarize', 15):  # threshold 384: no pixel is >= it, nothing changes
        np.testing.assert_array_equal(out, arr(img))
    x = arr(img)
    for out in each_seed(img, 'Solarize', 5):   # threshold 128: pixels >= 128 inverted
        np.testing.assert_array_equal(out, np.where(x < 128, x, 255 - x))


def test_solarize_add_adds_to_dark_pixels():
    img, x = gradient(), arr(gradient())
    for m, add in ((15, 165), (5, 55)):
        for out in each_seed(img, 'SolarizeAdd', m):
            np.testing.assert_array_equal(out, np.where(x < 128, np.minimum(255, x + add), x))


def test_posterize_keeps_the_official_bits():
    img, x = gradient(), arr(gradient())
    for m, mask in ((15, 0b11111100), (5, 0b11000000)):
        for out in each_seed(img, 'Posterize', m):
            np.testing.assert_array_equal(out, x & mask)


def test_enhance_factor_is_unsigned_and_official():
    img = noise()
    for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):  # factor 1.0 at m = 5: the image itself
        for out in each_seed(img, name, 5):
            np.testing.assert_array_equal(out, arr(img), err_msg=name)
    for out in each_seed(constant((50, 50, 50), 8), 'Brightness', 15):  # factor 2.8 every time: 50 -> 140
        assert (out == 140).all()
    for out in each_seed(constant((50, 50, 50), 8), 'Brightness', 1):   # factor 0.28: 50 -> 14
        assert (out == 14).all()


@pytest.mark.parametrize('name, axis', [('TranslateX', 0), ('TranslateY', 2)])
def test_translate_is_official_pixels_with_grey_fill(name, axis):
    img = coordinates()
    shifts = set()
    for out in each_seed(img, name, 5):  # 50 pixels (translate_const 100 at m = 10), either direction
        filled = out[..., 1] == 128
        assert (out[filled] == 128).all()
        moved = np.unique(out[~filled][:, axis] - arr(img)[~filled][:, axis])
        assert len(moved) == 1
        shifts.add(int(moved[0]))
        assert filled.sum() == 50 * 224
    assert shifts == {50, -50}


def test_translate_and_cutout_shrink_on_small_images():
    img = coordinates(48)
    for out in each_seed(img, 'TranslateX', 15):  # 150 * 48 / 224 = 32.1 pixels
        filled = out[..., 1] == 128
        assert abs(int(np.unique(out[~filled][:, 0] - arr(img)[~filled][:, 0])[0])) == 32
    for out in each_seed(constant((10, 200, 30), 48), 'Cutout', 15, seeds=range(30)):
        grey = (out == 128).all(-1)
        assert 0 < grey.sum() <= (2 * int(60 * 48 / 224)) ** 2


def test_rotate_and_shear_degrees_and_fill_are_official():
    img = noise()
    rotations = {d: arr(img.rotate(d, resample=Image.NEAREST, fillcolor=(128,) * 3)) for d in (45.0, -45.0)}
    assert_each_seed_gives_one_of(img, 'Rotate', rotations)
    shears = {s: arr(img.transform(img.size, Image.AFFINE, (1, s, 0, 0, 1, 0), resample=Image.NEAREST,
                                   fillcolor=(128,) * 3)) for s in (0.45, -0.45)}
    assert_each_seed_gives_one_of(img, 'ShearX', shears)


def assert_each_seed_gives_one_of(img, op, expected):
    """At magnitude 15, every seeded draw of ``op`` equals exactly one of ``expected`` (argument: image), and
    every one of them occurs (both signs)."""
    seen = set()
    for out in each_seed(img, op, 15):
        match = [k for k, want in expected.items() if np.array_equal(out, want)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(expected)


def test_cutout_is_a_grey_square_of_official_size():
    img = constant((10, 200, 30))
    sides = set()
    for out in each_seed(img, 'Cutout', 5, seeds=range(20)):  # pad 20: a 40 x 40 square, cut at the borders
        grey = (out == 128).all(-1)
        assert ((out == (10, 200, 30)).all(-1) | grey).all()
        ys, xs = np.nonzero(grey)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert grey.sum() == h * w and h <= 40 and w <= 40
        sides.add((h, w))
    assert (40, 40) in sides


def test_each_selected_op_is_always_applied(monkeypatch):
    # The official code draws prob = uniform(0.2, 0.8) for each op but discards it: the chosen op always runs.
    img = noise()
    for name in OFFICIAL_OPS:  # every op changes this image at m = 9, so an unchanged image means a skipped op
        random.seed(0)
        assert not np.array_equal(arr(randaugment_op(img, name, 9)), arr(img)), name
    chosen = []
    for name, op in list(transforms._RA_OPS.items()):
        monkeypatch.setitem(transforms._RA_OPS, name, lambda im, v, name=name, op=op: chosen.append(name) or op(im, v))
    ra = RandAugment(1, 9)
    for s in range(300):
        random.seed(s)
        assert not np.array_equal(arr(ra(img)), arr(img)), s
    assert set(chosen) == set(OFFICIAL_OPS) and len(chosen) == 300  # uniform over all 16, one per layer
    chosen.clear()
    RandAugment(2, 15)(img)
    assert len(chosen) == 2


def test_randaugment_is_deterministic_given_pythons_random_seed(tmp_path):
    img = noise()
    ra = RandAugment(2, 15)
    random.seed(7)
    np.random.seed(1)
    a = arr(ra(img))
    random.seed(7)
    np.random.seed(2)  # NumPy's state plays no part
    np.testing.assert_array_equal(arr(ra(img)), a)
    outs = []
    for s in range(10):
        random.seed(s)
        outs.append(arr(ra(img)))
    assert len({o.tobytes() for o in outs}) > 5
    # ... and through the dataset, which seeds per (seed, epoch, index)
    img.save(tmp_path / 'a.png')
    cfg = copy.deepcopy(DEFAULTS)
    cfg['Data'].update(img_size=32)
    ds = ImageDataset([(str(tmp_path / 'a.png'), 0)], ['a'], build_transform(cfg, train=True), seed=3)
    np.testing.assert_array_equal(ds[0][0], ds[0][0])
    ds.set_epoch(1)
    assert not np.array_equal(ds[0][0], ImageDataset(ds.samples, ['a'], ds.transform, seed=3)[0][0])


# ------------------------------------------------------------------------------------------------ file lists
def write(path, text):
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_filelist_reads_paths_labels_and_names(tmp_path):
    lst = write(tmp_path / 'list.txt', 'cats/a b.png 1\n\ndogs/c.png 0\n')
    assert filelist_samples('/root', lst, None) == ([('/root/cats/a b.png', 1), ('/root/dogs/c.png', 0)], ['0', '1'])
    names = write(tmp_path / 'labels.txt', 'dog\ncat\n')
    assert filelist_samples('/root', lst, names)[1] == ['dog', 'cat']


def test_filelist_negative_label_is_an_error_naming_the_line(tmp_path):
    lst = write(tmp_path / 'list.txt', 'a.png 0\nb.png -1\n')
    with pytest.raises(DataError, match=r'list\.txt:2: label -1 is negative; labels are class indices 0, 1, 2'):
        filelist_samples(str(tmp_path), lst, None)


@pytest.mark.parametrize('line', ['a.png', 'a.png 1.5', 'a.png cat', 'a.png ３'])
def test_filelist_label_must_be_an_integer(tmp_path, line):
    lst = write(tmp_path / 'list.txt', f'ok.png 0\n{line}\n')
    with pytest.raises(DataError, match=r'list\.txt:2: expected "relative/path label"'):
        filelist_samples(str(tmp_path), lst, None)


@pytest.mark.parametrize('text', ['', '\n  \n'])
def test_empty_filelist_is_a_data_error(tmp_path, text):
    lst = write(tmp_path / 'list.txt', text)
    with pytest.raises(DataError, match=r'file list .*list\.txt is empty \(expected lines "relative/path label"'):
        filelist_samples(str(tmp_path), lst, None)


def test_label_beyond_the_label_names_is_an_error_naming_the_line(tmp_path):
    lst = write(tmp_path / 'list.txt', 'a.png 0\nb.png 1\nc.png 2\n')
    names = write(tmp_path / 'labels.txt', 'dog\ncat\n')
    with pytest.raises(DataError, match=r'list\.txt:3: label 2 is out of range: .*labels\.txt names 2 classes '
                                        r'\(labels 0\.\.1\); add the missing class names or fix the label'):
        filelist_samples(str(tmp_path), lst, names)


def test_unreadable_label_names_file_is_a_data_error_naming_it(tmp_path):
    lst = write(tmp_path / 'list.txt', 'a.png 0\n')
    with pytest.raises(DataError, match=r'cannot read label names file .*nope\.txt'):
        filelist_samples(str(tmp_path), lst, str(tmp_path / 'nope.txt'))
    (tmp_path / 'folder').mkdir()
    with pytest.raises(DataError, match=r'cannot read label names file .*folder'):
        filelist_samples(str(tmp_path), lst, str(tmp_path / 'folder'))
    (tmp_path / 'bin.txt').write_bytes(b'\xff\xfe\x00bad')
    with pytest.raises(DataError, match=r'cannot read label names file .*bin\.txt'):
        filelist_samples(str(tmp_path), lst, str(tmp_path / 'bin.txt'))
    with pytest.raises(DataError, match=r'label names file .*empty\.txt is empty'):
        filelist_samples(str(tmp_path), lst, write(tmp_path / 'empty.txt', '\n'))


# ---------------------------------------------------------------- every PIL mode reads as what it shows
def _gradient(dtype, top):
    return (np.arange(64, dtype=np.float64).reshape(8, 8) / 63 * top).astype(dtype)  # 0 .. top


@pytest.mark.parametrize('mode, make, suffix, expected', [
    # 16-bit grey: 0..65535 -> 0..255 (Pillow's convert('RGB') turned 99.6% of it into 255)
    ('I;16', lambda: Image.fromarray(_gradient(np.uint16, 65535)), '.png', _gradient(np.float64, 255)),
    ('I', lambda: Image.fromarray(_gradient(np.int32, 65535)), '.tiff', _gradient(np.float64, 255)),
    ('F', lambda: Image.fromarray(_gradient(np.float32, 1.0)), '.tiff', _gradient(np.float64, 255)),
    ('1', lambda: Image.fromarray(_gradient(np.uint8, 255) > 127), '.png', (_gradient(np.float64, 255) > 127) * 255.0),
    ('L', lambda: Image.fromarray(_gradient(np.uint8, 255)), '.png', np.floor(_gradient(np.float64, 255))),
])
def test_grey_modes_keep_their_levels(tmp_path, mode, make, suffix, expected):
    img = make()
    path = tmp_path / f'img{suffix}'
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode or (mode == 'I;16' and reopened.mode in ('I', 'I;16'))
    rgb = np.asarray(ImageDataset([(str(path), 0)], ['a'], None).load(0), dtype=np.float64)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 0], expected, atol=1.0)


def test_transparent_pixels_become_white_and_opaque_ones_keep_their_colour(tmp_path):
    la = Image.new('LA', (4, 4), (50, 0))              # grey 50, fully transparent ...
    la.putpixel((0, 0), (50, 255))                     # ... but one opaque pixel
    pal = Image.new('P', (4, 4), 0)
    pal.putpalette([10, 20, 30] + [200, 100, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)                            # index 1 opaque orange; index 0 transparent
    pal.info['transparency'] = 0
    for name, img in (('la.png', la), ('p.png', pal)):
        img.save(tmp_path / name, transparency=0) if name == 'p.png' else img.save(tmp_path / name)
    ds = ImageDataset([(str(tmp_path / 'la.png'), 0), (str(tmp_path / 'p.png'), 0)], ['a'], None)
    la_rgb, p_rgb = np.asarray(ds.load(0)), np.asarray(ds.load(1))
    assert tuple(la_rgb[0, 0]) == (50, 50, 50) and tuple(la_rgb[3, 3]) == (255, 255, 255)
    assert tuple(p_rgb[0, 0]) == (200, 100, 0) and tuple(p_rgb[3, 3]) == (255, 255, 255)


def test_cmyk_reads_as_its_rgb_colour(tmp_path):
    Image.new('CMYK', (4, 4), (0, 255, 255, 0)).save(tmp_path / 'red.jpg', quality=100)   # cyan 0, magenta + yellow
    rgb = np.asarray(ImageDataset([(str(tmp_path / 'red.jpg'), 0)], ['a'], None).load(0), dtype=int)
    np.testing.assert_allclose(rgb[0, 0], (255, 0, 0), atol=8)


@pytest.mark.parametrize('world_size', [1, 2])
def test_train_sampler_gives_the_batches_from_start_to_stop_of_the_seeds_order(world_size):
    dataset = list(range(50))  # 50 samples: 6 batches of 8 per epoch with one process, 3 with two (drop_last)
    for rank in range(world_size):
        sampler = TrainBatchSampler(dataset, 8, num_replicas=world_size, rank=rank, shuffle=True, drop_last=True)
        sampler.set_epoch(7)
        order = list(sampler)
        assert len(order) == 6 // world_size and sorted(sum(order, [])) != sum(order, [])  # shuffled
        sampler.set_epoch(8)
        assert list(sampler) != order  # another seed, another order
        sampler.set_epoch(7, start=1, stop=len(order) - 1)  # a resume after batch 0, the last batch unused
        assert list(sampler) == order[1:-1]
        sampler.set_epoch(7, start=1)
        assert list(sampler) == order[1:]
        sampler.set_epoch(7)  # each call says where the epoch starts and stops: no bounds left from the last one
        assert list(sampler) == order


# ---------------------------------------------------------------------------------------- hostile and huge images
ROOT = Path(__file__).resolve().parent.parent


def png_bytes(width, height, rows=None):
    """An 8-bit RGB PNG of black pixels written row by row (no image in memory), or only its first ``rows`` rows
    and no end (a truncated file)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    deflate, row = zlib.compressobj(1), bytes(1 + 3 * width)  # filter byte 0, then the pixels
    idat = b''.join(deflate.compress(row) for _ in range(height if rows is None else rows))
    head = b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
    if rows is not None:
        return head + chunk(b'IDAT', idat)
    return head + chunk(b'IDAT', idat + deflate.flush()) + chunk(b'IEND', b'')


def test_reduction_factor_keeps_an_image_under_the_cap():
    assert reduction((6000, 6000), 40_000_000) == 1
    assert reduction((8000, 6000), 40_000_000) == 2    # 4000 x 3000 = 12 M
    assert reduction((3000, 2000), 1_000_000) == 4     # 1500 x 1000 = 1.5 M is still above
    assert reduction((3001, 2001), 94_376) == 8        # 1/8 rounds up, as the decoder does: 376 x 251 pixels
    assert reduction((3001, 2001), 94_375) == 0 and reduction((30000, 30000), 1_000_000) == 0
    assert reduction((30000, 30000), None) == 1


def test_hostile_images_are_skipped_once_each_with_their_reason(tmp_path):
    files = {'truncated.png': png_bytes(64, 64, rows=20), 'empty.jpg': b'', 'notes.png': b'a text file\n',
             'bomb.png': png_bytes(20000, 20000, rows=0),  # 400 M pixels: Pillow refuses it at open
             'huge.png': png_bytes(3000, 2000), 'good.png': png_bytes(8, 8)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ds = ImageDataset([(str(tmp_path / n), 0) for n in files], ['a'], lambda img: np.asarray(img),
                      max_pixels=1_000_000)
    items = [ds[i] for i in range(len(files))]
    assert [it[0] is None for it in items] == [True] * 5 + [False]
    _, _, indices, notes = ds.collate(items)
    assert indices.tolist() == [5] and notes.tolist() == [0, 1, 2, 3, 4, -1]
    lines = []
    report = SkipReport(ds, lines.append)
    report(notes)
    report(notes)  # seen again in a later epoch: not logged again
    assert report.count == 5 and len(lines) == 5
    reasons = dict(zip(files, lines))
    for name, reason in {'truncated.png': r'OSError: .*(truncated|broken)', 'empty.jpg': r'UnidentifiedImageError',
                         'notes.png': r'UnidentifiedImageError',
                         'bomb.png': r'DecompressionBombError: Image size \(400000000 pixels\) exceeds limit',
                         'huge.png': r'ImageTooLarge: 3000 x 2000 pixels \(6.0 megapixels\), above '
                                     r'Data.max_image_pixels \(1.0 megapixels\), and PNG images cannot be decoded '
                                     r'reduced \(JPEG can\): shrink the file, or raise Data.max_image_pixels'}.items():
        assert re.match(rf'skipped unreadable image {re.escape(str(tmp_path / name))}: {reason}', reasons[name]), \
            reasons[name]


def test_a_large_jpeg_is_decoded_reduced_with_one_line(tmp_path):
    x = np.linspace(0, 255, 3000)
    img = Image.fromarray(np.stack(np.broadcast_arrays(x[None, :], 128.0 * np.ones((2000, 1)), x[::-1][None, :]),
                                   -1).astype(np.uint8))
    img.save(tmp_path / 'big.jpg', quality=95)
    full = np.asarray(img.resize((750, 500), Image.BOX), dtype=float)
    ds = ImageDataset([(str(tmp_path / 'big.jpg'), 3)], ['a'], lambda im: np.asarray(im), max_pixels=1_000_000)
    pixels, label, index, factor = ds[0]
    assert pixels.shape == (500, 750, 3) and (label, index, factor) == (3, 0, 4)
    assert np.abs(pixels - full).mean() < 2  # the DCT's 1/4 scale: the picture, not a crop or noise
    _, _, _, notes = ds.collate([ds[0], ds[0]])
    assert notes.tolist() == [-2, -2]
    lines = []
    report = SkipReport(ds, lines.append)
    report(notes)
    report(notes)
    assert lines == [f'reduced large image {tmp_path / "big.jpg"}: 3000 x 2000 pixels (6.0 megapixels) decoded at 1/4 '
                     f'of its sides, 750 x 500, under Data.max_image_pixels (1.0 megapixels)'] and report.count == 0
    # without a cap, it is read as it is
    assert ImageDataset(ds.samples, ['a'], ds.transform)[0][0].shape == (2000, 3000, 3)


PEAK_SCRIPT = textwrap.dedent('''
    import gc, json, sys, warnings
    from common.data import read_image

    def status(key):  # kB
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))

    out = {}
    for name, path, cap in json.loads(sys.argv[1]):
        gc.collect()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets the peak resident size (VmHWM) to the current one
        before = status('VmRSS')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            try:
                img, factor = read_image(path, cap)
                result = [img.size[0], img.size[1], factor]
                del img
            except Exception as e:
                result = type(e).__name__
        out[name] = {'peak_mb': (status('VmHWM') - before) / 1024, 'result': result,
                     'warnings': [w.category.__name__ for w in caught]}
    print(json.dumps(out))
''')


def test_memory_stays_bounded_for_images_just_under_pillows_bomb_limit(tmp_path):
    """Peak resident memory of one image read, measured in a fresh process (VmHWM, reset before each read:
    ru_maxrss of a child can report its parent's peak, and never goes down)."""
    if not Path('/proc/self/clear_refs').exists():
        pytest.skip('needs Linux /proc/self/clear_refs to reset the peak resident size')
    (tmp_path / 'huge.png').write_bytes(png_bytes(13000, 13000))  # 169 M pixels: Pillow only warns (limit 179 M)
    Image.new('RGB', (8000, 6000), (90, 160, 30)).save(tmp_path / 'big.jpg', quality=90)  # 48 M pixels
    cap = DEFAULTS['Data']['max_image_pixels']
    cases = [('png, capped', str(tmp_path / 'huge.png'), cap), ('jpeg, capped', str(tmp_path / 'big.jpg'), cap),
             ('jpeg, no cap', str(tmp_path / 'big.jpg'), None)]
    run = subprocess.run([sys.executable, '-c', PEAK_SCRIPT, json.dumps(cases)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(got))
    assert cap == 40_000_000
    # the 13000 x 13000 PNG (0.5 GB of pixels, 1.6 GB peak through the training transform before) is refused from
    # its header, without Pillow's DecompressionBombWarning
    assert got['png, capped'] == {'peak_mb': got['png, capped']['peak_mb'], 'result': 'ImageTooLarge', 'warnings': []}
    assert got['png, capped']['peak_mb'] < 20
    # the 48 M pixel JPEG is decoded at half its sides: 36 MB of pixels instead of 144 MB
    assert got['jpeg, capped']['result'] == [4000, 3000, 2] and got['jpeg, no cap']['result'] == [8000, 6000, 1]
    assert 30 < got['jpeg, capped']['peak_mb'] < 60 and got['jpeg, no cap']['peak_mb'] > 140
