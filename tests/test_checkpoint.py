"""common/checkpoint.py: a kill at any moment leaves a whole checkpoint; every load checks each file against the
size and sha256 its save recorded; copies share no bytes; weights load without running code."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import paddle
import pytest
import safetensors.numpy

import common.checkpoint as ckpt
from common.checkpoint import (CheckpointError, DiskError, adapt_state_dict, copy_checkpoint, load_checkpoint,
                               load_file, load_pretrained, load_weights, pickled_size, read_safetensors,
                               save_checkpoint, to_numpy_tree)
from maxvit import MaxViT, tiny_args

SMALL = dict(tiny_args, stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, num_classes=10)


def version_set(v):
    return {'w': np.full([3], v, 'float32')}, {'v': v}, {'v': v, 'note': 'x' * v}


def assert_whole(prefix, version):
    model, opt, states = load_checkpoint(prefix)
    assert (int(model['w'][0]), opt['v'], states['v']) == (version,) * 3
    leftovers = sorted(p.name for p in Path(prefix).parent.glob(Path(prefix).name + '.*'))
    assert leftovers == sorted(Path(prefix).name + ext for ext in ckpt.EXTS + (ckpt.RECORD,))


class Killed(Exception):
    pass


def committed_but_not_promoted(prefix, monkeypatch, version):
    """The files a save leaves when it dies right after its commit point (kills of real processes:
    tests/test_checkpoint_kill.py)."""
    def die(_):
        raise Killed()
    with monkeypatch.context() as m:
        m.setattr(ckpt, '_promote', die)
        with pytest.raises(Killed):
            save_checkpoint(prefix, *version_set(version))
    assert all(Path(prefix + '.pending' + ext).is_file() for ext in ckpt.EXTS + ('.complete',))


def test_a_committed_save_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    committed_but_not_promoted(prefix, monkeypatch, 2)
    assert_whole(prefix, 2)


def test_a_committed_save_that_fails_verification_is_discarded(tmp_path, monkeypatch):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    committed_but_not_promoted(prefix, monkeypatch, 2)
    with open(prefix + '.pending.pdopt', 'r+b') as f:  # damage from outside: one byte changed
        f.seek(-3, os.SEEK_END)
        f.write(b'?')
    with pytest.warns(UserWarning, match=r'latest: discarding an interrupted save .*latest.pending.pdopt is not'):
        assert_whole(prefix, 1)
    # half promoted, then a damaged file: no whole set is left, and that is said, not papered over
    committed_but_not_promoted(prefix, monkeypatch, 3)
    os.replace(prefix + '.pending.pdparams', prefix + '.pdparams')
    Path(prefix + '.pending.pdstates').write_bytes(b'junk')
    with pytest.raises(CheckpointError, match=r'checkpoint .*latest is damaged: .*latest.pending.pdstates'):
        load_checkpoint(prefix)


def test_a_save_that_fails_leaves_no_files_behind(tmp_path, monkeypatch):
    prefix = str(tmp_path / 'latest')
    save_checkpoint(prefix, *version_set(1))
    real_write = ckpt._write_file

    def disk_full(path, dump):
        if path.endswith('.pdopt'):
            Path(path).write_bytes(b'half')
            raise OSError(28, 'No space left on device')
        return real_write(path, dump)
    monkeypatch.setattr(ckpt, '_write_file', disk_full)
    with pytest.raises(DiskError, match=rf'^cannot save checkpoint {prefix}: not enough space in {tmp_path} '
                                        r'\(needs about 20 kB, .* free on .*\): .*; the previous checkpoint there '
                                        r'is intact$'):
        save_checkpoint(prefix, *version_set(2))
    assert sorted(p.name for p in tmp_path.glob('latest.*')) == ['latest.pdopt', 'latest.pdparams', 'latest.pdstates',
                                                                 'latest.sha256.json']
    assert_whole(prefix, 1)


def test_checkpoint_files_are_what_paddle_save_writes(tmp_path):
    model = MaxViT(SMALL)
    save_checkpoint(str(tmp_path / 'c'), model.state_dict(), {'lr': 0.5}, {'epoch': 1})
    paddle.save({k: v.numpy() for k, v in model.state_dict().items()}, str(tmp_path / 'p.pdparams'))
    assert (tmp_path / 'c.pdparams').read_bytes() == (tmp_path / 'p.pdparams').read_bytes()
    loaded = paddle.load(str(tmp_path / 'c.pdparams'))
    np.testing.assert_array_equal(loaded['proj.weight'].numpy(), model.proj.weight.numpy())


def test_copies_share_no_bytes_with_their_source(tmp_path):
    latest, best = str(tmp_path / 'latest'), str(tmp_path / 'best')
    save_checkpoint(latest, *version_set(1))
    copy_checkpoint(latest, best)
    for ext in ckpt.EXTS:
        a, b = os.stat(latest + ext), os.stat(best + ext)
        assert (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) and b.st_nlink == 1
        assert Path(latest + ext).read_bytes() == Path(best + ext).read_bytes()
    assert json.loads(Path(best + ckpt.RECORD).read_text()) == json.loads(Path(latest + ckpt.RECORD).read_text())
    save_checkpoint(latest, *version_set(2))  # replaces latest's files, best keeps its own
    assert_whole(best, 1)
    assert_whole(latest, 2)
    copy_checkpoint(latest, best)
    copy_checkpoint(latest, best)  # onto a copy of the same files
    assert_whole(best, 2)


def flip_byte(path, where=0.5):
    """Damage from outside: one byte in the middle of ``path`` changed, its size kept."""
    data = bytearray(Path(path).read_bytes())
    data[int(len(data) * where)] ^= 0x10
    Path(path).write_bytes(bytes(data))


def run_with_copies(tmp_path, model=None):
    """latest, best and epoch_2 of a run (best and epoch_2 copies of latest)."""
    prefix = str(tmp_path / 'latest')
    weights = model.state_dict() if model else version_set(2)[0]
    save_checkpoint(prefix, weights, {'v': 2}, {'v': 2, 'class_names': ['a', 'b']})
    copy_checkpoint(prefix, str(tmp_path / 'best'))
    copy_checkpoint(prefix, str(tmp_path / 'epoch_2'))
    return prefix


def test_a_flipped_byte_is_one_error_on_every_load_and_the_copies_still_load(tmp_path):
    model = MaxViT(SMALL)
    prefix = run_with_copies(tmp_path, model)
    size = os.path.getsize(prefix + '.pdparams')
    record = json.loads(Path(prefix + ckpt.RECORD).read_text())['files']['.pdparams']
    assert record['bytes'] == size > 100_000 and len(record['sha256']) == 64
    flip_byte(prefix + '.pdparams')  # a float in the middle of the weights: it would load (as it did before)
    message = (rf'^{re.escape(prefix)}.pdparams is damaged: expected sha256 {record["sha256"][:16]}\.\.\. '
               rf'\({re.escape(prefix)}.sha256.json\), found [0-9a-f]{{16}}\.\.\. \(its bytes changed after it was '
               rf'saved: .*\); nothing of it was loaded: use another checkpoint of the run instead \(as Global.resume '
               rf'or Global.pretrained_model\): {re.escape(str(tmp_path / "best"))}, '
               rf'{re.escape(str(tmp_path / "epoch_2"))}$')
    calls = {'resume (load_checkpoint)': lambda: load_checkpoint(prefix),
             'eval, Global.pretrained_model (load_pretrained)': lambda: load_pretrained(MaxViT(SMALL), prefix),
             'raw weights (load_weights)': lambda: load_weights(prefix + '.pdparams'),
             'a file (load_file)': lambda: load_file(prefix + '.pdparams')}
    for what, call in calls.items():
        with pytest.raises(CheckpointError, match=message) as err:
            call()
        assert '\n' not in str(err.value), what
    # the copies have their own bytes
    for other in ('best', 'epoch_2'):
        restored = MaxViT(SMALL)
        load_pretrained(restored, str(tmp_path / other))
        np.testing.assert_array_equal(restored.proj.weight.numpy(), model.proj.weight.numpy())
    # the EMA and class-name reads of a damaged .pdstates (eval's EMA weights, tools/export.py's class names)
    flip_byte(prefix + '.pdstates', 0.9)
    with pytest.raises(CheckpointError, match=rf'{re.escape(prefix)}.pdstates is damaged: expected sha256'):
        load_file(prefix + '.pdstates')


def test_a_truncated_file_is_one_error_naming_what_was_expected(tmp_path):
    prefix = run_with_copies(tmp_path)
    size = os.path.getsize(prefix + '.pdopt')
    with open(prefix + '.pdopt', 'r+b') as f:
        f.truncate(size - 7)
    with pytest.raises(CheckpointError, match=rf'^{re.escape(prefix)}.pdopt is damaged: expected {size} bytes '
                                              rf'\({re.escape(prefix)}.sha256.json\), found {size - 7} \(truncated\); '
                                              rf'nothing of it was loaded: use another checkpoint .*best, .*epoch_2$'):
        load_checkpoint(prefix)
    assert_whole(str(tmp_path / 'best'), 2)
    assert_whole(str(tmp_path / 'epoch_2'), 2)
    # a damaged latest is not copied on: best keeps what it has
    with pytest.raises(CheckpointError, match=rf'{re.escape(prefix)}.pdopt is damaged: expected {size} bytes .*; not '
                                              rf'copied to .*best, which is unchanged'):
        copy_checkpoint(prefix, str(tmp_path / 'best'))
    assert_whole(str(tmp_path / 'best'), 2)
    # with no copy to fall back on, the error says so
    for other in ('best', 'epoch_2'):
        for path in tmp_path.glob(other + '.*'):
            path.unlink()
    with pytest.raises(CheckpointError, match=rf'no other checkpoint is in {re.escape(str(tmp_path))} to use instead'):
        load_checkpoint(prefix)


def test_a_damaged_record_is_an_error_and_a_missing_one_a_single_warning(tmp_path, recwarn):
    prefix = run_with_copies(tmp_path)
    Path(prefix + ckpt.RECORD).write_text('{"format": 1, "fil')
    with pytest.raises(CheckpointError, match=rf'^{re.escape(prefix)}.sha256.json is damaged \(JSONDecodeError: .*\), '
                                              rf'so the files of {re.escape(prefix)} cannot be checked: use another '
                                              rf'checkpoint .*, or delete .*latest.sha256.json to load .* unchecked$'):
        load_checkpoint(prefix)
    # a checkpoint saved before records were kept: it loads, with one warning for all its loads
    Path(prefix + ckpt.RECORD).unlink()
    recwarn.clear()
    assert load_checkpoint(prefix)[1] == {'v': 2}
    load_weights(prefix)
    notes = [str(w.message) for w in recwarn.list]
    assert notes == [f'{prefix}: saved without latest.sha256.json (by a version that kept no sha256 of its files), '
                     f'so loaded unchecked; its next save records one']
    save_checkpoint(prefix, *version_set(3))
    assert Path(prefix + ckpt.RECORD).is_file()
    assert_whole(prefix, 3)
    # a plain weights file (no .pdstates beside it) is no checkpoint: no record, no warning
    recwarn.clear()
    paddle.save({'w': np.zeros(2, 'float32')}, str(tmp_path / 'plain.pdparams'))
    assert load_weights(str(tmp_path / 'plain.pdparams'))[0]['w'].tolist() == [0, 0] and not recwarn.list


def test_pickled_size_bounds_the_files_a_save_writes(tmp_path):
    """The free-space check's estimate, against real files: never below, at most 256 bytes per tensor above."""
    model = MaxViT(SMALL)
    opt = paddle.optimizer.AdamW(parameters=model.parameters())
    model(paddle.rand([2, 3, 32, 32])).mean().backward()
    opt.step()
    states = {'epoch': 1, 'best': {'metric': 0.5}, 'class_names': ['ä', 'b'] * 50, 'config': {'Data': {'x': [1.5]}},
              'ema': {'state': {k: v.numpy() for k, v in model.state_dict().items()}, 'updates': 3},
              'scalar': np.float32(1)}
    trees = model.state_dict(), opt.state_dict(), states
    save_checkpoint(str(tmp_path / 'c'), *trees)
    def arrays(tree):
        if isinstance(tree, dict):
            return sum(arrays(v) for v in tree.values())
        return int(isinstance(tree, (np.ndarray, np.generic)))
    for ext, tree in zip(ckpt.EXTS, trees):
        written, estimate = os.path.getsize(str(tmp_path / 'c') + ext), pickled_size(tree)
        n = arrays(to_numpy_tree(tree))
        assert n > 50 and written < estimate <= written + 256 * n, (ext, written, estimate, n)


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


def safetensors_bytes(entries):
    """A .safetensors file by hand: {name: (dtype name, shape, raw bytes)} (safetensors.numpy cannot write BF16)."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, 'little') + head + b''.join(raw for _, _, raw in entries.values())


def test_safetensors_reader(tmp_path):
    arrays = {'a': np.arange(6, dtype='float32').reshape(2, 3), 'b': np.array([1, -2], 'int64'),
              'c': np.array([True, False]), 'd': np.array([0.5, -1], 'float16')}
    safetensors.numpy.save_file(arrays, str(tmp_path / 'x.safetensors'))
    out = load_file(str(tmp_path / 'x.safetensors'))
    assert out.keys() == arrays.keys()
    for k in arrays:
        assert out[k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(out[k], arrays[k])


def test_safetensors_bfloat16_becomes_float32(tmp_path):
    bf16 = np.array([0x3FC0, 0xC000, 0x0000, 0xFF80], '<u2')  # 1.5, -2, 0, -inf
    (tmp_path / 'b.safetensors').write_bytes(safetensors_bytes({
        'w': ('BF16', [2, 2], bf16.tobytes()), 'n': ('I32', [2], np.array([7, -9], '<i4').tobytes())}))
    out = read_safetensors(tmp_path / 'b.safetensors')
    assert out['w'].dtype == np.float32 and out['w'].tolist() == [[1.5, -2.0], [0.0, -np.inf]]
    assert out['n'].dtype == np.int32 and out['n'].tolist() == [7, -9]


@pytest.mark.parametrize('content, why', [
    (b'\xff' * 64, 'header too large'),
    (b'abc', 'header too small'),
    (safetensors_bytes({'w': ('F32', [2, 2], b'\0' * 12)}), 'offset'),    # 12 bytes for 4 float32
    (safetensors_bytes({'w': ('F32', [2, 2], b'\0' * 16)})[:-4], 'incomplete'),  # cut short
    (safetensors_bytes({'w': ('F8_E4M3', [2], b'\0' * 2)}), r'a type numpy cannot hold: w \(F8_E4M3\)'),
])
def test_malformed_safetensors_is_one_error_naming_the_file(tmp_path, content, why):
    path = tmp_path / 'bad.safetensors'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf'^{re.escape(str(path))}: .*{why}') as err:
        load_pretrained(MaxViT(SMALL), str(path))
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError):  # tools/convert_weights.py reports ValueErrors as an error line
        read_safetensors(path)


def test_weights_of_the_wrong_kind_are_one_error_line(tmp_path):
    (tmp_path / 'list.pdparams').write_bytes(pickle.dumps([np.zeros(3), np.ones(2)]))
    np.savez(tmp_path / 'objects.npz', w=np.zeros(3), names=np.array(['a', None], dtype=object))
    (tmp_path / 'opt.pdparams').write_bytes(pickle.dumps({'w': np.zeros(2), 'LR_Scheduler': {'last_epoch': 1}}))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with open(tmp_path / 'bare.npz', 'wb') as f:
        np.save(f, np.zeros(3))
    checks = [('list.pdparams', r'list.pdparams: not a weights file: it holds a list, where a dict \{tensor name'),
              ('objects.npz', r"objects.npz: 'names' is an array of Python objects, .*only hold numeric arrays"),
              ('opt.pdparams', r"opt.pdparams: not a weights file: 1 of its 2 entries are not named arrays: "
                               r"'LR_Scheduler' \(dict\)"),
              ('junk.npz', r'junk.npz: not a .npz archive'), ('bare.npz', r'bare.npz: one bare array \(.npy\)')]
    for name, message in checks:
        with pytest.raises(CheckpointError, match=message) as err:
            load_pretrained(MaxViT(SMALL), str(tmp_path / name))
        assert '\n' not in str(err.value) and str(tmp_path / name) in str(err.value)


def test_weights_of_another_model_list_each_tensor_once():
    model = MaxViT(SMALL)
    state = {k: v.numpy() for k, v in MaxViT(dict(SMALL, stage_dim=24, num_classes=7)).state_dict().items()}
    del state['proj.bias']
    state['extra.weight'] = np.zeros(2)
    with pytest.raises(CheckpointError) as err:
        adapt_state_dict(model, state)
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    named = [line.split(':')[0].split()[-1] if line.startswith('shape of') else line.split()[1] for line in lines]
    assert len(named) == len(set(named)), 'a tensor is listed twice'
    mis_shaped = {k for k, v in model.state_dict().items() if k in state and list(v.shape) != list(state[k].shape)}
    assert 'proj.weight' in mis_shaped and len(mis_shaped) > 50
    assert sorted(named) == sorted(mis_shaped | {'proj.bias', 'extra.weight'})
    assert 'missing proj.bias' in lines and 'unexpected extra.weight [2]' in lines


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
    assert 'missing conv_stem.0.weight' not in msg and len(msg.splitlines()) == 4


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
    # bfloat16 keeps 8 significant bits: a cast is within one unit of the last, 2^-7 of the value, whether it
    # rounds to the nearest or truncates
    np.testing.assert_allclose(dst.proj.weight.astype('float32').numpy(), src.proj.weight.numpy(), rtol=2 ** -7,
                               atol=0)


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
