"""The README's Python example runs as written and does what its comments say."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_example_runs(capsys):
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "ClippingSchedule: clipped phase from epoch 3, learning rate x0.1" in out
    printed = [line for line in out.splitlines() if line and not line.startswith("ClippingSchedule")]
    assert printed[0] == "[0.0, 0.0, 1.0]"
    assert printed[1] == "5"
    assert namespace["history"].history["lr"][2] == namespace["history"].history["lr"][0] * 0.1


def test_readme_own_model_example_runs(capsys):
    text = open(README, encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "make_switchable" in b)
    exec(compile(block, "README.md", "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("ClippingSchedule")]
    promised = re.search(r"print\(report.summary\(\)\)\n# (.*)\n", block).group(1)
    assert printed[0] == promised
    assert printed[1] == "[0.0, 1.0]"
