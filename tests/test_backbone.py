"""MaxViT as a detection/segmentation backbone: MaxViT(args, out_indices, frozen_stages, norm_eval) under a small
FPN (the one docs/backbone.md shows), at a non-square size that no window grid divides (800x1333 scaled down)."""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

import maxvit
from maxvit import MaxViT

SMALL = dict(stage_num_block=[1, 1, 1, 1], stem_dim=8, stage_dim=16, num_heads=1, block_size=[7, 7],
             grid_size=[7, 7])
H, W = 200, 333          # 800x1333 / 4: stage maps 50x84, 25x42, 13x21, 7x11, none a multiple of 7 in both axes


class FPN(nn.Layer):
    """Feature pyramid: 1x1 lateral convs, top-down nearest upsampling + add, 3x3 output convs."""

    def __init__(self, in_channels, out_channels=32):
        super().__init__()
        self.lateral = nn.LayerList([nn.Conv2D(c, out_channels, 1) for c in in_channels])
        self.output = nn.LayerList([nn.Conv2D(out_channels, out_channels, 3, padding=1) for _ in in_channels])

    def forward(self, features):
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):                  # coarse to fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        return [conv(x) for conv, x in zip(self.output, laterals)]


class Detector(nn.Layer):
    """Backbone + neck, as a detection framework nests them: its train() sets every sublayer's mode directly."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = FPN([f['num_chs'] for f in backbone.feature_info])

    def forward(self, x):
        return self.neck(self.backbone(x))


def bn_stats(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items() if k.endswith(('_mean', '_variance'))}


def changed(before, after):
    return sorted(k for k in before if not np.array_equal(before[k], after[k]))


def train_step(model, x):
    """One SGD step in training mode; returns {parameter name: gradient or None}."""
    model.train()
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    loss = sum(f.square().mean() for f in model(x))
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.numpy().copy()) for n, p in model.named_parameters()}
    opt.step()
    opt.clear_grad()
    return grads


@pytest.mark.parametrize('layout', ['article', 'official'])
def test_fpn_on_backbone_shapes_and_strides(layout):
    args = dict(maxvit.tiny_args if layout == 'article' else maxvit.tiny_tf_args, **SMALL)
    paddle.seed(0)
    backbone = MaxViT(args, out_indices=(1, 2, 3, 4))
    assert [(f['num_chs'], f['reduction']) for f in backbone.feature_info] == [(16, 4), (32, 8), (64, 16), (128, 32)]
    assert not any(hasattr(backbone, name) for name in ('proj', 'last_conv', 'norm', 'pre_logits'))
    model = Detector(backbone)
    model.eval()
    x = paddle.randn([2, 3, H, W])
    feats, outs = backbone(x), model(x)
    assert isinstance(feats, list) and len(feats) == len(outs) == 4
    for f, o, info in zip(feats, outs, backbone.feature_info):
        size = [math.ceil(H / info['reduction']), math.ceil(W / info['reduction'])]
        assert f.shape == [2, info['num_chs']] + size and o.shape == [2, 32] + size
    # the backbone's maps are the classifier's forward_features (same weights, stages and stem: the same ops on the
    # same input, so bit for bit)
    classifier = MaxViT(args)
    classifier.set_state_dict({**classifier.state_dict(), **backbone.state_dict()})
    classifier.eval()
    for f, g in zip(feats, classifier.forward_features(x)[1:]):
        np.testing.assert_array_equal(f.numpy(), g.numpy())


def test_out_indices_choose_maps_and_stages_after_the_last_are_not_built():
    backbone = MaxViT(dict(maxvit.tiny_args, **SMALL), out_indices=[0, 2])
    assert len(backbone.max_blocks) == 2
    assert [(f['num_chs'], f['reduction'], f['module']) for f in backbone.feature_info] == [
        (8, 2, 'conv_stem'), (32, 8, 'max_blocks.1')]
    backbone.eval()
    assert [f.shape for f in backbone(paddle.zeros([1, 3, H, W]))] == [[1, 8, 100, 167], [1, 32, 25, 42]]
    with pytest.raises(RuntimeError, match='backbone.*no classifier'):
        backbone.forward_head(paddle.zeros([1, 32, 4, 4]))
    for bad in ([], [2, 1], [1, 1], [0, 5], [-1]):
        with pytest.raises(ValueError, match='out_indices'):
            MaxViT(dict(maxvit.tiny_args, **SMALL), out_indices=bad)
    for bad in (-2, 5):
        with pytest.raises(ValueError, match='frozen_stages'):
            MaxViT(dict(maxvit.tiny_args, **SMALL), frozen_stages=bad)


def test_the_articles_classifier_is_unchanged():
    model = MaxViT(maxvit.tiny_args)
    assert model.out_indices is None and len(model.feature_info) == 5 and model.proj.weight.shape == [512, 1000]
    assert int(paddle.summary(model, (1, 3, 224, 224))['total_params']) == 31_001_840


def test_frozen_stages_get_no_gradient_and_keep_their_statistics():
    paddle.seed(0)
    args = dict(maxvit.tiny_args, **SMALL, drop_path=0.5)
    model = Detector(MaxViT(args, out_indices=(1, 2, 3, 4), frozen_stages=2))
    frozen = [model.backbone.conv_stem, model.backbone.max_blocks[0], model.backbone.max_blocks[1]]
    trained = [model.backbone.max_blocks[2], model.backbone.max_blocks[3]]
    frozen_stats, trained_stats = [bn_stats(p) for p in frozen], [bn_stats(p) for p in trained]
    frozen_weights = [{k: v.numpy().copy() for k, v in p.state_dict().items()} for p in frozen]
    x = paddle.randn([2, 3, H, W])

    model.train()                      # the detector's train() sets the backbone's sublayers directly...
    assert model.backbone.conv_stem[1].training
    feats = model.backbone(x)          # ...and the backbone puts its frozen parts back in eval mode
    assert not any(layer.training for part in frozen for layer in [part, *part.sublayers()])
    assert all(layer.training for part in trained for layer in [part, *part.sublayers()])
    # frozen stages run without stochastic depth (drop_path 0.5): the same maps twice in training mode
    np.testing.assert_array_equal(feats[1].numpy(), model.backbone(x)[1].numpy())

    grads = train_step(model, x)
    for part in frozen:
        for name, p in part.named_parameters():
            assert p.stop_gradient and p.grad is None, name
    assert all(grads[f'backbone.max_blocks.{i}.0.mbconv.expand_conv.0.weight'] is not None for i in (2, 3))
    assert all(grads[n] is not None for n in grads if n.startswith('neck.'))
    for part, weights in zip(frozen, frozen_weights):
        for k, v in part.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), weights[k], err_msg=k)
    assert all(not changed(s, bn_stats(p)) for s, p in zip(frozen_stats, frozen))
    assert all(changed(s, bn_stats(p)) for s, p in zip(trained_stats, trained))  # the test can see a change


def test_norm_eval_keeps_every_batchnorm_in_eval_mode_but_training_its_affine():
    paddle.seed(0)
    model = Detector(MaxViT(dict(maxvit.tiny_args, **SMALL), out_indices=(1, 2, 3, 4), norm_eval=True))
    before = bn_stats(model)
    assert len(before) == 2 * sum(isinstance(m, nn.BatchNorm2D) for m in model.sublayers()) > 0
    grads = train_step(model, paddle.randn([2, 3, H, W]))
    assert not changed(before, bn_stats(model))
    assert not any(m.training for m in model.sublayers() if isinstance(m, nn.BatchNorm2D))
    assert any(m.training for m in model.sublayers() if isinstance(m, nn.Dropout))   # only the norms
    bn_weight = 'backbone.max_blocks.0.0.mbconv.bn.weight'
    assert grads[bn_weight] is not None and np.abs(grads[bn_weight]).max() > 0

    # without norm_eval the same step changes the statistics (the check above is not vacuous)
    paddle.seed(0)
    model = Detector(MaxViT(dict(maxvit.tiny_args, **SMALL), out_indices=(1, 2, 3, 4)))
    before = bn_stats(model)
    train_step(model, paddle.randn([2, 3, H, W]))
    assert changed(before, bn_stats(model))

    # model.eval() then train() again: still eval-mode norms at the next forward
    model = MaxViT(dict(maxvit.tiny_args, **SMALL), norm_eval=True, frozen_stages=0)
    model.eval()
    model.train()
    model(paddle.zeros([1, 3, 32, 32]))
    assert not any(m.training for m in model.sublayers() if isinstance(m, nn.BatchNorm2D))
    assert all(p.stop_gradient for p in model.conv_stem.parameters())
    assert model.max_blocks[0][0].training and model.training
