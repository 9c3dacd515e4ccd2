"""The configuration's schema and the `_target_` nodes of trainer, loggers and callbacks."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

from conftest import CONF, compose_train
from hmqsearch.settings import Each, Number, OneOf
from hmqsearch.config_keys import check_overrides, legacy_overrides
from hmqsearch.config_schema import RULES, check_config
from hmqsearch.errors import UserError
from hmqsearch.lit.checkpointing import CheckpointOnSigterm, RngState
from hmqsearch.lit.guards import NonFiniteGuard
from hmqsearch.lit.trainer import CSVLoggers, RunLoggers, WandbLoggers, run_loggers, stage_callbacks


def _refused(rule) -> object:
    """A value ``rule`` refuses."""
    if isinstance(rule, OneOf):
        return "bogus"
    if isinstance(rule, Each):
        return ["bogus"]
    assert isinstance(rule, Number)
    return -1 if rule.low is not None else 0.5 if rule.integer else "x"


def test_every_checked_setting_is_refused_with_its_key_and_what_is_allowed():
    cfg = compose_train()
    check_config(cfg)  # the defaults pass
    for key, rule in RULES.items():
        node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        OmegaConf.update(node, key, _refused(rule), force_add=True)
        with pytest.raises(UserError) as refused:
            check_config(node)
        assert str(refused.value).startswith(f"{key}=") and "allowed" in str(refused.value), (key, refused.value)


def test_group_defaults_live_in_the_schema_only():
    """The default options of the typed groups hold no values: the schema has them."""
    for group in ("search", "budget", "export"):
        assert not OmegaConf.load(CONF / group / "default.yaml"), group
    cfg = compose_train()
    assert cfg.search.epochs == 20 and cfg.budget.weight_compression == 8 and cfg.export.form == "onnxruntime"
    assert isinstance(cfg.budget.weight_compression, int)  # numbers stay as written (8, not 8.0)


@pytest.mark.parametrize("argv,message", [
    (["search.fold_bn=maybe"], "search.fold_bn='maybe'; allowed: true or false"),
    (["search.epochs=2.5"], "search.epochs=2.5; allowed: an integer >= 0"),
    (["search.weight_bits=[2,x]"], "search.weight_bits[1]='x'; allowed: an integer"),
    (["search.ramp=3"], "search.ramp=3; allowed: its settings (steps, until, tau_restart)"),
    (["-m", "search.lr=0.1,abc"], "search.lr='abc'; allowed: a positive number"),  # every value of a sweep
])
def test_type_errors_are_one_line_before_hydra_runs(argv, message):
    GlobalHydra.instance().clear()
    with pytest.raises(UserError) as refused:
        check_overrides(argv, CONF)
    assert str(refused.value) == message


def test_logger_kind_reads_as_the_logger_group():
    assert legacy_overrides(["train.py", "logger.kind=csv", "seed=1"], CONF) == ["train.py", "logger=csv", "seed=1"]
    with pytest.raises(UserError, match=r"logger.kind='tensorboard'; allowed: wandb, csv, none"):
        legacy_overrides(["logger.kind=tensorboard"], CONF)


@pytest.mark.parametrize("logger,cls", [("csv", CSVLoggers), ("none", RunLoggers), ("wandb", WandbLoggers)])
def test_loggers_are_built_from_their_target(tmp_path, logger, cls):
    loggers = run_loggers(compose_train(f"logger={logger}").logger, tmp_path, {})
    assert type(loggers) is cls
    if cls is WandbLoggers:
        assert loggers.offline and loggers.project == "hmqsearch"
    if cls is RunLoggers:
        assert loggers.for_stage("search") is False


def test_callbacks_of_a_stage(tmp_path):
    cfg = compose_train()
    callbacks = stage_callbacks(cfg.callbacks, "finetune", tmp_path, "val/acc")
    kinds = [type(c) for c in callbacks]
    assert kinds == [ModelCheckpoint, RngState, CheckpointOnSigterm, NonFiniteGuard, ModelCheckpoint, RichProgressBar]
    best, step = callbacks[0], callbacks[4]
    assert best.dirpath == str(tmp_path) and best.monitor == "val/acc" and best.filename == "best"
    assert step._every_n_train_steps == 100 and callbacks[3].stage == "finetune"

    quiet = compose_train("callbacks.progress_bar=false", "callbacks.checkpoint_every_n_steps=0")
    callbacks = stage_callbacks(quiet.callbacks, "search", tmp_path, None)
    assert [type(c) for c in callbacks] == [ModelCheckpoint, RngState, CheckpointOnSigterm, NonFiniteGuard]
    assert callbacks[0].monitor is None and callbacks[0].filename == "epoch{epoch}"
