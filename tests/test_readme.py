"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 256, 2048)


def test_readme_model_example_runs():
    """The second block (a jitted CCGQA LM and generate) continues the first one's namespace."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README has no model example"
    namespace: dict = {}
    setup = "import jax\nfrom flax import nnx\nimport ccajax\n"  # the first block's imports
    exec(compile(setup + blocks[1], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 64, 256)
    assert namespace["out"].tokens.shape == (2, 8)
    assert isinstance(namespace["model"], namespace["ccajax"].TransformerLM)
