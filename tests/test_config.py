"""Configuration: the example parses, every key is known, and every error names its key and file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from blurd import config
from blurd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def _watch(tmp_path: Path, extra: str = "") -> str:
    return f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/out"\n{extra}\n'


def test_example_config_parses_and_covers_every_key(tmp_path: Path) -> None:
    """config.example.toml is valid and shows every key the parser accepts."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    text = (ROOT / "config.example.toml").read_text()
    line = '# secret_id_file = "/etc/blurd/blurit_secret_id"'
    assert line in text  # commented out: the service user cannot read a root-only file
    text = text.replace(line, f'secret_id_file = "{secret}"')
    cfg = config.parse(tomllib.loads(text), {}, source="example")
    assert cfg.daemon.engine == "local"
    assert cfg.blurit.secret_id == "s3cret"
    raw = tomllib.loads(text)
    assert set(raw["daemon"]) == {
        "engine", "database", "max_uploads", "max_in_flight", "metrics", "log_file", "node_id",
        "lease_seconds", "retention_days",
    }
    assert set(raw["blurit"]) >= {"url", "client_id"}
    assert set(raw["local"]) == {"plate_model"}
    w = raw["watch"][0]
    for key in ("path", "output", "recursive", "faces", "plates", "detections", "style",
                "color", "pixels", "padding", "area", "originals", "archive",
                "settle_seconds", "polling"):  # fmt: skip
        assert key in w, key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[daemon]\nspeed = 3\n", "daemon.speed"),
        ('[daemon]\nmax_uploads = "2"\n', "daemon.max_uploads"),
        ("[daemon]\nmax_uploads = true\n", "daemon.max_uploads"),
        ('[daemon]\nengine = "gpu"\n', "daemon.engine"),
        ("[daemon]\nlease_seconds = 0\n", "daemon.lease_seconds"),
            ("[daemon]\nnode_id = \"a b\"\n", "daemon.node_id"),
        ('[blurit]\nurl = "ftp://x"\n', "blurit.url"),
        ('[daemon]\nmetrics = "9464"\n', "daemon.metrics"),
        ('[daemon]\nlog_file = 3\n', "daemon.log_file"),
        ("[nope]\n", "nope"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    """A wrong or unknown key is an error whose one line names the key and the file."""
    p = _write(tmp_path, text + _watch(tmp_path))
    with pytest.raises(ConfigError) as err:
        config.load(p, {})
    assert key in str(err.value) and str(p) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('style = "smudge"', "watch[0].style"),
        ('color = "red"', "watch[0].color"),
        ("pixels = 0", "watch[0].pixels"),
        ('originals = "move"', "watch[0].archive"),
        ("area = { left = 0.5, right = 0.2 }", "watch[0].area"),
        ("area = { left = -0.1 }", "watch[0].area.left"),
        ('polling = "sometimes"', "watch[0].polling"),
        ("settle = 3", "watch[0].settle"),
    ],
)
def test_watch_errors_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    """Bad watch values are rejected with the watch's key in the message."""
    p = _write(tmp_path, _watch(tmp_path, extra))
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config.load(p, {})


def test_output_inside_watch_folder_is_refused(tmp_path: Path) -> None:
    """An output folder inside its watch folder would be watched: refused, naming the key."""
    text = f'[[watch]]\npath = "{tmp_path}/in"\noutput = "{tmp_path}/in/out"\n'
    with pytest.raises(ConfigError, match=r"watch\[0\]\.output"):
        config.load(_write(tmp_path, text), {})


def test_no_file_needed_with_inbox_and_outbox(tmp_path: Path) -> None:
    """`blurd run --inbox D --outbox D` works without a file; the database goes to XDG state."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    cfg = config.load(None, env, inbox=str(tmp_path / "in"), outbox=str(tmp_path / "out"))
    assert cfg.watches[0].path == tmp_path / "in"
    assert cfg.daemon.database == f"sqlite:///{tmp_path}/state/blurd/blurd.db"
    assert cfg.engine_choice()[0] == "local"
    sd = config.load(None, {"STATE_DIRECTORY": "/var/lib/blurd"}, inbox="/a", outbox="/b")
    assert sd.daemon.database == "sqlite:////var/lib/blurd/blurd.db"


def test_engine_follows_credentials_and_explicit_blurit_needs_them(tmp_path: Path) -> None:
    """With credentials the engine is BlurIt; engine = "blurit" without them refuses to start."""
    env = {"BLURIT_CLIENT_ID": "c", "BLURIT_SECRET_ID": "s"}
    cfg = config.load(None, env, inbox="/a", outbox="/b")
    assert cfg.engine_choice() == ("blurit", "BlurIt credentials are configured")
    p = _write(tmp_path, '[daemon]\nengine = "blurit"\n' + _watch(tmp_path))
    with pytest.raises(ConfigError, match=r"daemon\.engine"):
        config.load(p, {})


def test_secret_sources_in_order(tmp_path: Path) -> None:
    """secret_id, then secret_id_file, then $BLURIT_SECRET_ID, then the systemd credential."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "blurit_secret_id").write_text("from-cred\n")
    env = {"BLURIT_CLIENT_ID": "c", "CREDENTIALS_DIRECTORY": str(creds)}
    cfg = config.load(None, env, inbox="/a", outbox="/b")
    assert cfg.blurit.secret_id == "from-cred"
    cfg = config.load(None, {**env, "BLURIT_SECRET_ID": "from-env"}, inbox="/a", outbox="/b")
    assert cfg.blurit.secret_id == "from-env"
    (tmp_path / "sf").write_text("from-file\n")
    p = _write(tmp_path, f'[blurit]\nsecret_id_file = "{tmp_path}/sf"\n' + _watch(tmp_path))
    assert config.load(p, env).blurit.secret_id == "from-file"
    p = _write(tmp_path, '[blurit]\nsecret_id = "inline"\n' + _watch(tmp_path))
    assert config.load(p, env).blurit.secret_id == "inline"
    assert "inline" not in repr(config.load(p, env))


def test_world_readable_secret_gives_a_warning(tmp_path: Path) -> None:
    """A config holding secret_id that others can read is accepted with a warning."""
    p = _write(tmp_path, '[blurit]\nsecret_id = "x"\n' + _watch(tmp_path))
    assert config.load(p, {}).warnings == ()
    os.chmod(p, 0o644)
    (warning,) = config.load(p, {}).warnings
    assert str(p) in warning and "chmod 600" in warning


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML gives one line naming the file."""
    p = _write(tmp_path, "[daemon\n")
    with pytest.raises(ConfigError, match=str(p)):
        config.load(p, {})


def _watches(tmp_path: Path, *tables: dict[str, str]) -> str:
    """[[watch]] tables whose folders are given relative to tmp_path."""
    out = []
    for t in tables:
        out.append("[[watch]]\n" + "".join(f'{k} = "{tmp_path / v}"\n' for k, v in t.items()))
    return "".join(out)


@pytest.mark.parametrize(
    ("tables", "key"),
    [
        ([{"path": "a", "output": "o1"}, {"path": "a/sub", "output": "o2"}], "watch[1].path"),
        ([{"path": "a/sub", "output": "o1"}, {"path": "a", "output": "o2"}], "watch[1].path"),
        ([{"path": "a", "output": "o1"}, {"path": "a", "output": "o2"}], "watch[1].path"),
        ([{"path": "a", "output": "b/out"}, {"path": "b", "output": "o2"}], "watch[0].output"),
        ([{"path": "a", "output": "b"}, {"path": "b", "output": "o2"}], "watch[0].output"),
        (
            [{"path": "a", "output": "o1"}, {"path": "b", "output": "o2", "archive": "a/x"}],
            "watch[1].archive",
        ),
        ([{"path": "a", "output": "o1", "archive": "o1"}], "watch[0].archive"),
        ([{"path": "a", "output": "o1", "archive": "o1/originals"}], "watch[0].archive"),
        (
            [{"path": "a", "output": "o1"}, {"path": "b", "output": "o2", "archive": "o1"}],
            "watch[1].archive",
        ),
        ([{"path": "a", "output": "o1"}, {"path": "o1/in", "output": "o2"}], "watch[1].path"),
    ],
)
def test_unsafe_layouts_are_refused(tmp_path: Path, tables: list[dict[str, str]], key: str) -> None:
    """Nested watch folders, an output or archive inside any watch folder, an archive that is
    (or holds) an output, and a watch folder inside an output: refused, naming key and file."""
    p = _write(tmp_path, _watches(tmp_path, *tables))
    with pytest.raises(ConfigError) as err:
        config.load(p, {})
    assert str(err.value).startswith(f"{p}: {key}: ")


def test_layouts_are_judged_on_resolved_paths(tmp_path: Path) -> None:
    """A watch folder reached through a symlink whose output sits in the real folder is
    refused, and so is a second watch of the same folder through a link; the message shows
    the resolved path."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    p = _write(tmp_path, _watches(tmp_path, {"path": "link", "output": "real/out"}))
    with pytest.raises(ConfigError, match=r"watch\[0\]\.output: .* inside its own watch folder"):
        config.load(p, {})
    both = _watches(tmp_path, {"path": "real", "output": "o1"}, {"path": "link", "output": "o2"})
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, both), {})
    assert "watch[1].path" in str(err.value)
    assert f"resolved: {tmp_path / 'real'}" in str(err.value)
    os.symlink(tmp_path / "real" / "out", tmp_path / "outlink")
    hidden = _watches(tmp_path, {"path": "real", "output": "outlink"})
    with pytest.raises(ConfigError, match=r"watch\[0\]\.output"):
        config.load(_write(tmp_path, hidden), {})


def test_inbox_outbox_layout_errors_name_the_options(tmp_path: Path) -> None:
    """--inbox/--outbox beside a [[watch]] are checked too, and the error names the options."""
    p = _write(tmp_path, _watches(tmp_path, {"path": "a", "output": "o1"}))
    with pytest.raises(ConfigError, match=r"--inbox/--outbox\.output"):
        config.load(p, {}, inbox=str(tmp_path / "b"), outbox=str(tmp_path / "a" / "out"))


def test_safe_layouts_with_symlinks_are_accepted(tmp_path: Path) -> None:
    """Sibling folders, some reached through symlinks, and shared outputs are fine."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    text = _watches(
        tmp_path,
        {"path": "link/in", "output": "out", "archive": "archive"},
        {"path": "b", "output": "out"},
    )
    cfg = config.load(_write(tmp_path, text), {})
    assert [w.path for w in cfg.watches] == [tmp_path / "link" / "in", tmp_path / "b"]
