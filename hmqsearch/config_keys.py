"""Command-line overrides checked against the composed configuration before Hydra runs.

Hydra answers a misspelled key with exit status 1 and the advice to write ``+key=value``, which
would silently add the misspelled key; an unknown group option (``model=resnet1000``) gets its
own exit-1 message.  Here both become a :class:`UserError` (exit 2) that names the override and
what is allowed: the closest valid key (``difflib``) or the group's options.  The overrides are
composed with Hydra's compose API, exactly as ``@hydra.main`` will compose them; ``+key=`` and
``++key=`` still add keys on purpose.  A value of the wrong type for the schema
(:mod:`hmqsearch.config_schema`), which Hydra would refuse with a traceback, is a
:class:`UserError` too, checked for every value of a sweep.  Errors of other kinds are left to
Hydra.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from hmqsearch.config_schema import composition_error_message
from hmqsearch.errors import UserError

PLUGIN_HINT = "Hydra's optuna sweeper and submitit launcher come with pip install -e \".[sweeps]\""


def _single_runs(overrides: Sequence[str]) -> list[list[str]] | None:
    """The overrides of single jobs of a sweep: first every enumerable sweep (``a=1,2``,
    ``range(...)``) at its first value, as the first job composes it, then one job for each
    further value of each choice sweep (the others at their first); other sweeps are left out.
    None when the overrides do not parse (Hydra reports that itself)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None
    values: list[list[str]] = []
    for text, override in zip(overrides, parsed):
        if not override.is_sweep_override():
            values.append([text])
        elif override.is_choice_sweep() and override.value_type.name != "GLOB_CHOICE_SWEEP" or override.is_range_sweep():
            key = override.get_key_element()
            sweep = [f"{key}={v}" for v in override.sweep_string_iterator()]
            values.append(sweep if override.is_choice_sweep() else sweep[:1])
    first = [v[0] for v in values]
    return [first] + [first[:i] + [other] + first[i + 1:] for i, v in enumerate(values) for other in v[1:]]


def _user_error(exc: ConfigCompositionException) -> UserError | None:
    """A missing group option, or a value of the wrong type for the schema, as one line."""
    if isinstance(exc, MissingConfigException):
        return UserError(_missing_option_message(exc))
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__
    return UserError(composition_error_message(cause)) if cause is not None else None


def _check_jobs(name: str, jobs: Sequence[Sequence[str]]) -> None:
    """Compose each job's overrides; raise the :class:`UserError` of the first that fails."""
    for job in jobs:
        try:
            compose(name, overrides=list(job))
        except ConfigCompositionException as exc:
            error = _user_error(exc)
            if error is not None:
                raise error from None


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config container (nodes and leaves)."""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        keys += [path, *_keys(value, path)]
    return keys


def _unknown_key_message(key: str, cfg: DictConfig) -> str:
    """The message for one unknown key: the closest key beside it, else the closest key elsewhere
    in the configuration, else the keys allowed beside it."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    siblings = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    if not parent:
        siblings = [k for k in siblings if k != "hydra"]
    close = difflib.get_close_matches(leaf, siblings, n=1)
    if close:
        return f"unknown setting {key}; did you mean {parent + '.' if parent else ''}{close[0]}?"
    hydra_key = key.split(".", 1)[0] == "hydra"
    elsewhere = [
        k for k in _keys(OmegaConf.to_container(cfg, resolve=False))
        if (k.split(".", 1)[0] == "hydra") == hydra_key and not (parent and k.startswith(parent + "."))
        and not key.startswith(k + ".")
    ]
    close = difflib.get_close_matches(key, elsewhere, n=1, cutoff=0.8)
    if close:
        return f"unknown setting {key}; did you mean {close[0]}?"
    where = f"under {parent}" if parent and siblings else "at the top level"
    if not siblings:
        siblings = sorted(k for k in cfg.keys() if k != "hydra")
    return f"unknown setting {key}; allowed {where}: {', '.join(siblings)}"


def _missing_option_message(exc: MissingConfigException) -> str:
    missing = exc.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    plugin = missing.startswith("hydra/")
    if exc.options is None:
        text = str(exc).splitlines()[0].rstrip(".")
    else:
        close = difflib.get_close_matches(name, exc.options, n=1, cutoff=0.6)
        text = (f"{group}={name} is {'not installed' if plugin else 'not an option'}; allowed: {', '.join(exc.options)}"
                + (f" (did you mean {group}={close[0]}?)" if close else ""))
    return text + (f"; {PLUGIN_HINT}" if plugin else "")


def check_overrides(argv: Sequence[str], config_dir: Path, config_name: str = "train") -> None:
    """Raise a :class:`UserError` naming every override whose key is not in the configuration
    (with the closest valid key), whose group option does not exist (with the options) or
    whose value has the wrong type for the schema (in any job of a sweep).

    ``argv`` is the command line after the program name, flags included.  Commands that do not
    compose this configuration (``--help``, ``--info``, another ``--config-path``/``--config-dir``)
    are not checked.
    """
    args, rest = get_args_parser().parse_known_args(list(argv))
    if rest or args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun \
            or args.config_path or args.config_dir:
        return
    runs = _single_runs(args.overrides)
    if runs is None:
        return
    overrides, *others = runs
    name = args.config_name or config_name
    unknown: list[str] = []
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for _ in range(len(overrides) + 1):
            try:
                cfg = compose(name, overrides=overrides, return_hydra_config=True)
                break
            except ConfigCompositionException as exc:
                error = _user_error(exc)
                if error is not None:
                    raise error from None
                cause = exc.__cause__
                if not isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or not cause.full_key:
                    return  # not a key problem: Hydra reports it when it composes
                key = str(cause.full_key)
                culprits = [o for o in overrides if _override_key(o) and
                            (key == _override_key(o) or key.startswith(_override_key(o) + "."))]
                if not culprits:
                    return
                unknown.append(key)
                overrides = [o for o in overrides if o is not culprits[-1]]
            except Exception:  # noqa: BLE001 - any other composition error is Hydra's to report
                return
        else:
            return
        if unknown:
            raise UserError("; ".join(_unknown_key_message(key, cfg) for key in unknown))
        _check_jobs(name, others)


def _override_key(text: str) -> str:
    """The key of a ``key=value`` override without its ``+``/``++``/``~`` prefix or ``@package``."""
    return text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _logger_options(config_dir: Path) -> list[str]:
    """The ``logger=`` options, the default first."""
    names = sorted(p.stem for p in (Path(config_dir) / "logger").glob("*.yaml"))
    defaults = OmegaConf.load(Path(config_dir) / "train.yaml").get("defaults", [])
    default = next((d.logger for d in defaults if isinstance(d, DictConfig) and "logger" in d), None)
    return sorted(names, key=lambda n: n != default)


def legacy_overrides(argv: Sequence[str], config_dir: Path) -> list[str]:
    """``argv`` with ``logger.kind=X``, how a logger was chosen before the loggers had a
    ``_target_``, read as ``logger=X``; an X that is not a ``logger=`` option is refused."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "logger.kind":
            options = _logger_options(config_dir)
            bad = [v for v in value.split(",") if v not in options]
            if bad:
                raise UserError(f"logger.kind={bad[0]!r}; allowed: {', '.join(options)}")
            arg = f"logger={value}"
        out.append(arg)
    return out
