"""paddle.hub entry points: one per model config in configs/ (maxvit_t, maxvit_s, maxvit_b, maxvit_l for the article's
layout; maxvit_t_tf_224 ... maxvit_xl_tf_512 for the official one).

    import paddle
    paddle.hub.list('path/to/MaxViT-Paddle', source='local')
    model = paddle.hub.load('path/to/MaxViT-Paddle', 'maxvit_t_tf_224', source='local',
                            weights='weights/maxvit_t_tf_224.pdparams')
    backbone = paddle.hub.load('path/to/MaxViT-Paddle', 'maxvit_t', source='local', out_indices=(1, 2, 3, 4))

Every entry builds ``maxvit.MaxViT`` from its config's Model section and takes the same keywords:
weights (a .pdparams/.safetensors/.npz file or a training checkpoint prefix, read without unpickling code),
ema, num_classes, the backbone keywords out_indices/frozen_stages/norm_eval, and any Model key as an override.
timm's names of the official models (maxvit_tiny_tf_224, ...) load the same entries; the list shows each model
once, under its config's name.
"""
from pathlib import Path as _Path

import maxvit as _maxvit
from common import checkpoint as _checkpoint
from common.config import load_config as _load_config

dependencies = ['paddle', 'numpy', 'yaml', 'pydantic']

_CONFIGS = _Path(__file__).resolve().parent / 'configs'
_TIMM_SIZES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large', 'xl': 'xlarge'}


def _build(name, weights=None, ema=False, num_classes=None, out_indices=None, frozen_stages=-1, norm_eval=False,
           **overrides):
    args = dict(_load_config(str(_CONFIGS / f'{name}.yaml'))['Model'], **overrides)
    if num_classes is not None:
        args['num_classes'] = num_classes
    model = _maxvit.MaxViT(args, out_indices=out_indices, frozen_stages=frozen_stages, norm_eval=norm_eval)
    if weights is None:
        return model
    if out_indices is None:  # a num_classes that differs from the weights' leaves a fresh classifier
        _checkpoint.load_pretrained(model, str(weights), ema=ema, new_classifier=num_classes is not None)
    else:                    # a backbone takes what it has layers for: no classifier, no stage past its last output
        state, _ = _checkpoint.load_weights(str(weights), ema=ema)
        target = model.state_dict()
        state, _, _ = _checkpoint.adapt_state_dict(model, {k: v for k, v in state.items() if k in target})
        _checkpoint.set_model_state(model, state)
    return model


def _entry(name):
    def entry(weights=None, ema=False, num_classes=None, out_indices=None, frozen_stages=-1, norm_eval=False,
              **overrides):
        return _build(name, weights, ema, num_classes, out_indices, frozen_stages, norm_eval, **overrides)

    model = _load_config(str(_CONFIGS / f'{name}.yaml'))['Model']
    layout = 'official (google-research/maxvit, timm)' if model['head'] == 'norm_mlp' else "article's"
    entry.__name__ = entry.__qualname__ = name
    window = 'x'.join(str(s) for s in model['block_size'])
    entry.__doc__ = f"""MaxViT of configs/{name}.yaml, the {layout} layout: blocks {model['stage_num_block']},
    {model['stage_dim']} channels in stage 0, {window} windows, {model['num_classes']} classes.

    weights: None (random initialisation) or a .pdparams/.safetensors/.npz file or a training checkpoint prefix
        (common.checkpoint.load_pretrained; relative bias tables of another window size are resized).
    ema: from a training checkpoint, its EMA weights instead of the raw ones.
    num_classes: another classifier size; weights with a classifier of another size then leave it fresh.
    out_indices, frozen_stages, norm_eval: a detection/segmentation backbone (maxvit.MaxViT, docs/backbone.md).
    **overrides: any other maxvit.DEFAULT_ARGS key, e.g. drop_path=0.1.
    Returns the model in training mode: call model.eval() before inference.
    """
    return entry


for _name in sorted(p.stem for p in _CONFIGS.glob('maxvit_*.yaml')):
    globals()[_name] = _entry(_name)


def __getattr__(name):
    """timm's names for the official models: maxvit_tiny_tf_224 is maxvit_t_tf_224 (not listed by paddle.hub)."""
    for short, long in _TIMM_SIZES.items():
        prefix = f'maxvit_{long}_tf_'
        if name.startswith(prefix) and f'maxvit_{short}_tf_{name[len(prefix):]}' in globals():
            return globals()[f'maxvit_{short}_tf_{name[len(prefix):]}']
    raise AttributeError(f'hubconf has no model {name!r}')
