"""common/checkpoint.py: a kill at any moment leaves a whole checkpoint; weights load without running code."""
import json
import os
import pickle

import numpy as np
import paddle
import pytest

import common.checkpoint as ckpt
from common.checkpoint import (CheckpointError, adapt_state_dict, load_checkpoint, load_file, load_pretrained,
                               read_safetensors, save_checkpoint)
from maxvit import MaxViT, tiny_args

SMALL = dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, num_classes=10)


def version_set(v):
    return {'w': np.full([3], v, 'float32')}, {'v': v}, {'v': v, 'note': 'x' * v}


def assert_whole(prefix, allowed):
    model, opt, states = load_checkpoint(prefix)
    versions = {int(model['w'][0]), opt['v'], states['v']}
    assert len(versions) == 1 and versions <= set(allowed), versions


class Killed(Exception):
    pass


@pytest.mark.parametrize('kill_at', range(7))
def test_a_kill_at_any_point_of_a_save_leaves_one_whole_checkpoint(tmp_path, monkeypatch, kill_at):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    # a save has 6 effects: 3 temporary files written, then 3 renames; kill before effect number kill_at
    count = {'n': 0}
    real_save, real_replace = ckpt._fsync_save, os.replace

    def tick():
        if count['n'] == kill_at:
            raise Killed()
        count['n'] += 1

    def save(obj, path):
        tick()
        real_save(obj, path)

    def replace(a, b):
        tick()
        real_replace(a, b)
    monkeypatch.setattr(ckpt, '_fsync_save', save)
    monkeypatch.setattr(ckpt.os, 'replace', replace)
    if kill_at < 6:
        with pytest.raises(Killed):
            save_checkpoint(prefix, *version_set(2))
    else:
        save_checkpoint(prefix, *version_set(2))
    monkeypatch.setattr(ckpt, '_fsync_save', real_save)
    monkeypatch.setattr(ckpt.os, 'replace', real_replace)
    # before the marker is written the old set stands; after it, the reader finishes the new one
    assert_whole(prefix, {1} if kill_at < 3 else {2})
    save_checkpoint(prefix, *version_set(3))  # and the next save works
    assert_whole(prefix, {3})


def test_weights_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
    path = tmp_path / 'evil.pdparams'
    path.write_bytes(pickle.dumps({'w': Evil()}))
    with pytest.raises(CheckpointError, match=r"refusing to load '(posix|os)\.system'"):
        load_file(str(path))
    assert not (tmp_path / 'pwned').exists()


def test_paddle_save_files_load_safely(tmp_path):
    model = MaxViT(SMALL)
    paddle.save(model.state_dict(), str(tmp_path / 'm.pdparams'))
    state = load_file(str(tmp_path / 'm.pdparams'))
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(state[k], v.numpy())


def test_safetensors_reader(tmp_path):
    arrays = {'a': np.arange(6, dtype='float32').reshape(2, 3), 'b': np.array([1, -2], 'int64')}
    header, offset, blobs = {}, 0, []
    for k, v in arrays.items():
        raw = v.tobytes()
        header[k] = {'dtype': {'float32': 'F32', 'int64': 'I64'}[str(v.dtype)], 'shape': list(v.shape),
                     'data_offsets': [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    (tmp_path / 'x.safetensors').write_bytes(len(head).to_bytes(8, 'little') + head + b''.join(blobs))
    out = read_safetensors(str(tmp_path / 'x.safetensors'))
    for k in arrays:
        np.testing.assert_array_equal(out[k], arrays[k])


def test_adapt_state_dict_lists_every_problem():
    model = MaxViT(SMALL)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state['conv_stem.0.weight'] = state['conv_stem.0.weight'][:4]
    state['extra.weight'] = np.zeros(3)
    del state['last_conv.0.bias']
    with pytest.raises(CheckpointError) as err:
        adapt_state_dict(model, state)
    msg = str(err.value)
    assert 'shape of conv_stem.0.weight' in msg and 'unexpected extra.weight' in msg and 'missing last_conv.0.bias' in msg


def test_classifier_of_another_size_only_when_fine_tuning(tmp_path):
    src = MaxViT(dict(SMALL, num_classes=1000))
    paddle.save(src.state_dict(), str(tmp_path / 's.pdparams'))
    with pytest.raises(CheckpointError, match=r'shape of proj.weight'):
        load_pretrained(MaxViT(SMALL), str(tmp_path / 's.pdparams'))
    dst = MaxViT(SMALL)
    fresh = dst.proj.weight.numpy().copy()
    resized, skipped, _ = load_pretrained(dst, str(tmp_path / 's.pdparams'), new_classifier=True)
    assert skipped == ['proj.weight', 'proj.bias'] and not resized
    np.testing.assert_array_equal(dst.proj.weight.numpy(), fresh)
    np.testing.assert_array_equal(dst.conv_stem[0].weight.numpy(), src.conv_stem[0].weight.numpy())


def test_bias_tables_resize_bilinearly_to_the_new_window(tmp_path):
    src = MaxViT(dict(SMALL, block_size=[7, 7], grid_size=[7, 7]))
    dst = MaxViT(dict(SMALL, block_size=[12, 12], grid_size=[12, 12]))
    key = 'max_blocks.0.0.block_attn.attn.relative_bias_table'
    table = paddle.to_tensor(np.tile(np.linspace(0, 1, 13, dtype='float32'), 13)[:, None])  # rises along x
    src.max_blocks[0][0].block_attn.attn.relative_bias_table.set_value(table)
    paddle.save(src.state_dict(), str(tmp_path / 's.pdparams'))
    resized, _, _ = load_pretrained(dst, str(tmp_path / 's.pdparams'))
    assert len(resized) == 8 and key in resized
    out = dst.state_dict()[key].numpy().reshape(23, 23)
    assert out.shape == (23, 23)
    np.testing.assert_allclose(out[0], np.interp(np.arange(23), np.linspace(0, 22, 13), np.linspace(0, 1, 13)),
                               atol=0.03)  # a linear ramp stays a linear ramp (edges: half-pixel clamping)
    assert (np.diff(out[0]) >= 0).all() and np.allclose(out, out[0])


def test_nested_and_bfloat16_tensors_save_as_plain_arrays(tmp_path):
    # AMP O2 nests master weights inside the optimizer state and keeps bfloat16 weights: paddle.save would
    # pickle those as Paddle objects, which the safe loader (rightly) refuses.
    weights = {'w': paddle.to_tensor([1.5, -2.0]).astype('bfloat16')}
    opt = {'master_weights': {'w': paddle.to_tensor([1.5, -2.0])}, 'w@moment1_0': paddle.ones([2])}
    save_checkpoint(str(tmp_path / 'c'), weights, opt, {'epoch': 1, 'ema': None})
    weights, opt, states = load_checkpoint(str(tmp_path / 'c'))
    assert weights['w'].dtype == np.float32 and weights['w'].tolist() == [1.5, -2.0]
    assert isinstance(opt['master_weights']['w'], np.ndarray) and states == {'epoch': 1, 'ema': None}


def test_weights_load_into_a_bfloat16_model(tmp_path):
    src = MaxViT(SMALL)
    paddle.save(src.state_dict(), str(tmp_path / 's.pdparams'))
    dst = MaxViT(SMALL)
    dst.to(dtype='bfloat16')
    load_pretrained(dst, str(tmp_path / 's.pdparams'))
    assert dst.proj.weight.dtype == paddle.bfloat16
    np.testing.assert_allclose(dst.proj.weight.astype('float32').numpy(), src.proj.weight.numpy(), rtol=1e-2)


def test_headless_weights_keep_the_fresh_classifier_when_fine_tuning(tmp_path):
    # tools/convert_weights.py --drop-head writes weights without proj.*
    state = {k: v.numpy() for k, v in MaxViT(SMALL).state_dict().items() if not k.startswith('proj.')}
    _, _, skipped = adapt_state_dict(MaxViT(SMALL), state, new_classifier=True)
    assert skipped == ['proj.weight', 'proj.bias']
    with pytest.raises(CheckpointError, match='missing proj.weight'):
        adapt_state_dict(MaxViT(SMALL), state)


def test_bias_table_with_other_heads_is_an_error_not_a_silent_skip():
    state = {k: v.numpy() for k, v in MaxViT(SMALL).state_dict().items()}
    with pytest.raises(CheckpointError, match=r'shape of max_blocks.0.0.block_attn.attn.relative_bias_table'):
        adapt_state_dict(MaxViT(dict(SMALL, num_heads=2)), state)
