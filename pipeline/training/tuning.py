"""Optuna machinery of the tune stage: search spaces over config keys, trial configs, the study's storage, the
trial budget shared by several workers, and the objective around a training function.

A search space maps dotted config keys to Optuna distributions; it is checked against the config before a
study starts (every value a trial can draw must make a valid config). A trial's config is the base config with
the sampled keys set. Studies live in an RDB storage with heartbeats (SQLite by default, or any database
SQLAlchemy reaches), so several processes share one and a killed worker's trials do not hold budget; together
they finish exactly `n_trials` completed and pruned trials (see `claim`). Trials that diverge or run out of
memory fail and the study goes on; a config error or a bug stops it with its own message.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
import torch
from pydantic import ValidationError

from pipeline.core.artifacts import atomic_write
from pipeline.core.config import Config, known_keys, read_yaml
from pipeline.core.errors import PipelineError

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


STORAGE_FORMS = "sqlite:///path/to/optuna.db or postgresql://user:password@host:5432/db (null: WORK/optuna.db)"


def check_storage(url: str) -> None:
    """tune.storage is a database URL SQLAlchemy can open: it parses, names a known database and the driver is
    installed. Nothing is connected to (a server that is down is `_storage`'s one line)."""
    try:
        sqlalchemy.create_engine(_with_driver(url)).dispose()
    except sqlalchemy.exc.ArgumentError as exc:  # not a URL, or no such database (NoSuchModuleError)
        shown = re.sub(r":[^:@/]*@", ":***@", url)  # a password, should the URL hold one
        raise PipelineError(f"tune.storage={shown!r}: not a database URL SQLAlchemy can use ({exc}); "
                            f"use {STORAGE_FORMS}") from None
    except ImportError as exc:  # the database's driver is not installed
        raise PipelineError(f"tune.storage: {_safe_url(url)} needs the driver '{exc.name}', which is not installed; "
                            f"install it or use {STORAGE_FORMS}") from None


def _storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats (so the trials of a killed worker do not hold budget); processes starting together
    race to create the schema, so the loser retries."""
    check_storage(url)
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


def open_study(name: str, url: str, greater_is_better: bool, seed: int, pruner: str) -> optuna.Study:
    """The study `name` in the storage at `url`, created on first use (TPE sampler seeded with `seed`)."""
    storage = _storage(url)
    direction = "maximize" if greater_is_better else "minimize"
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=direction,
                               sampler=optuna.samplers.TPESampler(seed=seed), pruner=make_pruner(pruner))


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


def objective(base: Config, space: dict, n_trials: int, epochs: int, trials_dir: Path,
              train_for: Callable[[Path], TrainFn], metric: str) -> Callable[[optuna.Trial], float]:
    """A trial: claim its place in the budget, sample `space`, train `epochs` epochs with the train function
    `train_for(trial_dir)` (its folder under `trials_dir`, removed afterwards), reporting each epoch to the pruner."""

    def run_trial(trial: optuna.Trial) -> float:
        if not claim(trial.study, trial, n_trials):
            trial.study.stop()
            trial.set_user_attr("fail_reason", "over budget: other workers finished tune.n_trials trials first")
            log.info(f"tune: trial {trial.number} not run: other workers finished tune.n_trials trials first")
            raise OverBudget(f"trial {trial.number}: tune.n_trials reached by other workers")
        params = suggest(trial, space)
        cfg = trial_config(base, params, epochs)
        trial_dir = trials_dir / str(trial.number)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({value:.4f})")

        try:
            value = train_for(trial_dir)(cfg, report)
        except (torch.OutOfMemoryError, FloatingPointError) as exc:
            reason = f"{'out of memory' if isinstance(exc, torch.OutOfMemoryError) else 'diverged'}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            log.info(f"tune: trial {trial.number} failed ({reason.splitlines()[0]}) with {json.dumps(params)}")
            raise TrialFailed(reason) from exc
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        log.info(f"tune: trial {trial.number}: {metric} {value:.4f} with {json.dumps(params)}")
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


def optimize(study: optuna.Study, run_trial: Callable[[optuna.Trial], float], n_trials: int,
             timeout: float | None) -> None:
    """Run trials until the finished ones of all workers fill `n_trials`, `n_trials` trials in a row failed, or
    `timeout` seconds passed. Failed and over-budget trials are recorded and the study goes on."""
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna warns of each failed trial
    caught = _CaughtTrials()
    optuna_log.addFilter(caught)
    try:
        study.optimize(run_trial, timeout=timeout, catch=(TrialFailed, OverBudget),
                       callbacks=[StopWhenClaimed(n_trials), StopAfterFailures(n_trials)])
    finally:
        optuna_log.removeFilter(caught)


class _CaughtTrials(logging.Filter):
    """Drops Optuna's two warnings for a trial that ended in a caught exception ("Trial N failed with parameters ...",
    with the whole chained traceback, then "Trial N failed with value None."): they repeat what `objective` already
    said in one line, the reason and the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.caught: set[str] = set()  # numbers of the trials whose first warning was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        number = re.match(r"Trial (\d+) failed", record.getMessage())
        if isinstance(exc, (TrialFailed, OverBudget)):
            self.caught.add(number[1] if number else "")
            return False
        return not (number and number[1] in self.caught)


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
