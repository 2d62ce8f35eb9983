"""tools/visualize_attention.py: the plotted weights are the model's real attention of the query, on the right
positions, and the PNG is drawn.

The reference below is independent of the tool and of the model's partition code: numpy LayerNorm, qkv, a
per-key relative-bias lookup and softmax over the query's real keys, in float64, from the block's own parameters
and the input the block received in the same forward pass (as tests/test_model.py::reference_attention does).
The model's float32 weights are compared with it to their rounding (tests/tolerance.py)."""
import random
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from common.config import build_model, load_config
from common.shapes import render_shape
from reference import brute_force_attention
from tolerance import EPS, assert_close, softmax_tolerance
from tools import visualize_attention as va

ROOT = Path(__file__).resolve().parent.parent

# A small model on the quickstart config: four stages, block/grid 3x3 on a 48x48 input (stage maps 12, 6, 3, 2),
# 2 heads of 16 channels at stage 0.
OVERRIDES = ['Model.stage_num_block=[1, 1, 1, 1]', 'Model.block_size=[3, 3]', 'Model.grid_size=[3, 3]',
             'Data.img_size=48', 'Model.num_heads=2', 'Model.drop_path=0.0']


def small_model():
    paddle.seed(0)
    model = build_model(load_config(str(ROOT / 'configs' / 'quickstart.yaml'), OVERRIDES))
    model.eval()
    # Freshly initialised attention is almost uniform (weights ~N(0, 0.02)); make it peaked so that a weight
    # put on the wrong key cannot go unnoticed.
    rng = np.random.RandomState(0)
    for stage in model.max_blocks:
        for block in stage:
            for layer in (block.block_attn, block.grid_attn):
                attn = layer.attn
                attn.relative_bias_table.set_value(rng.randn(*attn.relative_bias_table.shape).astype('float32'))
                attn.qkv.weight.set_value((0.3 * rng.randn(*attn.qkv.weight.shape)).astype('float32'))
    return model


# A logit z = scale * q.k + bias leaves the model through a chain of four float32 sums (LayerNorm's mean and
# variance, qkv, q.k), each off by about EPS/2 of the magnitude of its terms when their roundings have random signs,
# which brute_force_attention's logit magnitude bounds for all four: 4 sums x EPS/2, and 4 times that for margin.
# LayerNorm divides the rounding of its mean (relative to mean |x|) by the spread sigma, so the tolerance grows
# with mean |x| / sigma where that exceeds 1.
LOGIT_EPS = 8


def reference_row(layer, x, r, c):
    """(heads, H, W) softmax weights of query (r, c) in a Window_Block/Grid_Block whose input is x (H, W, C), and
    how far the model's float32 ones may be from them (elementwise)."""
    H, W, _ = x.shape
    norm = layer.norm1
    x = x.astype(np.float64)
    sigma = np.sqrt(x.var(-1, keepdims=True) + norm._epsilon)
    xn = (x - x.mean(-1, keepdims=True)) / sigma
    keys, p, _, magnitude = brute_force_attention(layer, xn * norm.weight.numpy() + norm.bias.numpy(), r, c,
                                                  magnitude=True)
    out = np.zeros((p.shape[0], H, W))
    for n, (ky, kx) in enumerate(keys):
        out[:, ky, kx] = p[:, n]
    norm_gain = max(1.0, float((np.abs(x).mean(-1, keepdims=True) / sigma).max()))
    return out, softmax_tolerance(out, LOGIT_EPS * EPS * norm_gain * magnitude.max())


def run(model, hw, query, stage=0, block=0):
    """attention_maps on a random image, and the inputs the two attention blocks got in that same forward."""
    seen = {}
    mb = model.max_blocks[stage][block]
    hooks = [mb.block_attn.register_forward_pre_hook(lambda l, i: seen.__setitem__('block', i[0].numpy()[0])),
             mb.grid_attn.register_forward_pre_hook(lambda l, i: seen.__setitem__('grid', i[0].numpy()[0]))]
    paddle.seed(1)
    try:
        maps = va.attention_maps(model, paddle.randn([1, 3, *hw]), query, stage, block)
    finally:
        for h in hooks:
            h.remove()
    return maps, seen


# (input size, query pixel, stage): a divisible map (12x12, 3x3 windows); a padded non-square one (10x13 -> 12x15)
# with the query at cell (9, 8), whose window (rows 10-11 padded) and grid-mates (spaced 4x5: column 13 padded)
# both hold padded keys; and stage 1 (5x7 -> 6x9, 2 x 2 heads).
CASES = [((48, 48), (20, 28), 0), ((40, 52), (38, 33), 0), ((40, 52), (3, 30), 1)]


# The 9 weights of a 3x3 partition are e_i / S: they share the rounding of S (8 additions, up to 8 EPS/2) and each
# adds a few EPS of its own (exp, the division), relative to itself; summed in float64. Twice that for a product
# of two such rows (block then grid).
SUM_EPS = 9 + 4


@pytest.mark.numerics
@pytest.mark.parametrize('hw, query, stage', CASES)
def test_plotted_weights_are_the_models_attention(hw, query, stage):
    model = small_model()
    maps, seen = run(model, hw, query, stage)
    mb = model.max_blocks[stage][0]
    H, W = seen['block'].shape[:2]
    assert maps['map_size'] == (H, W)
    r, c = maps['query']
    assert (r, c) == (query[0] * H // hw[0], query[1] * W // hw[1])
    for kind, layer in (('block', mb.block_attn), ('grid', mb.grid_attn)):
        ref, tolerance = reference_row(layer, seen[kind], r, c)
        assert maps[kind].shape == ref.shape == (2 * 2 ** stage, H, W)
        assert_close(maps[kind], ref, tolerance, kind)
        assert ref.max() > 1.5 / (ref[0] > 0).sum()          # peaked: a misplaced weight would show
        assert_close(maps[kind].sum((1, 2)), np.ones(len(ref)), SUM_EPS * EPS, f'{kind}: sum')
        # padded keys: masked (Paddle's softmax floors exp(x - max) at exp(-64) = 1.6e-28, so not exactly 0)
        assert 0.0 <= maps['padded_mass'][kind] < 1e-20


@pytest.mark.parametrize('hw, query, stage', CASES)
def test_weights_sit_on_the_window_and_the_grid_mates(hw, query, stage):
    model = small_model()
    maps, _ = run(model, hw, query, stage)
    H, W = maps['map_size']
    r, c = maps['query']
    Hp, Wp = -(-H // 3) * 3, -(-W // 3) * 3                   # padded to the 3x3 window / grid
    ys, xs = np.mgrid[:H, :W]
    window = (ys // 3 == r // 3) & (xs // 3 == c // 3)
    mates = (ys % (Hp // 3) == r % (Hp // 3)) & (xs % (Wp // 3) == c % (Wp // 3))   # spaced Hp/3, Wp/3 apart
    np.testing.assert_array_equal(maps['support']['block'], window)
    np.testing.assert_array_equal(maps['support']['grid'], mates)
    np.testing.assert_array_equal(maps['block'] > 0, np.broadcast_to(window, maps['block'].shape))
    np.testing.assert_array_equal(maps['grid'] > 0, np.broadcast_to(mates, maps['grid'].shape))
    if query == (38, 33):                                       # keys of both fall on padding
        assert (window.sum(), mates.sum()) == (3, 6)


@pytest.mark.numerics
@pytest.mark.parametrize('hw, query, stage', CASES[:2])
def test_block_then_grid_is_the_product_summed_over_grid_mates(hw, query, stage):
    model = small_model()
    maps, seen = run(model, hw, query, stage)
    mb = model.max_blocks[stage][0]
    H, W = maps['map_size']
    heads = maps['heads']
    expected, tolerance = np.zeros((heads, H, W)), np.zeros((heads, H, W))
    union = np.zeros((H, W), bool)
    ys, xs = np.mgrid[:H, :W]
    for gy, gx in zip(*np.nonzero(maps['support']['grid'])):
        block, block_tolerance = reference_row(mb.block_attn, seen['block'], gy, gx)   # (heads, H, W) of mate g
        expected += maps['grid'][:, gy, gx, None, None] * block.mean(0)[None]
        tolerance += maps['grid'][:, gy, gx, None, None] * block_tolerance.mean(0)[None]
        union |= (ys // 3 == gy // 3) & (xs // 3 == gx // 3)               # its 3x3 window
    assert_close(maps['combined'], expected, tolerance, 'combined')
    np.testing.assert_array_equal(maps['support']['combined'], union)
    np.testing.assert_array_equal(maps['combined'] > 0, np.broadcast_to(union, maps['combined'].shape))
    assert_close(maps['combined'].sum((1, 2)), np.ones(heads), 2 * SUM_EPS * EPS, 'combined: sum')
    if (H, W) == (12, 12):
        assert union.sum() == 81                                            # 9 grid-mates x 9 keys


def test_command_line_writes_the_picture(tmp_path):
    image = tmp_path / 'star.png'
    render_shape('star', random.Random(0), 64).save(image)
    out = tmp_path / 'pictures' / 'attention.png'
    model_overrides = sum((['-o', o] for o in OVERRIDES), [])
    res = va.main(['-c', str(ROOT / 'configs' / 'quickstart.yaml'), *model_overrides, '--image', str(image),
                   '--query', '20', '28', '--stage', '1', '--panel', '96', '--out', str(out)])
    with Image.open(out) as png:
        assert png.format == 'PNG'
        size = png.size
        pixels = np.asarray(png.convert('RGB')).astype(int)
    heads = 4                                                  # stage 1: 2 x 2 heads
    panel = 96                                                 # 48x48 model input (Data.img_size), square panels
    assert size == res['size'] == (4 * panel + 5 * va.PAD, va.HEADER + heads * (va.LABEL + panel + va.PAD) + va.PAD)
    assert res['map_size'] == (6, 6) and res['query'] == (20 * 6 // 48, 28 * 6 // 48)
    assert res['weights'].startswith('random weights')
    # the colour bar says which end is high: the colormap's dark end (0) on the left, its light end (max) right
    bar_row = pixels[34 + va.BAR[1] // 2]
    dark = np.nonzero((np.abs(bar_row - va.colormap(np.array(0.0))).sum(-1) <= 3))[0]
    light = np.nonzero((np.abs(bar_row - va.colormap(np.array(1.0))).sum(-1) <= 3))[0]
    assert len(dark) and len(light) and dark.max() < light.min() and light.min() - dark.max() > va.BAR[0] * 0.9
    # the block-attention panel of the first head: coloured on the query's window, gray elsewhere
    x0, y0, cell = 2 * va.PAD + panel, va.HEADER + va.LABEL, panel // 6
    for r in range(6):
        for c in range(6):
            rgb = pixels[y0 + r * cell + cell // 2, x0 + c * cell + cell // 2]
            gray = rgb.max() - rgb.min() <= 1
            assert gray != res['support']['block'][r, c], (r, c, rgb)


def test_bad_stage_block_and_query_say_what_is_valid():
    model = small_model()
    image = paddle.zeros([1, 3, 48, 48])
    with pytest.raises(va.VisualizeError, match=r'stages 0\.\.3'):
        va.attention_maps(model, image, (0, 0), stage=4)
    with pytest.raises(va.VisualizeError, match=r'Max_Blocks 0\.\.0'):
        va.attention_maps(model, image, (0, 0), stage=0, block=1)
    with pytest.raises(va.VisualizeError, match=r'outside the 48x48 model input'):
        va.attention_maps(model, image, (48, 0))
