"""Independent numpy references the tests compare the model with."""
import numpy as np

from maxvit import Grid_Block


def brute_force_attention(block, xn, r, c):
    """Attention of query pixel (r, c) in a Window_Block/Grid_Block, given the block's normalised input
    xn (H, W, C), by looping over keys: the query attends to the real pixels of its own window (block) or grid
    cell (grid; maps padded to multiples of the partition size), bias looked up in the table by offset.
    Returns (keys [(row, col)], softmax weights (heads, keys), qkv (H, W, 3, heads, head_dim))."""
    H, W, C = xn.shape
    ph, pw = block.partition_size
    Hp, Wp = -(-H // ph) * ph, -(-W // pw) * pw
    attn = block.attn
    heads = attn.num_heads
    qkv = (xn.reshape(-1, C) @ attn.qkv.weight.numpy() + attn.qkv.bias.numpy()).reshape(H, W, 3, heads, -1)
    table = attn.relative_bias_table.numpy()
    grid = isinstance(block, Grid_Block)

    def cell(y, x):  # (which window, position inside it)
        if grid:   # grid-mates: the same remainder modulo the spacing Hp/g0, Wp/g1
            return (y % (Hp // ph), x % (Wp // pw)), (y // (Hp // ph), x // (Wp // pw))
        return (y // ph, x // pw), (y % ph, x % pw)

    window, (qi, qj) = cell(r, c)
    keys = [(ky, kx) for ky in range(H) for kx in range(W) if cell(ky, kx)[0] == window]
    logits = np.zeros((heads, len(keys)))
    for n, (ky, kx) in enumerate(keys):
        _, (ki, kj) = cell(ky, kx)
        row = (qi - ki + ph - 1) * (2 * pw - 1) + (qj - kj + pw - 1)
        logits[:, n] = (qkv[r, c, 0] * qkv[ky, kx, 1]).sum(-1) * attn.scale + table[row]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return keys, p / p.sum(-1, keepdims=True), qkv
