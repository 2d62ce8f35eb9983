"""Parity of maxvit.py with timm's maxvit_*_tf_* models: make the CI fixtures, or check the real Tiny end to end.

Needs torch + timm + safetensors (never installed by CI; the tests only read what this writes). The Paddle side
of ``--full`` runs in a second interpreter, the one with paddle installed:

    # write tests/data/parity/ (reduced tf-layout models at 224 / window 7 and 384 / window 12, a torch .pth)
    /work/venv-torch/bin/python -m tools.make_parity_fixtures

    # timm maxvit_tiny_tf_224 and maxvit_tiny_tf_384 with random weights -> convert -> Paddle: logits and the
    # 5 feature maps must agree within 1e-4, absolute for values up to 1 and relative to the largest value of the
    # map beyond (random weights make stage 3/4 maps reach 100-200, where float32 rounding alone exceeds 1e-4
    # absolute); writes nothing to the repository
    /work/venv-torch/bin/python -m tools.make_parity_fixtures --full --paddle-python /work/venv/bin/python

Every weight is random, BatchNorm running statistics and affine parameters included, and biases and bias tables
are far from their zero/small initial values, so that a wrongly mapped tensor changes the outputs. The fixtures
keep channels small (stage widths 8-64 / 4-32, head dim 8 / 4) to stay well under 2 MB a file; the inputs are
not stored but regenerated from a seed with numpy's RandomState, whose stream numpy keeps stable.

Files in tests/data/parity/ (NAME = tf224 or tf384):
  NAME.safetensors  timm state dict (num_batches_tracked included, as timm saves it)
  NAME.npz          model_args (JSON of maxvit args), timm_cfg (JSON), input_seed, input_shape, input_checksum,
                    logits, feat0 (stem) ... feat4 (stage 4); tf224.npz also holds, for every bias table,
                    resized384/<timm key>: the [heads, 23, 23] table bilinearly resized by torch (window 7 -> 12)
  tf384.pth         the tf384 state dict again, saved by torch.save (zip format), for the restricted .pth reader
  dtypes.pth        odd tensors (fp16, bf16, int64, bool, 0-d, transposed view, views sharing one storage) in
  dtypes.npz        an OrderedDict inside a wrapper dict, and their expected values (bf16 widened to float32)
  maxvit_tiny_tf_224_shapes.json   {name: shape} of the real maxvit_tiny_tf_224 state dict (no values)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / 'tests' / 'data' / 'parity'
TOL = 1e-4

# name: (img_size, batch, stem width, stage widths, depths, head dim, classes, input seed, weight seed)
REDUCED = {
    'tf224': (224, 2, 4, (8, 16, 32, 64), (1, 1, 2, 1), 8, 10, 224, 1),
    'tf384': (384, 1, 4, (4, 8, 16, 32), (1, 1, 2, 1), 4, 10, 384, 2),
}


def make_input(seed: int, shape) -> np.ndarray:
    """The fixtures' input: numpy RandomState normals (a stream numpy guarantees stable), float32."""
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def input_checksum(x: np.ndarray) -> np.ndarray:
    return np.array([x.sum(dtype=np.float64), np.abs(x).sum(dtype=np.float64), x.ravel()[:7].sum(dtype=np.float64)])


# ---------------------------------------------------------------------------------------------------- torch side
def randomise(model, seed: int) -> None:
    """Random values for every tensor that matters: BN statistics and affines, norms, biases, bias tables."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rand(t, mean, std):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                rand(module.running_mean, 0.0, 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                rand(module.weight, 1.0, 0.1)
                rand(module.bias, 0.0, 0.1)
                module.num_batches_tracked.fill_(1000)
            elif isinstance(module, torch.nn.LayerNorm):
                rand(module.weight, 1.0, 0.1)
                rand(module.bias, 0.0, 0.1)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                rand(module.bias, 0.0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith('relative_position_bias_table'):
                rand(p, 0.0, 0.5)  # asymmetric and large enough that a flipped or transposed table shows


def reduced_timm_model(img_size, stem, dims, depths, dim_head, classes):
    """timm's MaxxVit with the TF configuration (_tf_cfg: what maxvit_*_tf_* use), at small widths."""
    import dataclasses
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg
    tf = _tf_cfg()
    cfg = MaxxVitCfg(embed_dim=dims, depths=depths, block_type=('M',) * len(dims), stem_width=stem, stem_bias=True,
                     head_hidden_size=dims[-1], conv_cfg=tf['conv_cfg'],
                     transformer_cfg=dataclasses.replace(tf['transformer_cfg'], dim_head=dim_head))
    return MaxxVit(cfg, img_size=img_size, num_classes=classes).eval(), dataclasses.asdict(cfg)


def paddle_args(img_size, stem, dims, depths, dim_head, classes):
    """The maxvit.py args (official layout: maxvit.TF_LAYOUT) of the same model."""
    tf_layout = dict(act_layer='gelu_tanh', stem_out_norm=False, mbconv_conv_bias=False, mbconv_out_norm=False,
                     shortcut_pool='avg2', shortcut_conv_always=False, se_act='silu', bn_eps=1e-3, bn_momentum=0.99,
                     same_padding=True, head='norm_mlp')
    window = [img_size // 32] * 2
    return dict(tf_layout, stage_num_block=list(depths), stem_dim=stem, stage_dim=dims[0],
                num_heads=dims[0] // dim_head, num_classes=classes, block_size=window, grid_size=list(window))


def run_timm(model, x: np.ndarray):
    import torch
    with torch.no_grad():
        t = torch.from_numpy(x)
        feats = model.forward_intermediates(t, intermediates_only=True)
        logits = model(t)
    assert len(feats) == 5, len(feats)
    return logits.numpy(), [f.numpy() for f in feats]


def state_dict(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_fixtures(out_dir: Path) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (img, batch, stem, dims, depths, dim_head, classes, in_seed, w_seed) in REDUCED.items():
        torch.manual_seed(w_seed)
        model, timm_cfg = reduced_timm_model(img, stem, dims, depths, dim_head, classes)
        randomise(model, w_seed)
        shape = (batch, 3, img, img)
        x = make_input(in_seed, shape)
        logits, feats = run_timm(model, x)
        sd = state_dict(model)
        save_file(sd, str(out_dir / f'{name}.safetensors'))
        arrays = dict(model_args=json.dumps(paddle_args(img, stem, dims, depths, dim_head, classes)),
                      timm_cfg=json.dumps(timm_cfg, default=str), input_seed=in_seed, input_shape=shape,
                      input_checksum=input_checksum(x), logits=logits,
                      **{f'feat{i}': f for i, f in enumerate(feats)})
        if name == 'tf224':  # the bilinear resize 7 -> 12 that converting into the 384 model must reproduce
            for key, table in sd.items():
                if key.endswith('relative_position_bias_table'):
                    arrays[f'resized384/{key}'] = F.interpolate(table[None], size=(23, 23), mode='bilinear',
                                                                align_corners=False)[0].numpy()
        if name == 'tf384':
            torch.save(model.state_dict(), out_dir / 'tf384.pth')  # as timm saves it (OrderedDict + _metadata)
        np.savez(out_dir / f'{name}.npz', **arrays)
        print(f'{name}: logits {logits.shape} |max| {np.abs(logits).max():.3f}, features '
              + ', '.join(str(tuple(f.shape)) for f in feats))

    # odd tensors for the .pth reader: dtypes, 0-d, strided views, several views of one storage
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    odd = {
        'f32': base,
        'f16': (base * 3).half(),
        'bf16': (base - 1).bfloat16(),
        'f64': base.double() / 3,
        'i64': torch.arange(-5, 5),
        'i32': torch.arange(6, dtype=torch.int32).reshape(2, 3),
        'u8': torch.arange(250, 256, dtype=torch.uint8),
        'bool': torch.tensor([True, False, True]),
        'scalar': torch.tensor(1000),
        'transposed': base.t(),          # shares base's storage, strides (1, 6)
        'row': base[2],                  # storage offset 12
        'every_other': base[:, ::2],     # strides (6, 2)
        'empty': torch.zeros(0, 3),
    }
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in odd.items()}
    from collections import OrderedDict
    torch.save({'state_dict': OrderedDict(odd), 'epoch': 7}, out_dir / 'dtypes.pth')
    np.savez(out_dir / 'dtypes.npz', **expected)

    # the names and shapes of the real maxvit_tiny_tf_224 state dict (no weights): the full-size key layout
    import timm
    shapes = {k: list(v.shape) for k, v in timm.create_model('maxvit_tiny_tf_224', device='meta').state_dict().items()}
    (out_dir / 'maxvit_tiny_tf_224_shapes.json').write_text(json.dumps(shapes, separators=(',', ':')))
    for f in sorted(out_dir.iterdir()):
        print(f'{f.relative_to(ROOT)}: {f.stat().st_size:,} bytes')


def full_check(paddle_python: str) -> int:
    import timm
    import torch
    from safetensors.torch import save_file
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in (('maxvit_tiny_tf_224', 2), ('maxvit_tiny_tf_384', 1)):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            randomise(model, 0)
            img = int(name.rsplit('_', 1)[1])
            x = make_input(0, (batch, 3, img, img))
            logits, feats = run_timm(model, x)
            save_file(state_dict(model), f'{tmp}/{name}.safetensors')
            np.savez(f'{tmp}/{name}.npz', x=x, logits=logits, **{f'feat{i}': f for i, f in enumerate(feats)})
            print(f'{name}: timm logits |max| {np.abs(logits).max():.3f}', flush=True)
            res = subprocess.run([paddle_python, '-m', 'tools.make_parity_fixtures', '--paddle-check', tmp, '--model',
                                  name], capture_output=True, text=True, cwd=ROOT)
            print(res.stdout, end='')
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return res.returncode
            worst = max(worst, float(res.stdout.strip().rsplit('worst scaled diff ', 1)[1]))
    print(f'worst scaled diff {worst:.3g} (tolerance {TOL}: absolute for values up to 1, relative beyond)')
    return 0 if worst <= TOL else 1


# --------------------------------------------------------------------------------------------------- paddle side
def paddle_check(tmp: str, name: str) -> int:
    import paddle
    from maxvit import MaxViT
    from tools.convert_weights import checkpoint_num_classes, convert_state_dict, load_timm_checkpoint, timm_model_args
    sd = load_timm_checkpoint(f'{tmp}/{name}.safetensors')
    ref = np.load(f'{tmp}/{name}.npz')
    model = MaxViT(timm_model_args(name, checkpoint_num_classes(sd)))
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in convert_state_dict(sd, model).items()})
    model.eval()
    with paddle.no_grad():
        x = paddle.to_tensor(ref['x'])
        feats = model.forward_features(x)
        logits = model.forward_head(feats[-1])
    outs = [f.numpy() for f in feats] + [logits.numpy()]
    refs = [ref[f'feat{i}'] for i in range(5)] + [ref['logits']]
    names = ['stem', 'stage1', 'stage2', 'stage3', 'stage4', 'logits']
    worst = 0.0
    for n, out, r in zip(names, outs, refs):
        diff, scale = float(np.abs(out - r).max()), float(np.abs(r).max())
        # float32 rounding grows with the values: 1e-4 absolute, relative to the largest value once that exceeds 1
        worst = max(worst, diff / max(1.0, scale))
        print(f'{name} {n:<7} max abs diff {diff:.2e}   max |timm value| {scale:8.3g}   diff / max(1, |value|) '
              f'{diff / max(1.0, scale):.2e}')
    print(f'{name}: worst scaled diff {worst:.3e}')
    return 0 if worst <= TOL else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', type=Path, default=OUT_DIR, help='fixture directory (default tests/data/parity)')
    parser.add_argument('--full', action='store_true', help='check the real maxvit_tiny_tf_224/384, write nothing')
    parser.add_argument('--paddle-python', default='python', help='interpreter with paddle (for --full)')
    parser.add_argument('--paddle-check', metavar='DIR', help=argparse.SUPPRESS)  # internal: the Paddle side
    parser.add_argument('--model', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paddle_check:
        return paddle_check(args.paddle_check, args.model)
    if args.full:
        return full_check(args.paddle_python)
    write_fixtures(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
