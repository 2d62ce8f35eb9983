"""Benchmark MaxViT side by side: throughput, latency percentiles and peak memory, for inference (eager,
to_static, Paddle Inference with and without oneDNN, the exported model in onnxruntime and OpenVINO) and training
steps (fp32; train-static: through paddle.jit.to_static, as train.py's Global.to_static; bf16), optionally
against timm (eager, channels_last, torch.compile).

    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 1 8
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 8 --engines train train-static train-bf16
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --batch 1 8 --timm-python .venv-torch/bin/python \
        --engines eager inference-mkldnn onnxruntime openvino --rounds 7 --gflops auto
    python tools/benchmark.py -c configs/maxvit_t_tf_224.yaml --sweep 224 288 384 448    # vs global attention

Every engine runs in its own process; the driver times one iteration of one process at a time, in rotating order,
while the others are paused (SIGSTOP: idle Paddle Inference threads spin and would steal CPU), and reports medians;
each ratio between two rows is the median of their ratios within each round. So ratios come from the same seconds on
the same machine; absolute times on a shared machine are noise. Iterations during which other processes used more
than --quiet cores are dropped from the "quiet" median. Every table starts with the CPU model and its ISA flags
(/proc/cpuinfo): compare ratios measured in one run, never absolute times across machines. Where a C compiler is at
hand, the core-to-core round trip (tools/core_round_trip.c) is measured before each timed iteration, and each row's
median is its rt ns column: on a virtual machine it moves, within seconds, with where the hypervisor places the
virtual CPUs, and so does the time of an engine that splits one image's kernels over the cores (OpenVINO at batch 1
most, docs/performance.md). Paddle's engines run after common.device.setup, so on CPU the eager and training rows
use MaxViT's CPU kernels (common/cpu_kernels.cc) where they are built; the table says whether they did
(MAXVIT_CPU_KERNELS=0 runs Paddle's own ops). The model's weights are Global.pretrained_model's, or else random with
a trained model's statistics (trained_like_weights): OpenVINO drops the zero biases and unit norms of the bare
initialisation, which flattered it by 1-2%.

Engines that run the network another way than eager Paddle (static, inference*, onnxruntime, openvino*) first
compare their logits with eager Paddle's on one standard-normal batch: the table's max|diff| (and over the largest
logit, rel diff), marked ! above 1e-4. onnxruntime and openvino run the .onnx that tools/export.py writes
(export_onnx, paddle2onnx) with tools.export's onnxruntime_runner and openvino_runner, as tools/predict.py does:
this process's cores as threads (both run an even batch as two halves at once, on half of the threads each),
onnxruntime at graph optimisation level ALL, OpenVINO in fp32 latency mode, compiled for the batch's shape, with its
attention kernels (predict.py turns them off for models whose export check needed that, see tools/export.py).
openvino-bf16 computes in bfloat16, as tools/predict.py --precision bf16 does, on CPUs that have it (expect its
max|diff| to be marked); openvino-paddle asks OpenVINO to read the Paddle model itself. They need optional packages
(pip install -r requirements-deploy.txt) and are skipped, with the reason, where those are missing or cannot read
the model.

timm runs in the interpreter given by --timm-python (torch and timm installed there; never needed by this
repository), with the same number of threads: eager, channels_last (model and input) and torch.compile (inductor;
compiled on an untimed call before any timing), each compared with timm eager's logits. "x timm" is timm eager's
time over the row's, "x peer" the fastest timm engine's (of the same batch; > 1: the row is faster). --gflops auto
first measures this machine's 2048^3 float32 GEMM (Paddle, and torch) and prints each engine's % of that.

--sweep times batch-1 eager inference of the model and of a full-global-attention baseline of the same widths
(every block and grid attention replaced by attention over the whole stage map) at each image size: MaxViT's
cost grows with the number of pixels, global attention's with its square.

On a GPU (paddlepaddle-gpu): eager, static and train engines run on the GPU (Global.device), with the same AMP
and to_static code paths the CPU exercises; the Paddle Inference engines here are CPU ones. bf16 on the CPU
build is AMP plumbing only (arithmetic stays float32), so its time is fp32's.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ['eager', 'static', 'inference', 'inference-mkldnn', 'onnxruntime', 'openvino', 'openvino-bf16',
           'openvino-paddle', 'train', 'train-static', 'train-bf16']
DEFAULT_ENGINES = ['eager', 'static', 'inference', 'inference-mkldnn', 'onnxruntime', 'openvino']
TIMM_ENGINES = ['eager', 'channels_last', 'compile']


# ================================================================================================ workers
PARITY_TOLERANCE = 1e-4  # a row whose logits differ from its reference by more (absolute or relative) is marked
OPTIONAL = {'onnxruntime': ('onnxruntime', 'paddle2onnx'), 'openvino': ('openvino', 'paddle2onnx'),
            'openvino-bf16': ('openvino', 'paddle2onnx'),
            'openvino-paddle': ('openvino',)}  # engine -> the packages it needs beside Paddle
GEMM_N = 2048


def parity_input(shape):
    """The input every engine's logits are compared on: standard normal (like a normalised image), fixed seed."""
    import numpy as np
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def trained_like_weights(model, seed: int = 0) -> dict:
    """A state dict for ``model`` with the statistics of a trained one, for timing and parity checks where no
    trained weights are at hand: fan-in scaled weights (activations O(1) all the way through), non-zero biases and
    BatchNorm statistics, norm weights around 1. With the 0.02-std initialisation's zero biases and unit norms,
    OpenVINO drops about 55 elementwise kernels (LayerNorm and BatchNorm affines) that a trained MaxViT-T keeps, and
    ran 1-2% faster; and with the initialisation the tanh and exact GELU differ by only ~1e-6 on the logits (~4e-4
    with these weights)."""
    import numpy as np
    import paddle
    rng = np.random.default_rng(seed)
    state = {}
    for k, v in model.state_dict().items():
        shape = v.shape
        if k.endswith('_variance'):
            value = rng.uniform(0.5, 1.5, shape)
        elif k.endswith('relative_bias_table'):
            value = rng.normal(0, 0.5, shape)
        elif len(shape) in (2, 4):                                   # Linear [in, out], Conv2D [out, in, k, k]
            fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
            value = rng.normal(0, fan_in ** -0.5, shape)
        else:                                                        # biases, norm weights (around 1), means
            value = rng.normal(1.0 if k.endswith('weight') else 0.0, 0.1, shape)
        state[k] = paddle.to_tensor(value.astype('float32'))
    return state


def parity(out, ref, reference: str) -> dict:
    import numpy as np
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(out - ref).max()) if out.shape == ref.shape else float('inf')
    scale = float(np.abs(ref).max())
    rel = diff / scale if scale > 0 else diff
    return {'parity_ref': reference, 'max_abs_diff': diff if math.isfinite(diff) else None,
            'rel_diff': rel if math.isfinite(rel) else None, 'max_abs_logit': scale,
            'parity_ok': bool(diff <= PARITY_TOLERANCE and rel <= PARITY_TOLERANCE)}


def _paddle_worker(spec):
    sys.path.insert(0, str(ROOT))
    from common.device import cpu_cores, setup
    from common.config import build_model, load_config
    env = setup('auto')  # MKL threads: this process's share of the cores; on CPU, MaxViT's CPU kernels
    import numpy as np
    import paddle
    import paddle.nn.functional as F
    import maxvit
    kernels = {'cpu_kernels': maxvit.CPU_KERNELS is not None}
    engine = spec['engine']
    if engine == 'gemm':
        a, b = paddle.rand([GEMM_N, GEMM_N]), paddle.rand([GEMM_N, GEMM_N])
        return (lambda: paddle.matmul(a, b)), env.device, {'what': f'paddle {paddle.__version__}'}
    cfg = load_config(spec['config'], spec['overrides'])
    paddle.seed(0)
    model = build_model(cfg)
    if cfg['Global']['pretrained_model'] and not spec.get('global_attention'):
        from common.checkpoint import load_pretrained
        load_pretrained(model, cfg['Global']['pretrained_model'], ema=cfg['Global']['eval_weights'] == 'ema')
    else:
        model.set_state_dict(trained_like_weights(model))
    if spec.get('global_attention'):
        make_global(model, spec['size'])
    shape = [spec['batch'], cfg['Model']['input_dim'], spec['size'], spec['size']]
    x = paddle.rand(shape)
    if engine.startswith('train'):
        model.train()
        y = paddle.randint(0, cfg['Model']['num_classes'], [spec['batch']])
        opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
        bf16 = engine == 'train-bf16'
        net = paddle.jit.to_static(model, full_graph=True) if engine == 'train-static' else model  # as train.py

        def step():
            with paddle.amp.auto_cast(enable=bf16, dtype='bfloat16'):
                logits = net(x)
            loss = F.cross_entropy(logits.astype('float32'), y)
            loss.backward()
            opt.step()
            opt.clear_grad()
            return float(loss)
        return step, env.device, kernels
    model.eval()
    info = {'runtime': f'paddle {paddle.__version__}', **kernels}
    if engine == 'eager':
        def step():
            with paddle.no_grad():
                return float(model(x).sum())
        return step, env.device, info
    # every other engine runs the same network another way: first its logits against eager Paddle's
    probe = parity_input(shape)
    with paddle.no_grad():
        ref = model(paddle.to_tensor(probe)).numpy()
    if engine == 'static':
        net = paddle.jit.to_static(model, full_graph=True)
        info['runtime'] += ' to_static'

        def run(batch):
            with paddle.no_grad():
                return net(paddle.to_tensor(batch)).numpy()
        device = env.device
        info.update(parity(run(probe), ref, 'eager Paddle'))
    else:
        import shutil
        import tempfile
        import tools.export as ex
        tmp = tempfile.mkdtemp(prefix='maxvit_bench_')
        prefix = os.path.join(tmp, 'model')
        input_shape = shape[1:]
        device, threads = 'cpu', cpu_cores()
        try:
            if engine.startswith('inference'):
                ex.export(model, prefix, input_shape)
                run, _ = ex.create_runner(prefix, 'paddle', threads, mkldnn=engine == 'inference-mkldnn')
                info['runtime'] += ' inference' + (' + oneDNN' if engine == 'inference-mkldnn' else '')
            elif engine == 'onnxruntime':
                ex.export_onnx(model, prefix, input_shape)
                run, info['runtime'] = ex.onnxruntime_runner(prefix + '.onnx', threads)
            elif engine in ('openvino', 'openvino-bf16'):  # bf16: tools/predict.py --precision bf16
                ex.export_onnx(model, prefix, input_shape)
                hint = {'INFERENCE_PRECISION_HINT': 'bf16'} if engine == 'openvino-bf16' else {}
                try:
                    run, info['runtime'] = ex.openvino_runner(prefix + '.onnx', threads, hint)
                except ex.MissingPackage:
                    raise
                except ex.ExportError as e:  # bf16 on a CPU without it
                    raise SkipEngine(str(e)) from None
            elif engine == 'openvino-paddle':  # the Paddle model itself, no ONNX in between
                ex.export(model, prefix, input_shape)
                try:
                    run, info['runtime'] = ex.openvino_runner((prefix + '.json', prefix + '.pdiparams'), threads)
                except ex.MissingPackage:
                    raise
                except ex.ExportError as e:
                    import openvino as ov
                    why = str(e).strip().splitlines()[-1].split(' Please check')[0]
                    raise SkipEngine(f"openvino {ov.__version__.split('-')[0]} cannot read the model.json that "
                                     f"paddle.jit.save writes (Paddle {paddle.__version__}, PIR): its Paddle frontend "
                                     f"reads the older .pdmodel ({why[:120]})") from None
            else:
                raise ValueError(f'unknown engine {engine}')
            del model  # the engine holds its own copy of the weights
            info.update(parity(run(probe), ref, 'eager Paddle'))  # OpenVINO compiles for the batch's shape here
        finally:  # every engine has read its files by now (a mapped file stays readable once unlinked)
            shutil.rmtree(tmp, ignore_errors=True)
    batch = x.numpy()
    return (lambda: float(np.sum(run(batch)))), device, info


def _timm_worker(spec):
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = spec['engine']
    if engine == 'timm-gemm':
        a, b = torch.rand(GEMM_N, GEMM_N), torch.rand(GEMM_N, GEMM_N)
        return (lambda: torch.mm(a, b)), 'cpu', {'what': f'torch {torch.__version__}'}
    import timm
    torch.manual_seed(0)
    # the same stochastic depth as our config, so both train the same network
    model = timm.create_model(spec['timm_model'], drop_path_rate=spec['drop_path'])
    shape = (spec['batch'], 3, spec['size'], spec['size'])
    x = torch.rand(*shape)
    info = {'runtime': f'torch {torch.__version__}, timm {timm.__version__}'}
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
        return step, 'cpu', info
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
            raise SkipEngine(f'torch.compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}'
                             ) from None
        info.update(parity(out, ref, 'timm eager'))

    def step():
        with torch.no_grad():
            return float(net(x).sum())
    return step, 'cpu', info


class SkipEngine(Exception):
    """An optional engine that cannot run here: the row is left out with this message."""


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
    """Set up one engine, say what it is ('INFO {json}': runtime, parity), then on each 'run' line time one iteration
    ('T seconds'); 'stats' -> peak memory. An optional engine that cannot run here says 'SKIP why' and exits."""
    import resource
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        step, device, info = _timm_worker(spec) if spec['engine'].startswith('timm') else _paddle_worker(spec)
    except SkipEngine as e:
        print(f'SKIP {e}', flush=True)
        return
    except ImportError as e:
        if spec['engine'] not in OPTIONAL:
            raise
        print(f'SKIP {e} (pip install {" ".join(OPTIONAL[spec["engine"]])})', flush=True)
        return
    sync = lambda: None  # noqa: E731  (CPU work is synchronous)
    if device == 'gpu':
        import paddle
        sync = paddle.device.synchronize
    for _ in range(spec['warmup']):
        step()
    sync()
    print(f'INFO {json.dumps(info)}', flush=True)
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
        self.times, self.foreign, self.round_trips = [], [], []
        self.info, self.skipped = {}, None
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), '--worker', json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        while True:
            line = self._read(('INFO ', 'READY', 'SKIP '))
            if line.startswith('INFO '):
                self.info = json.loads(line[5:])
            elif line.startswith('SKIP '):
                self.skipped = line[5:].strip()
                self.proc.wait()
                return
            else:
                break
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

    def run(self, record=True, probe=None):
        """One timed iteration; ``probe`` (a core round trip, see round_trip_probe) runs just before it, while every
        worker is paused."""
        round_trip = probe() if probe and record else None
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
            self.round_trips.append(round_trip)

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


def interleave(workers, warmup_rounds: int, rounds: int, finish: bool = True, probe=None) -> None:
    for _ in range(warmup_rounds):
        for w in workers:
            w.run(record=False)
    for r in range(rounds):
        for w in workers[r % len(workers):] + workers[:r % len(workers)]:
            w.run(probe=probe)
    if finish:
        for w in workers:
            w.finish()


def start_workers(specs, python_for):
    """A Worker per spec, one set up at a time (the others paused); the skipped ones are returned apart."""
    workers, skipped = [], []
    try:
        for spec in specs:
            w = Worker(spec, python_for(spec))
            (skipped if w.skipped else workers).append(w)
    except BaseException:
        stop(workers)
        raise
    return workers, skipped


def stop(workers):
    for w in workers:
        if w.proc.poll() is None:
            os.kill(w.proc.pid, signal.SIGCONT)
            w.proc.kill()
            w.proc.wait()


# ISA extensions that decide which kernels a CPU math library can use, as /proc/cpuinfo names them
ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')


def cpu_info() -> dict:
    """The CPU model and the ISA flags that matter for these kernels, from /proc/cpuinfo (Linux)."""
    from common.device import cpu_cores, cpu_field
    flags = set(cpu_field('flags').split())
    model = cpu_field('model name') or platform.processor() or 'unknown CPU'
    family = cpu_field('cpu family')
    if family:
        model += f" (family {family} model {cpu_field('model') or '?'})"
    return {'cpu_model': model, 'cpu_cores': cpu_cores(), 'cpu_flags': [f for f in ISA_FLAGS if f in flags],
            'cpu_flags_absent': [f for f in ISA_FLAGS if f not in flags] if flags else []}


def cpu_lines(cpu: dict) -> List[str]:
    absent = ', '.join(cpu['cpu_flags_absent']) or ('-' if cpu['cpu_flags'] else 'unknown (no /proc/cpuinfo)')
    return [f"CPU: {cpu['cpu_model']}, {cpu['cpu_cores']} cores for this process",
            f"ISA: {' '.join(cpu['cpu_flags']) or '-'} (absent: {absent})"]


def round_trip_probe(cpus=None):
    """A function that returns the core-to-core round trip in ns (tools/core_round_trip.c: one cache line passed
    20,000 times between the first two CPUs of this process), or None where it cannot run: one CPU, or no C
    compiler. On a virtual machine this time moves with where the hypervisor places the virtual CPUs (on the
    2-core EPYC of docs/performance.md: about 50, 85-95 or 350 ns, changing within seconds), and an engine that
    splits one image's kernels over the cores slows with it: OpenVINO at batch 1 took 71, 81 and 94 ms in those
    three states, and 133-135 ms on one thread in all of them."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    compiler = shutil.which('cc') or shutil.which('gcc')
    if len(cpus) < 2 or not compiler:
        return None
    build = tempfile.TemporaryDirectory(prefix='maxvit-round-trip-')  # removed with the probe
    exe = str(Path(build.name) / 'core_round_trip')
    built = subprocess.run([compiler, '-O2', '-pthread', str(ROOT / 'tools' / 'core_round_trip.c'), '-o', exe],
                           capture_output=True, text=True)
    if built.returncode:
        return None

    def probe(build=build) -> float:
        return float(subprocess.run([exe, str(cpus[0]), str(cpus[1]), '20000'], capture_output=True, text=True,
                                    check=True).stdout)
    return probe


def gemm_workers(python_for, torch_python):
    """Workers that time a 2048^3 float32 GEMM in Paddle (after common.device.setup: its MKL threads and code path)
    and, with a torch interpreter, in torch (all cores): what MaxViT's matmuls could reach here."""
    specs = [{'engine': 'gemm', 'label': 'gemm paddle', 'warmup': 2, 'batch': 0, 'size': 0}]
    if torch_python:
        specs.append({'engine': 'timm-gemm', 'label': 'gemm torch', 'warmup': 2, 'batch': 0, 'size': 0})
    return start_workers(specs, python_for)[0]


def gemm_rates(workers) -> dict:
    """{'paddle 3.3.1': GFLOP/s, ...}: the best of each worker's iterations."""
    return {w.info['what']: 2 * GEMM_N ** 3 / min(w.times) / 1e9 for w in workers}


def summarize(w, quiet: float) -> dict:
    t = sorted(w.times)
    quiet_flags = [f < quiet for f in w.foreign]
    kept = quiet_flags if any(quiet_flags) else [True] * len(w.times)  # the quiet iterations, where there are any
    q = [s for s, k in zip(w.times, kept) if k]
    median = statistics.median(q)
    trips = [r for r, k in zip(w.round_trips, kept) if k and r is not None]
    pct = lambda p: t[min(len(t) - 1, int(round(p / 100 * (len(t) - 1))))]  # noqa: E731
    row = {'label': w.spec['label'], 'engine': w.spec['engine'], 'batch': w.spec['batch'], 'size': w.spec['size'],
           'median_s': median, 'p50_s': pct(50), 'p90_s': pct(90), 'max_s': t[-1],
           'images_per_sec': w.spec['batch'] / median, 'quiet_iterations': sum(quiet_flags), 'iterations': len(t),
           'peak_gb': w.peak_gb, 'model_gb': w.delta_gb, 'runtime': w.info.get('runtime'),
           'cpu_kernels': w.info.get('cpu_kernels'),
           'round_trip_ns': statistics.median(trips) if trips else None,
           'iterations_s': w.times, 'iterations_quiet': quiet_flags,  # one per round
           'iterations_round_trip_ns': w.round_trips}
    for key in ('parity_ref', 'max_abs_diff', 'rel_diff', 'max_abs_logit', 'parity_ok'):
        row[key] = w.info.get(key)
    return row


def _gflops(text):
    if text == 'auto':
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gflops takes GFLOP/s or 'auto', got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('-c', '--config', default=str(ROOT / 'configs' / 'maxvit_t_tf_224.yaml'))
    parser.add_argument('-o', '--override', action='append', default=[], metavar='Section.key=value')
    parser.add_argument('--engines', nargs='+', default=DEFAULT_ENGINES, choices=ENGINES)
    parser.add_argument('--batch', type=int, nargs='+', default=[8])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--sweep', type=int, nargs='+', help='image sizes: eager batch-1 vs global attention')
    parser.add_argument('--timm-python', help='a python with torch + timm: times timm beside ours')
    parser.add_argument('--timm-model', default='maxvit_tiny_tf_224')
    parser.add_argument('--timm-engines', nargs='+', default=TIMM_ENGINES, choices=TIMM_ENGINES,
                        help='timm inference engines beside ours (training: timm train, with --engines train)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations per worker')
    parser.add_argument('--rounds', type=int, default=5, help='timed iterations per worker')
    parser.add_argument('--quiet', type=float, default=0.15, help='max cores used by others in a quiet iteration')
    parser.add_argument('--gflops', type=_gflops, help="peak FP32 GFLOP/s of this machine: prints %% of peak; "
                        "'auto' measures a 2048^3 GEMM first (Paddle, and torch with --timm-python)")
    parser.add_argument('--json', help='also write the rows here (with each iteration\'s time and round trip)')
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    sys.path.insert(0, str(ROOT))
    from common.config import load_config
    drop_path = load_config(args.config, args.override)['Model']['drop_path']  # a bad config fails here, once
    base = {'config': args.config, 'overrides': args.override, 'warmup': 1}
    specs, skipped = [], []
    if args.sweep:
        for size in args.sweep:
            for glob in (False, True):
                specs.append(dict(base, engine='eager', batch=1, size=size, global_attention=glob,
                                  label=f'{"global attention" if glob else "MaxViT"} {size}'))
    else:
        missing = {e: [m for m in OPTIONAL.get(e, ()) if importlib.util.find_spec(m) is None] for e in args.engines}
        for b in args.batch:
            for e in args.engines:
                spec = dict(base, engine=e, batch=b, size=args.size, label=f'{e} b{b}')
                if missing[e]:
                    skipped.append((spec['label'], f'{", ".join(missing[e])} not installed in {sys.executable} '
                                                   f'(pip install {" ".join(missing[e])})'))
                else:
                    specs.append(spec)
            if args.timm_python:
                train = [e for e in args.engines if e.startswith('train')]
                timm = [f'timm-{t}' for t in args.timm_engines] if len(train) < len(args.engines) else []
                for e in timm + (['timm-train'] if train else []):
                    specs.append(dict(base, engine=e, batch=b, size=args.size, timm_model=args.timm_model,
                                      drop_path=drop_path, label=f'timm {e[5:]} b{b}'))
    python_for = lambda spec: args.timm_python if spec['engine'].startswith('timm') else sys.executable  # noqa
    cpu = cpu_info()
    gemm, gemms, workers = {}, [], []
    try:
        if args.gflops == 'auto':  # best of 10 GEMMs before the benchmark and 10 after: a busy spell misleads less
            gemms = gemm_workers(python_for, args.timm_python)
            interleave(gemms, 0, 10, finish=False)
        workers, skip_workers = start_workers(specs, python_for)
        skipped += [(w.spec['label'], w.skipped) for w in skip_workers]
        interleave(workers, args.warmup, args.rounds, probe=round_trip_probe())
        if gemms:
            interleave(gemms, 0, 10)
            gemm = gemm_rates(gemms)
            args.gflops = max(gemm.values())
    finally:
        stop(workers + gemms)
    rows = [summarize(w, args.quiet) for w in workers]
    text = report(rows, args, cpu, gemm, skipped)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def speedup(row: dict, reference: dict) -> float:
    """reference's time over row's: the median of the ratios within each round (both quiet, where there are such
    rounds) when the two ran the same rounds, else the ratio of their medians. A round times every engine once,
    within seconds, so a change of the machine's state between rounds (such as the core round trip,
    round_trip_probe) cancels out, where the medians of two rows could come from different states."""
    a, b = reference.get('iterations_s') or [], row.get('iterations_s') or []
    if not a or len(a) != len(b):
        return reference['median_s'] / row['median_s']
    quiet = [x and y for x, y in zip(reference.get('iterations_quiet') or [True] * len(a),
                                     row.get('iterations_quiet') or [True] * len(b))]
    pairs = [(x, y) for x, y, q in zip(a, b, quiet) if q] or list(zip(a, b))
    return statistics.median(x / y for x, y in pairs)


def report(rows, args, cpu=None, gemm=None, skipped=()) -> str:
    """The table (adding its ratios, parity and %% of peak to ``rows``), with the CPU and ISA lines above it."""
    cpu = cpu or cpu_info()
    gflop = None
    if args.gflops and not args.sweep:
        sys.path.insert(0, str(ROOT))
        from tools.flops import count
        from common.config import build_model, load_config
        macs = count(build_model(load_config(args.config, args.override)), args.size, args.size)['macs']
        gflop = 2 * sum(macs.values()) / 1e9  # per image, forward
    lines = cpu_lines(cpu)
    if gemm:
        lines.append('GEMM (2048^3 sgemm, best of 10 before and 10 after): '
                     + ', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in gemm.items())
                     + f'; % peak below is of {args.gflops:.0f}')
    elif gflop:
        lines.append(f'% peak below is of {args.gflops:.0f} GFLOP/s (--gflops)')
    if gflop:
        lines.append(f'model: {gflop:.2f} GFLOP per image forward ({Path(args.config).name}, {args.size}x{args.size})')
    trips = [r['round_trip_ns'] for r in rows if r.get('round_trip_ns') is not None]
    if trips:
        spread = f'{min(trips):.0f}' + (f'-{max(trips):.0f}' if round(max(trips)) > round(min(trips)) else '')
        lines.append(f'core-to-core round trip (tools/core_round_trip.c, before each timed iteration): {spread} ns '
                     f'(row medians: rt ns); one image split over the cores slows as it grows (docs/performance.md)')
    kernels = {r['cpu_kernels'] for r in rows if r.get('cpu_kernels') is not None}
    if kernels:  # eager and training rows on CPU: common/cpu_kernels.cc, or Paddle's own ops
        state = ('on' if kernels == {True} else 'off (not built, or MAXVIT_CPU_KERNELS=0)' if kernels == {False}
                 else 'on in some rows only')
        lines.append(f'MaxViT CPU kernels (eager and training rows): {state}')
    kind = lambda r: 'train' if r['engine'].endswith('train') or r['engine'].startswith('train') else 'infer'  # noqa
    peers = {}  # (batch, kind) -> (timm eager row, fastest timm row)
    for r in rows:
        if r['engine'].startswith('timm'):
            key = (r['batch'], kind(r))
            eager, best = peers.get(key, (None, None))
            if r['engine'] in ('timm-eager', 'timm-train'):
                eager = r
            if best is None or r['median_s'] < best['median_s']:
                best = r
            peers[key] = (eager, best)
    for (b, k), (_, best) in sorted(peers.items()):
        lines.append(f'fastest peer, {k} b{b}: {best["label"]} ({best["images_per_sec"]:.2f} img/s)')
    lines.append('')
    lines.append(f'{"engine":<26}{"s/iter":>8}{"p90 s":>8}{"img/s":>8}{"x timm":>8}{"x peer":>8}{"x first":>8}'
                 f'{"max|diff|":>11}{"rel diff":>10}{"peak GB":>8}{"quiet":>8}' + (f'{"% peak":>8}' if gflop else '')
                 + (f'{"rt ns":>7}' if trips else ''))
    for r in rows:
        eager, best = peers.get((r['batch'], kind(r)), (None, None))
        r['vs_timm_eager'] = speedup(r, eager) if eager else None
        r['fastest_peer'] = best['label'] if best else None
        r['vs_fastest_peer'] = speedup(r, best) if best else None
        r['cpu_model'], r['cpu_flags'] = cpu['cpu_model'], cpu['cpu_flags']
        work = gflop * (3 if kind(r) == 'train' else 1) if gflop else None  # a training step ~ 3 forward passes
        r['pct_peak'] = 100 * work * r['images_per_sec'] / args.gflops if gflop else None
        ratio = lambda v: f'{v:.2f}' if v is not None else '-'  # noqa: E731
        diff = (f'{r["max_abs_diff"]:.1e}' + ('' if r['parity_ok'] else '!')) if r.get('max_abs_diff') is not None \
            else ('inf!' if r.get('parity_ref') else '-')
        rel = f'{r["rel_diff"]:.1e}' if r.get('rel_diff') is not None else '-'
        quiet_of = f'{r["quiet_iterations"]}/{r["iterations"]}'
        line = (f'{r["label"]:<26}{r["median_s"]:>8.3f}{r["p90_s"]:>8.3f}{r["images_per_sec"]:>8.2f}'
                f'{ratio(r["vs_timm_eager"]):>8}{ratio(r["vs_fastest_peer"]):>8}{speedup(r, rows[0]):>8.2f}'
                f'{diff:>11}{rel:>10}{r["peak_gb"]:>8.2f}{quiet_of:>8}')
        if gflop:
            line += f'{r["pct_peak"]:>7.0f}%'
        if trips:
            line += f'{r["round_trip_ns"]:>7.0f}' if r.get('round_trip_ns') is not None else f'{"-":>7}'
        lines.append(line)
    quiet, total = sum(r['quiet_iterations'] for r in rows), sum(r['iterations'] for r in rows)
    lines.append('')
    lines.append(f'quiet iterations: {quiet}/{total} ({100 * quiet / max(total, 1):.0f}%; others used < {args.quiet} '
                 f'cores; medians are of the quiet ones where a row has any). x timm / x peer / x first: timm '
                 f'eager\'s / the fastest timm engine\'s / the first row\'s time over the row\'s (> 1: faster), the '
                 f'median of the ratios within each round.')
    if any(r.get('parity_ref') for r in rows):
        lines.append(f'max|diff|: largest logit difference from the row\'s reference (Paddle rows: eager Paddle; '
                     f'timm rows: timm eager) on one standard-normal batch; rel diff: over the largest |logit|; '
                     f'! = above {PARITY_TOLERANCE:g} (either).')
    for label, why in skipped:
        lines.append(f'skipped {label}: {why}')
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
