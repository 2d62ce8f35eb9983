"""Where OpenVINO spends its time on MaxViT: the exported .onnx run with OpenVINO's per-layer counters (PERF_COUNT),
summed by layer type and kernel, with the FLOPs of the matrix products and the rate they reach.

    python -m tools.profile_openvino -c configs/maxvit_t_tf_224.yaml --batch 1 8
    python -m tools.profile_openvino -c configs/maxvit_t_tf_224.yaml --batch 8 --gflops 210   # % of a GEMM rate

The model is tools.export.model_to_measure's (Global.pretrained_model, or trained-like weights), exported as
tools/export.py does and compiled with tools.export.openvino_compiler's settings, as tools/predict.py runs it on the
CPU: fp32, latency mode, this process's cores as threads, OpenVINO's attention kernels on. Each batch runs as one
request (tools.export.openvino_runner would split an even batch into two halves run at once). OpenVINO reports each
fused kernel once: a fully-connected or convolution row includes what OpenVINO fused into it (bias, GELU,
BatchNorm), and "Subgraph" rows are kernels that OpenVINO generates for chains of elementwise ops (attention: those
with a softmax). The times are the counters', the mean over --rounds inferences after --warmup. Their sum is close
to an inference's wall time but leaves out the time threads spend waiting for each other between kernels. --gflops
takes a GEMM rate measured on this machine (GFLOP/s) and adds each row's share of it.
"""
import argparse
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.profile_openvino ...')

import common  # noqa: F401  (first: it silences known third-party noise before Paddle loads)
import numpy as np

import tools.export as ex
from common.checkpoint import CheckpointError
from common.config import ConfigError, add_config_args, load_config
from common.cpu_info import cpu_cores, cpu_header
from common.device import setup

MATRIX_LAYERS = ('FullyConnected', 'Convolution', 'GroupConvolution', 'MatMul')


def layer_flops(op) -> int:
    """FLOPs (2 per multiply-add) of one runtime-model op of a MATRIX_LAYERS type, from its static shapes."""
    shapes = [list(op.input(i).get_shape()) for i in range(op.get_input_size())]
    out = list(op.output(0).get_shape())
    kind = op.get_rt_info()['layerType'].astype(str)
    if kind == 'Convolution':                                   # weight (out, in, kh, kw)
        return 2 * math.prod(out) * math.prod(shapes[1][1:])
    if kind == 'GroupConvolution':                              # weight (groups, out/g, in/g, kh, kw)
        return 2 * math.prod(out) * math.prod(shapes[1][2:])
    return 2 * math.prod(out) * shapes[0][-1]                   # (..., K) x (K, N)


def profile(onnx_file: str, batch_shape, threads: int, warmup: int, rounds: int) -> dict:
    """{(layer type, kernel): [count per inference, ms per inference, GFLOP per inference]} for one compiled
    batch shape."""
    compile_for, _ = ex.openvino_compiler(onnx_file, threads, {'PERF_COUNT': True})
    compiled = compile_for(batch_shape)
    request = compiled.create_infer_request()
    ops = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ordered_ops()}
    x = np.random.default_rng(0).standard_normal(batch_shape).astype(np.float32)
    for _ in range(warmup):
        request.infer([x])
    rows = defaultdict(lambda: [0, 0.0, 0.0])
    for _ in range(rounds):
        request.infer([x])
        for layer in request.get_profiling_info():
            op = ops.get(layer.node_name)
            kind = layer.node_type
            if kind == 'Subgraph' and op is not None:
                kind += ' (attention)' if 'Softmax' in op.get_rt_info()['originalLayersNames'].astype(str) \
                    else ' (elementwise)'
            row = rows[kind, layer.exec_type]
            row[0] += 1 / rounds
            row[1] += layer.real_time.total_seconds() * 1e3 / rounds
            if op is not None and layer.node_type in MATRIX_LAYERS:
                row[2] += layer_flops(op) / 1e9 / rounds
    return {key: row for key, row in rows.items() if row[1] > 0}


def table(rows: dict, gflops=None) -> str:
    total = sum(row[1] for row in rows.values())
    lines = [f"{'layer type':30s} {'kernel':26s} {'count':>5s} {'ms':>8s} {'share':>6s} {'GFLOP':>7s} "
             f"{'GFLOP/s':>8s}" + ('  % GEMM' if gflops else '')]
    for (kind, kernel), (count, ms, flop) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        rate = flop / ms * 1e3 if flop else None
        lines.append((f'{kind:30s} {kernel:26s} {count:5.0f} {ms:8.2f} {100 * ms / total:5.1f}% '
                      + (f'{flop:7.2f} {rate:8.1f}' + (f'  {100 * rate / gflops:5.0f}%' if gflops else '')
                         if rate else '')).rstrip())
    flop = sum(row[2] for row in rows.values())
    lines.append(f"{'total':30s} {'':26s} {'':5s} {total:8.2f} {'100%':>6s} {flop:7.2f}")
    return '\n'.join(lines)


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help='default: Data.img_size')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--gflops', type=float, help="a GEMM rate of this machine in GFLOP/s (such as a 2048^3 "
                                                     "float32 matmul's): adds each row's %% of it")
    args = parser.parse_args(argv)
    ex.import_optional('openvino', 'the OpenVINO profile')  # before the export, which takes seconds
    setup('cpu')
    cfg = load_config(args.config, args.override)
    model = ex.model_to_measure(cfg)
    size = args.size or [cfg['Data']['img_size']] * 2
    input_shape = [cfg['Model']['input_dim'], *size]
    threads = cpu_cores()
    print('\n'.join(cpu_header()))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = ex.export_onnx(model, str(Path(tmp) / 'model'), input_shape)
        for batch in args.batch:
            results[batch] = profile(onnx_file, [batch, *input_shape], threads, args.warmup, args.rounds)
            print(f'\n{Path(args.config).name}, batch {batch}, {size[0]}x{size[1]}, fp32, {threads} threads, '
                  f'mean of {args.rounds} inferences')
            print(table(results[batch], args.gflops))
    return results


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, CheckpointError, ex.ExportError) as e:
        sys.exit(f'error: {e}')
