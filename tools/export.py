"""Export MaxViT weights to a Paddle Inference model (NAME.json + NAME.pdiparams + NAME.yaml), optionally ONNX.

    python tools/export.py -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best
    python tools/export.py -c configs/maxvit_t_tf_224.yaml -o Global.pretrained_model=weights/maxvit_t_tf_224.pdparams \
        --output inference/maxvit_t --softmax
    python tools/export.py -c configs/maxvit_t.yaml -o Global.pretrained_model=output/maxvit_t/best --weights raw \
        --size 384 384 --onnx              # also NAME.onnx (pip install -r requirements-deploy.txt)

The model is saved in eval mode with a dynamic batch size: input 'image' [batch, C, H, W], H = W = Data.img_size
unless --size H W. The output is logits, or probabilities (MaxViT.predict) with --softmax. NAME.yaml beside it
holds what tools/predict.py --model needs without a config: the evaluation preprocessing (img_size, crop_pct,
crop_mode, interpolation, mean, std), the class names when the weights come from a training checkpoint, and
whether the output is logits or probabilities.

Global.pretrained_model is a weights file (.pdparams, .safetensors, .npz) or a training checkpoint prefix
(output/run/best); from a checkpoint, --weights picks the EMA or the raw weights (default: Global.eval_weights).

create_predictor(prefix, mkldnn=True) and run_predictor(predictor, batch) run an exported model through
paddle.inference on the CPU, with or without oneDNN (tools/predict.py and tools/benchmark.py use them). With
--onnx (pip install -r requirements-deploy.txt), export_onnx() writes PREFIX.onnx and check_onnx() compares it
with the Paddle model when onnxruntime is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import native_output_filtered  # noqa: E402  (first: silences known noise before Paddle loads)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import yaml  # noqa: E402

from common.checkpoint import CheckpointError, checkpoint_prefix, load_file, load_pretrained  # noqa: E402
from common.config import ConfigError, add_config_args, build_model, load_config  # noqa: E402
from common.device import cpu_cores  # noqa: E402

PREPROCESS_KEYS = ('img_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std')
INPUT_NAME = 'image'
ONNX_OPSET = 13  # paddle2onnx raises it by itself when an operator needs a newer one


class ExportError(RuntimeError):
    """An exported model that cannot be written or used as asked; the message says which file and why."""


class Probabilities(paddle.nn.Layer):
    """Wraps a MaxViT so that the exported forward is MaxViT.predict (softmax of the logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.predict(x)


def checkpoint_class_names(path: str) -> Optional[List[str]]:
    """Class names stored in a training checkpoint's .pdstates (train.py writes them), or None when ``path``
    is a plain weights file or the checkpoint has none."""
    prefix = checkpoint_prefix(path)
    if not prefix:
        return None
    names = load_file(prefix + '.pdstates').get('class_names')
    return [str(n) for n in names] if names else None


def _import_paddle2onnx():
    """paddle2onnx is optional: imported only for --onnx, never when this module is imported."""
    try:
        import paddle2onnx
    except ImportError:
        raise SystemExit('error: --onnx needs paddle2onnx, which is not installed here: pip install paddle2onnx '
                         'onnxruntime, or pip install -r requirements-deploy.txt (then run the same command again)'
                         ) from None
    return paddle2onnx


class TanhGELU(paddle.nn.Layer):
    """GELU's tanh approximation written out: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), the formula
    nn.GELU(approximate=True) computes. paddle2onnx 2.1 converts that gelu as the exact (erf) GELU, about 1e-3 off
    on MaxViT-T's logits; these elementwise ops convert one to one."""

    def forward(self, x):
        return 0.5 * x * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


@contextlib.contextmanager
def tanh_gelu_written_out(model):
    """Within the block, every nn.GELU(approximate=True) sublayer of ``model`` is a TanhGELU (same values); the
    original layers are put back afterwards. Yields how many were swapped."""
    swapped = []
    for parent in [model, *model.sublayers()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, paddle.nn.GELU) and child._approximate in (True, 'tanh'):
                swapped.append((parent, name, child))
                setattr(parent, name, TanhGELU())
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def export(model, prefix: str, input_shape: List[int], softmax: bool = False) -> List[str]:
    """paddle.jit.save ``model`` (eval mode) to PREFIX.json + PREFIX.pdiparams for inputs [None] + input_shape
    (channels, height, width). Returns the two paths."""
    model.eval()
    layer = Probabilities(model) if softmax else model
    layer.eval()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    spec = paddle.static.InputSpec([None] + list(input_shape), 'float32', INPUT_NAME)
    with native_output_filtered():  # PIR warns about every in-place op it traces
        paddle.jit.save(layer, prefix, input_spec=[spec])
    files = [prefix + '.json', prefix + '.pdiparams']
    missing = [f for f in files if not Path(f).is_file()]
    if missing:  # an older Paddle (or PIR switched off) writes .pdmodel instead
        raise ExportError(f'paddle.jit.save did not write {", ".join(missing)} (Paddle {paddle.__version__}; '
                          f'Paddle 3.x with PIR writes .json)')
    return files


def export_onnx(model, prefix: str, input_shape: List[int], softmax: bool = False) -> str:
    """PREFIX.onnx for ``model`` (what export() saves for the same arguments), with paddle2onnx. It converts a
    Paddle program saved for it alone, in which the tanh GELU of the official layout is written out (TanhGELU):
    PREFIX.json keeps Paddle's own gelu, which oneDNN fuses with the preceding matmul. Returns the path."""
    paddle2onnx = _import_paddle2onnx()
    onnx_file = prefix + '.onnx'
    with tempfile.TemporaryDirectory() as tmp, tanh_gelu_written_out(model):
        src = str(Path(tmp) / 'model')
        export(model, src, input_shape, softmax)
        paddle2onnx.export(src + '.json', src + '.pdiparams', save_file=onnx_file, opset_version=ONNX_OPSET,
                           enable_onnx_checker=True)
    if not Path(onnx_file).is_file():
        raise ExportError(f'paddle2onnx {paddle2onnx.__version__} did not write {onnx_file}')
    return onnx_file


def load_meta(prefix: str) -> Dict:
    """PREFIX.yaml written by export(); checks that the model files are there too."""
    prefix = str(prefix)
    for suffix in ('.json', '.pdiparams', '.yaml'):
        if not Path(prefix + suffix).is_file():
            raise ExportError(f'exported model {prefix}: no {prefix + suffix} (write one with tools/export.py)')
    meta = yaml.safe_load(Path(prefix + '.yaml').read_text(encoding='utf-8')) or {}
    missing = [k for k in ('input', 'output', 'preprocess') if k not in meta]
    if missing:
        raise ExportError(f'{prefix}.yaml lacks {", ".join(missing)}: re-export it with tools/export.py')
    return meta


def inference_config(prefix: str, mkldnn: bool = True, threads: Optional[int] = None) -> paddle.inference.Config:
    """A CPU paddle.inference.Config for PREFIX.json + PREFIX.pdiparams, with oneDNN on or off (Paddle 3.3
    turns it on by default) and ``threads`` math-library threads (default: every core this process may use)."""
    for suffix in ('.json', '.pdiparams'):
        if not Path(prefix + suffix).is_file():
            raise ExportError(f'exported model {prefix}: no {prefix + suffix} (write one with tools/export.py)')
    config = paddle.inference.Config(prefix + '.json', prefix + '.pdiparams')
    config.disable_gpu()
    if mkldnn:
        config.enable_mkldnn()
    else:
        config.disable_mkldnn()
    config.set_cpu_math_library_num_threads(threads or cpu_cores())
    config.disable_glog_info()
    return config


def create_predictor(prefix: str, mkldnn: bool = True, threads: Optional[int] = None):
    """A paddle.inference predictor for an exported model (see inference_config)."""
    config = inference_config(str(prefix), mkldnn, threads)
    with native_output_filtered():
        return paddle.inference.create_predictor(config)


def run_predictor(predictor, batch: np.ndarray) -> np.ndarray:
    """Run ``predictor`` on one float32 NCHW batch (any batch size); returns its first output as numpy."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(batch.shape))
    handle.copy_from_cpu(batch)
    with native_output_filtered():
        predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def check_onnx(prefix: str, tolerance: float = 1e-4) -> Optional[float]:
    """When onnxruntime is installed: the largest difference between PREFIX.onnx and the Paddle model (Paddle
    Inference, no oneDNN) on a random batch of 2; an ExportError above ``tolerance`` times the largest output
    (at least 1). None without onnxruntime. (Both layouts match to about 1e-6; a broken conversion, or the tanh
    GELU converted as the exact one, gives 1e-4 to 1e-3.)"""
    try:
        import onnxruntime
    except ImportError:
        print(f'note: onnxruntime is not installed, so {prefix}.onnx was not compared with the Paddle model '
              f'(pip install onnxruntime to check it)', file=sys.stderr, flush=True)
        return None
    shape = load_meta(prefix)['input']['shape']
    x = np.random.default_rng(0).standard_normal([2] + shape[1:]).astype(np.float32)
    session = onnxruntime.InferenceSession(prefix + '.onnx', providers=['CPUExecutionProvider'])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    ref = run_predictor(create_predictor(prefix, mkldnn=False), x)
    diff = float(np.abs(out.astype(np.float64) - ref).max()) if out.shape == ref.shape else float('inf')
    scale = max(1.0, float(np.abs(ref).max()))
    if not diff <= tolerance * scale:
        raise ExportError(f'{prefix}.onnx differs from the Paddle model by up to {diff:.3g} (outputs up to '
                          f'{scale:.3g}; onnxruntime {onnxruntime.__version__}, random batch of 2): do not use it; '
                          f'the Paddle Inference model {prefix}.json is fine')
    print(f'{prefix}.onnx matches the Paddle model within {diff:.2e} (onnxruntime, random batch of 2)', flush=True)
    return diff


def main(argv=None) -> Dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    parser.add_argument('--weights', choices=('ema', 'raw'), default=None,
                        help="a training checkpoint's EMA or raw weights (default: Global.eval_weights)")
    parser.add_argument('--softmax', action='store_true', help='output probabilities instead of logits')
    parser.add_argument('--output', default=None,
                        help='output prefix, writes PREFIX.json/.pdiparams/.yaml (default: inference/CONFIG_NAME)')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: Data.img_size); predict.py needs a square')
    parser.add_argument('--onnx', action='store_true',
                        help='also write PREFIX.onnx with paddle2onnx (pip install -r requirements-deploy.txt)')
    args = parser.parse_args(argv)
    paddle2onnx = _import_paddle2onnx() if args.onnx else None  # fail before any work
    cfg = load_config(args.config, args.override)
    g, d = cfg['Global'], cfg['Data']
    if not g['pretrained_model']:
        raise ConfigError('nothing to export: pass -o Global.pretrained_model=PATH (weights or checkpoint prefix)')
    if args.size and min(args.size) < 1:
        raise ConfigError(f'--size must be two positive ints, got {args.size}')
    prefix = args.output or str(Path('inference') / Path(args.config).stem)
    weights = args.weights or g['eval_weights']

    paddle.set_device('cpu')
    model = build_model(cfg)
    _, _, what = load_pretrained(model, g['pretrained_model'], ema=weights == 'ema')
    height, width = args.size or (d['img_size'], d['img_size'])
    channels = cfg['Model']['input_dim']
    files = export(model, prefix, [channels, height, width], softmax=args.softmax)

    preprocess = {k: d[k] for k in PREPROCESS_KEYS}
    if height == width:
        preprocess['img_size'] = height  # the preprocessing makes the square the model was exported for
    meta = {
        'input': {'name': INPUT_NAME, 'shape': [-1, channels, height, width], 'dtype': 'float32', 'layout': 'NCHW'},
        'output': 'probabilities' if args.softmax else 'logits',
        'num_classes': cfg['Model']['num_classes'],
        'class_names': checkpoint_class_names(g['pretrained_model']),
        'preprocess': preprocess,
        'weights': what,
        'config': str(args.config),
        'paddle_version': paddle.__version__,
    }
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=None)
    Path(prefix + '.yaml').write_text(text, encoding='utf-8')
    files.append(prefix + '.yaml')

    onnx_file, onnx_diff = None, None
    if paddle2onnx is not None:
        onnx_file = export_onnx(model, prefix, [channels, height, width], softmax=args.softmax)
        files.append(onnx_file)
        onnx_diff = check_onnx(prefix)
    print(f'exported {what} -> {", ".join(files)} (input {meta["input"]["shape"]}, output {meta["output"]}, '
          f'{"class names from the checkpoint" if meta["class_names"] else "no class names"})', flush=True)
    return {'prefix': prefix, 'files': files, 'meta': meta, 'onnx': onnx_file, 'onnx_max_abs_diff': onnx_diff}


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, CheckpointError, ExportError) as e:
        sys.exit(f'error: {e}')
