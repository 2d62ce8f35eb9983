"""Benchmark MaxViT side by side: throughput, latency percentiles and peak memory, for inference (eager,
to_static, Paddle Inference with and without oneDNN) and training steps (fp32, bf16), optionally against timm.

    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 1 8
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 8 --engines train train-bf16
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 8 --timm-python .venv-torch/bin/python
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --sweep 224 288 384 448    # vs global attention

Every engine runs in its own process; the driver times one iteration of one process at a time, in rotating
order, while the others are paused (SIGSTOP: idle Paddle Inference threads spin and would steal CPU), and
reports medians. So ratios come from the same minutes on the same machine; absolute times on a shared machine
are noise. Iterations during which other processes used more than --quiet cores are dropped from the
"quiet" median. timm runs in the interpreter given by --timm-python (torch and timm installed there; never
needed by this repository), with the same number of threads.

--sweep times batch-1 eager inference of the model and of a full-global-attention baseline of the same widths
(every block and grid attention replaced by attention over the whole stage map) at each image size: MaxViT's
cost grows with the number of pixels, global attention's with its square.

On a GPU (paddlepaddle-gpu): eager, static and train engines run on the GPU (Global.device), with the same AMP
and to_static code paths the CPU exercises; the Paddle Inference engines here are CPU ones. bf16 on the CPU
build is AMP plumbing only (arithmetic stays float32), so its time is fp32's.
"""
import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ['eager', 'static', 'inference', 'inference-mkldnn', 'train', 'train-bf16']


# ================================================================================================ workers
def _paddle_worker(spec):
    sys.path.insert(0, str(ROOT))
    from common.device import setup
    from common.config import build_model, load_config
    env = setup('auto')  # MKL threads: this process's share of the cores
    import numpy as np
    import paddle
    import paddle.nn.functional as F
    cfg = load_config(spec['config'], spec['overrides'])
    paddle.seed(0)
    model = build_model(cfg)
    if spec.get('global_attention'):
        make_global(model, spec['size'])
    x = paddle.rand([spec['batch'], cfg['Model']['input_dim'], spec['size'], spec['size']])
    engine = spec['engine']
    if engine.startswith('train'):
        model.train()
        y = paddle.randint(0, cfg['Model']['num_classes'], [spec['batch']])
        opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
        bf16 = engine == 'train-bf16'

        def step():
            with paddle.amp.auto_cast(enable=bf16, dtype='bfloat16'):
                logits = model(x)
            loss = F.cross_entropy(logits.astype('float32'), y)
            loss.backward()
            opt.step()
            opt.clear_grad()
            return float(loss)
        return step, env.device
    model.eval()
    if engine in ('eager', 'static'):
        net = paddle.jit.to_static(model, full_graph=True) if engine == 'static' else model

        def step():
            with paddle.no_grad():
                return float(net(x).sum())
        return step, env.device
    import tempfile
    from tools.export import create_predictor, export, run_predictor
    prefix = os.path.join(tempfile.mkdtemp(prefix='maxvit_bench_'), 'model')
    export(model, prefix, [cfg['Model']['input_dim'], spec['size'], spec['size']])
    predictor = create_predictor(prefix, mkldnn=engine == 'inference-mkldnn')
    batch = x.numpy()
    return (lambda: float(np.sum(run_predictor(predictor, batch)))), 'cpu'


def _timm_worker(spec):
    import torch
    import timm
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    # the same stochastic depth as our config, so both train the same network
    model = timm.create_model(spec['timm_model'], drop_path_rate=spec['drop_path'])
    x = torch.rand(spec['batch'], 3, spec['size'], spec['size'])
    if spec['engine'] == 'timm-train':
        model.train()
        y = torch.randint(0, 1000, (spec['batch'],))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss)
        return step, 'cpu'
    model.eval()

    def step():
        with torch.no_grad():
            return float(model(x).sum())
    return step, 'cpu'


def make_global(model, size: int) -> None:
    """Turn every block and grid attention of ``model`` into attention over its whole stage map (one window
    of all positions, with a relative bias table of that size): the quadratic baseline of the same widths."""
    from maxvit import Rel_Attention
    side = math.ceil(size / 2)  # after the stem
    for stage in model.max_blocks:
        side = math.ceil(side / 2)
        for block in stage:
            for part in (block.block_attn, block.grid_attn):
                old = part.attn
                part.partition_size = [side, side]
                part.attn = Rel_Attention(old.qkv.weight.shape[0], [side, side], old.num_heads)


def worker(spec):
    """Set up one engine, then on each 'run' line time one iteration ('T seconds'); 'stats' -> peak memory."""
    import resource
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, device = _timm_worker(spec) if spec['engine'].startswith('timm') else _paddle_worker(spec)
    sync = lambda: None  # noqa: E731  (CPU work is synchronous)
    if device == 'gpu':
        import paddle
        sync = paddle.device.synchronize
    for _ in range(spec['warmup']):
        step()
    sync()
    print('READY', flush=True)
    for line in sys.stdin:
        if line.startswith('run'):
            t = time.perf_counter()
            step()
            sync()
            print(f'T {time.perf_counter() - t}', flush=True)
        elif line.startswith('stats'):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f'S {peak / 2 ** 20} {(peak - rss0) / 2 ** 20}', flush=True)
        else:
            break


# ================================================================================================ driver
class Worker:
    def __init__(self, spec, python):
        self.spec = spec
        self.times, self.foreign = [], []
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), '--worker', json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self._read('READY')
        os.kill(self.proc.pid, signal.SIGSTOP)

    def _read(self, prefix):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                why = 'killed by signal 9: out of memory?' if code == -9 else 'its error is above'
                raise RuntimeError(f"benchmark worker {self.spec['label']} failed ({why})")
            if line.startswith(prefix):
                return line

    def run(self, record=True):
        os.kill(self.proc.pid, signal.SIGCONT)
        busy0, own0, t0 = _busy(), _cpu(self.proc.pid), time.perf_counter()
        self.proc.stdin.write('run\n')
        self.proc.stdin.flush()
        seconds = float(self._read('T ').split()[1])
        os.kill(self.proc.pid, signal.SIGSTOP)
        foreign = ((_busy() - busy0) - (_cpu(self.proc.pid) - own0)) / os.sysconf('SC_CLK_TCK') / (
            time.perf_counter() - t0)
        if record:
            self.times.append(seconds)
            self.foreign.append(foreign)

    def finish(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.stdin.write('stats\n')
        self.proc.stdin.flush()
        _, peak, delta = self._read('S ').split()
        self.proc.stdin.write('quit\n')
        self.proc.stdin.flush()
        self.proc.wait()
        self.peak_gb, self.delta_gb = float(peak), float(delta)


def _busy() -> int:
    fields = list(map(int, open('/proc/stat').readline().split()[1:]))
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks


def _cpu(pid) -> int:
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return int(fields[11]) + int(fields[12])


def interleave(workers, warmup_rounds: int, rounds: int) -> None:
    for _ in range(warmup_rounds):
        for w in workers:
            w.run(record=False)
    for r in range(rounds):
        for w in workers[r % len(workers):] + workers[:r % len(workers)]:
            w.run()
    for w in workers:
        w.finish()


def summarize(w, quiet: float) -> dict:
    t = sorted(w.times)
    q = [s for s, f in zip(w.times, w.foreign) if f < quiet]
    median = statistics.median(q or w.times)
    pct = lambda p: t[min(len(t) - 1, int(round(p / 100 * (len(t) - 1))))]  # noqa: E731
    return {'label': w.spec['label'], 'batch': w.spec['batch'], 'size': w.spec['size'], 'median_s': median,
            'p50_s': pct(50), 'p90_s': pct(90), 'max_s': t[-1], 'images_per_sec': w.spec['batch'] / median,
            'quiet_iterations': len(q), 'iterations': len(t), 'peak_gb': w.peak_gb, 'model_gb': w.delta_gb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('-c', '--config', default=str(ROOT / 'configs' / 'maxvit_t_tf_224.yaml'))
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value')
    parser.add_argument('--engines', nargs='+', default=['eager', 'static', 'inference', 'inference-mkldnn'],
                        choices=ENGINES)
    parser.add_argument('--batch', type=int, nargs='+', default=[8])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--sweep', type=int, nargs='+', help='image sizes: eager batch-1 vs global attention')
    parser.add_argument('--timm-python', help='a python with torch + timm: times timm beside ours')
    parser.add_argument('--timm-model', default='maxvit_tiny_tf_224')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations per worker')
    parser.add_argument('--rounds', type=int, default=5, help='timed iterations per worker')
    parser.add_argument('--quiet', type=float, default=0.15, help='max cores used by others in a quiet iteration')
    parser.add_argument('--gflops', type=float, help='peak FP32 GFLOP/s of this machine: prints %% of peak')
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    sys.path.insert(0, str(ROOT))
    from common.config import load_config
    drop_path = load_config(args.config, args.override)['Model']['drop_path']  # a bad config fails here, once
    base = {'config': args.config, 'overrides': args.override, 'warmup': 1}
    specs = []
    if args.sweep:
        for size in args.sweep:
            for glob in (False, True):
                specs.append(dict(base, engine='eager', batch=1, size=size, global_attention=glob,
                                  label=f'{"global attention" if glob else "MaxViT"} {size}'))
    else:
        for b in args.batch:
            specs += [dict(base, engine=e, batch=b, size=args.size, label=f'{e} b{b}') for e in args.engines]
            if args.timm_python:
                for e in sorted({'train' if e.startswith('train') else 'eager' for e in args.engines}):
                    specs.append(dict(base, engine=f'timm-{e}', batch=b, size=args.size, timm_model=args.timm_model,
                                      drop_path=drop_path, label=f'timm {e} b{b}'))
    workers = []
    try:
        for spec in specs:
            python = args.timm_python if spec['engine'].startswith('timm') else sys.executable
            workers.append(Worker(spec, python))
        interleave(workers, args.warmup, args.rounds)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
                w.proc.kill()
    rows = [summarize(w, args.quiet) for w in workers]
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def report(rows, args) -> str:
    gflop = None
    if args.gflops and not args.sweep:
        sys.path.insert(0, str(ROOT))
        from tools.flops import count
        from common.config import build_model, load_config
        macs = count(build_model(load_config(args.config, args.override)), args.size, args.size)['macs']
        gflop = 2 * sum(macs.values()) / 1e9  # per image, forward
    lines = [f'{"engine":<26}{"s/iter":>9}{"p90 s":>8}{"img/s":>8}{"x timm":>8}{"x first":>8}'
             f'{"peak GB":>9}{"quiet":>7}' + (f'{"% peak":>8}' if gflop else '')]
    first = rows[0]['median_s']
    for r in rows:
        timm = next((t for t in rows if t['label'].startswith('timm') and t['batch'] == r['batch']
                     and ('train' in t['label']) == ('train' in r['label'])), None)
        vs_timm = f'{timm["median_s"] / r["median_s"]:.2f}' if timm else '-'
        line = (f'{r["label"]:<26}{r["median_s"]:>9.3f}{r["p90_s"]:>8.3f}{r["images_per_sec"]:>8.2f}{vs_timm:>8}'
                f'{first / r["median_s"]:>8.2f}{r["peak_gb"]:>9.2f}{r["quiet_iterations"]:>4}/{r["iterations"]:<2}')
        if gflop:
            work = gflop * (3 if 'train' in r['label'] else 1)  # a training step ~ 3 forward passes
            line += f'{100 * work * r["images_per_sec"] / args.gflops:>7.0f}%'
        lines.append(line)
    if args.sweep:
        lines.append('')
        lines.append(f'{"size":>6}{"pixels x":>10}{"MaxViT x":>10}{"global x":>10}')
        by = {(r['size'], r['label'].startswith('global')): r['median_s'] for r in rows}
        s0 = args.sweep[0]
        for s in args.sweep:
            lines.append(f'{s:>6}{(s / s0) ** 2:>10.2f}{by[(s, False)] / by[(s0, False)]:>10.2f}'
                         f'{by[(s, True)] / by[(s0, True)]:>10.2f}')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
