"""The README's set-up commands are the ones that work: CI runs the test one."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_command = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_command) == 1
    readme = (REPO / "README.md").read_text()
    assert ci_command[0] in readme
    assert "prism up" in readme
