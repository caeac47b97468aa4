"""Tune stage: an Optuna study over any config keys, scored by short trainings on chosen folds.

Each trial takes the resolved config, sets the sampled keys, trains `tune.epochs` epochs on each
of `tune.folds` (under WORK/tune/trials/, not WORK/runs) and reports the val metric after every
epoch, so the pruner can stop bad trials early. The search space is checked against the config
before the study starts. Trials that diverge (non-finite training loss) or run out of memory are
recorded as failed and the study goes on; a config error or a bug stops the study with its message.
The study lives in SQLite (WORK/optuna.db) by default, or in any database SQLAlchemy reaches
(`tune.storage: postgresql://user@host/db`, `make tune STORAGE=... JOBS=...`, on one machine or
several): run it again and it continues; several processes on the same storage share it, and
together they finish exactly `tune.n_trials` completed and pruned trials (see `claim`). Writes
WORK/tune/best.yaml (the best parameters as a partial config, which later stages merge unless
USE_TUNED=0), trials.csv and plots.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy
import torch
import yaml
from pydantic import ValidationError

from pipeline.context import Context
from pipeline.core.artifacts import atomic_write, content_key, fingerprint, read_json, write_csv, write_text
from pipeline.core.config import Config, known_keys, read_yaml
from pipeline.core.errors import PipelineError
from pipeline.scoring import tasks
from pipeline.training.fold import train_fold

log = logging.getLogger(__name__)

TYPES = {"float", "int", "categorical"}


def load_space(path: Path) -> dict[str, dict]:
    """The search space, checked: known keys, known types, the fields each type needs, valid ranges."""
    space = read_yaml(Path(path))
    known = set(known_keys(Config))
    for key, spec in space.items():
        where = f"{path}: '{key}'"
        if key not in known or "." not in key:
            raise PipelineError(f"{where}: not a config key (see configs/default.yaml)")
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise PipelineError(f"{where}: needs type: float, int or categorical")
        need = ("choices",) if spec["type"] == "categorical" else ("low", "high")
        missing = [n for n in need if n not in spec]
        if missing:
            raise PipelineError(f"{where}: {spec['type']} needs {', '.join(missing)}")
        distribution(spec, where)
    if not space:
        raise PipelineError(f"{path}: the search space is empty")
    return space


def distribution(spec: dict, where: str) -> optuna.distributions.BaseDistribution:
    """Optuna's distribution of one key; its own checks (low <= high, low > 0 with log, ...) as one line."""
    try:
        if spec["type"] == "float":
            return optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False))
        if spec["type"] == "int":
            return optuna.distributions.IntDistribution(spec["low"], spec["high"], log=spec.get("log", False),
                                                        step=spec.get("step", 1))
        if not isinstance(spec["choices"], list):
            raise ValueError("choices must be a list")
        return optuna.distributions.CategoricalDistribution(spec["choices"])
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: {exc}") from None


def check_space(space: dict[str, dict], base: Config, path: Path) -> None:
    """Every value a trial can draw must make a valid config, checked before the study starts.

    A float range is checked at both ends and at one value between (an int key refuses a fraction),
    an int range at both ends, a categorical at every choice. Otherwise each trial would fail on
    its sampled values and the study would end with nothing but failed trials.
    """
    for key, spec in space.items():
        dist = distribution(spec, f"{path}: '{key}'")
        if spec["type"] == "categorical":
            values = list(dist.choices)
        elif spec["type"] == "float":
            values = [dist.low, dist.high, dist.low + 0.37 * (dist.high - dist.low)]
        else:
            values = [dist.low, dist.high]
        for value in values:
            problem = config_error(base, {key: value})
            if problem:
                raise PipelineError(f"{path}: '{key}': the value {value!r} is not a valid config ({problem}); "
                                    "change the range or choices")


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, object]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                            log=spec.get("log", False))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def as_tree(params: dict[str, object]) -> dict:
    """Dotted params -> nested partial config; a scalar for a list-valued key becomes a one-item list."""
    tree: dict = {}
    for key, value in params.items():
        section, name = key.split(".", 1)
        field = Config.model_fields[section].annotation.model_fields[name]
        if "list" in str(field.annotation) and not isinstance(value, list):
            value = [value]
        tree.setdefault(section, {})[name] = value
    return tree


def _tree(base: Config, params: dict[str, object], epochs: int | None = None) -> dict:
    tree = base.model_dump(mode="json")
    for section, values in as_tree(params).items():
        tree[section].update(values)
    if epochs is not None:
        tree["train"]["epochs"] = epochs
    return tree


def config_error(base: Config, params: dict[str, object]) -> str | None:
    """Why `params` set on `base` is not a valid config (pydantic's first message), or None."""
    try:
        Config.model_validate(_tree(base, params))
    except ValidationError as err:
        return err.errors()[0]["msg"]
    return None


def trial_config(base: Config, params: dict[str, object], epochs: int) -> Config:
    try:
        return Config.model_validate(_tree(base, params, epochs))
    except ValidationError as err:
        raise PipelineError(f"tune: sampled values are not a valid config: {err.errors()[0]['msg']}") from None


TrainFn = Callable[[Config, Callable[[int, float], None]], float]


def train_trial(ctx: Context, trial_dir: Path) -> TrainFn:
    """The real objective: short trainings on tune.folds, reporting every epoch."""

    def fn(cfg: Config, report: Callable[[int, float], None]) -> float:
        trial_ctx = Context(cfg, ctx.data_dir, ctx.work_dir, ctx.submissions_dir)
        shared: dict = {}
        scores = []
        for i, fold in enumerate(ctx.cfg.tune.folds):
            for exp in trial_ctx.selected_experiments():  # each with its own resolved keys
                exp_ctx = trial_ctx.for_experiment(exp)
                data = exp_ctx.training_data(shared)

                def on_epoch(epoch: int, value: float, i: int = i) -> None:
                    report(i * cfg.train.epochs + epoch, value)

                meta = train_fold(exp_ctx.fold_settings(trial_dir, "tune"), exp.backbone, fold, data,
                                  on_epoch=on_epoch, name=exp.name)
                scores.append(meta["metric"])
        return float(sum(scores) / len(scores))

    return fn


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


HEARTBEAT_S = 10  # a running trial's process writes a heartbeat this often (Optuna's RDB heartbeat)
GRACE_S = 30  # a running trial without a heartbeat for this long belongs to a dead process: failed, and retried


def _storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats (so the trials of a killed worker do not hold budget); processes starting together
    race to create the schema, so the loser retries."""
    given, url = url, _with_driver(url)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental, unchanged since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:  # locked, or the other won
            if attempt == attempts - 1:
                why = " ".join(str(getattr(exc, "orig", exc)).split())[:240]  # the driver's message, on one line
                raise PipelineError(f"tune.storage: cannot open {_safe_url(given)} ({why}); "
                                    "check that the database server is running and the URL is right") from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """A bare `postgresql://` URL with the driver the project installs: SQLAlchemy 2.1 reads it as psycopg 3, which
    is not a dependency; psycopg2-binary is. A URL naming its driver (`postgresql+psycopg://`) is kept."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.drivername != "postgresql" or importlib.util.find_spec("psycopg") is not None:
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _safe_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def study_name(ctx: Context) -> str:
    """<competition>-<key of what the trials read>: the split, the training images' bytes, the config the trials start
    from, the search space and the tune keys but the budget (n_trials, timeout) and the storage. A study continues while
    these stay the same; change one and a new study starts (earlier ones stay in the storage)."""
    cfg, folds = ctx.cfg.tune, read_json(ctx.work_dir / "folds.json", "run `make folds`")
    paths = pd.read_csv(ctx.work_dir / "folds.csv", dtype=str, keep_default_na=False)["path"]
    key = fingerprint("tune", folds["folds_hash"], content_key(paths), ctx.input_channels(), ctx.cfg.competition.metric,
                      ctx.cfg.model.model_dump(),
                      ctx.cfg.train.model_dump(exclude={"folds", "num_workers", "threads", "device"}
                                               | ({"loss"} if ctx.cfg.competition.task == "single_label" else set())),
                      read_yaml(Path(cfg.space)), cfg.model_dump(exclude={"space", "n_trials", "timeout", "storage"}))
    return f"{ctx.name}-{key}"


def open_study(ctx: Context) -> optuna.Study:
    cfg = ctx.cfg.tune
    url = cfg.storage or f"sqlite:///{(ctx.work_dir / 'optuna.db').resolve()}"
    storage = _storage(url)
    direction = "maximize" if tasks.greater_is_better(ctx.cfg.competition.metric) else "minimize"  # every task's
    return optuna.create_study(study_name=study_name(ctx), storage=storage, load_if_exists=True, direction=direction,
                               sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=make_pruner(cfg.pruner))


class TrialFailed(Exception):
    """A trial that failed on its sampled values (diverged, out of memory): recorded as failed, the study goes on.

    Anything else -- a PipelineError (a config problem the user fixes) or a code bug -- stops the
    study with its own message and traceback instead of failing every trial alike.
    """


class OverBudget(Exception):
    """A trial created after the budget was claimed by other workers' trials: recorded as failed, its worker stops."""


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
CLAIMING = (*FINISHED, optuna.trial.TrialState.RUNNING)


def claimed(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """(finished, finished + running) trials, of those numbered below `before` when given. Stale running trials (a
    dead worker's: no heartbeat for GRACE_S) are failed first, so they free their place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 2.9
        optuna.storages.fail_stale_trials(study)
    trials = [t for t in study.get_trials(deepcopy=False, states=CLAIMING) if before is None or t.number < before]
    return sum(t.state in FINISHED for t in trials), len(trials)


def claim(study: optuna.Study, trial: optuna.Trial, n_trials: int, poll_s: float = 0.5) -> bool:
    """Whether `trial` is one of the first `n_trials` trials that can finish; waits while that depends on a running one.

    Optuna's MaxTrialsCallback counts finished trials after each trial, so workers that start trials while others
    run theirs finish up to JOBS - 1 trials too many. Optuna creates trials one at a time (it locks the study's row)
    and numbers them in that order, so the trials numbered below this one are exactly those created before it: when
    n_trials of them are finished or running, this one is surplus -- unless a running one fails (or its worker dies
    and its heartbeat stops), so it waits for them to end.
    """
    while True:
        finished, taken = claimed(study, before=trial.number)
        if taken < n_trials:
            return True
        if finished >= n_trials:
            return False
        time.sleep(poll_s)


class StopWhenClaimed:
    """Stops a worker's study once the finished and running trials of all workers fill the budget (so it does not
    create a trial that `claim` then turns away); a worker whose trial fails goes on and retries it."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if claimed(study)[1] >= self.n_trials:
            study.stop()


def objective(ctx: Context, space: dict, train_fn: TrainFn | None = None) -> Callable[[optuna.Trial], float]:
    def run_trial(trial: optuna.Trial) -> float:
        if not claim(trial.study, trial, ctx.cfg.tune.n_trials):
            trial.study.stop()
            trial.set_user_attr("fail_reason", "over budget: other workers finished tune.n_trials trials first")
            raise OverBudget(f"trial {trial.number}: tune.n_trials reached by other workers")
        params = suggest(trial, space)
        cfg = trial_config(ctx.cfg, params, ctx.cfg.tune.epochs)
        trial_dir = ctx.work_dir / "tune" / "trials" / str(trial.number)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({value:.4f})")

        try:
            value = (train_fn or train_trial(ctx, trial_dir))(cfg, report)
        except (torch.OutOfMemoryError, FloatingPointError) as exc:
            reason = f"{'out of memory' if isinstance(exc, torch.OutOfMemoryError) else 'diverged'}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            log.info(f"tune: trial {trial.number} failed ({reason.splitlines()[0]}) with {json.dumps(params)}")
            raise TrialFailed(reason) from exc
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        log.info(f"tune: trial {trial.number}: {ctx.cfg.competition.metric} {value:.4f} with {json.dumps(params)}")
        return value

    return run_trial


class StopAfterFailures:
    """Stops the study after `limit` failed trials in a row.

    The budget counts finished trials only, so without this a study whose every trial fails (out
    of memory at any setting) would retry forever; a space that fails only in part goes on.
    """

    def __init__(self, limit: int):
        self.limit, self.failed = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failed = self.failed + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if self.failed >= self.limit:
            log.info(f"tune: {self.failed} trials in a row failed; stopping")
            study.stop()


def run(ctx: Context, train_fn: TrainFn | None = None) -> dict:
    """Run (or continue) the study up to tune.n_trials, then write best.yaml, trials.csv and plots.

    Only completed and pruned trials count toward tune.n_trials: failed ones (and ones a killed
    process left running) are retried, so a rerun after a fix still runs the whole budget. A run
    stops after tune.n_trials failed trials in a row, and fails when no trial ever completed.
    """
    cfg = ctx.cfg.tune
    space = load_space(Path(cfg.space))
    check_space(space, ctx.cfg, Path(cfg.space))
    ctx.work_dir.mkdir(parents=True, exist_ok=True)  # the folds it trains on come first (pipeline/orchestrate.py)
    study = open_study(ctx)
    done, taken = claimed(study)
    log.info(f"tune: study '{study.study_name}' has {done} finished trials ({taken - done} running); running up to "
          f"{cfg.n_trials} ({cfg.pruner} pruner, seed {cfg.seed})")
    if done < cfg.n_trials:  # running trials may be a killed worker's: `claim` waits until their heartbeat is stale
        study.optimize(objective(ctx, space, train_fn), timeout=cfg.timeout, catch=(TrialFailed, OverBudget),
                       callbacks=[StopWhenClaimed(cfg.n_trials), StopAfterFailures(cfg.n_trials)])
    return write_results(ctx, study)


def write_results(ctx: Context, study: optuna.Study) -> dict:
    out = ctx.work_dir / "tune"
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    write_csv(out / "trials.csv", frame)
    states = frame["state"].value_counts().to_dict() if len(frame) else {}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = sorted({t.user_attrs["fail_reason"].splitlines()[0][:160] for t in study.trials
                          if "fail_reason" in t.user_attrs})
        why = f"; failures: {' | '.join(reasons)}" if reasons else ""
        raise PipelineError(f"tune: no trial completed ({states}){why}; best.yaml not written")
    best = study.best_trial
    header = (f"# Best of {len(study.trials)} trials (trial {best.number}, "
              f"{ctx.cfg.competition.metric} {best.value:.4f}).\n")
    write_text(out / "best.yaml", header + "# Merged into later stages' config; USE_TUNED=0 ignores it.\n" +
               yaml.safe_dump(as_tree(best.params), sort_keys=True))
    plots = write_plots(study, out)
    log.info(f"tune: trials by state {states}; best trial {best.number}: {best.value:.4f} {json.dumps(best.params)}")
    log.info(f"tune: wrote {out / 'best.yaml'}, {out / 'trials.csv'} and {len(plots)} plots")
    return {"states": states, "best_value": best.value, "best_params": best.params, "plots": plots}


def write_plots(study: optuna.Study, out: Path) -> list[str]:
    """Optuna's matplotlib plots as PNG; a plot that needs more trials is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    for name, fn in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances),
                     ("parallel", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            atomic_write(out / f"{name}.png",
                         lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
            plt.close(fig)
            written.append(f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info(f"tune: {name} plot skipped ({str(exc).splitlines()[0][:80]})")
    return written
