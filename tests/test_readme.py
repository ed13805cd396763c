"""The README's autograd example prints exactly what its comments say, and its set-up commands
are the ones .ci/run uses."""
import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _python_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_autograd_example_prints_its_comments():
    code = _python_block_after("## Autograd in ten lines")
    expected = [line.split("#", 1)[1].strip() for line in code.splitlines()
                if line.startswith("print(")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert [" ".join(line.split()) for line in out.getvalue().splitlines()] == \
           [" ".join(e.split()) for e in expected]


def test_ci_runs_the_readme_commands():
    setup = re.search(r"## Set up\n\n```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(setup) == 2, "the README holds exactly two set-up commands"
    install, tests = setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install' in install and '-e ".[test]"' in ci and '-e ".[test]"' in install
    assert tests.strip() in ci.replace(" -q -p no:cacheprovider", "")
