"""TOML configuration -> frozen, validated dataclasses (DESIGN.md section 4).

Every error names the file and the key. Secrets are resolved here, once, and never logged.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blurd import defaults, layout
from blurd.errors import ConfigError
from blurd.metadata.policy import Policy
from blurd.options import STYLES, Area, Options

SYSTEM_CONFIG = Path("/etc/blurd/config.toml")
ENGINES = ("blurit", "local")
ORIGINALS = ("keep", "move", "delete")
METADATA = tuple(p.value for p in Policy)
CREDENTIAL_NAME = "blurit_secret_id"
_HEX_COLOR = re.compile(r"^#?[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class DaemonConfig:
    engine: str | None = None  # None: chosen by credentials (see Config.engine_choice)
    database: str = ""  # SQLAlchemy URL; "" = the default state folder
    max_uploads: int = defaults.MAX_UPLOADS
    max_in_flight: int = defaults.MAX_IN_FLIGHT
    metrics: str = ""  # "HOST:PORT" serves Prometheus text; "" is off
    log_file: str = ""  # with `run --detach`; "" = blurd.log beside the default database
    node_id: str = ""  # this daemon's name among those sharing a database; "" = the host name
    lease_seconds: float = defaults.LEASE_S
    retention_days: float = defaults.RETENTION_DAYS  # finished jobs older than this are pruned


@dataclass(frozen=True)
class BlurItConfig:
    url: str = defaults.BLURIT_URL
    client_id: str = ""
    secret_id: str = field(default="", repr=False)
    secret_source: str = ""  # where the secret came from, for `check` and logs

    @property
    def has_credentials(self) -> bool:
        return bool(self.client_id and self.secret_id)


@dataclass(frozen=True)
class LocalConfig:
    plate_model: str = ""  # optional ONNX plate detector supplied by the user


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    output: Path
    recursive: bool = True
    options: Options = field(default_factory=Options)
    originals: str = "keep"
    archive: Path | None = None
    settle_s: float = defaults.SETTLE_S
    polling: bool | None = None  # None = auto

    @property
    def name(self) -> str:
        """The watch's identity in the jobs table: its folder."""
        return str(self.path)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    blurit: BlurItConfig
    watches: tuple[WatchConfig, ...]
    local: LocalConfig = field(default_factory=LocalConfig)
    source: str = "(command line)"
    warnings: tuple[str, ...] = ()

    def engine_choice(self) -> tuple[str, str]:
        """The engine to run and why, in one sentence."""
        if self.daemon.engine:
            return self.daemon.engine, f"engine = {self.daemon.engine!r} in {self.source}"
        if self.blurit.has_credentials:
            return "blurit", "BlurIt credentials are configured"
        return "local", "no BlurIt credentials are configured"


# ---------------------------------------------------------------------------- reading


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """--config, then $BLURD_CONFIG, then /etc/blurd/config.toml (only if it exists)."""
    if explicit:
        return Path(explicit)
    if env.get("BLURD_CONFIG"):
        return Path(env["BLURD_CONFIG"])
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return None


def load(
    path: Path | None,
    env: Mapping[str, str],
    *,
    inbox: str | None = None,
    outbox: str | None = None,
    require_watches: bool = True,
) -> Config:
    """Read and validate the configuration; --inbox/--outbox add (or make) a watch."""
    raw: dict[str, Any] = {}
    source = "(command line)"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config file not found", file=source) from None
        except PermissionError:
            raise ConfigError("config file is not readable", file=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML ({exc})", file=source) from exc
    return parse(
        raw,
        env,
        source=source,
        inbox=inbox,
        outbox=outbox,
        path=path,
        require_watches=require_watches,
    )


def parse(
    raw: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    source: str = "(command line)",
    inbox: str | None = None,
    outbox: str | None = None,
    path: Path | None = None,
    require_watches: bool = True,
) -> Config:
    r = _Reader(source)
    r.no_unknown(raw, "", {"daemon", "blurit", "local", "watch"})
    daemon = _daemon(r, r.table(raw, "daemon"), env)
    blurit, warnings = _blurit(r, r.table(raw, "blurit"), env, path)
    watch_items = raw.get("watch", [])
    if not isinstance(watch_items, list):
        raise r.error("watch", "must be an array of tables: write [[watch]]")
    named = [(f"watch[{i}]", item) for i, item in enumerate(watch_items)]
    if inbox or outbox:
        if not (inbox and outbox):
            raise ConfigError("--inbox and --outbox go together", key="--inbox/--outbox")
        named.append(("--inbox/--outbox", {"path": inbox, "output": outbox}))
    watches = [_watch(r, item, label) for label, item in named]
    if not watches and require_watches:
        raise r.error("watch", "no folder to watch: add a [[watch]] table or use --inbox/--outbox")
    pairs = zip(named, watches, strict=True)
    folders = [layout.Folders(n, w.path, w.output, w.archive) for (n, _), w in pairs]
    layout.check_layout(folders, source)
    if daemon.engine == "blurit" and not blurit.has_credentials:
        raise r.error(
            "daemon.engine",
            "is 'blurit' but no BlurIt credentials were found: set blurit.client_id and "
            "blurit.secret_id (or $BLURIT_CLIENT_ID / $BLURIT_SECRET_ID)",
        )
    local = _local(r, r.table(raw, "local"))
    return Config(daemon, blurit, tuple(watches), local, source, tuple(warnings))


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` or ``"0.0.0.0:9464"`` -> (host, port).

    The host is required: metrics are off unless the admin says where to listen.
    """
    host, sep, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(
            f"must be HOST:PORT such as '127.0.0.1:9464' (or '' for off), not {address!r}",
            key="daemon.metrics",
        )
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"port {port} is out of range", key="daemon.metrics")
    return host, port


# ---------------------------------------------------------------------------- sections


def _daemon(r: _Reader, t: Mapping[str, Any], env: Mapping[str, str]) -> DaemonConfig:
    r.no_unknown(
        t,
        "daemon",
        {"engine", "database", "max_uploads", "max_in_flight", "metrics", "log_file", "node_id",
         "lease_seconds", "retention_days"},
    )  # fmt: skip
    engine = r.get(t, "daemon", "engine", str, None)
    if engine is not None and engine not in ENGINES:
        raise r.error("daemon.engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
    database = r.get(t, "daemon", "database", str, "")
    url = layout.database_url(database) if database else layout.default_database_url(env)
    max_uploads = r.get(t, "daemon", "max_uploads", int, defaults.MAX_UPLOADS)
    max_in_flight = r.get(t, "daemon", "max_in_flight", int, defaults.MAX_IN_FLIGHT)
    if max_uploads < 1:
        raise r.error("daemon.max_uploads", "must be at least 1")
    if max_in_flight < 1:
        raise r.error("daemon.max_in_flight", "must be at least 1")
    metrics = r.get(t, "daemon", "metrics", str, "")
    if metrics:
        try:
            parse_address(metrics)
        except ConfigError as exc:
            raise r.error("daemon.metrics", str(exc).split(": ", 1)[-1]) from None
    log_file = r.get(t, "daemon", "log_file", str, "")
    node_id = r.get(t, "daemon", "node_id", str, "")
    if len(node_id) > 200 or any(c.isspace() or not c.isprintable() for c in node_id):
        raise r.error("daemon.node_id", "must be at most 200 printable characters, no spaces")
    lease = r.get(t, "daemon", "lease_seconds", float, defaults.LEASE_S)
    if not 1.0 <= lease <= 86400.0:
        raise r.error("daemon.lease_seconds", f"must be between 1 and 86400, not {lease}")
    retention = r.get(t, "daemon", "retention_days", float, defaults.RETENTION_DAYS)
    if not 1 <= retention <= 36500:
        raise r.error("daemon.retention_days", f"must be between 1 and 36500, not {retention}")
    return DaemonConfig(engine, url, max_uploads, max_in_flight, metrics, log_file, node_id, lease,
                        retention)  # fmt: skip


def _local(r: _Reader, t: Mapping[str, Any]) -> LocalConfig:
    r.no_unknown(t, "local", {"plate_model"})
    plate_model = r.get(t, "local", "plate_model", str, "")
    if plate_model and not Path(plate_model).expanduser().is_file():
        raise r.error("local.plate_model", f"{plate_model} is not a file")
    return LocalConfig(plate_model=plate_model)


def _blurit(
    r: _Reader, t: Mapping[str, Any], env: Mapping[str, str], path: Path | None
) -> tuple[BlurItConfig, list[str]]:
    r.no_unknown(t, "blurit", {"url", "client_id", "secret_id", "secret_id_file"})
    warnings: list[str] = []
    url = r.get(t, "blurit", "url", str, defaults.BLURIT_URL).rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise r.error("blurit.url", f"must start with https:// (got {url!r})")
    client_id = r.get(t, "blurit", "client_id", str, "") or env.get("BLURIT_CLIENT_ID", "")
    secret, source = r.get(t, "blurit", "secret_id", str, ""), "blurit.secret_id"
    if secret and path is not None and layout.readable_by_others(path):
        warnings.append(
            f"{path} holds blurit.secret_id and is readable by other users: "
            f"chmod 600 it, or use secret_id_file or a systemd credential"
        )
    secret_file = r.get(t, "blurit", "secret_id_file", str, "")
    if not secret and secret_file:
        try:
            secret = Path(secret_file).expanduser().read_text().strip()
        except OSError as exc:
            raise r.error("blurit.secret_id_file", f"cannot read {secret_file}: {exc}") from exc
        source = f"blurit.secret_id_file ({secret_file})"
    if not secret and env.get("BLURIT_SECRET_ID"):
        secret, source = env["BLURIT_SECRET_ID"], "$BLURIT_SECRET_ID"
    if not secret and env.get("CREDENTIALS_DIRECTORY"):
        cred = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if cred.is_file():
            secret, source = cred.read_text().strip(), f"systemd credential {CREDENTIAL_NAME}"
    if not secret:
        source = ""
    return BlurItConfig(url, client_id, secret, source), warnings


def _watch(r: _Reader, t: Any, where: str) -> WatchConfig:
    if not isinstance(t, Mapping):
        raise r.error(where, "must be a table")
    known = {
        "path", "output", "recursive", "faces", "plates", "detections", "style", "color",
        "pixels", "padding", "area", "originals", "archive", "settle_seconds", "polling",
        "metadata",
    }  # fmt: skip
    r.no_unknown(t, where, known)
    if "path" not in t:
        raise r.error(f"{where}.path", "is required")
    if "output" not in t:
        raise r.error(f"{where}.output", "is required")
    path = layout.absolute(r.get(t, where, "path", str, ""))
    output = layout.absolute(r.get(t, where, "output", str, ""))
    style = r.get(t, where, "style", str, "blur")
    if style not in STYLES:
        raise r.error(f"{where}.style", f"must be one of {', '.join(STYLES)}, not {style!r}")
    color = r.get(t, where, "color", str, "#000000")
    if not _HEX_COLOR.match(color):
        raise r.error(f"{where}.color", f"must be a colour like '#1a2b3c', not {color!r}")
    if not color.startswith("#"):
        color = "#" + color
    pixels = r.get(t, where, "pixels", int, 10)
    if pixels < 1:
        raise r.error(f"{where}.pixels", "must be at least 1")
    padding = r.get(t, where, "padding", int, 0)
    if padding < 0:
        raise r.error(f"{where}.padding", "must not be negative")
    options = Options(
        faces=r.get(t, where, "faces", bool, True),
        plates=r.get(t, where, "plates", bool, True),
        detections=r.get(t, where, "detections", bool, True),
        style=style,
        color=color.lower(),
        pixels=pixels,
        padding=padding,
        area=_area(r, t.get("area"), f"{where}.area"),
        metadata=r.get(t, where, "metadata", str, "strip"),
    )
    if options.metadata not in METADATA:
        raise r.error(f"{where}.metadata", f"must be one of {', '.join(METADATA)}")
    originals = r.get(t, where, "originals", str, "keep")
    if originals not in ORIGINALS:
        raise r.error(f"{where}.originals", f"must be one of {', '.join(ORIGINALS)}")
    archive_raw = r.get(t, where, "archive", str, "")
    archive = layout.absolute(archive_raw) if archive_raw else None
    if originals == "move" and archive is None:
        raise r.error(f"{where}.archive", "is required when originals = 'move'")
    settle = r.get(t, where, "settle_seconds", float, defaults.SETTLE_S)
    if settle < 0:
        raise r.error(f"{where}.settle_seconds", "must not be negative")
    polling_raw = t.get("polling", "auto")
    if polling_raw == "auto":
        polling: bool | None = None
    elif isinstance(polling_raw, bool):
        polling = polling_raw
    else:
        raise r.error(f"{where}.polling", f"must be 'auto', true or false, not {polling_raw!r}")
    return WatchConfig(
        path=path,
        output=output,
        recursive=r.get(t, where, "recursive", bool, True),
        options=options,
        originals=originals,
        archive=archive,
        settle_s=settle,
        polling=polling,
    )


def _area(r: _Reader, t: Any, where: str) -> Area:
    if t is None:
        return Area()
    if not isinstance(t, Mapping):
        raise r.error(
            where, "must be a table like { left = 0.0, top = 0.0, right = 1.0, bottom = 1.0 }"
        )
    r.no_unknown(t, where, {"left", "top", "right", "bottom"})
    values = {k: r.get(t, where, k, float, d) for k, d in Area().__dict__.items()}
    for k, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise r.error(f"{where}.{k}", f"must be a fraction between 0 and 1, not {v}")
    area = Area(**values)
    if area.left >= area.right or area.top >= area.bottom:
        raise r.error(where, "left must be below right and top below bottom")
    return area


class _Reader:
    """Typed access to TOML tables with errors that name the key and the file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key, file=self.source)

    def table(self, raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a table: write [{key}]")
        return value

    def no_unknown(self, t: Mapping[str, Any], where: str, known: set[str]) -> None:
        for key in t:
            if key not in known:
                name = f"{where}.{key}" if where else key
                raise self.error(name, "unknown key")

    def get(self, t: Mapping[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
        if key not in t:
            return default
        value = t[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(
                f"{where}.{key}",
                f"must be {_KIND_NAMES[kind]}, not {type(value).__name__} {value!r}",
            )
        return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
