"""maxvit.py: the article's model, its fixed bugs, any input size, features, and what the attention sees."""
import math
import re
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import maxvit
from reference import brute_force_attention
from maxvit import (Grid_Block, MaxViT, MBConv, Rel_Attention, Window_Block, create_model,
                    grid_partition, grid_reverse, relative_position_index, tiny_args, window_partition,
                    window_reverse)

DATA = Path(__file__).parent / 'data'

# A small model with the article's layout, for tests where the 224 layout is not the point.
SMALL = dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=16, stage_dim=16, num_heads=1, num_classes=10)


# ---------------------------------------------------------------- the article, exactly
def test_article_snippet_output_shape():
    paddle.seed(0)
    out = MaxViT(tiny_args)(paddle.zeros([2, 3, 224, 224]))
    assert out.shape == [2, 1000]


def parse_summary(text):
    rows = re.findall(r'^\s*([A-Za-z_0-9]+)-\d+\s+(\[\[.*?\]\])\s+(\[.*?\])\s+([\d,]+)\s*$', text, re.M)
    return [(kind, int(params.replace(',', ''))) for kind, _, _, params in rows]


def test_tiny_summary_matches_article_table(capsys):
    model = MaxViT(tiny_args)
    totals = paddle.summary(model, (1, 3, 224, 224))
    ours = parse_summary(capsys.readouterr().out)
    assert int(totals['total_params']) == 31_001_840
    assert int(totals['trainable_params']) == 30_947_696  # the article's 30,893,552 counted BN stats twice

    article = parse_summary((DATA / 'article_tiny_summary.txt').read_text())
    assert sum(p for _, p in article) == 31_001_840
    # Row by row, every layer with parameters appears in the same order with the same count. Kinds map as:
    # the article's 1x1 Conv2D on NCHW windows = our Linear on channels-last tokens; its LayerNorm inside
    # Channel_Layernorm = our Channel_Layernorm (a LayerNorm without the two transposes).
    same_kind = {'LayerNorm': 'Channel_Layernorm'}
    art = [(same_kind.get(k, k), p) for k, p in article if p]
    our = [(k, p) for k, p in ours if p]
    assert len(art) == len(our) == 264
    for (ka, pa), (ko, po) in zip(art, our):
        assert pa == po
        assert ka == ko or (ka == 'Conv2D' and ko == 'Linear')


# paddle.summary's total (parameters + BatchNorm statistics) for the article layout, as the article prints it for
# Tiny; trainable parameters for the official layout, as timm counts them (README's table).
@pytest.mark.parametrize('name, total, trainable', [
    ('tiny', 31_001_840, 30_947_696), ('small', 69_049_428, 68_968_404), ('base', 119_715_900, 119_550_396),
    ('large', 212_133_336, 211_912_408), ('xlarge', 475_485_904, 475_154_512),
    ('tiny_tf', 30_964_144, 30_916_528), ('small_tf', 68_999_252, 68_927_956), ('base_tf', 119_615_036, 119_467_708),
    ('large_tf', 211_982_168, 211_785_560), ('xlarge_tf', 475_246_864, 474_951_952)])
def test_every_variant_builds_from_its_name_with_its_parameter_count(name, total, trainable):
    with paddle.LazyGuard():  # shapes only: the XL models build in under a second
        model = create_model(name)
    assert sum(math.prod(v.shape) for v in model.state_dict().values()) == total
    assert sum(math.prod(p.shape) for p in model.parameters() if not p.stop_gradient) == trainable


def test_variant_summary_total_is_the_state_dict_count():
    """paddle.summary (what the article prints) counts what the state dict holds, at any input size."""
    model = create_model('small')
    assert int(paddle.summary(model, (1, 3, 64, 64))['total_params']) == 69_049_428


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(KeyError, match=r"'stage_num_blocks'.*did you mean 'stage_num_block'"):
        MaxViT(dict(tiny_args, stage_num_blocks=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match='act_layer'):
        MaxViT(dict(tiny_args, act_layer='relu'))


# ---------------------------------------------------------------- bug 1: attention once per Window_Block
@pytest.mark.parametrize('cls', [Window_Block, Grid_Block])
def test_attention_runs_once_per_block(cls):
    block = cls(32, (7, 7), 1)
    calls = []
    block.attn.register_forward_post_hook(lambda layer, inp, out: calls.append(1))
    block(paddle.randn([1, 14, 14, 32]))
    assert len(calls) == 1


@pytest.mark.numerics
def test_window_block_is_attention_then_mlp():
    paddle.seed(1)
    block = Window_Block(32, (7, 7), 2)
    block.eval()
    x = paddle.randn([1, 14, 21, 32])
    y = x + window_reverse(block.attn(window_partition(block.norm1(x), (7, 7))), (7, 7), (14, 21))
    y = y + block.mlp(block.norm2(y))
    np.testing.assert_allclose(block(x).numpy(), y.numpy(), atol=1e-6)


# ---------------------------------------------------------------- bug 2: height and width, non-square maps
@pytest.mark.parametrize('part, rev', [(window_partition, window_reverse), (grid_partition, grid_reverse)])
def test_partition_round_trip_non_square(part, rev):
    x = paddle.randn([2, 14, 21, 5])
    windows = part(x, (7, 3))
    assert windows.shape == [2 * 2 * 7, 21, 5]
    np.testing.assert_array_equal(rev(windows, (7, 3), (14, 21)).numpy(), x.numpy())


def test_partition_token_positions():
    H, W = 6, 8
    pos = paddle.arange(H * W, dtype='float32').reshape([1, H, W, 1])  # pixel id = row * W + col
    win = window_partition(pos, (3, 4)).numpy()[..., 0]                # (4 windows, 12 tokens)
    grid = grid_partition(pos, (3, 4)).numpy()[..., 0]
    for a in range(H // 3):
        for b in range(W // 4):
            for i in range(3):
                for j in range(4):
                    assert win[a * 2 + b, i * 4 + j] == (a * 3 + i) * W + (b * 4 + j)
                    # grid: window (a, b) holds pixels (i*H/3 + a, j*W/4 + b), spaced H/3 and W/4 apart
                    assert grid[a * 2 + b, i * 4 + j] == (i * 2 + a) * W + (j * 2 + b)


@pytest.mark.parametrize('part', [window_partition, grid_partition])
def test_partition_checks_width_too(part):
    with pytest.raises(ValueError, match='14x15'):
        part(paddle.zeros([1, 14, 15, 4]), (7, 7))  # height divides, width does not


def test_non_square_image():
    model = MaxViT(SMALL)
    model.eval()
    assert model(paddle.randn([1, 3, 224, 448])).shape == [1, 10]


# ---------------------------------------------------------------- bug 3: logits out, probabilities apart
@pytest.mark.numerics
def test_forward_returns_logits_and_predict_probabilities():
    paddle.seed(0)
    model = MaxViT(SMALL)
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    logits = model(x)
    assert float(logits.min()) < 0  # softmax output would be positive
    assert not np.allclose(logits.sum(axis=-1).numpy(), 1.0)
    probs = model.predict(x)
    np.testing.assert_allclose(probs.sum(axis=-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.numpy(), F.softmax(logits, axis=-1).numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bug 4: relative position bias
def test_relative_index_matches_brute_force():
    h, w = 3, 4
    index = relative_position_index((h, w)).numpy().reshape(h * w, h * w)
    for q in range(h * w):
        for k in range(h * w):
            dy, dx = q // w - k // w, q % w - k % w
            assert index[q, k] == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
    assert sorted(set(index.flatten())) == list(range((2 * h - 1) * (2 * w - 1)))  # every row is used


def test_relative_bias_gathers_whole_rows():
    # torch.gather-style element-wise indexing would read the wrong head for every head but the first.
    attn = Rel_Attention(32, (3, 4), num_heads=4)
    table = attn.relative_bias_table.numpy()
    assert table.shape == ((2 * 3 - 1) * (2 * 4 - 1), 4)
    bias = attn.relative_bias().numpy()                                # (heads, N, N)
    for q in range(12):
        for k in range(12):
            row = (q // 4 - k // 4 + 2) * 7 + (q % 4 - k % 4 + 3)
            np.testing.assert_array_equal(bias[:, q, k], table[row])


# ---------------------------------------------------------------- bug 5: initialisation
def test_official_initialisation():
    paddle.seed(0)
    model = MaxViT(dict(tiny_args, num_classes=100))
    weights = np.concatenate([layer.weight.numpy().ravel() for layer in model.sublayers()
                              if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear))])
    assert abs(weights.std() - 0.0176) < 0.001   # std of N(0, 0.02) truncated at 2 std = 0.02 * 0.8796
    assert np.abs(weights).max() <= 0.04 + 1e-6
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear)) and layer.bias is not None:
            assert not layer.bias.numpy().any()
        if isinstance(layer, (paddle.nn.LayerNorm, paddle.nn.BatchNorm2D)):
            assert (layer.weight.numpy() == 1).all() and not layer.bias.numpy().any()
    tables = np.concatenate([l.relative_bias_table.numpy().ravel() for l in model.sublayers()
                             if isinstance(l, Rel_Attention)])
    assert abs(tables.std() - 0.0176) < 0.002 and np.abs(tables).max() <= 0.04 + 1e-6


# ---------------------------------------------------------------- bug 6: stochastic depth schedule
def test_drop_path_rises_linearly_from_zero():
    model = MaxViT(dict(tiny_args, drop_path=0.2))
    blocks = [b for stage in model.max_blocks for b in stage]
    rates = []
    for block in blocks:
        layers = [block.mbconv.drop_path, block.block_attn.drop_path, block.grid_attn.drop_path]
        r = {getattr(l, 'drop_prob', 0.0) for l in layers}
        assert len(r) == 1  # the three parts of a Max_Block share its rate
        rates.append(r.pop())
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, 11), atol=1e-12)


def test_drop_path_drops_whole_samples_in_training_only():
    layer = maxvit.DropPath(0.5)
    x = paddle.ones([64, 3, 4, 4])
    paddle.seed(0)
    y = layer(x).numpy()
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    assert all(len(set(row)) == 1 for row in per_sample)
    layer.eval()
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())


def test_reset_classifier_for_fine_tuning():
    model = MaxViT(dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1))
    model.reset_classifier(37)
    assert model(paddle.zeros([1, 3, 32, 32])).shape == [1, 37] and model.args['num_classes'] == 37
    assert float(model.proj.bias.abs().sum()) == 0 and 0 < float(model.proj.weight.std()) < 0.03


@pytest.mark.parametrize('cls', [Window_Block, Grid_Block])
def test_attention_block_drop_path_drops_whole_images_not_windows(cls):
    """The blocks run on partitioned windows (B*num_windows, N, C); stochastic depth must still drop an image's
    branch in all of its windows at once. With the MLP's output zeroed, out == x exactly where attention was
    dropped, and each image must be all or none: an unpadded 14x21 map (6 windows per image) and a padded 10x9 one."""
    paddle.seed(0)
    for hw in [(14, 21), (10, 9)]:
        block = cls(8, (7, 7), 2, drop_path=0.5)
        block.mlp.fc2.weight.set_value(paddle.zeros_like(block.mlp.fc2.weight))
        block.mlp.fc2.bias.set_value(paddle.zeros_like(block.mlp.fc2.bias))
        x = paddle.randn([64, *hw, 8])
        block.eval()
        branch = (block(x) - x).numpy()
        block.train()
        got = (block(x) - x).numpy()
        per_pixel = (np.abs(got) == 0).all(-1).reshape(64, -1)      # branch dropped at this pixel
        dropped = per_pixel.all(1)
        assert (per_pixel.any(1) == dropped).all()                  # an image is dropped everywhere or nowhere
        assert 10 < dropped.sum() < 54
        np.testing.assert_allclose(got[~dropped], branch[~dropped] / 0.5, rtol=1e-4, atol=1e-5)


def test_mbconv_drop_path_drops_its_branch_per_sample():
    """MBConv's stochastic depth (the article's unused ``dropout`` argument is gone): in training each sample's
    residual branch is either dropped (output = shortcut) or scaled by 1/keep."""
    paddle.seed(0)
    block = MBConv(16, 16, 3, 1, drop_path=0.5)
    x = paddle.randn([64, 16, 8, 8])
    block.eval()
    branch = (block(x) - x).numpy()                        # identity shortcut: in == out, stride 1
    block.train()
    for layer in block.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer.eval()                                   # running statistics: only drop path differs
    got = (block(x) - x).numpy()
    dropped = np.abs(got).reshape(64, -1).max(1) == 0
    assert 10 < dropped.sum() < 54                         # about half of 64
    np.testing.assert_allclose(got[~dropped], branch[~dropped] / 0.5, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- any input size
@pytest.mark.parametrize('hw', [(200, 300), (255, 257)])
def test_any_input_size_gives_finite_logits(hw):
    paddle.seed(0)
    model = MaxViT(tiny_args)
    model.eval()
    out = model(paddle.randn([1, 3, *hw]))
    assert out.shape == [1, 1000] and np.isfinite(out.numpy()).all()


@pytest.mark.numerics
@pytest.mark.parametrize('cls', [Window_Block, Grid_Block])
def test_mask_path_equals_fast_path_when_nothing_is_padded(cls):
    paddle.seed(0)
    block = cls(32, (7, 7), 2)
    block.eval()
    x = block.partition(paddle.randn([2, 14, 21, 32]), (7, 7))
    no_padding = paddle.zeros([x.shape[0] // 2, 49], dtype='bool')
    np.testing.assert_allclose(block.attn(x, no_padding).numpy(), block.attn(x).numpy(), atol=1e-6)


def reference_attention(block, x):
    """Brute-force attention output of a Window/Grid block on (H, W, C), numpy, query by query."""
    H, W, C = x.shape
    out = np.zeros((H, W, C))
    for qy in range(H):
        for qx in range(W):
            keys, p, qkv = brute_force_attention(block, x, qy, qx)
            v = np.stack([qkv[ky, kx, 2] for ky, kx in keys])            # (keys, heads, head_dim)
            out[qy, qx] = np.einsum('hn,nhd->hd', p, v).reshape(C)
    return out @ block.attn.proj.weight.numpy() + block.attn.proj.bias.numpy()


@pytest.mark.numerics
@pytest.mark.parametrize('cls', [Window_Block, Grid_Block])
@pytest.mark.parametrize('hw', [(14, 14), (10, 9)])
def test_padded_attention_matches_brute_force(cls, hw):
    paddle.seed(0)
    block = cls(8, (7, 7), 2)
    block.eval()
    x = paddle.randn([1, *hw, 8])
    # the block with the attention computed query by query on the unpadded map (padding, if any, must not show)
    y = x + paddle.to_tensor(reference_attention(block, block.norm1(x).numpy()[0])[None], dtype='float32')
    y = y + block.mlp(block.norm2(y))
    np.testing.assert_allclose(block(x).numpy(), y.numpy(), atol=2e-5)


def test_bad_input_shapes_say_what_was_expected():
    model = MaxViT(SMALL)
    with pytest.raises(ValueError, match=r'\[batch, 3, height, width\].*\[1, 1, 64, 64\]'):
        model(paddle.zeros([1, 1, 64, 64]))
    with pytest.raises(ValueError, match=r'\[batch, 3, height, width\].*\[3, 64, 64\]'):
        model(paddle.zeros([3, 64, 64]))


# ---------------------------------------------------------------- multi-scale features
def test_forward_features_strides_and_channels():
    model = MaxViT(tiny_args)
    model.eval()
    feats = model.forward_features(paddle.zeros([1, 3, 224, 224]))
    assert [f.shape for f in feats] == [[1, 64, 112, 112], [1, 64, 56, 56], [1, 128, 28, 28], [1, 256, 14, 14],
                                        [1, 512, 7, 7]]
    assert [(i['num_chs'], i['reduction']) for i in model.feature_info] == [
        (64, 2), (64, 4), (128, 8), (256, 16), (512, 32)]


def test_headless_model():
    model = MaxViT(dict(SMALL, num_classes=0))
    model.eval()
    assert model(paddle.zeros([1, 3, 64, 64])).shape == [1, SMALL['stage_dim'] * 8]


# ---------------------------------------------------------------- what block and grid attention see
@pytest.mark.parametrize('cls', [Window_Block, Grid_Block])
def test_receptive_field_of_one_block(cls):
    paddle.seed(0)
    H = W = 28
    block = cls(16, (7, 7), 2)
    block.eval()
    x = paddle.randn([1, H, W, 16])
    y0 = block(x).numpy()
    x2 = x.numpy().copy()
    x2[0, 9, 16] += np.random.RandomState(0).randn(16)                 # poke one input position
    # (a random vector: adding the same value to every channel would vanish in LayerNorm)
    changed = np.abs(block(paddle.to_tensor(x2)).numpy() - y0).max(-1)[0] > 1e-7
    expected = np.zeros((H, W), bool)
    if cls is Window_Block:
        expected[7:14, 14:21] = True                                    # its own 7x7 block
    else:
        expected[9 % 4::4, 16 % 4::4] = True                            # grid-mates, stride H/7 = 4
    np.testing.assert_array_equal(changed, expected)


def test_unknown_variant_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown MaxViT variant 'huge'; known: tiny, small, base, large, xlarge"):
        create_model('huge')


@pytest.mark.parametrize('name, momentum, eps', [('tiny', 0.9, 1e-5), ('tiny_tf', 0.99, 1e-3)])
def test_batch_norm_momentum_and_eps_of_each_layout(name, momentum, eps):
    """Paddle's momentum is TensorFlow's (running = m * running + (1 - m) * batch): the official 0.99 stays 0.99,
    not torchvision's 0.01. Every BatchNorm of the model has the layout's values."""
    with paddle.LazyGuard():
        model = create_model(name)
    norms = [l for l in model.sublayers() if isinstance(l, paddle.nn.BatchNorm2D)]
    assert len(norms) >= 34
    assert {(l._momentum, l._epsilon) for l in norms} == {(momentum, eps)}
    # and the running mean really moves by (1 - momentum) of the batch mean
    bn = paddle.nn.BatchNorm2D(1, momentum=momentum, epsilon=eps)
    bn.train()
    bn(paddle.full([2, 1, 2, 2], 10.0))
    assert bn._mean.numpy()[0] == pytest.approx((1 - momentum) * 10.0)
