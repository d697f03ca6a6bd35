"""README.md opens with the install+run and the test command, and .ci/run runs exactly those."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_two_readme_commands_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    install_and_run, tests = blocks[0].strip(), blocks[1].strip()
    assert "pip install" in install_and_run and "python train.py" in install_and_run
    assert "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install_and_run in ci and tests in ci
    assert ci.index(install_and_run) < ci.index(tests)
