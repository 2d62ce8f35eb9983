"""tools/convert_weights.py: timm maxvit_*_tf_* checkpoints -> MaxViT-Paddle, checked against timm's own outputs.

The fixtures in tests/data/parity/ come from tools/make_parity_fixtures.py (run with torch + timm, never in CI):
reduced official-layout models with random weights (BatchNorm statistics included) at 224 (window 7) and 384
(window 12), their timm logits and the 5 feature maps of timm's forward_intermediates. No torch here.
"""
import contextlib
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml

import maxvit
from common.fast_layers import use_fast_layers
from maxvit import MaxViT
from tools.convert_weights import (ConversionError, UnsafeCheckpointError, _rebuild_tensor, checkpoint_num_classes,
                                   convert_state_dict, load_timm_checkpoint, main, read_safetensors, read_torch_zip,
                                   timm_model_args, timm_to_paddle_name)
from tools.make_parity_fixtures import input_checksum, make_input
from tolerance import EPS, assert_close, forward_tolerance, linear_magnitude

DATA = Path(__file__).resolve().parent / 'data' / 'parity'
OUTPUTS = [f'feat{i}' for i in range(5)] + ['logits']   # the stem's map, the 4 stages' maps, the logits


def fixture(name):
    """(reference arrays, maxvit args, the input regenerated from its seed and checked against its checksum)."""
    ref = np.load(DATA / f'{name}.npz')
    x = make_input(int(ref['input_seed']), tuple(int(s) for s in ref['input_shape']))
    # float64 sums of the same numbers in any order agree to (n - 1) float64 eps/2 of the magnitude summed; another
    # input stream would be off by whole units
    summed = np.array([np.abs(x).sum(dtype=np.float64)] * 2 + [np.abs(x.ravel()[:7]).sum(dtype=np.float64)])
    assert_close(input_checksum(x), ref['input_checksum'], x.size * np.finfo(np.float64).eps * summed, 'input')
    return ref, json.loads(str(ref['model_args'])), x


def load(model, state):
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    model.eval()  # Paddle 3.0's eval() returns None: never chain on it
    return model


@contextlib.contextmanager
def default_dtype(dtype):
    before = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(before)


def converted_outputs(args, timm_sd, x, dtype='float32', fast=False):
    """{name: array} of OUTPUTS of the converted model in ``dtype`` (fast: after use_fast_layers, which on the
    CPU runs MaxViT's kernels), and the largest magnitude its classifier sums (tolerance.linear_magnitude)."""
    with default_dtype(dtype):
        model = MaxViT(args)
        state = convert_state_dict(timm_sd, model)
        load(model, {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()})
    if fast:
        model = use_fast_layers(model)
    with paddle.no_grad(), linear_magnitude(model.proj) as magnitude:
        feats = model.forward_features(paddle.to_tensor(x.astype(dtype)))
        logits = model.forward_head(feats[-1])
    assert len(feats) == 5 and all(f.dtype == logits.dtype == getattr(paddle, dtype) for f in feats)
    return dict(zip(OUTPUTS, [f.numpy() for f in feats] + [logits.numpy()])), magnitude[0].max()


def output_tolerance(ref, name, head_magnitude, forwards):
    """tolerance.forward_tolerance of one output: a feature map's relative to its largest value, the logits'
    relative to the magnitude the classifier sums, |h| @ |W| + |b| (never below |logits|)."""
    return forward_tolerance(head_magnitude if name == 'logits' else np.abs(ref[name]).max(), forwards)


@pytest.mark.numerics
@pytest.mark.parametrize('name, window', [('tf224', 7), ('tf384', 12)])
def test_converted_timm_model_matches_logits_and_all_feature_maps(name, window):
    """The converted model in float64 against timm's float32 outputs: what differs is timm's float32 rounding
    (float64's is 2^29 times finer), one forward's worth. Then our float32 forwards, with Paddle's ops and with
    the fast layers, against the float64 one: our rounding, one forward's worth each."""
    ref, args, x = fixture(name)
    # the fixture's model is the official layout at the window size this test is about
    assert {k: args[k] for k in maxvit.TF_LAYOUT} == maxvit.TF_LAYOUT
    assert args['block_size'] == args['grid_size'] == [window, window] == [x.shape[-1] // 32] * 2
    assert np.abs(ref['logits']).max() > 0.1 and np.abs(ref['feat4']).max() > 1  # the comparison is not vacuous
    timm_sd = read_safetensors(DATA / f'{name}.safetensors')
    exact, head = converted_outputs(args, timm_sd, x, 'float64')
    for out in OUTPUTS:
        assert exact[out].shape == ref[out].shape, out
        assert_close(exact[out], ref[out], output_tolerance(ref, out, head, 1), f'{out}: float64 model vs timm')
    for fast in (False, True):
        ours, _ = converted_outputs(args, timm_sd, x, 'float32', fast)
        for out in OUTPUTS:
            assert_close(ours[out], exact[out], output_tolerance(ref, out, head, 1),
                         f'{out}: float32 {"fast layers" if fast else "model"} vs float64')


def test_pth_reader_reads_timm_state_dict_like_the_safetensors_one():
    from_pth = load_timm_checkpoint(DATA / 'tf384.pth')            # torch.save(model.state_dict()): zip + pickle
    from_st = read_safetensors(DATA / 'tf384.safetensors')
    assert sorted(from_pth) == sorted(from_st)
    assert any(k.endswith('num_batches_tracked') for k in from_pth)
    for k, v in from_st.items():
        assert from_pth[k].dtype == v.dtype and from_pth[k].shape == v.shape, k
        np.testing.assert_array_equal(from_pth[k], v, err_msg=k)


def test_pth_reader_dtypes_strides_and_shared_storages():
    raw = read_torch_zip(DATA / 'dtypes.pth')
    assert raw['epoch'] == 7 and set(raw) == {'state_dict', 'epoch'}
    got = load_timm_checkpoint(DATA / 'dtypes.pth')                # unwraps 'state_dict'
    expected = np.load(DATA / 'dtypes.npz')
    assert sorted(got) == sorted(expected.files)
    for k in expected.files:
        assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert got['transposed'].flags['C_CONTIGUOUS']


def _torch_zip(path, pickle_bytes):
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', pickle_bytes)
        zf.writestr('archive/version', '3\n')
    return path


def _unicode(s):  # BINUNICODE opcode
    b = s.encode()
    return b'X' + struct.pack('<I', len(b)) + b


@pytest.mark.parametrize('module, name, protocol', [('os', 'system', 2), ('posix', 'system', 2),
                                                    ('builtins', 'eval', 4), ('subprocess', 'call', 4)])
def test_pth_reader_refuses_forbidden_globals_without_running_them(tmp_path, module, name, protocol):
    marker = tmp_path / 'pwned'
    arg = f'touch {marker}' if name != 'eval' else f"open({str(marker)!r}, 'w')"
    if name == 'call':
        arg = str(marker)
    if protocol == 2:   # GLOBAL 'module name', arg, TUPLE1, REDUCE
        payload = b'\x80\x02c' + f'{module}\n{name}\n'.encode() + _unicode(arg) + b'\x85R.'
    else:               # SHORT_BINUNICODE module, name, STACK_GLOBAL, arg, TUPLE1, REDUCE
        payload = (b'\x80\x04' + b'\x8c' + bytes([len(module)]) + module.encode() + b'\x8c' + bytes([len(name)])
                   + name.encode() + b'\x93' + _unicode(arg) + b'\x85R.')

    # the payload really asks to call module.name(arg): a recording unpickler sees the call, runs nothing
    calls = []

    class Recorder(pickle.Unpickler):
        def find_class(self, mod, attr):
            return lambda *a: calls.append((mod, attr, a))
    Recorder(__import__('io').BytesIO(payload)).load()
    assert calls == [(module, name, (arg,))]

    path = _torch_zip(tmp_path / 'evil.pth', payload)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load global '{module}\.{name}'"):
        read_torch_zip(path)
    with pytest.raises(UnsafeCheckpointError):
        load_timm_checkpoint(path)
    assert not marker.exists()


def test_pth_reader_refuses_tensors_outside_their_storage():
    storage = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(_rebuild_tensor(storage, 2, (2, 2), (2, 1)), [[2, 3], [4, 5]])
    for offset, size, stride in [(3, (2, 2), (2, 1)), (0, (7,), (1,)), (0, (2, 3), (3, 2)), (0, (2,), (-1,))]:
        with pytest.raises(pickle.UnpicklingError):
            _rebuild_tensor(storage, offset, size, stride)


def test_safetensors_reader_rejects_bad_files(tmp_path):
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}}).encode()
    good = tmp_path / 'good.safetensors'
    good.write_bytes(struct.pack('<Q', len(header)) + header + np.arange(4, dtype='<f4').tobytes())
    np.testing.assert_array_equal(read_safetensors(good)['w'], [[0, 1], [2, 3]])
    short = tmp_path / 'short.safetensors'
    short.write_bytes(struct.pack('<Q', len(header)) + header + b'\0' * 12)     # 12 of the 16 bytes
    with pytest.raises(ValueError, match='short.safetensors: .*incomplete metadata'):
        read_safetensors(short)
    with pytest.raises(ValueError, match='not a safetensors file'):
        (tmp_path / 'junk').write_bytes(b'\xff' * 64)
        read_safetensors(tmp_path / 'junk')


# torch and Paddle each take a bilinear weight from a float32 source coordinate (i + 0.5) * 13/23 - 0.5, the
# product up to 12.7: the rounded scale and the two operations leave it within about 14 EPS, so the two resizes'
# weights differ by up to 28 EPS, which moves an output by 28 EPS * |b - a| <= 56 EPS * max|table| per axis:
# 112 EPS for the two axes, plus the rounding of the weighted sums.
RESIZE_EPS = 128


@pytest.mark.numerics
def test_converting_224_weights_into_the_384_model_resizes_bias_tables_bilinearly():
    ref, args, _ = fixture('tf224')
    timm_sd = read_safetensors(DATA / 'tf224.safetensors')
    args384 = dict(args, block_size=[12, 12], grid_size=[12, 12])
    resized = []
    out = convert_state_dict(timm_sd, MaxViT(args384), resized=resized)
    same = convert_state_dict(timm_sd, MaxViT(args))
    tables = [k for k in timm_sd if k.endswith('relative_position_bias_table')]
    assert len(tables) == 10 and sorted(resized) == sorted(timm_to_paddle_name(k) for k in tables)
    for key in tables:
        ours = out[timm_to_paddle_name(key)]
        heads = timm_sd[key].shape[0]
        assert timm_sd[key].shape == (heads, 13, 13) and ours.shape == (23 * 23, heads)
        torch_bilinear = ref[f'resized384/{key}']                           # F.interpolate(bilinear) in timm's layout
        expected = torch_bilinear[:, ::-1, ::-1].reshape(heads, -1).T       # -> our layout
        assert_close(ours, expected, RESIZE_EPS * EPS * np.abs(timm_sd[key]).max(), key)
    for k, v in same.items():                                               # everything else is untouched
        if not k.endswith('relative_bias_table'):
            np.testing.assert_array_equal(out[k], v)
    model = load(MaxViT(args384), out)                                      # and the 384 model runs on it
    assert model(paddle.zeros([1, 3, 384, 384])).shape == [1, 10]

    with pytest.raises(ConversionError, match=r'(?s)10 shape mismatch\(es\).*block_attn.attn.relative_bias_table: '
                                              r'converted \[169, 1\], model needs \[529, 1\]'):
        convert_state_dict(timm_sd, MaxViT(args384), resize_bias_tables=False)


def test_every_unmapped_missing_or_misshaped_tensor_is_listed():
    _, args, _ = fixture('tf224')
    sd = read_safetensors(DATA / 'tf224.safetensors')
    sd['foo.bar'] = np.zeros(3, np.float32)                                        # no rule knows it
    sd['stages.7.blocks.0.conv.norm1.weight'] = np.zeros(8, np.float32)            # a rule, but no such stage
    sd['stem.conv1.weight'] = sd['stem.conv1.weight'][:, :2]                       # wrong shapes
    sd['stages.1.blocks.0.attn_block.mlp.fc1.weight'] = sd['stages.1.blocks.0.attn_block.mlp.fc1.weight'][1:]
    sd['stages.3.blocks.0.attn_grid.attn.rel_pos.relative_position_bias_table'] = np.zeros((3, 13, 13), np.float32)
    del sd['head.norm.bias'], sd['stages.2.blocks.1.conv.se.fc2.bias']            # missing
    with pytest.raises(ConversionError) as err:
        convert_state_dict(sd, MaxViT(args))
    msg = str(err.value)
    for text in ['2 checkpoint tensor(s) with no place in the model', 'foo.bar [3]',
                 'stages.7.blocks.0.conv.norm1.weight [8] (-> max_blocks.7.0.mbconv.expand_conv.1.weight, not in the model)',
                 '3 shape mismatch(es)', 'stem.conv1.weight [4, 2, 3, 3] -> conv_stem.0.weight',
                 'stages.1.blocks.0.attn_block.mlp.fc1.weight [63, 16] -> max_blocks.1.0.block_attn.mlp.fc1.weight: '
                 'converted [16, 63], model needs [16, 64]',
                 'relative_bias_table: converted [169, 3], model needs [169, 8]',
                 '2 model tensor(s) the checkpoint does not provide', 'norm.bias [64]',
                 'max_blocks.2.1.mbconv.se.gate.2.bias [128]']:
        assert text in msg, (text, msg)

    sd = read_safetensors(DATA / 'tf224.safetensors')                               # a missing tensor alone
    del sd['stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table']
    with pytest.raises(ConversionError, match=r'1 model tensor\(s\) the checkpoint does not provide:\n  '
                                              r'max_blocks.0.0.block_attn.attn.relative_bias_table \[169, 1\]$'):
        convert_state_dict(sd, MaxViT(args))


def test_the_real_tiny_state_dict_layout_maps_completely():
    """Every name and shape of timm's full-size maxvit_tiny_tf_224 (2-2-5-2 blocks, 64-512 channels) fits."""
    shapes = json.loads((DATA / 'maxvit_tiny_tf_224_shapes.json').read_text())
    sd = {k: np.zeros(s, np.int64 if k.endswith('num_batches_tracked') else np.float32) for k, s in shapes.items()}
    assert len(sd) == 560 and checkpoint_num_classes(sd) == 1000
    model = MaxViT(timm_model_args('maxvit_tiny_tf_224', checkpoint_num_classes(sd)))
    out = convert_state_dict(sd, model)
    assert sorted(out) == sorted(model.state_dict()) and len(out) == 560 - 34   # 34 num_batches_tracked skipped
    assert sum(v.size for k, v in out.items() if not k.endswith(('_mean', '_variance'))) == 30_916_528


def test_drop_head_keeps_the_models_own_classifier_and_classes_come_from_the_checkpoint():
    _, args, _ = fixture('tf224')
    sd = read_safetensors(DATA / 'tf224.safetensors')
    assert checkpoint_num_classes(sd) == 10
    with pytest.raises(ConversionError, match=r'head.fc.weight \[10, 64\] -> proj.weight: converted \[64, 10\], '
                                              r'model needs \[64, 1000\]'):
        convert_state_dict(sd, MaxViT(dict(args, num_classes=1000)))
    out = convert_state_dict(sd, MaxViT(dict(args, num_classes=1000)), drop_head=True)
    assert 'proj.weight' not in out and 'pre_logits.0.weight' in out


def test_timm_model_names():
    a = timm_model_args('maxvit_base_tf_384.in21k_ft_in1k', 1000)
    assert a == dict(maxvit.base_tf_args, block_size=[12, 12], grid_size=[12, 12], num_classes=1000)
    assert timm_model_args('maxvit_xlarge_tf_224', 21843)['num_classes'] == 21843
    assert timm_model_args('maxvit_tiny_tf_512')['block_size'] == [16, 16]
    with pytest.raises(ValueError, match='unknown model'):
        timm_model_args('maxvit_tiny_rw_224')


@pytest.mark.numerics
def test_cli_pdparams_round_trip_and_exported_inference_model(tmp_path):
    ref, args, x = fixture('tf224')
    config = tmp_path / 'fixture.yaml'
    config.write_text(yaml.safe_dump({'Model': args, 'Data': {'img_size': 224}}))
    weights = tmp_path / 'w.pdparams'
    assert main(['--src', str(DATA / 'tf224.safetensors'), '-c', str(config), '--out', str(weights)]) == 0

    state = paddle.load(str(weights))
    assert all(isinstance(v, paddle.Tensor) and v.dtype == paddle.float32 for v in state.values())
    model = MaxViT(args)
    assert sorted(state) == sorted(model.state_dict())
    model.set_state_dict(state)
    model.eval()
    with paddle.no_grad(), linear_magnitude(model.proj) as magnitude:
        logits = model(paddle.to_tensor(x)).numpy()
    # two float32 forwards, timm's and ours (each checked against float64 above)
    tolerance = forward_tolerance(magnitude[0].max(), forwards=2)
    assert_close(logits, ref['logits'], tolerance, 'logits of the .pdparams')

    prefix = str(tmp_path / 'export' / 'maxvit')
    paddle.jit.save(model, prefix, input_spec=[paddle.static.InputSpec([None, 3, 224, 224], 'float32', 'x')])
    assert Path(prefix + '.json').exists() and Path(prefix + '.pdiparams').exists()
    config = paddle.inference.Config(prefix + '.json', prefix + '.pdiparams')
    config.disable_gpu()
    predictor = paddle.inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(x.shape))
    handle.copy_from_cpu(x)
    predictor.run()
    out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    assert_close(out, ref['logits'], tolerance, 'logits of Paddle Inference')
