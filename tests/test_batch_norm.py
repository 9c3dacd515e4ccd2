"""Batch-norm statistics recomputed after the search for the chosen assignment."""

import json

import torch
from torch import nn

from hmqsearch.quant.batch_norm import reestimate_batch_norm
from hmqsearch.quant.prepare import QuantSpec, prepare


def conv_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    qmodel = prepare(net, QuantSpec(weight_bits=[2], act_bits=[8], first_layer_act_bits=None, fold_bn=False),
                     torch.randn(2, 3, 8, 8))
    qmodel.set_state("fixed")
    return qmodel


def test_statistics_are_those_of_the_quantized_layer_output_over_the_batches_and_the_mode_is_kept():
    qmodel = conv_bn()
    bn = qmodel.net[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8), torch.zeros(16)) for _ in range(3)]
    conv = qmodel.net[0]
    with torch.no_grad():
        outputs = [conv(x) for x, _ in batches]  # the 2-bit convolution, as the model now quantizes
        float_mean = torch.cat([nn.functional.conv2d(x, conv.weight, conv.bias) for x, _ in batches]).mean((0, 2, 3))
    qmodel.eval()
    assert reestimate_batch_norm(qmodel, iter(batches + batches), 3) == 3  # only the first 3 batches
    expected_mean = torch.cat(outputs).mean((0, 2, 3))
    expected_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(1) for o in outputs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert not torch.allclose(bn.running_mean, float_mean, atol=1e-3)  # not the float layer's statistics
    assert not qmodel.training


def test_nothing_is_done_without_batch_norm_or_batches():
    qmodel = conv_bn()
    bn = qmodel.net[1]
    bn.running_mean.fill_(5.0)
    assert reestimate_batch_norm(qmodel, iter([torch.randn(4, 3, 8, 8)]), 0) == 0
    assert torch.all(bn.running_mean == 5.0)
    assert reestimate_batch_norm(nn.Linear(2, 2), iter([torch.randn(4, 2)]), 5) == 0


def test_a_run_without_fine_tune_keeps_the_statistics_of_its_assignment(train_run):
    proc, run_dir = train_run("pretrain.epochs=3", "search.epochs=1", "finetune.epochs=0", "logger=csv",
                              "export.enabled=false", "search.fold_bn=false", "search.bn_batches=4")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bn_reestimated_batches"] == 4
    assert summary["quant_top1"] == summary["search_top1"]
    assert "batch-norm statistics re-estimated on 4 training batches" in (run_dir / "train.log").read_text()
    state = torch.load(run_dir / "quantized_state.pt", map_location="cpu")
    assert any(k.endswith("running_mean") for k in state)  # batch norm kept, with the re-estimated statistics
