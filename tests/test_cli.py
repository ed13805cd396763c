"""The command line as a whole: the gradcheck command, unknown flags, one-line errors."""
import numpy as np
import pytest

from tinygpt.commands import cli
from tinygpt.autograd import ops


@pytest.mark.slow
def test_gradcheck_command_passes_every_op(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    n = len(cli._gradcheck_cases(np.random.default_rng(0)))
    assert f"{n} passed, 0 failed" in out
    assert "causal_attention" in out and "cross_entropy" in out


def test_gradcheck_command_fails_on_a_wrong_backward(capsys, monkeypatch):
    def wrong_tanh_backward(ctx, dy):          # should be dy * (1 - y^2)
        (y,) = ctx.saved
        return (dy * (1 - y),)

    monkeypatch.setattr(ops.Tanh, "backward", staticmethod(wrong_tanh_backward))
    assert cli.main(["gradcheck"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  tanh" in out and "1 failed" in out


def test_misspelled_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["gradcheck", "--seeed", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --seeed" in capsys.readouterr().err
