"""The optimizer side of the recipe: AdamW with decoupled weight decay on weights only, warmup + cosine
learning rate per optimizer step, gradient clipping, and an EMA of the weights."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

import paddle


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from peak/warmup_steps to peak,
    then cosine decay from peak to min_lr at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: Dict, steps_per_epoch: int) -> int:
    """The warmup in optimizer steps: Optimizer.warmup_steps, or Optimizer.warmup_epochs x steps per epoch."""
    o = cfg['Optimizer']
    if o['warmup_epochs'] is not None:
        return round(o['warmup_epochs'] * steps_per_epoch)
    return o['warmup_steps']


def schedule_lines(cfg: Dict, plan: Dict) -> Tuple[str, list]:
    """The run's lr schedule in one line (the lr at its first step, at the end of its warmup and at its last step)
    and the warnings about it: a warmup at least as long as the run (it never reaches its peak), or a peak lr
    linear scaling has made less than a tenth of Optimizer.lr."""
    o, total, peak = cfg['Optimizer'], plan['total_steps'], plan['peak_lr']
    warm, low = plan['warmup_steps'], min(o['min_lr'], peak)
    lr = [cosine_lr(s, total, warm, peak, low) for s in (0, min(max(warm, 1), total) - 1, total - 1)]
    given = f"{o['warmup_epochs']:g} epochs = " if o['warmup_epochs'] is not None else ''
    line = (f'lr schedule: peak {peak:.3g} = Optimizer.lr {o["lr"]:g} x global batch {plan["global_batch"]} / '
            f'Optimizer.base_batch_size {o["base_batch_size"]}; warmup {given}{warm} steps, cosine to {low:.3g} at '
            f'step {total}; lr at step 1 {lr[0]:.3g}, at the end of warmup {lr[1]:.3g}, at the last step {lr[2]:.3g}')
    warnings = []
    if warm >= total:
        warnings.append(f'warning: the warmup ({warm} steps) is at least as long as the run ({total} steps): the lr '
                        f'never reaches its peak {peak:.3g} (it ends at {lr[2]:.3g}, {lr[2] / peak:.0%} of it); '
                        f'shorten Optimizer.warmup_steps, or give it as Optimizer.warmup_epochs')
    if peak < o['lr'] / 10:
        warnings.append(f'warning: the peak lr is {peak:.3g}, Optimizer.lr {o["lr"]:g} scaled to the global batch '
                        f'{plan["global_batch"]} from Optimizer.base_batch_size {o["base_batch_size"]}; if '
                        f'{o["lr"]:g} is meant for this batch, set -o Optimizer.base_batch_size={plan["global_batch"]}')
    return line, warnings


def no_weight_decay(name: str, param) -> bool:
    """Biases, norm weights (every 1-D parameter) and relative position bias tables get no weight decay."""
    return param.ndim <= 1 or name.endswith('relative_bias_table')


def layer_scales(num_stages: int, decay: float) -> List[float]:
    """Layer-wise lr decay (BEiT, arXiv:2106.08254) as timm groups MaxViT (param_groups_layer_decay with
    MaxxVit.group_matcher): the stem is layer 0, stage i layer i, the head (everything after the last stage) layer
    S + 1, and layer l trains at lr x decay ** (S + 1 - l). Returns the multipliers [stem, stage 1..S, head]: the
    head 1, the last stage decay, the stem, deepest, decay ** (S + 1)."""
    return [decay ** (num_stages + 1 - layer) for layer in range(num_stages + 2)]


def layer_lr_scales(model: paddle.nn.Layer, decay: float) -> Dict[str, float]:
    """Each parameter's lr multiplier under layer-wise decay (layer_scales), by its name."""
    scales = layer_scales(len(model.max_blocks), decay)

    def layer(name: str) -> int:
        if name.startswith('conv_stem.'):
            return 0
        if name.startswith('max_blocks.'):
            return int(name.split('.')[1]) + 1
        return len(scales) - 1

    return {name: scales[layer(name)] for name, _ in model.named_parameters()}


def layer_decay_line(model: paddle.nn.Layer, decay: float) -> str:
    """The multipliers in one log line."""
    scales = layer_scales(len(model.max_blocks), decay)
    stages = ', '.join(f'{s:.3g}' for s in reversed(scales[1:-1]))
    return (f'layer-wise lr decay {decay:g}: lr x 1 for the head, x {stages} for stages {len(scales) - 2}..1, '
            f'x {scales[0]:.3g} for the stem')


def build_optimizer(model: paddle.nn.Layer, cfg: Dict, plan: Dict
                    ) -> Tuple[paddle.optimizer.Optimizer, paddle.optimizer.lr.LRScheduler]:
    """AdamW and its lr schedule (plan's peak_lr, warmup_steps and total_steps: train.plan_steps), for the
    parameters that train (a linear probe's classifier only), each at its layer_lr_scales multiple of the lr with
    Optimizer.layer_decay."""
    o = cfg['Optimizer']
    total, warmup, peak = plan['total_steps'], plan['warmup_steps'], plan['peak_lr']
    min_lr = min(o['min_lr'], peak)
    schedule = paddle.optimizer.lr.LambdaDecay(1.0, lambda step: cosine_lr(step, total, warmup, peak, min_lr))
    params = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    decay_names = {p.name for n, p in params if not no_weight_decay(n, p)}
    # The multiplier is each parameter's own (what ParamAttr(learning_rate=...) sets; Paddle multiplies it into the
    # schedule's lr), in one parameter list: parameter groups would make ClipGradByGlobalNorm clip each group alone.
    scales = layer_lr_scales(model, o['layer_decay']) if o['layer_decay'] is not None else {}
    for n, p in params:
        p.optimize_attr['learning_rate'] = scales.get(n, 1.0)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=schedule, beta1=o['beta1'], beta2=o['beta2'], epsilon=o['epsilon'],
        parameters=[p for _, p in params], weight_decay=o['weight_decay'],
        apply_decay_param_fun=lambda name: name in decay_names,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(o['clip_grad']) if o['clip_grad'] > 0 else None,
        multi_precision=cfg['AMP']['enable'] and cfg['AMP']['level'] == 'O2')
    return optimizer, schedule


class ModelEma:
    """Exponential moving average of every float tensor of the model's state (BatchNorm statistics included),
    kept in float32. As TensorFlow's ExponentialMovingAverage(num_updates=...) in the official code, the decay
    warms up: min(decay, (1 + n) / (10 + n)) after n updates, so short runs get a useful average too."""

    def __init__(self, model: paddle.nn.Layer, decay: float):
        self.decay = decay
        self.updates = 0
        self.state = {k: v.astype('float32').clone() for k, v in model.state_dict().items()}

    @paddle.no_grad()
    def update(self, model: paddle.nn.Layer) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in model.state_dict().items():  # ema + (v - ema)(1 - d): a tensor that never moved stays exact
            self.state[k] = self.state[k] + (v.astype('float32') - self.state[k]) * (1.0 - d)

    def state_dict(self) -> Dict:
        return {'decay': self.decay, 'updates': self.updates, 'state': {k: v.numpy() for k, v in self.state.items()}}

    def set_state_dict(self, saved: Dict) -> None:
        self.updates = saved['updates']
        self.state = {k: paddle.to_tensor(v) for k, v in saved['state'].items()}


# Paddle keys optimizer state by its internal parameter names ('conv2d_54.w_0_moment1_0'), which depend on how
# many layers the process created before the model. Checkpoints use the model's own names instead
# ('max_blocks.0.0.mbconv.expand_conv.0.weight@moment1_0'), so they resume in any process.
_PARAM_KEY = re.compile(r'^(.+?\.[wb]_\d+)_(.+)$')


def optimizer_state(optimizer, model) -> Dict:
    """optimizer.state_dict() with parameter names made structural."""
    names = {p.name: n for n, p in model.named_parameters()}
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == 'master_weights':
            out[key] = {names[k]: v for k, v in value.items()}
            continue
        m = _PARAM_KEY.match(key)
        out[f'{names[m.group(1)]}@{m.group(2)}' if m and m.group(1) in names else key] = value
    return out


def load_optimizer_state(optimizer, model, state: Dict) -> None:
    """Inverse of optimizer_state."""
    names = {n: p.name for n, p in model.named_parameters()}
    restored = {}
    for key, value in state.items():
        if key == 'master_weights':
            restored[key] = {names[k]: v for k, v in value.items()}
        elif '@' in key:
            structured, suffix = key.split('@', 1)
            restored[f'{names[structured]}_{suffix}'] = value
        else:
            restored[key] = value
    optimizer.set_state_dict(restored)
