"""`tinygpt bench finetune`'s flags: a bad case, model or step count is a one-line error, status 2."""
import pytest

from tinygpt.bench import finetune


@pytest.mark.parametrize("argv, message", [
    (["--only", "bogus"], "--only: bogus is not one of"),
    (["--models", "gpt3"], "--models: gpt3 is not one of"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--steps", "-3"], "--steps must be between 1 and 1000")])
def test_bad_flags_are_named(argv, message, capsys):
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
