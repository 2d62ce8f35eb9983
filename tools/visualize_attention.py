"""Draw where one position's block and grid attention look (the MaxViT paper's Figure 3, with real weights).

    python -m tools.visualize_attention -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best \
        --image data/shapes/val/star/0000.png --query 20 28 --out attention.png
    python -m tools.visualize_attention -c configs/maxvit_t_tf_224.yaml \
        -o Global.pretrained_model=weights/maxvit_t_tf_224.pdparams --image dog.jpg --query 100 120 \
        --stage 1 --block 1 --out attention.png

The image goes through the eval transform of the config (common.transforms.build_transform(cfg, train=False)); the
picture shows that model input, and --query ROW COL are pixel coordinates in it. The query is mapped to the
feature map of Max_Block --block of stage --stage (0-based: model.max_blocks[stage][block]; cell =
floor(ROW * map_height / input_height), same for columns). Without Global.pretrained_model the weights are
random. From a training checkpoint prefix (output/run/best), Global.eval_weights picks its EMA (default) or raw
weights, as in eval.py.

One row per attention head, four panels each:
1. the input, the query cell (cyan), its block-attention window (yellow) and its grid-mates (magenta dots);
2. block attention: the query's softmax weights over the keys of its own window;
3. grid attention: its weights over its grid-mates, spaced (H/g0, W/g1) apart over the whole map;
4. block then grid (one Max_Block): how much each map position can reach the query, the attention-rollout
   product sum_g grid[query, g] * block[g, key] over grid-mates g, with block weights averaged over heads (the
   output projection mixes heads between the two attentions). It sums to 1 over the union of the grid-mates'
   windows (the residual connections add the query's own window, which that union already holds).

The weights are the model's own: forward pre-hooks on the chosen Window_Block/Grid_Block's Rel_Attention capture
its real input during one forward pass (padded, partitioned, normalised, with the padding mask), and
Rel_Attention.attention_weights is called on exactly that. Padded keys (a map that does not divide by the window
or grid size) get zero weight and are cropped away. attention_maps() returns the plotted arrays.
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.visualize_attention ...')

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import numpy as np
import paddle
from PIL import Image, ImageDraw, ImageFont

from common.checkpoint import CheckpointError, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config
from common.data import read_rgb
from common.transforms import build_transform

# Layout of the picture, in pixels: panels of the image's aspect with the longer side PANEL (--panel).
PAD = 8              # around and between panels
HEADER = 56          # two title lines and the colour bar at the top
BAR = (160, 10)      # colour bar: width, height
LABEL = 26           # two caption lines above each panel
COLUMNS = 4          # input, block, grid, block then grid

# A perceptual colormap (inferno-like anchors), zero = dark, max = light yellow.
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float64)


class VisualizeError(ValueError):
    """A stage, block, head or query that this model and image do not have; the message says the valid range."""


# ------------------------------------------------------------------------------------------------ weights
def load_image(path: str, cfg: dict):
    """(model input (1, 3, H, W) float32, the same input as uint8 (H, W, 3) for display): the file read at most
    Data.max_image_pixels (common.data.read_image), then the eval transform."""
    image = read_rgb(path, cfg['Data']['max_image_pixels'])
    chw = np.asarray(build_transform(cfg, train=False)(image), dtype=np.float32)
    mean = np.asarray(cfg['Data']['mean'], np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg['Data']['std'], np.float32).reshape(3, 1, 1)
    shown = np.clip((chw * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return paddle.to_tensor(chw[None]), shown


def capture(model, images: paddle.Tensor, stage: int = 0, block: int = 0) -> dict:
    """Run ``model`` on ``images`` (batch 1) and capture what the attention of Max_Block ``block`` of stage
    ``stage`` really received. Returns {'block': ..., 'grid': ...}, each a dict with
    'layer' (the Window_Block / Grid_Block), 'hw' (its real map size), 'windows' (Rel_Attention's input,
    (num_windows, N, C)) and 'mask' ((num_windows, N) True on padding, or None)."""
    stages = model.max_blocks
    if not 0 <= stage < len(stages):
        raise VisualizeError(f'--stage {stage}: this model has stages 0..{len(stages) - 1}')
    if not 0 <= block < len(stages[stage]):
        raise VisualizeError(f'--block {block}: stage {stage} has Max_Blocks 0..{len(stages[stage]) - 1}')
    if images.shape[0] != 1:
        raise VisualizeError(f'one image at a time, got a batch of {images.shape[0]}')
    max_block = stages[stage][block]
    got = {'block': {'layer': max_block.block_attn}, 'grid': {'layer': max_block.grid_attn}}
    hooks = []
    for entry in got.values():
        def on_block(layer, inputs, entry=entry):            # Window_Block/Grid_Block input: (1, H, W, C)
            entry['hw'] = tuple(inputs[0].shape[1:3])

        def on_attn(layer, inputs, entry=entry):             # Rel_Attention input: (windows, N, C)[, mask]
            entry['windows'] = inputs[0].detach().clone()
            mask = inputs[1] if len(inputs) > 1 else None
            entry['mask'] = None if mask is None else mask.detach().clone()
        hooks.append(entry['layer'].register_forward_pre_hook(on_block))
        hooks.append(entry['layer'].attn.register_forward_pre_hook(on_attn))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        if was_training:  # Paddle 3.0's Layer.train() takes no argument
            model.train()
    return got


def _positions(layer, hw):
    """(padded (Hp, Wp), pos): pos[w, t] = flat index (row * Wp + col) on the padded map of token t of
    window w, from the block's own partition function, so it is the layout the model uses."""
    H, W = hw
    ph, pw = layer.partition_size
    Hp, Wp = H + (-H % ph), W + (-W % pw)
    index = paddle.arange(Hp * Wp, dtype='int64').reshape([1, Hp, Wp, 1])
    return (Hp, Wp), layer.partition(index, layer.partition_size).squeeze(-1).numpy()


def _all_weights(entry) -> np.ndarray:
    """Softmax weights of every window: (num_windows, heads, N, N), float64."""
    with paddle.no_grad():
        attn, _ = entry['layer'].attn.attention_weights(entry['windows'], entry['mask'])
    return attn.astype('float32').numpy().astype(np.float64)


def _scatter(weights: np.ndarray, keys: np.ndarray, padded) -> np.ndarray:
    """(heads, N) weights of keys at flat positions ``keys`` -> (heads, Hp, Wp) maps, zero elsewhere."""
    out = np.zeros((weights.shape[0], padded[0] * padded[1]))
    out[:, keys] = weights
    return out.reshape(weights.shape[0], *padded)


def _query_row(attn: np.ndarray, pos: np.ndarray, padded, r: int, c: int):
    """((heads, Hp, Wp) attention row of the query at (r, c) scattered onto the padded map,
    (Hp, Wp) bool: the positions of its window, the keys it can attend to, padding included)."""
    w, t = np.argwhere(pos == r * padded[1] + c)[0]
    keys = np.zeros(padded[0] * padded[1], bool)
    keys[pos[w]] = True
    return _scatter(attn[w, :, t, :], pos[w], padded), keys.reshape(padded)


def map_query(query, input_hw, map_hw):
    """Input pixel (row, col) -> the cell of a map_hw feature map that covers it."""
    (row, col), (H, W), (h, w) = query, input_hw, map_hw
    if not (0 <= row < H and 0 <= col < W):
        raise VisualizeError(f'--query {row} {col} lies outside the {H}x{W} model input (rows 0..{H - 1}, '
                             f'columns 0..{W - 1})')
    return int(row * h // H), int(col * w // W)


def attention_maps(model, images: paddle.Tensor, query, stage: int = 0, block: int = 0) -> dict:
    """The plotted arrays, on the chosen stage's (unpadded) H x W map, float64:

    'block' (heads, H, W): the query's block-attention weights (nonzero only on its window; sum 1 per head);
    'grid' (heads, H, W): its grid-attention weights (nonzero only on its grid-mates; sum 1 per head);
    'combined' (heads, H, W): sum over grid-mates g of grid[h, g] * mean over heads of block[g] (sum 1);
    'support': {'block', 'grid', 'combined'} (H, W) bool: the real positions each can reach (the query's window,
    its grid-mates, the union of the grid-mates' windows);
    plus 'query' (map cell), 'query_input' (input pixel), 'map_size', 'input_size', 'padded' (padded map size of
    block and grid attention), 'padded_mass' (weight on padded keys, cropped away: below 1e-27, as Paddle's
    softmax floors probabilities at exp(-64)) and 'heads'.
    ``query`` is (row, col) in input pixels."""
    got = capture(model, images, stage, block)
    H, W = got['block']['hw']
    r, c = map_query(query, images.shape[2:], (H, W))
    out = {'query': (r, c), 'query_input': tuple(int(q) for q in query), 'map_size': (H, W),
           'input_size': tuple(images.shape[2:]), 'stage': stage, 'block_index': block, 'padded': {},
           'padded_mass': {}, 'partition_size': {}, 'support': {}}
    rows = {}
    for kind in ('block', 'grid'):
        entry = got[kind]
        padded, pos = _positions(entry['layer'], entry['hw'])
        attn = _all_weights(entry)
        full, keys = _query_row(attn, pos, padded, r, c)
        out[kind] = full[:, :H, :W].copy()
        out['support'][kind] = keys[:H, :W].copy()
        out['padded'][kind] = padded
        out['padded_mass'][kind] = float(full[:, H:, :].sum() + full[:, :H, W:].sum())
        out['partition_size'][kind] = tuple(entry['layer'].partition_size)
        rows[kind] = (attn, pos, padded)
    out['heads'] = out['block'].shape[0]

    # block then grid: every real grid-mate g passes on its (head-averaged) block-attention row
    attn, pos, padded = rows['block']
    combined = np.zeros_like(out['grid'])
    support = np.zeros((H, W), bool)
    for gy, gx in zip(*np.nonzero(out['support']['grid'])):
        reach, keys = _query_row(attn, pos, padded, gy, gx)
        combined += out['grid'][:, gy, gx, None, None] * reach.mean(0)[None, :H, :W]
        support |= keys[:H, :W]
    out['combined'] = combined
    out['support']['combined'] = support
    return out


# ------------------------------------------------------------------------------------------------ drawing
def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB (..., 3)."""
    x = np.clip(values, 0.0, 1.0) * (len(_CMAP) - 1)
    anchors = np.arange(len(_CMAP))
    return np.stack([np.interp(x, anchors, _CMAP[:, k]) for k in range(3)], -1).round().astype(np.uint8)


def panel_size(input_hw, panel: int):
    """(width, height) of one panel: the input's aspect, longer side ``panel`` pixels."""
    H, W = input_hw
    scale = panel / max(H, W)
    return max(1, round(W * scale)), max(1, round(H * scale))


def figure_size(input_hw, heads: int, panel: int):
    """(width, height) of the whole picture for ``heads`` rows."""
    pw, ph = panel_size(input_hw, panel)
    return COLUMNS * pw + (COLUMNS + 1) * PAD, HEADER + heads * (LABEL + ph + PAD) + PAD


def _cell_box(r, c, map_hw, size):
    """Pixel box of map cell (r, c) in a panel of ``size`` (width, height)."""
    (h, w), (pw, ph) = map_hw, size
    return (c * pw / w, r * ph / h, (c + 1) * pw / w - 1, (r + 1) * ph / h - 1)


def _heat(base: Image.Image, weights: np.ndarray, support: np.ndarray) -> Image.Image:
    """The image faded to light gray outside ``support``, coloured by weight (relative to the panel's maximum,
    dark = 0, light yellow = max) inside it."""
    size = base.size
    top = weights.max()
    norm = weights / top if top > 0 else weights
    color = Image.fromarray(colormap(norm)).resize(size, Image.NEAREST)
    alpha = Image.fromarray(np.where(support, 200 + 40 * norm, 0).astype(np.uint8)).resize(size, Image.NEAREST)
    faded = Image.blend(base.convert('L').convert('RGB'), Image.new('RGB', size, (255, 255, 255)), 0.7)
    return Image.composite(color, faded, alpha)


def draw(shown: np.ndarray, maps: dict, panel: int = 192, heads=None) -> Image.Image:
    """The picture (module docstring) for the input ``shown`` (H, W, 3 uint8) and attention_maps() output."""
    heads = list(range(maps['heads'])) if heads is None else list(heads)
    H, W = maps['map_size']
    r, c = maps['query']
    pw, ph = panel_size(shown.shape[:2], panel)
    fig = Image.new('RGB', figure_size(shown.shape[:2], len(heads), panel), (255, 255, 255))
    pen = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    bs, gs = maps['partition_size']['block'], maps['partition_size']['grid']
    gp = maps['padded']['grid']
    pen.text((PAD, 4), f"stage {maps['stage']}, Max_Block {maps['block_index']}: query pixel "
                       f"{maps['query_input']} of the {maps['input_size'][0]}x{maps['input_size'][1]} input "
                       f"-> cell {(r, c)} of the {H}x{W} map", fill=(0, 0, 0), font=font)
    pen.text((PAD, 18), f"block attention: {bs[0]}x{bs[1]} window; grid attention: {gs[0]}x{gs[1]} grid, "
                        f"spacing {gp[0] // gs[0]}x{gp[1] // gs[1]}; colour = weight / panel max; "
                        f"even = 1 / positions reached",
             fill=(0, 0, 0), font=font)
    # colour bar: what the heat panels' colours mean, low (0) on the left to high (the panel's maximum) on the right
    bar = Image.fromarray(colormap(np.tile(np.linspace(0.0, 1.0, BAR[0]), (BAR[1], 1))))
    low = 'low: 0'
    fig.paste(bar, (PAD + int(pen.textlength(low, font=font)) + 6, 34))
    pen.text((PAD, 34), low, fill=(0, 0, 0), font=font)
    pen.text((PAD + int(pen.textlength(low, font=font)) + 12 + BAR[0], 34), 'high: the panel\'s max weight',
             fill=(0, 0, 0), font=font)
    base = Image.fromarray(shown).resize((pw, ph), Image.BICUBIC)
    query_box = _cell_box(r, c, (H, W), (pw, ph))
    for row, h in enumerate(heads):
        y = HEADER + row * (LABEL + ph + PAD)
        panels = [('input: query (cyan), window\n(yellow), grid-mates (magenta)', None),
                  (f"block attention, head {h}", 'block'),
                  (f"grid attention, head {h}", 'grid'),
                  (f"block then grid, grid head {h}", 'combined')]
        for col, (title, kind) in enumerate(panels):
            x = PAD + col * (pw + PAD)
            if kind is None:
                img = base.copy()
                d = ImageDraw.Draw(img)
                rows_, cols_ = np.nonzero(maps['support']['block'])
                left, top, _, _ = _cell_box(rows_.min(), cols_.min(), (H, W), (pw, ph))
                _, _, right, bottom = _cell_box(rows_.max(), cols_.max(), (H, W), (pw, ph))
                d.rectangle((left, top, right, bottom), outline=(255, 220, 0), width=2)
                for gy, gx in zip(*np.nonzero(maps['support']['grid'])):
                    bx0, by0, bx1, by1 = _cell_box(gy, gx, (H, W), (pw, ph))
                    cx, cy, rad = (bx0 + bx1) / 2, (by0 + by1) / 2, max(2, min(bx1 - bx0, by1 - by0) / 4)
                    d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(255, 0, 255))
            else:
                weights = maps[kind][h]
                img = _heat(base, weights, maps['support'][kind])
                title += f'\nmax {weights.max():.3f}, even {1 / maps["support"][kind].sum():.3f}'
                d = ImageDraw.Draw(img)
            d.rectangle(query_box, outline=(0, 255, 255), width=2)
            fig.paste(img, (x, y + LABEL))
            pen.multiline_text((x, y + 1), title, fill=(0, 0, 0), font=font, spacing=2)
    return fig


# ------------------------------------------------------------------------------------------------ command line
def main(argv=None) -> dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    parser.add_argument('--image', required=True, help='image file (any size; the eval transform is applied)')
    parser.add_argument('--query', type=int, nargs=2, required=True, metavar=('ROW', 'COL'),
                        help='query pixel in the model input (after the eval transform)')
    parser.add_argument('--stage', type=int, default=0,
                        help="stage index 0..3 = model.max_blocks[i], tools/summary.py's 'stage i+1' (default 0: "
                             "the finest map, stride 4)")
    parser.add_argument('--block', type=int, default=0, help='Max_Block within the stage (default 0)')
    parser.add_argument('--heads', type=int, nargs='+', help='heads to draw (default: all)')
    parser.add_argument('--panel', type=int, default=192, help='longer side of each panel in pixels (default 192)')
    parser.add_argument('--out', default='attention.png', help='PNG to write (default attention.png)')
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)

    model = build_model(cfg)
    weights = cfg['Global']['pretrained_model']
    if weights:
        _, _, what = load_pretrained(model, weights, ema=cfg['Global']['eval_weights'] == 'ema')
    else:
        what = 'random weights (no -o Global.pretrained_model=...)'
    model.eval()
    images, shown = load_image(args.image, cfg)
    maps = attention_maps(model, images, args.query, args.stage, args.block)
    if args.heads and not all(0 <= h < maps['heads'] for h in args.heads):
        raise VisualizeError(f"--heads {args.heads}: stage {args.stage} has heads 0..{maps['heads'] - 1}")
    fig = draw(shown, maps, args.panel, args.heads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.save(args.out)
    H, W = maps['map_size']
    print(f"{what}\nstage {args.stage} Max_Block {args.block}: {H}x{W} map, query pixel {tuple(args.query)} -> "
          f"cell {maps['query']}; positions reached: block {int(maps['support']['block'].sum())}, "
          f"grid {int(maps['support']['grid'].sum())}, block then grid {int(maps['support']['combined'].sum())}\n"
          f"wrote {args.out} ({fig.size[0]}x{fig.size[1]})", flush=True)
    return dict(maps, out=args.out, size=fig.size, weights=what)


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, CheckpointError, VisualizeError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
