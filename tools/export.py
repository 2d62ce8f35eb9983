"""Export MaxViT weights to a Paddle Inference model (NAME.json + NAME.pdiparams + NAME.yaml) and to ONNX (NAME.onnx).

    python -m tools.export -c configs/quickstart.yaml -o Global.pretrained_model=output/quickstart/best
    python -m tools.export -c configs/maxvit_t_tf_224.yaml -o Global.pretrained_model=weights/maxvit_t_tf_224.pdparams \
        --output inference/maxvit_t --softmax
    python -m tools.export -c configs/maxvit_t.yaml -o Global.pretrained_model=output/maxvit_t/best --weights raw \
        --size 384 384 --no-onnx           # only the Paddle Inference model

The model is saved in eval mode with a dynamic batch size: input 'image' [batch, C, H, W], H = W = Data.img_size
unless --size H W. The output is logits, or probabilities (MaxViT.predict) with --softmax. NAME.yaml beside it
holds what tools/predict.py --model needs without a config: the evaluation preprocessing (img_size, crop_pct,
crop_mode, interpolation, mean, std), the class names when the weights come from a training checkpoint, and
whether the output is logits or probabilities.

Global.pretrained_model is a weights file (.pdparams, .safetensors, .npz) or a training checkpoint prefix
(output/run/best); from a checkpoint, --weights picks the EMA or the raw weights (default: Global.eval_weights).

On the CPUs of docs/performance.md, OpenVINO on PREFIX.onnx runs an exported model fastest (that page compares it
with Paddle Inference, onnxruntime and timm's torch.compile). So when paddle2onnx is installed (pip install -r
requirements-deploy.txt), this tool also writes PREFIX.onnx (--no-onnx: don't; --onnx: fail without paddle2onnx),
and checks it against the Paddle model in every ONNX runtime installed (onnxruntime, OpenVINO), within 1e-5; a
file that fails the check is deleted. tools/predict.py --model PREFIX then runs PREFIX.onnx through OpenVINO when
OpenVINO is installed, else PREFIX.json through Paddle Inference + oneDNN.

From Python: create_runner(prefix, engine) -> (run, description), run(batch) -> outputs, for the engines 'auto',
'openvino', 'onnxruntime' and 'paddle'; create_predictor / run_predictor for Paddle Inference itself;
model_to_measure(cfg) for the model that the benchmark and the OpenVINO profile time (trained_like_weights where the
config names no weights).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import importlib.util
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

if not __package__:  # run as a file: the repository root, where common/ and maxvit.py are, is not importable
    sys.exit('run it from the repository root as: python -m tools.export ...')

from common import NATIVE_NOISE, native_output_filtered  # (first: silences known noise before Paddle loads)
import numpy as np
import paddle
import yaml

from common.checkpoint import CheckpointError, checkpoint_prefix, load_file, load_pretrained
from common.config import ConfigError, add_config_args, build_model, load_config
from common.cpu_info import cpu_cores

PREPROCESS_KEYS = ('img_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std')
INPUT_NAME = 'image'
ONNX_OPSET = 13  # paddle2onnx raises it by itself when an operator needs a newer one
# What paddle2onnx 2.1 (and the Polygraphy constant folding it runs) print on every successful conversion;
# everything else they print, warnings and errors included, still shows.
PADDLE2ONNX_PROGRESS = ('[Paddle2ONNX] Start parsing the Paddle model file', '[Paddle2ONNX] Use opset_version',
                        '[Paddle2ONNX] PaddlePaddle model is exported as ONNX format now',
                        'Try to perform constant folding on the ONNX model with Polygraphy',
                        "[W] 'colored' module is not installed", '[I] Folding Constants', '[I]     Total Nodes',
                        '[INFO]\tONNX model saved in')


class ExportError(RuntimeError):
    """An exported model that cannot be written or used as asked; the message says which file and why."""


class MissingPackage(ExportError, ImportError):
    """An optional deployment package (requirements-deploy.txt) that a feature needs is not installed."""


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


def import_optional(module: str, purpose: str):
    """An optional deployment package (requirements-deploy.txt), imported only when a feature needs it, never
    when this module is imported; missing, an ExportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f'{purpose} needs {module}, which is not installed here: pip install -r '
                          f'requirements-deploy.txt (paddle2onnx, onnxruntime, openvino), then run the same '
                          f'command again') from None


class TanhGELU(paddle.nn.Layer):
    """GELU's tanh approximation written out: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), the formula
    nn.GELU(approximate=True) computes. paddle2onnx 2.1 converts that gelu as the exact (erf) GELU, about 1e-3 off
    on MaxViT-T's logits; these elementwise ops convert one to one. The cube is a Pow, as in the patterns that
    onnxruntime (FastGelu) and OpenVINO (Gelu, fused into the matmul before it) fuse; written as x * x * x, neither
    recognises it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * paddle.pow(x, 3.0))))


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


def export_onnx(model, prefix: str, input_shape: List[int], softmax: bool = False, saved: Optional[str] = None
                ) -> str:
    """PREFIX.onnx for ``model`` (what export() saves for the same arguments), with paddle2onnx. With a tanh GELU
    (the official layout) it converts a Paddle program saved for it alone, in which that GELU is written out
    (TanhGELU): PREFIX.json keeps Paddle's own gelu, which oneDNN fuses with the preceding matmul. Without one, it
    converts ``saved`` (the prefix export() just wrote for the same arguments) when given, instead of tracing the
    model a second time (about 5 s). Returns the path."""
    paddle2onnx = import_optional('paddle2onnx', 'ONNX export')
    onnx_file = prefix + '.onnx'
    with tempfile.TemporaryDirectory() as tmp, tanh_gelu_written_out(model) as swapped:
        src = saved if saved and not swapped else str(Path(tmp) / 'model')
        if src != saved:
            export(model, src, input_shape, softmax)
        try:
            with native_output_filtered(NATIVE_NOISE + PADDLE2ONNX_PROGRESS):
                paddle2onnx.export(src + '.json', src + '.pdiparams', save_file=onnx_file,
                                   opset_version=ONNX_OPSET, enable_onnx_checker=True)
        except Exception as e:  # paddle2onnx raises whatever its parts raise
            Path(onnx_file).unlink(missing_ok=True)
            raise ExportError(f'paddle2onnx {paddle2onnx.__version__} could not convert the model: '
                              f'{type(e).__name__}: {e}') from None
    if not Path(onnx_file).is_file():
        raise ExportError(f'paddle2onnx {paddle2onnx.__version__} did not write {onnx_file}')
    return onnx_file


def write_meta(prefix: str, meta: Dict) -> str:
    """Write PREFIX.yaml (what load_meta reads); returns its path."""
    path = prefix + '.yaml'
    Path(path).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=None),
                          encoding='utf-8')
    return path


def load_meta(prefix: str) -> Dict:
    """PREFIX.yaml written by export(); checks that the model files are there too."""
    prefix = str(prefix)
    for suffix in ('.json', '.pdiparams', '.yaml'):
        if not Path(prefix + suffix).is_file():
            raise ExportError(f'exported model {prefix}: no {prefix + suffix} (write one with python -m tools.export)')
    meta = yaml.safe_load(Path(prefix + '.yaml').read_text(encoding='utf-8')) or {}
    missing = [k for k in ('input', 'output', 'preprocess') if k not in meta]
    if missing:
        raise ExportError(f'{prefix}.yaml lacks {", ".join(missing)}: re-export it with python -m tools.export')
    return meta


def inference_config(prefix: str, mkldnn: bool = True, threads: Optional[int] = None) -> paddle.inference.Config:
    """A CPU paddle.inference.Config for PREFIX.json + PREFIX.pdiparams, with oneDNN on or off (Paddle 3.3
    turns it on by default) and ``threads`` math-library threads (default: every core this process may use)."""
    for suffix in ('.json', '.pdiparams'):
        if not Path(prefix + suffix).is_file():
            raise ExportError(f'exported model {prefix}: no {prefix + suffix} (write one with python -m tools.export)')
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


# ------------------------------------------------------------------------------------------------ running PREFIX.onnx
ENGINES = ('auto', 'openvino', 'onnxruntime', 'paddle')
# OpenVINO on the CPU in float32: left alone it computes in bf16 on CPUs with AVX512-BF16 or AMX (about 1e-2 off on
# MaxViT-T's logits); latency mode: one request uses every thread.
OPENVINO_CPU = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
# OpenVINO 2026.4 fuses each attention into a generated kernel ("snippets") when the shapes are static. For MaxViT-T
# (7x7 windows) that kernel is exact (3e-7) and 15-20% faster than without it; for MaxViT with 2x2 windows (the
# quickstart) it is 2e-5 (trained) to 4e-3 (random weights) off the logits, relative to the largest. So check_onnx
# tries OpenVINO as is first, then with these settings, and PREFIX.yaml records the settings that passed
# (openvino_config), which create_runner uses.
OPENVINO_WITHOUT_SNIPPETS = {'SNIPPETS_MODE': 'DISABLE'}


def openvino_compiler(model_files: Union[str, Tuple[str, ...]], threads: Optional[int] = None,
                      config: Optional[Dict] = None) -> Tuple[Callable[[Sequence[int]], Any], str]:
    """(compile, 'OpenVINO VERSION') for the model in ``model_files`` (PREFIX.onnx, or files OpenVINO reads
    together): compile(input shape, streams=1) returns an openvino.CompiledModel of it for that static shape, on the
    CPU with ``threads`` threads (default: every core this process may use) shared by ``streams`` streams (requests
    that run at once), and OPENVINO_CPU plus ``config``. Reading and compiling errors are ExportErrors that name the
    files."""
    ov = import_optional('openvino', 'the OpenVINO engine')
    version = ov.__version__.split('-')[0]
    core = ov.Core()
    try:
        source = core.read_model(*model_files) if isinstance(model_files, tuple) else core.read_model(model_files)
    except RuntimeError as e:
        raise ExportError(f'OpenVINO {version} cannot read {model_files}: {str(e).strip().splitlines()[-1]}') from None
    config = dict(OPENVINO_CPU, INFERENCE_NUM_THREADS=threads or cpu_cores(), **(config or {}))
    if config['INFERENCE_PRECISION_HINT'] == 'bf16' and 'BF16' not in core.get_property('CPU',
                                                                                         'OPTIMIZATION_CAPABILITIES'):
        raise ExportError('bf16 needs a CPU with bfloat16 arithmetic (AVX512-BF16 or AMX: /proc/cpuinfo flags '
                          'avx512_bf16, amx_bf16), which OpenVINO does not find here: use fp32')

    def compile_for(shape: Sequence[int], streams: int = 1):
        model = source.clone()
        try:
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            return core.compile_model(model, 'CPU', dict(config, NUM_STREAMS=streams))
        except RuntimeError as e:
            raise ExportError(f'OpenVINO {version} cannot compile {model_files} for input '
                              f'{list(shape)}: {str(e).strip().splitlines()[-1]}') from None
    return compile_for, f'OpenVINO {version}'


def in_two_halves(batch: np.ndarray, threads: int) -> bool:
    """Whether a runner runs ``batch`` as its two halves at once, each on half of the ``threads``: an even number of
    images and two threads or more (openvino_runner, onnxruntime_runner)."""
    return threads >= 2 and len(batch) % 2 == 0


def openvino_runner(model_files: Union[str, Tuple[str, ...]], threads: Optional[int] = None,
                    config: Optional[Dict] = None) -> Tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(run, 'OpenVINO VERSION') for the model in ``model_files``, compiled as openvino_compiler does.
    run(batch) returns the first output. The model is compiled for each input shape the first time it sees it
    (about 1 s for MaxViT-T): static shapes run 10-25% faster than one compile with a dynamic batch size
    (MaxViT-T, batch 1 and 8).

    A batch of an even number of images, with two threads or more, runs as its two halves at once, each half on
    half of the threads (two OpenVINO streams): the same values (no image's arithmetic changes). A kernel split
    over two threads reads data the other core wrote and waits for it, which costs more the farther apart the cores
    are; a half on one thread does neither: on 2 cores MaxViT-T at batch 8 runs 1.02-1.18x faster
    (docs/performance.md)."""
    threads = threads or cpu_cores()
    compile_for, version = openvino_compiler(model_files, threads, config)
    requests = {}  # input shape -> the infer requests of the model compiled for it, one per part of the batch

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = 2 if in_two_halves(batch, threads) else 1
        if batch.shape not in requests:
            compiled = compile_for((len(batch) // parts, *batch.shape[1:]), streams=parts)
            requests[batch.shape] = [compiled.create_infer_request() for _ in range(parts)]
        for request, part in zip(requests[batch.shape], np.split(batch, parts)):
            request.start_async([part])
        for request in requests[batch.shape]:
            request.wait()
        # a copy: each request reuses its output buffer
        return np.concatenate([request.get_output_tensor(0).data for request in requests[batch.shape]])
    return run, version


def onnxruntime_runner(onnx_file: str, threads: Optional[int] = None
                       ) -> Tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(run, 'onnxruntime VERSION') for ``onnx_file`` on the CPU: all graph optimisations, ``threads`` threads
    inside each operator (default: every core this process may use), operators one after another.

    As in openvino_runner, a batch of an even number of images, with two threads or more, runs as its two halves at
    once, each in its own thread through a second session with half of the threads (made for the first such
    batch; onnxruntime runs one session from several threads at once, and the two calls share that session's
    threads beyond their own): the same values. On 2 cores, where each half runs on its calling thread alone,
    MaxViT-T at batch 8 runs 1.02-1.30x faster than as one run, the more the farther apart the cores are
    (docs/performance.md); machines with more cores have not been measured."""
    ort = import_optional('onnxruntime', 'the onnxruntime engine')
    threads = threads or cpu_cores()

    def session(intra_op_threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = intra_op_threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            return ort.InferenceSession(onnx_file, options, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime's own exception types
            raise ExportError(f'onnxruntime {ort.__version__} cannot load {onnx_file}: {e}') from None
    whole = session(threads)
    name = whole.get_inputs()[0].name
    halves = []  # [the session for half a batch, the two threads that run the halves], made when first needed

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not in_two_halves(batch, threads):
            return whole.run(None, {name: batch})[0]
        if not halves:
            halves.extend([session(threads // 2), concurrent.futures.ThreadPoolExecutor(2, 'onnxruntime-half')])
        half_session, pool = halves
        parts = [pool.submit(half_session.run, None, {name: part}) for part in np.split(batch, 2)]
        return np.concatenate([part.result()[0] for part in parts])
    return run, f'onnxruntime {ort.__version__}'


def create_runner(prefix: str, engine: str = 'auto', threads: Optional[int] = None, mkldnn: bool = True,
                  precision: str = 'fp32') -> Tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(run, description) for an exported model: run(float32 NCHW batch) -> its output as numpy.

    engine 'openvino' and 'onnxruntime' run PREFIX.onnx, 'paddle' runs PREFIX.json through Paddle Inference (with
    oneDNN unless mkldnn=False). 'auto' is OpenVINO when PREFIX.onnx is there and OpenVINO is installed (the
    fastest on the CPUs of docs/performance.md), else Paddle Inference. precision 'bf16' (OpenVINO only, on CPUs with
    bfloat16 arithmetic) computes in bfloat16: 1.7x faster for MaxViT-T on an AVX512-BF16 CPU, logits about 1e-2
    off (docs/performance.md); everything else computes in float32."""
    prefix, onnx_file = str(prefix), str(prefix) + '.onnx'
    if engine not in ENGINES:
        raise ExportError(f'unknown engine {engine!r}: one of {", ".join(ENGINES)}')
    if precision not in ('fp32', 'bf16'):
        raise ExportError(f'unknown precision {precision!r}: fp32 or bf16')
    if precision == 'bf16' and engine == 'auto':
        engine = 'openvino'
    if precision == 'bf16' and engine != 'openvino':
        raise ExportError(f'bf16 runs through OpenVINO only, not the {engine} engine')
    note = ''
    meta = load_meta(prefix) if Path(prefix + '.yaml').is_file() else {}
    if engine == 'auto':
        has_openvino = importlib.util.find_spec('openvino') is not None
        checked = 'openvino_config' in meta  # the export compared PREFIX.onnx with the Paddle model in OpenVINO
        engine = 'openvino' if has_openvino and checked and Path(onnx_file).is_file() else 'paddle'
        if Path(onnx_file).is_file() and engine == 'paddle':
            note = (f'; {onnx_file} runs faster through OpenVINO: ' + (
                'pip install -r requirements-deploy.txt' if not has_openvino else
                're-export with OpenVINO installed, so that the export checks it there'))
    if engine == 'paddle':
        predictor = create_predictor(prefix, mkldnn, threads)
        return (lambda batch: run_predictor(predictor, batch),
                f'Paddle Inference, {"oneDNN" if mkldnn else "no oneDNN"}{note}')
    if not Path(onnx_file).is_file():
        raise ExportError(f'the {engine} engine runs {onnx_file}, which is not there: write it with python -m '
                          f'tools.export (pip install -r requirements-deploy.txt first), or use --engine paddle')
    if engine == 'openvino':
        # the settings the export's check passed with; without a check, the exact ones (see OPENVINO_WITHOUT_SNIPPETS)
        config = meta.get('openvino_config', OPENVINO_WITHOUT_SNIPPETS)
        hint = {'fp32': 'f32', 'bf16': 'bf16'}[precision]  # OpenVINO's names
        run, version = openvino_runner(onnx_file, threads, dict(config, INFERENCE_PRECISION_HINT=hint))
        version += ' without its attention kernels' if config == OPENVINO_WITHOUT_SNIPPETS else (
            ''.join(f', {k} {v}' for k, v in config.items()))
    else:
        run, version = onnxruntime_runner(onnx_file, threads)
    return run, f'{version} on {Path(onnx_file).name}, {precision}'


def check_onnx(prefix: str, tolerance: float = 1e-5) -> Dict[str, float]:
    """PREFIX.onnx against the Paddle model (Paddle Inference, no oneDNN) on random batches of 1 and 3, in every ONNX
    runtime installed (onnxruntime, OpenVINO): {runtime: largest difference}. OpenVINO is tried as is, then without
    its attention kernels (OPENVINO_WITHOUT_SNIPPETS); the settings that pass go into PREFIX.yaml (openvino_config).
    Above ``tolerance`` times the largest output (at least 1) otherwise, PREFIX.onnx is deleted (tools/predict.py
    would pick it up) and an ExportError says why. (Both layouts match to 1e-7 - 2e-6 in onnxruntime; the tanh GELU
    converted as the exact one gave 1e-3, OpenVINO's attention kernels on 2x2 windows 2e-5 to 4e-3.)"""
    engines = [e for e in ('onnxruntime', 'openvino') if importlib.util.find_spec(e) is not None]
    if not engines:
        print(f'note: neither onnxruntime nor openvino is installed, so {prefix}.onnx was not compared with the '
              f'Paddle model (pip install -r requirements-deploy.txt to check it)', file=sys.stderr, flush=True)
        return {}
    meta = load_meta(prefix)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([n] + meta['input']['shape'][1:]).astype(np.float32) for n in (1, 3)]
    predictor = create_predictor(prefix, mkldnn=False)
    refs = [run_predictor(predictor, x) for x in inputs]
    scale = max(1.0, max(float(np.abs(ref).max()) for ref in refs))

    def largest_diff(run):
        outs = [run(x) for x in inputs]
        if any(out.shape != ref.shape for out, ref in zip(outs, refs)):
            return float('inf')
        return max(float(np.abs(out.astype(np.float64) - ref).max()) for out, ref in zip(outs, refs))

    def reject(why: str):  # no PREFIX.onnx, and no record that one passed in OpenVINO
        Path(prefix + '.onnx').unlink()
        meta.pop('openvino_config', None)
        write_meta(prefix, meta)
        raise ExportError(f'{why}, so {prefix}.onnx was deleted; the Paddle Inference model {prefix}.json is fine '
                          f'(python -m tools.predict uses it)')

    meta.pop('openvino_config', None)  # set below when PREFIX.onnx passes in OpenVINO
    diffs = {}
    for engine in engines:
        try:
            if engine == 'onnxruntime':
                run, version = onnxruntime_runner(prefix + '.onnx')
                diffs[engine] = largest_diff(run)
            else:
                for config in ({}, OPENVINO_WITHOUT_SNIPPETS):
                    run, version = openvino_runner(prefix + '.onnx', config=config)
                    diffs[engine] = largest_diff(run)
                    if diffs[engine] <= tolerance * scale:
                        meta['openvino_config'] = config
                        break
        except ExportError as e:
            reject(str(e))
        if not diffs[engine] <= tolerance * scale:
            reject(f'{prefix}.onnx differed from the Paddle model by up to {diffs[engine]:.3g} in {version} (outputs '
                   f'up to {scale:.3g}, random batches of 1 and 3)')
    write_meta(prefix, meta)  # with the OpenVINO settings that passed
    print(f'{prefix}.onnx matches the Paddle model within {max(diffs.values()):.2e} ({", ".join(engines)}'
          f'{"; OpenVINO without its attention kernels" if meta.get("openvino_config") else ""}; random batches '
          f'of 1 and 3)', flush=True)
    return diffs


def trained_like_weights(model, seed: int = 0) -> dict:
    """A state dict for ``model`` with the statistics of a trained one, for timings and export checks where no
    trained weights are at hand: fan-in scaled weights (activations O(1) all the way through), non-zero biases and
    BatchNorm statistics, norm weights around 1. The initialisation's zero biases and unit norms would let OpenVINO
    drop the LayerNorm and BatchNorm affines that a trained model keeps, and its logits are so small that the tanh
    and the exact GELU would agree to 1e-6."""
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


def model_to_measure(cfg: Dict):
    """The config's MaxViT with Global.pretrained_model's weights (a checkpoint's EMA or raw ones as
    Global.eval_weights says), or with trained_like_weights when it names none: the model that tools/benchmark.py
    and tools/profile_openvino.py time."""
    model = build_model(cfg)
    g = cfg['Global']
    if g['pretrained_model']:
        load_pretrained(model, g['pretrained_model'], ema=g['eval_weights'] == 'ema')
    else:
        model.set_state_dict(trained_like_weights(model))
    return model


def main(argv=None) -> Dict:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
    parser.add_argument('--weights', choices=('ema', 'raw'), default=None,
                        help="a training checkpoint's EMA or raw weights (default: Global.eval_weights)")
    parser.add_argument('--softmax', action='store_true', help='output probabilities instead of logits')
    parser.add_argument('--output', default=None,
                        help='output prefix, writes PREFIX.json/.pdiparams/.yaml (default: inference/CONFIG_NAME)')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: Data.img_size); predict.py needs a square')
    parser.add_argument('--onnx', action=argparse.BooleanOptionalAction, default=None,
                        help='also write PREFIX.onnx, which predict.py runs through OpenVINO (default: when '
                             'paddle2onnx is installed; --onnx: fail without it; --no-onnx: never)')
    args = parser.parse_args(argv)
    asked_for_onnx = bool(args.onnx)
    if args.onnx is None:
        args.onnx = importlib.util.find_spec('paddle2onnx') is not None
        if not args.onnx:
            print('note: paddle2onnx is not installed, so no PREFIX.onnx is written and python -m tools.predict will '
                  'use Paddle Inference; for the faster OpenVINO path: pip install -r requirements-deploy.txt',
                  file=sys.stderr, flush=True)
    elif args.onnx:
        import_optional('paddle2onnx', '--onnx')  # fail before any work
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
    Path(prefix + '.onnx').unlink(missing_ok=True)  # an earlier export's: predict.py must never run it with this one
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
    files.append(write_meta(prefix, meta))

    onnx_file, onnx_diffs = None, {}
    if args.onnx:
        try:
            onnx_file = export_onnx(model, prefix, [channels, height, width], softmax=args.softmax, saved=prefix)
            onnx_diffs = check_onnx(prefix)
        except ExportError as e:
            if asked_for_onnx:
                raise
            Path(prefix + '.onnx').unlink(missing_ok=True)
            onnx_file = None
            print(f'note: no {prefix}.onnx ({e}); python -m tools.predict will use the Paddle model', file=sys.stderr,
                  flush=True)
        else:
            files.append(onnx_file)
            meta = load_meta(prefix)  # with the OpenVINO settings that passed
    print(f'exported {what} -> {", ".join(files)} (input {meta["input"]["shape"]}, output {meta["output"]}, '
          f'{"class names from the checkpoint" if meta["class_names"] else "no class names"})', flush=True)
    return {'prefix': prefix, 'files': files, 'meta': meta, 'onnx': onnx_file, 'onnx_diffs': onnx_diffs}


if __name__ == '__main__':
    try:
        main()
    except (ConfigError, CheckpointError, ExportError) as e:
        sys.exit(f'error: {e}')
