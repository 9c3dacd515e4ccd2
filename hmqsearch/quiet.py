"""Third-party console notices that mean nothing to a user of hmqsearch, silenced.

* Lightning's tips advertising its own products (litlogger, litmodels) and its note on how it
  counts steps;
* torch's deprecation of ``LeafSpec``, which Lightning (not hmqsearch) still uses.

wandb's own console output (banner, run history and summary) is switched off where the run is
created (:class:`hmqsearch.lit.trainer.WandbLoggers`); its logs stay in the run's ``wandb/`` folder.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_NOTICES = (
    "💡 Tip:",  # advertising LitLogger / LitModelCheckpoint
    "Loading `train_dataloader` to estimate number of stepping batches",
)
TORCH_DEPRECATIONS = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(notice) for notice in LIGHTNING_NOTICES)


def silence_third_party_notices() -> None:
    """Install the filters (idempotent: the filter is added once, ``filterwarnings`` dedupes)."""
    warnings.filterwarnings("ignore", message=TORCH_DEPRECATIONS, category=FutureWarning)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
