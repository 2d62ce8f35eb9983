"""The transfer demonstration (docs/training.md, "What transfer does"): pretrain the quickstart MaxViT on rendered
letters, then teach it the built-in shapes from a few labelled images per class in four ways at one budget (from
scratch, fine-tuned, fine-tuned with layer-wise lr decay, and as a linear probe), and deploy the fine-tuned models
through OpenVINO in fp32 and bf16. It shows the mechanics of transfer on data the project renders itself; it says
nothing about transfer from ImageNet.

    python -m tools.transfer_demo                      # about 22 minutes on 2 CPU cores
    python -m tools.transfer_demo --sweep --labels 10 --seeds 0     # the lr sweep that chose MODES' lrs, 12 min
    python -m tools.transfer_demo --labels 10 --seeds 0 --epochs 5 --pretrain-epochs 1   # a quick look

Every training is a train.py command, printed before it runs (rerun one to look at it); each writes into
--out/NAME, named by what it varies (k10_e60_fine_tune_s0: labels, epochs, mode, seed). A run whose command
finished before is reused (its command.txt); delete --out to start over. The table goes to stdout and to
--out/results.md (--sweep: --out/sweep.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ != 'tools':
    sys.exit('run the tools as modules from the repository root: python -m tools.transfer_demo')

from common.shapes import GLYPHS, SHAPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / 'configs' / 'quickstart.yaml')  # the model (32x32, three stages), the from-scratch recipe
GLYPHS_PER_CLASS = {'train': 300, 'val': 40}  # 26 letters: 7,800 training images

# What differs between the ways of learning the shapes, over the quickstart recipe (the same epochs, batch,
# schedule shape and augmentation for all): where the weights start, what trains, and the lr. Each lr is the best
# of --sweep (seed 0, 10 labels per class; docs/training.md, "What transfer does", lists it).
MODES: Dict[str, List[str]] = {
    'scratch': ['Optimizer.lr=4e-3'],
    'fine-tune': ['Optimizer.lr=2e-3'],
    'fine-tune, layer decay 0.6': ['Optimizer.lr=4e-3', 'Optimizer.layer_decay=0.6'],
    'linear probe': ['Optimizer.lr=1e-2', 'Global.linear_probe=true'],
}
# --sweep: the lrs tried for each mode, and one more layer decay
SWEEP_LRS = ['5e-4', '1e-3', '2e-3', '4e-3', '8e-3']
SWEEP: Dict[str, Tuple[List[str], List[str]]] = {
    **{mode: ([o for o in recipe if not o.startswith('Optimizer.lr=')], SWEEP_LRS) for mode, recipe in MODES.items()},
    'fine-tune, layer decay 0.75': (['Optimizer.layer_decay=0.75'], SWEEP_LRS),
    'linear probe': (['Global.linear_probe=true'], ['3e-3', '1e-2', '3e-2']),
}


def typed(cmd: List[str]) -> str:
    """[sys.executable, ARGS...] as one would type it: python ARGS."""
    return shlex.join(['python'] + cmd[1:])


def run_name(mode: str, labels: int, epochs: int, seed: int) -> str:
    """The folder of one run in --out, e.g. k10_e60_fine_tune_s0."""
    return f'k{labels}_e{epochs}_{re.sub(r"[^a-z0-9.]+", "_", mode)}_s{seed}'


def write_data(data: Path, labels: List[int], out: Path) -> Dict[int, str]:
    """The letters (DATA/glyphs), the built-in shapes (DATA/shapes, as train.py writes them for the quickstart)
    and K-labels-per-class copies of the shapes' training images (OUT/shapes_kK/train: the first K files of each
    class). Returns {K: training root}."""
    from common.shapes import SHAPES_PER_CLASS, make_dataset  # read at the call: tests shrink the dataset
    for split, seed in (('train', 0), ('val', 1)):
        for kind, per_class in (('glyphs', GLYPHS_PER_CLASS), ('shapes', SHAPES_PER_CLASS)):
            if not (data / kind / split).is_dir():
                (data / kind).mkdir(parents=True, exist_ok=True)
                make_dataset(str(data / kind / split), kind, per_class[split], seed=seed)
    roots = {}
    for k in labels:
        root = out / f'shapes_k{k}' / 'train'
        if not root.is_dir():
            for name in SHAPES:
                (root / name).mkdir(parents=True, exist_ok=True)
                for f in sorted((data / 'shapes' / 'train' / name).iterdir())[:k]:
                    shutil.copyfile(f, root / name / f.name)
        roots[k] = str(root)
    return roots


def train(name: str, overrides: List[str], out: Path) -> Path:
    """python train.py -c CONFIG -o ... into OUT/NAME, unless that command finished there before (its
    OUT/NAME/command.txt, written at the end); a finished run of another command is an error."""
    run = out / name
    cmd = [sys.executable, str(ROOT / 'train.py'), '-c', CONFIG] + [
        a for o in overrides + [f'Global.output_dir={run}'] for a in ('-o', o)]
    typed_cmd, record = typed(cmd), run / 'command.txt'
    if record.is_file():
        if record.read_text() != typed_cmd + '\n':
            raise SystemExit(f'{run} holds a finished run of another command ({record}): delete it, or give '
                             f'another --out')
        print(f'# {name}: finished before, reused', flush=True)
        return run
    print(f'# {name}\n{typed_cmd}', flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    record.write_text(typed_cmd + '\n')
    return run


def final_top1(run: Path, weights: str = 'ema') -> float:
    """Top-1 of the last evaluation in RUN/train.log (the final weights, not the best epoch's)."""
    found = re.findall(rf'eval \({weights}\): top-1 ([\d.]+)%', (run / 'train.log').read_text())
    return float(found[-1])


def deployed_top1(run: Path, val_root: Path, out: Path) -> Dict[str, object]:
    """Export RUN/latest's EMA weights (tools.export, with ONNX) and classify VAL_ROOT through OpenVINO in fp32 and
    bf16 (tools.predict): {'fp32': top-1, 'bf16': top-1 or the reason it did not run, 'changed': predictions
    bf16 changes, 'images': n}; {'skipped': reason} without the deployment packages."""
    missing = [m for m in ('paddle2onnx', 'openvino') if importlib.util.find_spec(m) is None]
    if missing:
        return {'skipped': f'{" and ".join(missing)} not installed (pip install -r requirements-deploy.txt)'}
    prefix = out / 'deploy' / run.name
    export = [sys.executable, '-m', 'tools.export', '-c', CONFIG, '-o', 'Model.num_classes=auto', '-o',
              f'Global.pretrained_model={run}/latest', '--output', str(prefix), '--onnx']
    print(f'# export, then the validation shapes through OpenVINO fp32 and bf16\n{typed(export)}',
          flush=True)
    subprocess.run(export, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    result, predicted = {}, {}
    for precision in ('fp32', 'bf16'):
        cmd = [sys.executable, '-m', 'tools.predict', '--model', str(prefix), '--engine', 'openvino', '--precision',
               precision, '--images', str(val_root), '--topk', '1', '--json', '--batch-size', '50']
        print(typed(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:  # bf16 on a CPU without it: the reason, in one line
            result[precision] = done.stderr.strip().splitlines()[-1]
            continue
        found = json.loads(done.stdout)
        labels = [Path(r['image']).parent.name for r in found]
        predicted[precision] = [r['topk'][0]['class'] for r in found]
        result[precision] = 100.0 * sum(p == t for p, t in zip(predicted[precision], labels)) / len(labels)
        result['images'] = len(labels)
    if len(predicted) == 2:
        result['changed'] = sum(a != b for a, b in zip(predicted['fp32'], predicted['bf16']))
    return result


def deployed_line(d: Dict[str, object], paddle_top1: float) -> str:
    """deployed_top1's result in words."""
    if 'skipped' in d:
        return f'skipped, {d["skipped"]}'
    shown = {p: f'{d[p]:.1f}%' if isinstance(d[p], float) else f'not run ({d[p]})' for p in ('fp32', 'bf16')}
    changed = f' ({d["changed"]} of {d["images"]} predictions changed by bf16)' if 'changed' in d else ''
    return f'Paddle {paddle_top1:.1f}%, OpenVINO fp32 {shown["fp32"]}, OpenVINO bf16 {shown["bf16"]}{changed}'


def spread(values: List[float]) -> str:
    """'mean (min-max)' of top-1 values."""
    mean = sum(values) / len(values)
    return f'{mean:.1f}' + (f' ({min(values):.1f}-{max(values):.1f})' if len(values) > 1 else '')


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='output/transfer', help='runs, copies of the few labelled images, results.md')
    p.add_argument('--data', default='data', help='where the letters and the shapes are written (glyphs/, shapes/)')
    p.add_argument('--labels', type=int, nargs='+', default=[10, 50], help='labelled shapes per class')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='Global.seed of each run of each mode')
    p.add_argument('--epochs', type=int, default=60, help='epochs of each run on the shapes (all modes)')
    p.add_argument('--pretrain-epochs', type=int, default=12, help='epochs on the letters')
    p.add_argument('--no-deploy', action='store_true', help='skip the export and the OpenVINO evaluation')
    p.add_argument('--sweep', action='store_true',
                   help='instead of the table: the lrs of SWEEP for each mode, at the first --labels and --seeds')
    args = p.parse_args(argv)
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    roots = write_data(data, args.labels, out)
    letters, val = data / 'glyphs', data / 'shapes' / 'val'
    n_val = sum(1 for _ in val.rglob('*.png'))

    pretrained = train(f'pretrain_e{args.pretrain_epochs}', [
        'Data.format=folder', f'Data.train_root={letters}/train', f'Data.val_root={letters}/val',
        'Model.num_classes=auto', f'Global.epochs={args.pretrain_epochs}', 'Global.eval_freq=3'], out)

    def learn(mode: str, recipe: List[str], k: int, seed: int, name: str) -> Path:
        """One run on the K-label shapes: the shared budget, the letters' weights unless from scratch."""
        shared = ['Data.format=folder', f'Data.train_root={roots[k]}', f'Data.val_root={val}',
                  'Model.num_classes=auto', f'Global.epochs={args.epochs}', f'Global.eval_freq={args.epochs}',
                  f'Global.seed={seed}', 'Optimizer.warmup_steps=null',
                  f'Optimizer.warmup_epochs={max(1, args.epochs // 10)}', 'Global.use_visualdl=false']
        start = [] if mode == 'scratch' else [f'Global.pretrained_model={pretrained}/best']
        return train(name, shared + start + recipe, out)

    if args.sweep:
        k, seed = args.labels[0], args.seeds[0]
        rows = [f'lr sweep, {k} labels per class, seed {seed}, {args.epochs} epochs: top-1 % on {n_val} validation '
                f'shapes']
        for mode, (recipe, lrs) in SWEEP.items():
            top1 = [final_top1(learn(mode, recipe + [f'Optimizer.lr={lr}'], k, seed,
                                     'sweep_' + run_name(f'{mode} lr {lr}', k, args.epochs, seed))) for lr in lrs]
            rows.append(f'{mode}: ' + ', '.join(f'{t:.1f} at {lr}' for t, lr in zip(top1, lrs)))
        table = '\n'.join(rows)
        (out / 'sweep.md').write_text(table + '\n')
        print(table)
        return table

    rows = [f'pretraining: {len(GLYPHS)} letters, {sum(1 for _ in (letters / "train").rglob("*.png")):,} images, '
            f'{args.pretrain_epochs} epochs: top-1 {final_top1(pretrained):.1f}% on '
            f'{sum(1 for _ in (letters / "val").rglob("*.png")):,} validation letters', '',
            '| labels per class | ' + ' | '.join(MODES) + ' |', '|---|' + '---|' * len(MODES)]
    finetuned = []  # the first fine-tune of each number of labels: exported and deployed
    for k in args.labels:
        cells = []
        for mode, recipe in MODES.items():
            runs = [learn(mode, recipe, k, seed, run_name(mode, k, args.epochs, seed)) for seed in args.seeds]
            cells.append(spread([final_top1(run) for run in runs]))
            if mode == 'fine-tune':
                finetuned.append(runs[0])
        rows.append(f'| {k} ({k * len(SHAPES)} images) | ' + ' | '.join(cells) + ' |')
    rows += ['', f'top-1 % on the {n_val} validation shapes after {args.epochs} epochs (the final EMA weights), mean '
                 f'(min-max) of seeds {", ".join(map(str, args.seeds))}', '']
    for run in finetuned if not args.no_deploy else []:
        rows.append(f'deployed {run.name}: {deployed_line(deployed_top1(run, val, out), final_top1(run))}')
    table = '\n'.join(rows)
    (out / 'results.md').write_text(table + '\n')
    print(table)
    return table


if __name__ == '__main__':
    main()
