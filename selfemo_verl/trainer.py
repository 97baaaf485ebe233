"""SELF-GRPO trainer: verl 0.9.1's v1 synchronous PPO trainer plus group-level consistency (docs/method.md §4, §5).

Adapter; every reliance on a private verl 0.9.1 name lives in this file, each marked, each with a contract
test in tests/test_trainer_on_cpu.py.

What changes against `PPOTrainerSync`: the advantage step (only with `algorithm.adv_estimator=self_grpo`), the
corpus-level validation metrics, and an optional time budget (all below).

1. Read each row's `pred_mask` (the recognizer's label set P_i as a bitmask, from `selfemo_verl.reward_fn`) out of
   TransferQueue: the streaming reward path stores `compute_score`'s dict as
   `extra_fields["reward_extra_info"]` of each `AgentLoopOutput` (`AgentLoopWorker._compute_score`), and
   `AgentLoopWorkerTQ._agent_loop_postprocess` writes `extra_fields` as a TQ column under the key
   `{uid}_{session}_{output}`.
2. c_i = sIoU(P_i, M_uid) over the rows of each uid (`rewards.group_consistency_from_masks`), with the
   sIoU ε of `selfemo.reward.eps`; only episodes whose answer parsed (`parse_ok`) and that had no
   infrastructure failure (`infra_error`, docs/method.md §3.5) vote, the others get c_i = 0. n_labels is the
   widest label space (7): a mask never sets bits beyond its own space, so the extra all-zero columns change
   neither the consensus nor the sIoU, and mixed-dataset batches need no per-row label space.
3. Run verl's own `_compute_advantage` (KL-in-reward, rollout correction, write-back untouched) with a
   `ConsistencyFeed` active; the registered `self_grpo` estimator takes c_i from it after checking the uids
   match row for row, gives A = 0 to `infra_error` episodes and leaves them out of their group's mean and
   std, and leaves its diagnostics, which are logged as `selfemo/consistency_mean`, `selfemo/zero_std_groups`,
   `selfemo/adv_clip_frac` and `selfemo/infra_adv_abs_max` (max |A| of infra rows: 0 by construction)
   (verl's padding rows excluded). `selfemo/infra_error_rate` is the share of real episodes with `infra_error`.

Limitation: one `AgentLoopOutput` per episode (what `selfemo_self_play` returns). Several outputs per session
would all join the uid group (verl's special multi-output handling applies to `grpo` only), so it raises.

Episode dump (`selfemo.dump.enable`): the same TransferQueue read also writes every real episode of the step
(`episode_dump.write_step`: uid, row index, `extra_fields["selfemo"]`, reward terms) for the data flywheel.

Validation: weighted-F1 is corpus-level, so it cannot be the mean of per-sample scores; the validation step
also computes accuracy / weighted-F1 / macro-F1 / parse-failure rate per data source from the gathered
`pred_mask` / `gold_mask` of `compute_score` and logs them as `val-core/selfemo/weighted_f1/<dataset>` etc.

Time budget (`selfemo.trainer.time_budget_s`, null = off): training stops at the last step that fits in this many
seconds, counted from the start of the first step (validations inside the loop count, the one before training
does not). verl decides a step is the last before the step begins, from `total_training_steps`, so after each
step the trainer lowers that number to the next step when one more step after it would overrun the budget
(`next_step_is_last`); the last step validates and saves as verl's last step always does. The optimizer's
schedule keeps the configured step count (a constant learning rate, the default, is unaffected).

`SelfEmoTaskRunner` is verl's `TaskRunnerV1` with this trainer behind `trainer.v1.trainer_mode=sync`.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import ray
import transfer_queue as tq

from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from selfemo_verl.data.episode_dump import records_from_columns, write_step
from selfemo_verl.estimator import ConsistencyFeed, consistency_feed
from selfemo_verl.eval.metrics import metrics_by_source
from selfemo_verl.labels import LABEL_SPACES, dataset_of
from selfemo_verl.rewards import component_means, group_consistency_from_masks

N_LABELS = max(len(labels) for labels in LABEL_SPACES.values())
METRIC_PREFIX = "selfemo/"
_TQ_FIELDS = ["uid", "extra_fields"]
_DUMP_FIELDS = ["index", "data_source"]
_DUMP_REWARDS = ("score", "r_rec", "r_con", "r_und")


def check_trainer_mode(config) -> None:
    """SELF-GRPO runs on the v1 synchronous trainer only; anything else is a config error."""
    if not config.trainer.use_v1:
        raise ValueError("selfemo_verl.main needs trainer.use_v1=true (the v1 trainer); got false")
    mode = config.trainer.v1.trainer_mode
    if mode != "sync":
        raise ValueError(f"selfemo_verl.main needs trainer.v1.trainer_mode=sync; got {mode!r}")


def check_dump_config(config) -> None:
    """`selfemo.dump.enable=true` needs `selfemo.dump.dir`."""
    dump = config.selfemo.dump
    if dump.enable and not dump.dir:
        raise ValueError("selfemo.dump.enable=true needs selfemo.dump.dir (the episode dump directory)")


def dump_episodes(dump_dir, step: int, tags, rows) -> None:
    """Write this step's real episodes (uid, row index, selfemo record, reward terms) for the data flywheel."""
    real = [i for i, tag in enumerate(tags) if not tag.get("is_padding", False)]
    extra = list(rows["extra_fields"])
    columns = {name: list(rows[name]) for name in ("uid", "index", "data_source")}
    infos = [extra[i].get("reward_extra_info", {}) for i in real]
    records = records_from_columns(
        step, [columns["uid"][i] for i in real], [int(columns["index"][i]) for i in real],
        [columns["data_source"][i] for i in real], [extra[i].get("selfemo", {}) for i in real],
        {name: [info.get(name) for info in infos] for name in _DUMP_REWARDS},
    )
    write_step(dump_dir, step, records)


def _real_infos(tags, rows) -> list:
    """`reward_extra_info` (compute_score's dict) of each real row, or None where a row has none."""
    extra = list(rows["extra_fields"])
    return [extra[i].get("reward_extra_info") if isinstance(extra[i], dict) else None
            for i, tag in enumerate(tags) if not tag.get("is_padding", False)]


def reward_metrics(tags, rows) -> dict[str, float]:
    """`selfemo/infra_error_rate` over real episodes; `selfemo/r_rec`, `r_con`, `r_und`, `parse_ok` step means
    over real episodes without an infrastructure failure (those are not the policy's scores, docs/method.md §3.5)."""
    infos = [info for info in _real_infos(tags, rows) if isinstance(info, dict)]
    if not infos:
        return {}
    infra = [float(info.get("infra_error", 0.0)) == 1.0 for info in infos]
    means = component_means([info for info, hit in zip(infos, infra) if not hit])
    return {METRIC_PREFIX + "infra_error_rate": float(np.mean(infra)),
            **{METRIC_PREFIX + name: value for name, value in means.items()}}


def episode_columns(keys, extra_fields, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred_mask, parse_ok, infra_error) per row from the TQ `extra_fields` column, shapes (N,) each.

    A real row without `pred_mask` is a wiring error; a missing `parse_ok` / `infra_error` reads as 0 (the
    reward of an older selfemo_verl). verl's synthetic padding rows (`valid` False: own uid, response mask 0)
    get 0 / False / False without being read.
    """
    masks = np.zeros(len(keys), dtype=np.int64)
    parsed = np.zeros(len(keys), dtype=bool)
    infra = np.zeros(len(keys), dtype=bool)
    for i, (key, fields, real) in enumerate(zip(keys, extra_fields, valid, strict=True)):
        if not real:
            continue
        info = fields.get("reward_extra_info") if isinstance(fields, dict) else None
        if not isinstance(info, dict) or "pred_mask" not in info:
            raise ValueError(
                f"row {key}: extra_fields['reward_extra_info'] has no 'pred_mask'; self_grpo needs "
                "reward.custom_reward_function.path=pkg://selfemo_verl.reward_fn (streaming reward path)"
            )
        masks[i] = int(info["pred_mask"])
        parsed[i] = float(info.get("parse_ok", 0.0)) == 1.0
        infra[i] = float(info.get("infra_error", 0.0)) == 1.0
    return masks, parsed, infra


def check_one_output_per_session(keys) -> None:
    """Keys are `{uid}_{session}_{output}`; SELF-GRPO supports output index 0 only (see module docstring)."""
    extra = [k for k in keys if k.rsplit("_", 2)[-1] != "0"]
    if extra:
        raise ValueError(f"self_grpo expects one AgentLoopOutput per episode; got multi-output key {extra[0]!r}")


def recognizer_scores(extra_fields, valid, w_rec: float) -> np.ndarray:
    """w_rec·r_rec per row (the recognizer's share of R, for `self_grpo.per_role`); 0 for padding rows, shape (N,)."""
    return np.array([w_rec * float(fields["reward_extra_info"]["r_rec"]) if real else 0.0
                     for fields, real in zip(extra_fields, valid, strict=True)], dtype=np.float64)


def consistency_feed_for(keys, tags, rows, eps: float, w_rec: float | None = None) -> ConsistencyFeed:
    """The estimator feed for one batch: uids, c_i per row, real rows, and rows hit by infrastructure failures.

    Only parsed episodes without an infrastructure failure vote and score (docs/method.md §4.2); others get c_i = 0.
    With `w_rec` (`self_grpo.per_role`) the feed also carries each row's w_rec·r_rec.
    """
    # TensorDict["non-tensor field"] is a list of the python values (tensordict LinkedList).
    uids = np.array(list(rows["uid"]), dtype=object)
    valid = np.array([not tag.get("is_padding", False) for tag in tags], dtype=bool)
    masks, parsed, infra = episode_columns(keys, list(rows["extra_fields"]), valid)
    consistency = group_consistency_from_masks(masks, valid & parsed & ~infra, uids, N_LABELS, eps)
    rec = None if w_rec is None else recognizer_scores(list(rows["extra_fields"]), valid, w_rec)
    return ConsistencyFeed(uids=uids, consistency=consistency, valid=valid, infra=infra, recognizer_scores=rec)


class SelfEmoTrainer(PPOTrainerSync):
    """`PPOTrainerSync` whose advantage step feeds SELF-GRPO the group-level consistency c_i."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        budget_s = self.config.selfemo.trainer.time_budget_s
        self.step_budget = None if budget_s is None else StepBudget(budget_s)

    # Overrides verl 0.9.1 PPOTrainer._compute_advantage; re-check on upgrade.
    def _compute_advantage(self, batch, metrics: dict):
        dump = self.config.selfemo.dump
        self_grpo = self.config.algorithm.adv_estimator == "self_grpo"
        if not (self_grpo or dump.enable):
            return super()._compute_advantage(batch, metrics)
        check_one_output_per_session(batch.keys)
        # Relies on verl 0.9.1 private TransferQueue columns "uid", "extra_fields", and the dataset fields
        # "index", "data_source" that AgentLoopWorkerTQ._agent_loop_postprocess stores with every row.
        fields = _TQ_FIELDS + (_DUMP_FIELDS if dump.enable else [])
        rows = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if dump.enable:
            dump_episodes(dump.dir, self.global_steps, batch.tags, rows)
        metrics.update(reward_metrics(batch.tags, rows))
        if not self_grpo:
            return super()._compute_advantage(batch, metrics)
        reward = self.config.selfemo.reward
        per_role = self.config.algorithm.self_grpo.get("per_role", False)
        feed = consistency_feed_for(batch.keys, batch.tags, rows, eps=reward.eps,
                                    w_rec=reward.w_rec if per_role else None)
        with consistency_feed(feed):
            batch = super()._compute_advantage(batch, metrics)
        if feed.stats is None:
            raise RuntimeError("verl's _compute_advantage did not call the self_grpo estimator (verl changed?)")
        metrics.update({METRIC_PREFIX + name: value for name, value in feed.stats.items()})
        return batch

    def on_step_begin(self):
        super().on_step_begin()
        if self.step_budget is not None:
            self.step_budget.begin(time.monotonic())

    # Relies on verl 0.9.1's fit loop reading `self.total_training_steps` before each step (is_last_step).
    def on_step_end(self):
        super().on_step_end()  # the weight sync to the rollout replicas
        if self.step_budget is not None and self.step_budget.end(time.monotonic()):
            self.total_training_steps = min(self.total_training_steps, self.global_steps + 1)

    # Overrides verl 0.9.1 PPOTrainer._val_metrics_update; re-check on upgrade.
    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs):
        metrics = super()._val_metrics_update(
            data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs
        )
        metrics.update(corpus_val_metrics(data_sources, reward_extra_infos_dict))
        return metrics


class StepBudget:
    """Wall-clock budget of the training loop, from the start of the first step.

    `end(now)` after each step: True when the step after the next one would end past the budget, i.e.
    elapsed + 2 * (longest step so far) > budget, so the next step must be the last.

    >>> b = StepBudget(200.0); b.begin(0.0); b.end(30.0), b.end(60.0), b.end(140.0)   # steps of 30, 30, 80 s
    (False, False, True)
    """

    def __init__(self, budget_s: float):
        self.budget_s, self.start, self.last, self.longest = float(budget_s), None, 0.0, 0.0

    def begin(self, now: float) -> None:
        self.start = now if self.start is None else self.start

    def end(self, now: float) -> bool:
        elapsed = now - self.start
        self.longest, self.last = max(self.longest, elapsed - self.last), elapsed
        return elapsed + 2.0 * self.longest > self.budget_s


def corpus_val_metrics(data_sources, reward_extra_infos: dict) -> dict[str, float]:
    """Corpus-level ERC metrics per `selfemo/<dataset>` source from the per-sample reward extra info.

    Rows of other data sources (or without masks) are left to verl's own metrics.
    """
    preds, golds = reward_extra_infos.get("pred_mask"), reward_extra_infos.get("gold_mask")
    if preds is None or golds is None:
        return {}
    rows = [i for i, source in enumerate(data_sources)
            if dataset_of(str(source)) is not None and preds[i] is not None and golds[i] is not None]
    if not rows:
        return {}
    sources = [str(data_sources[i]) for i in rows]
    by_source = metrics_by_source([int(preds[i]) for i in rows], [int(golds[i]) for i in rows],
                                  sources, [dataset_of(source) for source in sources])
    out = {}
    for source, values in by_source.items():
        dataset = dataset_of(source)
        for name in ("weighted_f1", "accuracy"):
            out[f"val-core/selfemo/{name}/{dataset}"] = values[name]
        for name in ("macro_f1", "parse_failure_rate", "classes_predicted", "majority_accuracy",
                     "majority_weighted_f1"):
            out[f"val-aux/selfemo/{name}/{dataset}"] = values[name]
    return out


@contextlib.contextmanager
def sync_trainer_is(trainer_cls):
    """Inside the block, verl's trainer registry maps mode "sync" to `trainer_cls` (a PPOTrainerSync subclass).

    The mode name stays "sync" because verl compares `trainer_mode` to that string in several places.
    """
    if not issubclass(trainer_cls, PPOTrainerSync):
        raise TypeError(f"{trainer_cls!r} is not a PPOTrainerSync subclass")
    # Relies on verl 0.9.1 private TRAINER_REGISTRY (v1/trainer_base.py), read by TaskRunnerV1.run; re-check on upgrade.
    previous = TRAINER_REGISTRY["sync"]
    TRAINER_REGISTRY["sync"] = trainer_cls
    try:
        yield
    finally:
        TRAINER_REGISTRY["sync"] = previous


class SelfEmoTaskRunnerBase(TaskRunnerV1.__ray_actor_class__):
    """verl's `TaskRunnerV1` (plain class) running `SelfEmoTrainer`."""

    # Overrides verl 0.9.1 TaskRunnerV1.run; re-check on upgrade.
    def run(self, config):
        check_trainer_mode(config)
        check_dump_config(config)
        with sync_trainer_is(SelfEmoTrainer):
            return super().run(config)


SelfEmoTaskRunner = ray.remote(SelfEmoTaskRunnerBase)
