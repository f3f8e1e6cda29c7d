"""On/off options: MONAI's bundle CLI passes lowercase words as strings; 'false' must not mean on."""

from __future__ import annotations

import pytest

from ultrarefiner.utils.flags import as_flag


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "yes", "on", "1"])
def test_true_values(value):
    assert as_flag(value) is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "off", "0", ""])
def test_false_values(value):
    assert as_flag(value) is False


def test_unknown_value_names_the_option():
    with pytest.raises(ValueError, match="--quality_gate: expected true or false, got 'maybe'"):
        as_flag("maybe", "quality_gate")
