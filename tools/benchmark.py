"""Benchmark MaxViT's engines side by side: time per iteration, images per second and peak memory, for inference
(eager Paddle, to_static, Paddle Inference with and without oneDNN, the exported model in onnxruntime and OpenVINO)
and training steps (fp32, through to_static, bf16), optionally beside timm's MaxViT in another Python.

    python -m tools.benchmark -c configs/maxvit_t_tf_224.yaml --batch 1 8 --engines inference-mkldnn onnxruntime \
        openvino --timm-python /path/to/torch-venv/bin/python --timm-engines eager compile
    python -m tools.benchmark -c configs/maxvit_t_tf_224.yaml --batch 8 --engines train train-static \
        --timm-python /path/to/torch-venv/bin/python

Every engine runs in a process of its own, set up one after another (built, exported or compiled, --warmup untimed
iterations). A round then times one iteration of every engine, one at a time, each followed by SETTLE_S of quiet.
A row's time is the median of --rounds rounds; a ratio between two rows is the median over the rounds of their
ratio within the round, so a change of the machine's speed between rounds cancels out. The table starts with the
CPU model and its ISA flags: compare ratios from one run, absolute times only on the same kind of machine.

The model is tools.export.model_to_measure's: the config's, with Global.pretrained_model's weights or else
trained-like ones. Eager and training rows call common.fast_layers.use_fast_layers, and the table says whether
MaxViT's CPU kernels were in use. The other engines run the model as tools/export.py exports it, as tools/predict.py
runs it (OpenVINO with its attention kernels; openvino-bf16 in bfloat16). Every inference row checks its logits
against the model as built, in eager Paddle, on one standard-normal batch (max|diff|, rel diff: over the largest
logit). timm runs in --timm-python (with torch and timm) on as many threads: eager, channels_last, torch.compile
(compiled before any timing), checked against timm eager, and a training step beside a train engine. Engines that
cannot run here are skipped, with the reason.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.benchmark ...')

from common.cpu_info import cpu_cores, cpu_header, cpu_summary  # (no Paddle: timm's workers too)

ENGINES = ['eager', 'static', 'inference', 'inference-mkldnn', 'onnxruntime', 'openvino', 'openvino-bf16',
           'train', 'train-static', 'train-bf16']
DEFAULT_ENGINES = ['eager', 'static', 'inference', 'inference-mkldnn', 'onnxruntime', 'openvino']
TIMM_ENGINES = ['eager', 'channels_last', 'compile']
OPTIONAL = {'onnxruntime': ('onnxruntime', 'paddle2onnx'), 'openvino': ('openvino', 'paddle2onnx'),
            'openvino-bf16': ('openvino', 'paddle2onnx')}  # engine -> the packages it needs beside Paddle
PARITY_TOLERANCE = 1e-4  # a row whose logits differ from its reference by more (absolute or relative) is marked
# OpenMP threads spin for 200 ms after their last parallel region (KMP_BLOCKTIME's default) before they sleep: the
# next engine waits that out rather than share the cores with them.
SETTLE_S = 0.3


class SkipEngine(Exception):
    """An optional engine that cannot run here: the row is left out with this message."""


# ================================================================================================ workers
def parity_input(shape):
    """The input every engine's logits are compared on: standard normal (like a normalised image), fixed seed."""
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def parity(out, ref, reference: str) -> dict:
    """How far ``out`` is from ``ref``: the largest absolute difference, and that over the largest |ref|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(out - ref).max()) if out.shape == ref.shape else float('inf')
    scale = float(np.abs(ref).max())
    rel = diff / scale if scale > 0 else diff
    return {'parity_ref': reference, 'max_abs_diff': diff if math.isfinite(diff) else None,
            'rel_diff': rel if math.isfinite(rel) else None, 'max_abs_logit': scale,
            'parity_ok': bool(diff <= PARITY_TOLERANCE and rel <= PARITY_TOLERANCE)}


def _paddle_worker(spec):
    """(step, info) for one Paddle engine: step() times one iteration; info holds what the table says of it."""
    from common import cpu_kernels
    from common.config import load_config
    from common.device import setup
    from common.fast_layers import use_fast_layers
    env = setup('auto')  # MKL threads: this process's share of the cores
    import paddle
    from tools.export import model_to_measure
    engine, cfg = spec['engine'], load_config(spec['config'], spec['overrides'])
    paddle.seed(0)
    model = model_to_measure(cfg)
    shape = [spec['batch'], cfg['Model']['input_dim'], spec['size'], spec['size']]
    info = {'runtime': f'paddle {paddle.__version__}', 'device': env.device}

    def fast(model):  # eager and training rows: MaxViT's fast layers, and whether its CPU kernels are in use
        model = use_fast_layers(model)
        if env.device == 'cpu':
            info['cpu_kernels'] = cpu_kernels.load()
        return model
    if engine.startswith('train'):
        return _train_step(fast(model), engine, shape, cfg['Model']['num_classes']), info
    model.eval()
    probe = parity_input(shape)
    with paddle.no_grad():
        ref = model(paddle.to_tensor(probe)).numpy()  # the model as built: every inference row's reference
    with tempfile.TemporaryDirectory(prefix='maxvit_bench_') as tmp:
        if engine in ('eager', 'static'):
            if engine == 'eager':
                net = fast(model)
            else:
                net, info['runtime'] = paddle.jit.to_static(model, full_graph=True), info['runtime'] + ' to_static'
            run = paddle.no_grad()(lambda batch: net(paddle.to_tensor(batch)).numpy())
        else:
            run, info['runtime'] = _exported_runner(model, engine, os.path.join(tmp, 'model'), shape[1:])
            info['device'] = 'cpu'
        # while the exported files still exist: the first run is when onnxruntime reads its half-batch session from
        # them (and OpenVINO compiles for the batch's shape)
        info.update(parity(run(probe), ref, 'eager Paddle'))
    batch = np.random.default_rng(1).random(shape, dtype=np.float32)
    return (lambda: run(batch)), info


def _train_step(model, engine: str, shape, num_classes: int):
    """One optimizer step of ``model`` on a fixed batch (train-static: through to_static, as train.py's
    Global.to_static; train-bf16: under bfloat16 autocast)."""
    import paddle
    import paddle.nn.functional as F
    model.train()
    x, y = paddle.rand(shape), paddle.randint(0, num_classes, shape[:1])
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    net = paddle.jit.to_static(model, full_graph=True) if engine == 'train-static' else model

    def step():
        with paddle.amp.auto_cast(enable=engine == 'train-bf16', dtype='bfloat16'):
            logits = net(x)
        loss = F.cross_entropy(logits.astype('float32'), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        return float(loss)
    return step


def _exported_runner(model, engine: str, prefix: str, input_shape):
    """(run, runtime) for ``model`` exported to PREFIX as tools/export.py does, run on this process's cores as
    tools/predict.py runs it."""
    import tools.export as ex
    threads = cpu_cores()
    if engine.startswith('inference'):
        ex.export(model, prefix, input_shape)
        run, _ = ex.create_runner(prefix, 'paddle', threads, mkldnn=engine == 'inference-mkldnn')
        return run, f'paddle {ex.paddle.__version__} inference' + (' + oneDNN' if 'mkldnn' in engine else '')
    ex.export_onnx(model, prefix, input_shape)
    if engine == 'onnxruntime':
        return ex.onnxruntime_runner(prefix + '.onnx', threads)
    hint = {'INFERENCE_PRECISION_HINT': 'bf16'} if engine == 'openvino-bf16' else {}  # predict.py --precision bf16
    try:
        return ex.openvino_runner(prefix + '.onnx', threads, hint)
    except ex.ExportError as e:  # bf16 on a CPU without it
        raise SkipEngine(str(e)) from None


def _timm_worker(spec):
    """(step, info) for one timm engine; runs in the --timm-python interpreter."""
    import timm
    import torch
    torch.set_num_threads(cpu_cores())
    engine = spec['engine']
    torch.manual_seed(0)
    # the config's stochastic depth, so that both train the same network
    model = timm.create_model(spec['timm_model'], drop_path_rate=spec['drop_path'])
    shape = (spec['batch'], 3, spec['size'], spec['size'])
    x = torch.rand(*shape)
    info = {'runtime': f'torch {torch.__version__}, timm {timm.__version__}', 'device': 'cpu'}
    if engine == 'timm-train':
        model.train()
        y = torch.randint(0, 1000, (spec['batch'],))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss)
        return step, info
    model.eval()
    net = model
    if engine != 'timm-eager':
        probe = torch.from_numpy(parity_input(list(shape)))
        with torch.no_grad():
            ref = model(probe).numpy()
        if engine == 'timm-channels_last':
            net = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            probe = probe.contiguous(memory_format=torch.channels_last)
        elif engine == 'timm-compile':
            net = torch.compile(model)  # inductor; compiles on the first call below, before any timing
        try:
            with torch.no_grad():
                out = net(probe).numpy()
        except Exception as e:  # inductor needs a working C++ compiler
            raise SkipEngine(f'{engine} failed: {type(e).__name__}: {str(e).strip()[:200]}') from None
        info.update(parity(out, ref, 'timm eager'))

    @torch.no_grad()
    def step():
        return float(net(x).sum())
    return step, info


def serve(spec):
    """One engine: set it up and say 'READY {info}', or 'SKIP why' and exit; then time one iteration per 'run' line
    ('T seconds'), and on any other line say its peak resident memory ('S GB') and exit."""
    import resource
    try:
        step, info = _timm_worker(spec) if spec['engine'].startswith('timm') else _paddle_worker(spec)
    except SkipEngine as e:
        print(f'SKIP {e}', flush=True)
        return
    for _ in range(spec['warmup']):  # every step ends on a host value: GPU work is done when it returns
        step()
    print(f'READY {json.dumps(info)}', flush=True)
    for line in sys.stdin:
        if line.startswith('run'):
            t = time.perf_counter()
            step()
            print(f'T {time.perf_counter() - t}', flush=True)
        else:
            break
    print(f'S {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}', flush=True)  # KiB -> GiB


# ================================================================================================ driver
class Worker:
    """One engine's process (this file with --worker), driven through its stdin and stdout."""

    def __init__(self, spec, python):
        self.spec, self.times, self.info, self.skipped, self.peak_gb = spec, [], {}, None, None
        self.proc = subprocess.Popen([python, '-m', 'tools.benchmark', '--worker', json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self._read('READY ', 'SKIP ')
        if line.startswith('SKIP '):
            self.skipped = line[5:].strip()
            self.proc.wait()
        else:
            self.info = json.loads(line[6:])

    def _read(self, *prefixes) -> str:
        """The worker's next line that starts with one of ``prefixes`` (Paddle and its libraries print too)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                why = 'killed by signal 9: out of memory?' if code == -9 else 'its error is above'
                raise RuntimeError(f"benchmark worker {self.spec['label']} failed ({why})")
            if line.startswith(prefixes):
                return line

    def _send(self, command: str) -> None:
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()

    def run(self) -> None:
        """Time one iteration, then wait SETTLE_S for the worker's threads to go idle."""
        self._send('run')
        self.times.append(float(self._read('T ').split()[1]))
        time.sleep(SETTLE_S)

    def finish(self) -> None:
        self._send('quit')
        self.peak_gb = float(self._read('S ').split()[1])
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def summarize(w: Worker) -> dict:
    t = w.times
    median = statistics.median(t)
    return {'label': w.spec['label'], 'engine': w.spec['engine'], 'batch': w.spec['batch'], 'size': w.spec['size'],
            'median_s': median, 'max_s': max(t), 'images_per_sec': w.spec['batch'] / median, 'iterations_s': t,
            'peak_gb': w.peak_gb, **{k: w.info.get(k) for k in ('runtime', 'device', 'cpu_kernels', 'parity_ref',
                                                                  'max_abs_diff', 'rel_diff', 'max_abs_logit',
                                                                  'parity_ok')}}


def speedup(row: dict, reference: dict) -> float:
    """reference's time over row's: the median over the rounds of the ratio within each round (both rows ran in
    the same rounds)."""
    return statistics.median(a / b for a, b in zip(reference['iterations_s'], row['iterations_s'], strict=True))


def report(rows, cpu=None, skipped=()) -> str:
    """The table, with the CPU lines above it; adds the ratios and the CPU to ``rows``."""
    cpu = cpu or cpu_summary()
    lines = cpu_header(cpu)
    kernels = {r['cpu_kernels'] for r in rows if r.get('cpu_kernels') is not None}
    if kernels:
        state = ('on' if kernels == {True} else 'off (not built, or MAXVIT_CPU_KERNELS=0)' if kernels == {False}
                 else 'on in some rows only')
        lines.append(f'MaxViT CPU kernels (eager and training rows): {state}')
    kind = lambda r: 'train' if 'train' in r['engine'] else 'infer'  # noqa: E731
    peers = {}  # (batch, kind) -> the timm rows
    for r in rows:
        if r['engine'].startswith('timm'):
            peers.setdefault((r['batch'], kind(r)), []).append(r)
    for (b, k), timm_rows in sorted(peers.items()):
        best = min(timm_rows, key=lambda p: p['median_s'])
        lines.append(f'fastest peer, {k} b{b}: {best["label"]} ({best["images_per_sec"]:.2f} img/s)')
    lines.append('')
    lines.append(f'{"engine":<26}{"s/iter":>8}{"max s":>8}{"img/s":>8}{"x timm":>8}{"x peer":>8}{"x first":>8}'
                 f'{"max|diff|":>11}{"rel diff":>10}{"peak GB":>8}')
    ratio = lambda v: f'{v:.2f}' if v is not None else '-'  # noqa: E731
    for r in rows:
        timm_rows = peers.get((r['batch'], kind(r)), [])
        eager = next((p for p in timm_rows if p['engine'] in ('timm-eager', 'timm-train')), None)
        best = min(timm_rows, key=lambda p: p['median_s'], default=None)
        r['vs_timm_eager'] = speedup(r, eager) if eager else None
        r['fastest_peer'] = best['label'] if best else None
        r['vs_fastest_peer'] = speedup(r, best) if best else None
        r['vs_first'] = speedup(r, next(f for f in rows if (f['batch'], kind(f)) == (r['batch'], kind(r))))
        r['cpu_model'], r['cpu_flags'] = cpu['cpu_model'], cpu['cpu_flags']
        diff = (f'{r["max_abs_diff"]:.1e}' + ('' if r['parity_ok'] else '!')) if r.get('max_abs_diff') is not None \
            else ('inf!' if r.get('parity_ref') else '-')
        rel = f'{r["rel_diff"]:.1e}' if r.get('rel_diff') is not None else '-'
        lines.append(f'{r["label"]:<26}{r["median_s"]:>8.3f}{r["max_s"]:>8.3f}{r["images_per_sec"]:>8.2f}'
                     f'{ratio(r["vs_timm_eager"]):>8}{ratio(r["vs_fastest_peer"]):>8}{r["vs_first"]:>8.2f}'
                     f'{diff:>11}{rel:>10}{r["peak_gb"]:>8.2f}')
    rounds = max((len(r['iterations_s']) for r in rows), default=0)
    lines.append('')
    lines.append(f's/iter: the median of {rounds} round(s), each timing every row once, one row at a time; max s: '
                 f'the slowest round. x timm / x peer / x first: timm eager\'s / the fastest timm engine\'s / the '
                 f'first row\'s time over the row\'s, of the same batch and kind (inference or training; > 1: the '
                 f'row is faster), the median over the rounds of the ratio within each round.')
    lines.append('runtimes: ' + '; '.join(dict.fromkeys(r['runtime'] for r in rows if r.get('runtime'))))
    if any(r.get('parity_ref') for r in rows):
        lines.append(f'max|diff|: the largest logit difference from the row\'s reference (Paddle rows: the model as '
                     f'built, in eager Paddle; timm rows: timm eager) on one standard-normal batch; rel diff: over '
                     f'the largest |logit|; ! = above {PARITY_TOLERANCE:g} (either).')
    for label, why in skipped:
        lines.append(f'skipped {label}: {why}')
    return '\n'.join(lines)


def plan(args, drop_path: float):
    """(the specs of the rows to run, [(label, why) of the rows skipped for missing packages])."""
    base = {'config': args.config, 'overrides': args.override, 'warmup': args.warmup, 'size': args.size}
    missing = {e: [m for m in OPTIONAL.get(e, ()) if importlib.util.find_spec(m) is None] for e in args.engines}
    train = [e for e in args.engines if e.startswith('train')]
    timm = [f'timm-{t}' for t in args.timm_engines] if len(train) < len(args.engines) else []
    timm += ['timm-train'] if train else []
    specs, skipped = [], []
    for b in args.batch:
        for e in args.engines:
            spec = dict(base, engine=e, batch=b, label=f'{e} b{b}')
            if missing[e]:
                skipped.append((spec['label'], f'{", ".join(missing[e])} not installed in {sys.executable} '
                                               f'(pip install {" ".join(missing[e])})'))
            else:
                specs.append(spec)
        if args.timm_python:
            specs += [dict(base, engine=e, batch=b, timm_model=args.timm_model, drop_path=drop_path,
                           label=f'timm {e[5:]} b{b}') for e in timm]
    return specs, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)  # (before any import of Paddle: timm's Python has none)
    parser.add_argument('-c', '--config', default=str(ROOT / 'configs' / 'maxvit_t_tf_224.yaml'))
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value')
    parser.add_argument('--engines', nargs='+', default=DEFAULT_ENGINES, choices=ENGINES)
    parser.add_argument('--batch', type=int, nargs='+', default=[8])
    parser.add_argument('--size', type=int, help='image side (default: Data.img_size)')
    parser.add_argument('--timm-python', help='a python with torch + timm: times timm beside ours')
    parser.add_argument('--timm-model', default='maxvit_tiny_tf_224')
    parser.add_argument('--timm-engines', nargs='+', default=TIMM_ENGINES, choices=TIMM_ENGINES,
                        help='timm inference engines beside ours (training: timm train, with a train engine)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations per engine (default 2)')
    parser.add_argument('--rounds', type=int, default=7, help='timed iterations per engine (default 7)')
    parser.add_argument('--json', help="also write the rows here (with each round's time)")
    args = parser.parse_args(argv)
    if args.worker:
        return serve(json.loads(args.worker))
    if args.rounds < 1 or args.warmup < 0:
        parser.error('--rounds must be at least 1 and --warmup at least 0')

    from common.config import load_config
    cfg = load_config(args.config, args.override)  # a bad config fails here, once
    args.size = args.size or cfg['Data']['img_size']
    specs, skipped = plan(args, cfg['Model']['drop_path'])
    workers = []
    try:
        for spec in specs:
            w = Worker(spec, args.timm_python if spec['engine'].startswith('timm') else sys.executable)
            if w.skipped:
                skipped.append((spec['label'], w.skipped))
            else:
                workers.append(w)
        for _ in range(args.rounds):
            for w in workers:
                w.run()
        for w in workers:
            w.finish()
    finally:
        for w in workers:
            w.stop()
    rows = [summarize(w) for w in workers]
    print(report(rows, skipped=skipped))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == '__main__':
    main()
