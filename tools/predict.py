"""Classify images with MaxViT: the top-k classes and their probabilities for every image.

    python -m tools.predict -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best \
        --images data/shapes/val/star/0000.png
    python -m tools.predict -c configs/maxvit_t_tf_224.yaml \
        -o Global.pretrained_model=weights/maxvit_t_tf_224.pdparams --images photos/ --labels imagenet.txt --json
    python -m tools.predict --model inference/quickstart --images 'data/shapes/val/*/000?.png'

--images takes image files, folders (searched recursively for image files) and glob patterns (quote them to let
this script expand them; '**' recurses), any number of each. Images go through the evaluation preprocessing
(common.transforms.build_transform) in batches of --batch-size.

Two ways to run a model:
* -c CONFIG -o Global.pretrained_model=WEIGHTS: the dynamic-graph model, built from the config; from a training
  checkpoint prefix, --weights picks the EMA or raw weights (default: Global.eval_weights).
* --model PREFIX: a model written by tools/export.py, run on the CPU; PREFIX.yaml gives the preprocessing, the
  class names and whether the model outputs logits or probabilities. No config needed. --engine picks the runtime:
  auto (default) is OpenVINO on PREFIX.onnx when both are there (the fastest CPU path we measured; export.py
  writes PREFIX.onnx and checks it when requirements-deploy.txt is installed), else Paddle Inference on
  PREFIX.json with oneDNN (unless --no-mkldnn); openvino, onnxruntime and paddle ask for one. --precision bf16
  computes in bfloat16 through OpenVINO on CPUs that have it (AVX512-BF16, AMX): faster, less exact.

Class names come from --labels (one name per line), else from the training checkpoint or the export's yaml,
else they are the class indices. An unreadable image is reported on stderr (path and reason) and skipped.
Results go to stdout: readable text, or with --json a list of {"image", "topk": [{"class", "index", "prob"}]}.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.predict ...')

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import numpy as np
import paddle

from common.checkpoint import CheckpointError, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config, validate
from common.data import IMG_EXTENSIONS, DataError, read_rgb
from common.transforms import build_transform
from common.device import setup
from common.fast_layers import use_fast_layers
from tools.export import ENGINES, ExportError, checkpoint_class_names, create_runner, load_meta


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_images(patterns: Sequence[str]) -> List[str]:
    """Files named, image files under folders (recursively) and image files matching glob patterns, each once,
    in the order given (sorted within a folder or pattern). A pattern that matches nothing is reported."""
    found: List[str] = []
    missing: List[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            matches = [str(path)]
        elif path.is_dir():
            matches = sorted(str(p) for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in IMG_EXTENSIONS)
        if not matches:
            missing.append(pattern)
        found += matches
    if found:  # with nothing found at all, the caller's error names the patterns (once)
        for pattern in missing:
            log(f'no images at {pattern}')
    return list(dict.fromkeys(found))


def read_labels(path: str) -> List[str]:
    """One class name per line (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding='utf-8').splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f'cannot read label file {path}: {e.strerror or e}') from None
    if not names:
        raise DataError(f'label file {path} has no class names (expected one name per line)')
    return names


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def topk(probs: np.ndarray, k: int, names: List[str]) -> List[Dict]:
    """Top-k of one probability row, highest first (ties: lower index first)."""
    order = np.argsort(-probs, kind='stable')[:k]
    return [{'class': names[i], 'index': int(i), 'prob': float(probs[i])} for i in order]


def format_text(results: List[Dict]) -> str:
    lines = []
    for r in results:
        lines.append(r['image'])
        width, digits = max(len(t['class']) for t in r['topk']), len(str(len(r['topk'])))
        lines += [f'  {n:>{digits}}. {t["class"]:<{width}}  {t["prob"]:.4f}' for n, t in enumerate(r['topk'], 1)]
    return '\n'.join(lines)


def _reader(cfg: dict):
    """path -> the model's input (C, H, W): read at most Data.max_image_pixels (common.data.read_image), then
    the evaluation transform."""
    transform, max_pixels = build_transform(cfg, train=False), cfg['Data']['max_image_pixels']
    return lambda path: transform(read_rgb(path, max_pixels))


def _build_runner(args):
    """(batch -> probabilities, path -> input, num_classes, stored class names, description)."""
    if args.model:
        meta = load_meta(args.model)
        try:
            cfg = validate({'Data': meta['preprocess']})
        except ConfigError as e:
            raise ExportError(f'{args.model}.yaml: preprocess: {e}') from None
        height, width = meta['input']['shape'][2:]
        if (height, width) != (cfg['Data']['img_size'],) * 2:
            raise ExportError(f'{args.model} was exported for {height}x{width} inputs, but its preprocessing makes '
                              f'{cfg["Data"]["img_size"]}x{cfg["Data"]["img_size"]} images: re-export it with '
                              f'--size S S (a square)')
        forward, runtime = create_runner(args.model, args.engine, threads=args.threads, mkldnn=not args.no_mkldnn,
                                         precision=args.precision)
        probabilities = meta['output'] == 'probabilities'

        def run(batch):
            out = forward(batch)
            return out if probabilities else softmax(out)
        what = f'{args.model} ({runtime}, {meta["output"]})'
        return run, _reader(cfg), meta.get('num_classes'), meta.get('class_names'), what

    cfg = load_config(args.config, args.override)
    g = cfg['Global']
    if not g['pretrained_model']:
        raise ConfigError('nothing to predict with: pass -o Global.pretrained_model=PATH (weights or checkpoint '
                          'prefix), or --model PREFIX for a model written by tools/export.py')
    setup(g['device'])
    model = build_model(cfg)
    weights = args.weights or g['eval_weights']
    _, _, what = load_pretrained(model, g['pretrained_model'], ema=weights == 'ema')
    model = use_fast_layers(model)  # on the CPU, MaxViT's kernels (common/cpu_kernels.cc)
    model.eval()

    @paddle.no_grad()
    def run(batch):
        return model.predict(paddle.to_tensor(batch)).numpy()
    return (run, _reader(cfg), cfg['Model']['num_classes'], checkpoint_class_names(g['pretrained_model']), what)


def main(argv=None) -> List[Dict]:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]), required=False)
    parser.add_argument('--model', help='prefix of a model written by tools/export.py (instead of -c)')
    parser.add_argument('--images', nargs='+', required=True, metavar='PATH',
                        help='image files, folders (recursive) or glob patterns')
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image (default 5)')
    parser.add_argument('--labels', help='text file with one class name per line (overrides stored names)')
    parser.add_argument('--json', action='store_true', help='print a JSON list instead of text')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('--weights', choices=('ema', 'raw'), default=None,
                        help="with -c: a training checkpoint's EMA or raw weights (default: Global.eval_weights)")
    parser.add_argument('--engine', choices=ENGINES, default='auto',
                        help='with --model: the runtime (default auto: OpenVINO on PREFIX.onnx when both are there, '
                             'else Paddle Inference)')
    parser.add_argument('--no-mkldnn', action='store_true',
                        help='with --model: Paddle Inference without oneDNN (implies --engine paddle)')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='with --model: bf16 computes in bfloat16 through OpenVINO, on CPUs that have it '
                             '(AVX512-BF16, AMX): faster, logits about 1e-2 off (docs/performance.md)')
    parser.add_argument('--threads', type=int, default=None, help='with --model: CPU threads (default: all cores)')
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.model):
        parser.error('give either -c CONFIG (with -o Global.pretrained_model=...) or --model PREFIX')
    if (args.engine != 'auto' or args.precision != 'fp32' or args.no_mkldnn) and not args.model:
        parser.error('--engine, --precision and --no-mkldnn run an exported model: give --model PREFIX (with -c the '
                     'dynamic-graph model runs)')
    if args.no_mkldnn and (args.engine in ('openvino', 'onnxruntime') or args.precision == 'bf16'):
        parser.error('--no-mkldnn is a Paddle Inference setting; OpenVINO and onnxruntime do not use oneDNN')
    if args.no_mkldnn:
        args.engine = 'paddle'
    if args.model and args.override:
        parser.error('-o overrides need -c CONFIG; an exported model (--model) takes its settings from PREFIX.yaml')
    if args.topk < 1 or args.batch_size < 1:
        parser.error('--topk and --batch-size must be at least 1')

    paths = find_images(args.images)
    if not paths:
        raise DataError(f'no images found in {" ".join(args.images)} (image files, folders or glob patterns; '
                        f'extensions {", ".join(IMG_EXTENSIONS)})')
    run, read, num_classes, names, what = _build_runner(args)
    if args.labels:
        names = read_labels(args.labels)
    if names is not None and num_classes is not None and len(names) != num_classes:
        source = args.labels or 'the stored class names'
        raise DataError(f'{source} lists {len(names)} classes, but the model has {num_classes}')

    results: List[Dict] = []
    batch, batch_paths = [], []

    def flush():
        if not batch:
            return
        probs = run(np.stack(batch))
        k = min(args.topk, probs.shape[1])
        labels = names or [str(i) for i in range(probs.shape[1])]
        results.extend({'image': p, 'topk': topk(row, k, labels)} for p, row in zip(batch_paths, probs))
        batch.clear()
        batch_paths.clear()

    skipped = 0
    for path in paths:
        try:
            image = read(path)
        except Exception as e:  # any reason: truncated, not an image, too large, unreadable
            log(f'skipped unreadable image {path}: {type(e).__name__}: {e}')
            skipped += 1
            continue
        batch.append(image)
        batch_paths.append(path)
        if len(batch) == args.batch_size:
            flush()
    flush()
    if not results:
        raise DataError(f'none of the {len(paths)} images could be read (reasons above)')

    print(json.dumps(results, indent=2, ensure_ascii=False) if args.json else format_text(results), flush=True)
    log(f'{len(results)} images classified with {what}' + (f'; {skipped} unreadable skipped' if skipped else ''))
    return results


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, DataError, CheckpointError, ExportError) as e:
        sys.exit(f'error: {e}')
