"""README and docs code blocks run, so they never rot.

Every ```python block of a file runs in order, in one namespace per file, in a temporary
directory. Blocks that talk about "your" model use the names ``model``, ``example_inputs``,
``calibration_data`` and ``batch``; the namespace starts with small real ones (a random-init
torchvision ResNet-18 at 64 px), and a block may define its own.
"""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _python_blocks(path: Path) -> list[str]:
    return PYTHON_BLOCK.findall(path.read_text())


def _user_objects() -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    calibration_data = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    return {"model": model, "example_inputs": (calibration_data[0],), "calibration_data": calibration_data,
            "batch": (torch.randn(4, 3, 64, 64),)}


@pytest.mark.parametrize("path", [p for p in DOCS if _python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _user_objects()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, block in enumerate(_python_blocks(path)):
            try:
                exec(compile(block, f"{path.name}[block {index}]", "exec"), namespace)
            except Exception as error:
                pytest.fail(f"{path.name} python block {index} fails: {type(error).__name__}: {error}\n{block}")


def test_readme_has_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && python -m fxq quantize" in readme
    assert 'pip install -e ".[test]" && python -m pytest -q' in readme
