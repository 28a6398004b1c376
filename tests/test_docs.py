"""The README stays honest: every test it cites exists, and every config key is documented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_cited_test_exists() -> None:
    """`tests/x.py::name` in the README names a test that is really there: a function, or a
    test case class (a Hypothesis state machine's is assigned)."""
    cited = re.findall(r"`?(tests/[\w/]+\.py)(?:::(\w+))?", README)
    assert len(cited) > 20
    for path, name in cited:
        source = (ROOT / path).read_text()
        if name:
            forms = (f"def {name}(", f"class {name}(", f"\n{name} = ")
            assert any(f in source for f in forms), f"{path}::{name} is cited but does not exist"
    for path, group in re.findall(r"`(tests/[\w/]+\.py)` \(([^)]*)\)", README):
        source = (ROOT / path).read_text()
        for name in re.findall(r"`(test_\w+)`", group):
            assert f"def {name}(" in source, f"{path}::{name} is cited but does not exist"


def test_every_config_key_is_in_the_readme() -> None:
    """Each key of config.example.toml has a row in the README's configuration table."""
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    for section in ("daemon", "blurit", "local"):
        for key in example[section]:
            if key == "secret_id_file":
                assert "secret_id_file" in README
                continue
            assert f"`{section}.{key}`" in README, f"{section}.{key} is not documented"
    for key in example["watch"][0]:
        assert f"`watch.{key}`" in README, f"watch.{key} is not documented"
