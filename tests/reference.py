"""Independent numpy references the tests compare the model with."""
import numpy as np

from maxvit import Grid_Block


def brute_force_attention(block, xn, r, c, magnitude=False):
    """Attention of query pixel (r, c) in a Window_Block/Grid_Block, given the block's normalised input
    xn (H, W, C), by looping over keys: the query attends to the real pixels of its own window (block) or grid
    cell (grid; maps padded to multiples of the partition size), bias looked up in the table by offset.
    Computed in float64, so that its own rounding is negligible next to a float32 model's.
    Returns (keys [(row, col)], softmax weights (heads, keys), qkv (H, W, 3, heads, head_dim)), and with
    ``magnitude`` also the magnitude each logit sums, (heads, keys): scale * sum_d |q_d| |k_d| + |bias|, with q and
    k at the magnitude their own sums had, |xn| @ |W| + |b| (what a float32 computation's rounding is relative to)."""
    H, W, C = xn.shape
    ph, pw = block.partition_size
    Hp, Wp = -(-H // ph) * ph, -(-W // pw) * pw
    attn = block.attn
    heads = attn.num_heads
    xn = np.asarray(xn, np.float64).reshape(-1, C)
    weight, bias = (attn.qkv.weight.numpy().astype(np.float64), attn.qkv.bias.numpy().astype(np.float64))
    qkv = (xn @ weight + bias).reshape(H, W, 3, heads, -1)
    qkv_magnitude = (np.abs(xn) @ np.abs(weight) + np.abs(bias)).reshape(H, W, 3, heads, -1)
    table = attn.relative_bias_table.numpy().astype(np.float64)
    grid = isinstance(block, Grid_Block)

    def cell(y, x):  # (which window, position inside it)
        if grid:   # grid-mates: the same remainder modulo the spacing Hp/g0, Wp/g1
            return (y % (Hp // ph), x % (Wp // pw)), (y // (Hp // ph), x // (Wp // pw))
        return (y // ph, x // pw), (y % ph, x % pw)

    window, (qi, qj) = cell(r, c)
    keys = [(ky, kx) for ky in range(H) for kx in range(W) if cell(ky, kx)[0] == window]
    logits, logit_magnitude = np.zeros((heads, len(keys))), np.zeros((heads, len(keys)))
    for n, (ky, kx) in enumerate(keys):
        _, (ki, kj) = cell(ky, kx)
        row = (qi - ki + ph - 1) * (2 * pw - 1) + (qj - kj + pw - 1)
        logits[:, n] = (qkv[r, c, 0] * qkv[ky, kx, 1]).sum(-1) * attn.scale + table[row]
        logit_magnitude[:, n] = ((qkv_magnitude[r, c, 0] * qkv_magnitude[ky, kx, 1]).sum(-1) * attn.scale
                                 + np.abs(table[row]))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = keys, p / p.sum(-1, keepdims=True), qkv
    return out + (logit_magnitude,) if magnitude else out
