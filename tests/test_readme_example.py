"""The README's Python API example runs as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = python_example()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 15, f"the README example has {len(lines)} lines of code"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    result, qmodel, test = namespace["result"], namespace["qmodel"], namespace["test"]
    assert result.search.feasible and result.compression_model >= 8.0
    assert result.export["verify"]["agreement"] >= 99.5
    assert (tmp_path / "quantized" / "model.onnx").is_file() and (tmp_path / "quantized" / "summary.json").is_file()
    x, _ = next(iter(test))
    with torch.no_grad():
        assert torch.equal(qmodel(x), result.qmodel(x))


def test_transformer_example_script(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "quantize_transformer.py"
    spec = importlib.util.spec_from_file_location("quantize_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path / "out", samples=768, float_epochs=4)
    assert result.search.feasible and result.export["verify"]["agreement"] >= 99.5
    assert "tokens" in result.qmodel.layer_names
