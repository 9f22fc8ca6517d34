"""Profile YAML loading and validation: one-line errors naming the key and the value."""

from __future__ import annotations

import pytest

from kvchat.errors import ProfileError
from kvchat.profiles import load_profile, shipped_names


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_profiles_load():
    names = shipped_names()
    assert {"full", "window"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.summary


@pytest.mark.parametrize("body, message", [
    ("methods:\n  - window: {recent: -5}\n", "window.recent must be >= 1, got -5"),
    ("methods:\n  - window: {sink: 2.5}\n", "window.sink must be an integer, got 2.5"),
    ("methods:\n  - window: {recnet: 5}\n", "unknown key window.recnet; window accepts sink, recent"),
    ("methods:\n  - nosuch: {}\n", "unknown method 'nosuch'"),
    ("methods: window\n", "'methods' must be a list"),
    ("nme: x\n", "unknown key 'nme'"),
    ("methods: [\n", "invalid YAML"),
])
def test_bad_profiles_give_one_line_errors(tmp_path, body, message):
    with pytest.raises(ProfileError) as e:
        load_profile(write(tmp_path, body))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_name_lists_shipped():
    with pytest.raises(ProfileError, match="unknown profile 'pyramidd'; shipped profiles: .*full"):
        load_profile("pyramidd")
