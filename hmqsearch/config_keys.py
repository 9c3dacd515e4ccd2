"""Command-line overrides checked against the composed configuration before Hydra runs.

Hydra answers a misspelled key with exit status 1 and the advice to write ``+key=value``, which
would silently add the misspelled key; an unknown group option (``model=resnet1000``) gets its
own exit-1 message.  Here both become a :class:`UserError` (exit 2) that names the override and
what is allowed: the closest valid key (``difflib``) or the group's options.  The overrides are
composed with Hydra's compose API, exactly as ``@hydra.main`` will compose them; ``+key=`` and
``++key=`` still add keys on purpose.  Errors of other kinds are left to Hydra.
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
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from hmqsearch.errors import UserError

PLUGIN_HINT = "Hydra's optuna sweeper and submitit launcher come with pip install -e \".[sweeps]\""


def _single_run_overrides(overrides: Sequence[str]) -> list[str] | None:
    """``overrides`` with every enumerable sweep (``a=1,2``, ``range(...)``) narrowed to its first
    value, as one job of the sweep composes it; other sweeps are left out.  None when they do
    not parse (Hydra reports that itself)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None
    single = []
    for text, override in zip(overrides, parsed):
        if not override.is_sweep_override():
            single.append(text)
        elif override.is_choice_sweep() and override.value_type.name != "GLOB_CHOICE_SWEEP" or override.is_range_sweep():
            single.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
    return single


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
    (with the closest valid key) or whose group option does not exist (with the options).

    ``argv`` is the command line after the program name, flags included.  Commands that do not
    compose this configuration (``--help``, ``--info``, another ``--config-path``/``--config-dir``)
    are not checked.
    """
    args, rest = get_args_parser().parse_known_args(list(argv))
    if rest or args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun \
            or args.config_path or args.config_dir:
        return
    overrides = _single_run_overrides(args.overrides)
    if overrides is None:
        return
    name = args.config_name or config_name
    unknown: list[str] = []
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for _ in range(len(overrides) + 1):
            try:
                cfg = compose(name, overrides=overrides, return_hydra_config=True)
                break
            except MissingConfigException as exc:
                raise UserError(_missing_option_message(exc)) from None
            except ConfigCompositionException as exc:
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


def _override_key(text: str) -> str:
    """The key of a ``key=value`` override without its ``+``/``++``/``~`` prefix or ``@package``."""
    return text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
