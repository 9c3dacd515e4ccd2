"""Non-finite guard: training stops at the first NaN/inf loss or gradient with a message naming
the step and the layer, and the last good checkpoint stays."""

from collections import OrderedDict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hmqsearch.errors import RunHalted
from hmqsearch.lit.trainer import make_trainer

BAD_STEP = 3
CONF = Path(__file__).resolve().parents[1] / "conf"


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs())  # infinite derivative at 0


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4, bias=False), root=Sqrt(), fc2=nn.Linear(4, 2)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(bad: str) -> DataLoader:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) + 3.0
    rows = slice(2 * BAD_STEP, 2 * BAD_STEP + 2)  # batch BAD_STEP (batches of 2)
    x[rows] = float("nan") if bad == "loss" else 0.0  # zero input: fc1 outputs 0, sqrt' = inf
    return DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=2)


@pytest.mark.parametrize("bad,what,layer", [("loss", "non-finite loss (nan)", "fc1"), ("gradient", "non-finite gradient (parameter model.fc1.weight)", "fc1")])
def test_nonfinite_stops_naming_step_and_layer_and_keeps_last_good_checkpoint(tmp_path, bad, what, layer):
    trainer_cfg = OmegaConf.merge(OmegaConf.load(CONF / "trainer" / "default.yaml"), {"accelerator": "cpu", "log_every_n_steps": 1})
    callbacks_cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "callbacks" / "default.yaml"), {"progress_bar": False, "checkpoint_every_n_steps": 2}
    )
    trainer = make_trainer(trainer_cfg, callbacks_cfg, "toy", tmp_path, False, 1, None)
    with pytest.raises(RunHalted) as halted:
        trainer.fit(Tiny(), train_dataloaders=_loader(bad))
    message = str(halted.value)
    assert f"{what}" in message and f"at toy step {BAD_STEP} (epoch 0) in layer {layer}" in message, message
    last = tmp_path / "checkpoints" / "toy" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_stopped_message_names_only_checkpoints_that_exist(tmp_path):
    """A stage stopped at its first step has written nothing: the message must not point into
    its empty (or absent) folder, but at the earlier stages' files, or say there are none."""
    from hmqsearch.lit.guards import kept_checkpoints

    stage = tmp_path / "checkpoints" / "search"
    assert kept_checkpoints(stage) == "no checkpoint was written yet"
    pretrain = tmp_path / "checkpoints" / "pretrain"
    pretrain.mkdir(parents=True)
    (pretrain / "best.ckpt").write_bytes(b"x")
    message = kept_checkpoints(stage)
    assert str(pretrain / "best.ckpt") in message and str(stage) not in message, message
    stage.mkdir()
    (stage / "last.ckpt").write_bytes(b"x")
    assert kept_checkpoints(stage) == f"the last good checkpoint is kept: {stage / 'last.ckpt'}"
