"""What a resumed run may change: train.py compares the config, classes and batch plan a checkpoint stores with the
run's own before it loads the weights (docs/training.md, "Stopping, preemption and resuming")."""
from __future__ import annotations

from typing import List

import yaml

from common.config import ConfigError
from common.logger import Logger

# How a resumed run may differ from the run that wrote its checkpoint (docs/training.md, "Stopping, preemption and
# resuming"). Never: Model.* (but recompute and the three regularisation keys), Global.linear_probe, the classes and
# their order, and, from a mid-epoch checkpoint, the batch plan (its position counts batches of each process's share
# of an order that depends on the batch, the processes and the number of images). Freely, in one line: the run's
# length and rhythm, where the data is, and how steps are computed. The rest of the recipe (learning rate,
# augmentation, drop path, EMA, AMP, seed, a global batch changed at an epoch's end, ...) changes what the run
# computes: refused unless -o Global.resume_changes=allow, then listed in the same line.
RESUME_FREE = {'Global.epochs', 'Global.print_freq', 'Global.eval_freq', 'Global.save_epoch_freq',
               'Global.save_interval_steps', 'Global.device', 'Global.use_visualdl', 'Global.to_static',
               'Model.recompute', 'Data.format', 'Data.train_root', 'Data.val_root', 'Data.train_list',
               'Data.val_list', 'Data.label_names', 'Data.num_workers', 'Data.use_shared_memory',
               'processes', 'accumulation steps'}
RESUME_NOT_COMPARED = {'Global.resume', 'Global.resume_changes', 'Global.pretrained_model',  # how a run starts
                       'Global.output_dir'}  # a checkpoint may be resumed into another directory
MODEL_RECIPE = {'Model.drop', 'Model.attn_drop', 'Model.drop_path'}  # regularisation: no parameters
NEVER_CHANGED = {'Global.linear_probe'}  # which parameters train: the optimizer's state is for those
BATCH_PLAN = {'global_batch': 'global batch', 'batch_size': 'Data.batch_size', 'world_size': 'processes',
              'accum': 'accumulation steps', 'train_images': 'training images'}  # plan_steps' keys


def _listed(changes: dict) -> str:
    """'key old -> new, ...', each value as an -o override spells it (null, true, 0.001, [7, 7])."""
    show = lambda value: yaml.safe_dump(value, default_flow_style=True, width=10 ** 9).split('\n')[0]  # noqa: E731
    return ', '.join(f'{key} {show(old)} -> {show(new)}' for key, (old, new) in changes.items())


def check_resume(resume: str, states: dict, cfg: dict, class_names: List[str], plan: dict, log: Logger) -> None:
    """Compare this run's config, classes and batch plan with those the checkpoint stores (RESUME_* above): a
    ConfigError of one line for a change the checkpoint cannot take, else one log line listing the changes."""
    saved, saved_plan = states.get('config') or {}, states.get('plan') or {}
    changes = {f'{s}.{k}': (saved[s][k], v) for s, keys in cfg.items() for k, v in keys.items()
               if k in (saved.get(s) or {}) and saved[s][k] != v and f'{s}.{k}' not in RESUME_NOT_COMPARED}
    changes.update({BATCH_PLAN[k]: (saved_plan[k], plan[k]) for k in BATCH_PLAN
                    if k in saved_plan and saved_plan[k] != plan[k] and BATCH_PLAN[k] not in changes})
    refused = {k: v for k, v in changes.items()
               if (k.startswith('Model.') and k not in RESUME_FREE | MODEL_RECIPE) or k in NEVER_CHANGED}
    problems = [f'{", ".join(refused)} changed since the checkpoint ({_listed(refused)})'] if refused else []
    old_names = states.get('class_names')
    if old_names is not None and list(old_names) != list(class_names):
        first = next((i for i, (a, b) in enumerate(zip(old_names, class_names)) if a != b), None)
        problems.append('the classes changed since the checkpoint (' + (
            f'class {first}: {old_names[first]!r} -> {class_names[first]!r}; ' if first is not None else '')
            + f'{len(old_names)} -> {len(class_names)} classes)')
    batch_keys = set(BATCH_PLAN.values()) if saved_plan else {'Data.batch_size', 'Optimizer.global_batch_size'}
    batch = {k: v for k, v in changes.items() if k in batch_keys}
    if states.get('epoch_step') and batch:
        problems.append(f'the batch plan changed since its mid-epoch save ({_listed(batch)}), which would misplace '
                        f'its position (epoch {states["epoch"] + 1}, step {states["epoch_step"]})')
    if problems:
        raise ConfigError(f'cannot resume {resume}: {"; ".join(problems)}. Resume with the checkpoint\'s settings, or '
                          f'start a new run in another Global.output_dir (-o Global.pretrained_model={resume} '
                          f'starts from its weights)')
    recipe = {k: v for k, v in changes.items() if k not in RESUME_FREE}
    if recipe and cfg['Global']['resume_changes'] != 'allow':
        raise ConfigError(f'resuming {resume} would change its recipe: {_listed(recipe)}. Add -o '
                          f'Global.resume_changes=allow to resume with the change, or drop it to continue as the '
                          f'checkpoint\'s run would (docs/training.md, "Stopping, preemption and resuming")')
    if changes:
        log.info(f'resuming with changes: {_listed(changes)}'
                 + (' (Global.resume_changes=allow)' if recipe else ''))
