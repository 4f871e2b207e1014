"""``deformable demo``: argument errors."""

import pytest

from deformable.commands import demo


def test_rejects_bad_epochs(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err
