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


def test_the_folder_tree_is_the_layering_in_order():
    """The README's tree under "## The folders" names every folder of tinygpt/, bottom floor
    first, in the order tests/test_layers.py's FLOORS gives them."""
    from tests.test_layers import FLOORS
    section = README.split("## The folders", 1)[1].split("\n## ", 1)[0]
    tree = re.search(r"```\n(.*?)```", section, re.S).group(1)
    listed = re.findall(r"^[├└]── (\w+)/", tree, re.M)
    assert listed == sorted(FLOORS, key=lambda f: (FLOORS[f], list(FLOORS).index(f)))
    for folder in listed:                       # and its modules are in the table below it
        modules = sorted(p.name for p in (ROOT / "tinygpt" / folder).glob("*.py")
                         if p.name not in ("__init__.py", "__main__.py"))
        row = re.search(rf"^\| `{folder}/` \| (.*?) \|", section, re.M).group(1)
        assert re.findall(r"`([\w.]+)`", row) == modules, folder
