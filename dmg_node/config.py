"""node.toml -> frozen, validated settings.

This is the one module that knows the file format. Every rule is checked at start-up, and a
broken file raises :class:`ConfigError` with the file and the dotted key in its message, so
``dmg-node serve`` can print one line and exit with ``EXIT_CONFIG`` instead of a traceback.

One module because it is the file format's only reader: the settings records, their enums and
the validation that builds them change together, key by key.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dmg_node.classify.rules import Rules, compile_rules
from dmg_node.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node.toml"
# A path key left out of a config file takes the shipped default, which is relative to the
# checkout (the shipped config/node.toml spells it "../spool", "../models").
DEFAULTS_ROOT = DEFAULT_CONFIG.parent.parent

# DICOM PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash and
# no control characters; leading/trailing spaces are not significant.
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
SEQUENCES = ("t1c", "t2", "flair")
#: ``[node] workers = 0`` (the default) receives in one process per core, up to this many.
MAX_AUTO_WORKERS = 8


class DuplicatePolicy(StrEnum):
    """What a second copy of a stored SOP Instance UID does (``storage.duplicate_policy``)."""

    REPLACE = "replace"
    KEEP_FIRST = "keep_first"


class LatePolicy(StrEnum):
    """What an instance arriving after its study was queued does (``assembly.late_policy``)."""

    REPROCESS = "reprocess"
    IGNORE = "ignore"


class Completion(StrEnum):
    """When received series become jobs (``assembly.completion``): the whole study, or each series."""

    STUDY = "study"
    SERIES = "series"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class DeviceKind(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class InferenceBackend(StrEnum):
    """Where segmentation runs (``inference.backend``): in this process, or on a Ray Serve application."""

    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class Device:
    """``models.device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""

    kind: DeviceKind = DeviceKind.AUTO
    index: int | None = None

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.index is not None else self.kind.value

    @classmethod
    def parse(cls, text: str) -> Device:
        """Read ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

        Raises
        ------
        ValueError
            Anything else.
        """
        match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", text)
        if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N; found {text!r}")
        index = match.group(2)
        return cls(DeviceKind(match.group(1)), int(index) if index is not None else None)


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DMG_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    require_called_aet: bool = True
    maximum_associations: int = 10
    maximum_pdu_size: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    # Limits on unauthenticated input (dmg_node.net.pdu_reader, gate, dimse_guard; docs/reliability.md)
    pdu_timeout: float = 30.0
    max_pending_connections: int = 64
    max_pending_per_peer: int = 8
    max_instance_mb: int = 1024
    max_inflated_mb: int = 1024
    fast_path: bool = True
    spool_in_memory_mb: int = 16
    # Receive processes (dmg_node.net.pool); 0 = one per core, at most MAX_AUTO_WORKERS; 1 = receive
    # in the node process itself
    workers: int = 0

    def receive_workers(self, cpus: int | None = None) -> int:
        """How many processes receive: ``workers``, or for 0 one per core (*cpus*, default this machine's)."""
        if self.workers:
            return self.workers
        return max(1, min(cpus if cpus is not None else (os.cpu_count() or 1), MAX_AUTO_WORKERS))


@dataclass(frozen=True)
class StorageSettings:
    root: Path = Path("spool")  # left out of a file: DEFAULTS_ROOT / "spool"
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REPLACE
    min_free_mb: int = 1024
    fsync: bool = True
    retention_days: float = 0.0


@dataclass(frozen=True)
class AssemblySettings:
    quiet_seconds: float = 60.0
    late_policy: LatePolicy = LatePolicy.REPROCESS
    poll_seconds: float = 2.0
    max_attempts: int = 3
    completion: Completion = Completion.STUDY
    series_quiet_seconds: float = 10.0


@dataclass(frozen=True)
class AccessSettings:
    allowed_calling_aets: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS on the SCP (PS3.15 B.1: the Basic TLS Secure Transport Connection Profile)."""

    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = True


class OutputFormat(StrEnum):
    """What a destination is sent (``destinations.formats``): the RTSTRUCT, the DICOM SEG, or both."""

    RTSTRUCT = "rtstruct"
    SEG = "seg"


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    formats: tuple[OutputFormat, ...] = (OutputFormat.RTSTRUCT,)

    def wants(self, fmt: OutputFormat) -> bool:
        return fmt in self.formats


@dataclass(frozen=True)
class ModelsSettings:
    dir: Path = Path("models")  # left out of a file: DEFAULTS_ROOT / "models"
    device: Device = field(default_factory=Device)
    # Model folder names per sequence, in order of preference: a series goes to the first whose
    # manifest admits its voxel spacing (dmg_node.segment.routing). TOML takes a string or an array.
    t1c: tuple[str, ...] = ("demo-t1c-3d", "demo-t1c")
    t2: tuple[str, ...] = ("demo-t2-3d", "demo-t2")
    flair: tuple[str, ...] = ("demo-flair",)


@dataclass(frozen=True)
class OutboxSettings:
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    give_up_hours: float = 72.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 2.0


@dataclass(frozen=True)
class RtStructSettings:
    roi_name_t1c: str = "GTV_DMG_AI_T1C"
    roi_name_t2: str = "GTV_DMG_AI_T2"
    roi_name_flair: str = "GTV_DMG_AI_FLAIR"
    color_t1c: tuple[int, ...] = (255, 0, 0)
    color_t2: tuple[int, ...] = (255, 255, 0)
    color_flair: tuple[int, ...] = (0, 255, 255)
    send_empty: bool = False
    min_volume_mm3: float = 100.0
    series_number_base: int = 9000

    def roi_name(self, sequence: str) -> str:
        return str(getattr(self, f"roi_name_{sequence}"))

    def color(self, sequence: str) -> tuple[int, int, int]:
        """The ROI Display Colour (3006,002A) of one sequence's structure, RGB 0-255."""
        r, g, b = getattr(self, f"color_{sequence}")
        return int(r), int(g), int(b)

    def series_number(self, sequence: str, source_series_number: int | None) -> int:
        """Series Number (0020,0011) of one sequence's RTSTRUCT: ``series_number_base`` + 1, 2, 3.

        T1C, T2 and FLAIR each get their own number, so a planner's series list tells them apart; a
        number equal to the source series' own is moved up by 10 (the two must never be confused).
        """
        number = self.series_number_base + 1 + SEQUENCES.index(sequence)
        return number + 10 if number == source_series_number else number


@dataclass(frozen=True)
class ClassifySettings:
    """Regex overrides for the description rules; an empty list keeps the built-in default."""

    t1c: tuple[str, ...] = ()
    t2: tuple[str, ...] = ()
    flair: tuple[str, ...] = ()
    none: tuple[str, ...] = ()
    contrast: tuple[str, ...] = ()
    t1: tuple[str, ...] = ()

    def overrides(self) -> dict[str, tuple[str, ...]]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass(frozen=True)
class ImportSettings:
    """The drop folder (TOML table ``[import]``): DICOM files copied in by hand or from media."""

    dir: str = ""
    settle_seconds: float = 2.0
    poll_seconds: float = 5.0

    @property
    def path(self) -> Path | None:
        return Path(self.dir) if self.dir else None


class QaPolicy(StrEnum):
    """What happens to a contour the QA flagged (``qa.flagged``)."""

    SEND = "send"
    HOLD = "hold"


@dataclass(frozen=True)
class QaSettings:
    """Contour QA (dmg_node.segment.qa; docs/model.md "Contour QA")."""

    flagged: QaPolicy = QaPolicy.SEND
    min_inside_others: float = 0.3
    min_dice: float = 0.45
    max_outside_head: float = 0.2
    head_margin_mm: float = 3.0
    min_ml: float = 0.5
    max_ml: float = 150.0
    max_components: int = 3
    consensus_on: str = ""
    consensus_roi_name: str = "GTV_DMG_AI_CONSENSUS"


@dataclass(frozen=True)
class InferenceSettings:
    """``[inference]``: local models, or a Ray Serve application shared by several nodes.

    The node reads ``backend``, ``url``, ``application``, ``timeout_seconds`` and the retry keys;
    ``dmg-node inference-serve`` reads ``address`` and the sizing keys (replicas, CPUs, GPUs).
    """

    backend: InferenceBackend = InferenceBackend.LOCAL
    url: str = "http://127.0.0.1:8000"
    application: str = "dmg-inference"
    timeout_seconds: float = 300.0
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 300.0
    address: str = "auto"
    num_replicas: int = 1
    max_replicas: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 2


@dataclass(frozen=True)
class LoggingSettings:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.JSON
    include_phi: bool = False


@dataclass(frozen=True)
class WebSettings:
    """The read-only status page and Prometheus metrics (``[web]``); PHI only with logging.include_phi."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    assembly: AssemblySettings = field(default_factory=AssemblySettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    destinations: tuple[Destination, ...] = ()
    models: ModelsSettings = field(default_factory=ModelsSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    rtstruct: RtStructSettings = field(default_factory=RtStructSettings)
    classify: ClassifySettings = field(default_factory=ClassifySettings)
    import_: ImportSettings = field(default_factory=ImportSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    web: WebSettings = field(default_factory=WebSettings)
    qa: QaSettings = field(default_factory=QaSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    source: Path | None = None
    # Compiled once from [classify] when the settings are built; every user reads these.
    rules: Rules = field(default_factory=compile_rules)

    def destination(self, name: str) -> Destination:
        """Return the destination called *name*.

        Raises
        ------
        ConfigError
            If no destination has that name.
        """
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise ConfigError(f"no destination named {name!r} in {self.source} (configured: {known})")


_RANGES: dict[str, tuple[float, float]] = {
    "node.port": (1, 65535),
    "destinations.port": (1, 65535),
    "node.maximum_associations": (1, 1000),
    "node.maximum_pdu_size": (0, 2**32 - 1),
    "node.acse_timeout": (0.1, 3600),
    "node.dimse_timeout": (0.1, 3600),
    "node.network_timeout": (0.1, 86400),
    "node.pdu_timeout": (0.1, 3600),
    "node.max_pending_connections": (1, 10000),
    "node.max_pending_per_peer": (1, 10000),
    "node.max_instance_mb": (1, 65536),
    "node.max_inflated_mb": (1, 65536),
    "node.spool_in_memory_mb": (0, 65536),
    "node.workers": (0, 64),
    "storage.min_free_mb": (0, 10**9),
    "assembly.quiet_seconds": (0, 86400),
    "assembly.poll_seconds": (0.05, 3600),
    "assembly.max_attempts": (1, 100),
    "assembly.series_quiet_seconds": (0, 86400),
    "outbox.retry_initial_seconds": (0.01, 86400),
    "outbox.retry_max_seconds": (0.01, 86400),
    "outbox.give_up_hours": (0, 8760),
    "outbox.timeout_seconds": (0.1, 3600),
    "outbox.poll_seconds": (0.01, 3600),
    "rtstruct.color_t1c": (0, 255),
    "rtstruct.color_t2": (0, 255),
    "rtstruct.color_flair": (0, 255),
    "rtstruct.series_number_base": (1, 2**31 - 100),
    "rtstruct.min_volume_mm3": (0, 10**7),
    "storage.retention_days": (0, 36500),
    "import.settle_seconds": (0, 3600),
    "import.poll_seconds": (0.05, 3600),
    "web.port": (0, 65535),
    "qa.min_inside_others": (0, 1),
    "qa.min_dice": (0, 1),
    "qa.max_outside_head": (0, 1),
    "qa.head_margin_mm": (0, 100),
    "qa.min_ml": (0, 10**4),
    "qa.max_ml": (0, 10**4),
    "qa.max_components": (1, 10**4),
    "inference.timeout_seconds": (0.1, 86400),
    "inference.retry_initial_seconds": (0.01, 86400),
    "inference.retry_max_seconds": (0.01, 86400),
    "inference.num_replicas": (1, 1000),
    "inference.max_replicas": (0, 1000),
    "inference.num_cpus": (0, 1024),
    "inference.num_gpus": (0, 64),
    "inference.max_ongoing_requests": (1, 1000),
}
# Field names whose TOML key is a Python keyword.
_TOML_KEYS = {"import_": "import"}
_AE_KEYS = {"node.ae_title", "destinations.ae_title", "access.allowed_calling_aets"}
# Array keys that also take a single string (read as a one-element array).
_ONE_OR_MANY = {"models.t1c", "models.t2", "models.flair"}


def load(path: Path | str | None = None) -> Settings:
    """Read and validate a node.toml.

    Parameters
    ----------
    path
        The file; ``None`` means the default ``config/node.toml`` shipped with the node.

    Returns
    -------
    Settings
        Frozen settings. A relative path in the file (``storage.root``, ``models.dir``,
        ``import.dir``, ``tls.*``) is resolved against the folder holding the file, never the
        current directory; a path key left out takes the shipped default (the checkout's
        ``spool`` and ``models``).

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or a key is unknown, mistyped or out of range.
    """
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {cfg_path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {cfg_path} is not UTF-8: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from exc
    return from_dict(raw, source=cfg_path)


def from_dict(raw: dict[str, Any], source: Path | None = None) -> Settings:
    """Validate an already-parsed TOML table (see :func:`load`)."""
    where = str(source) if source is not None else "<config>"
    rt = raw.get("rtstruct")
    if isinstance(rt, dict) and "color" in rt:
        raise ConfigError(f"{where}: 'rtstruct.color' was replaced by one colour per sequence: set "
                          f"rtstruct.color_t1c, color_t2 and color_flair instead (found color = {rt['color']!r})")
    settings: Settings = _build(Settings, raw, "", where, skip={"source", "rules"})
    settings = _resolve_paths(settings, raw, source)
    _check_cross_rules(settings, where)
    try:
        rules = compile_rules(settings.classify.overrides())
    except ValueError as exc:
        raise ConfigError(f"{where}: [classify] {exc}") from exc
    return dataclasses.replace(settings, source=source, rules=rules)


def _build(cls: type[Any], raw: Any, prefix: str, where: str, skip: set[str] | None = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table, found {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_TOML_KEYS.get(f.name, f.name): f for f in dataclasses.fields(cls) if f.name not in (skip or set())}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"{where}: unknown key {key!r} (allowed here: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {key!r}")
            continue
        kwargs[f.name] = _convert(hints[f.name], raw[name], key, where)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    generic_key = re.sub(r"\[\d+\]", "", key)
    if hint is Device:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key!r} must be a string, found {value!r}")
        try:
            return Device.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key!r} {exc}") from exc
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [m.value for m in hint]
        if value not in choices:
            raise ConfigError(f"{where}: {key!r} must be one of {', '.join(choices)}; found {value!r}")
        return hint(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", where)  # type: ignore[arg-type]
    if origin is tuple:
        if isinstance(value, str) and generic_key in _ONE_OR_MANY:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key!r} must be an array, found {_tname(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):  # Path | None
        return _convert(args[0], value, key, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, found {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key!r} must be an integer, found {value!r}")
        _check_range(generic_key, value, key, where)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key!r} must be a number, found {value!r}")
        _check_range(generic_key, float(value), key, where)
        return float(value)
    if hint is str or hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key!r} must be a string, found {value!r}")
        if generic_key in _AE_KEYS and not _AE_RE.fullmatch(value.strip() or "\x00"):
            raise ConfigError(
                f"{where}: {key!r} must be a DICOM AE title (1-16 printable characters, no backslash); "
                f"found {value!r}"
            )
        if hint is Path:
            if not value:
                raise ConfigError(f"{where}: {key!r} must not be empty")
            return Path(value)
        return value.strip() if generic_key in _AE_KEYS else value
    raise ConfigError(f"{where}: {key!r} has an unsupported type")  # pragma: no cover


def _check_range(generic_key: str, value: float, key: str, where: str) -> None:
    bounds = _RANGES.get(generic_key)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{where}: {key!r} must be between {bounds[0]:g} and {bounds[1]:g}; found {value!r}")


def _check_cross_rules(settings: Settings, where: str) -> None:
    tls = settings.tls
    if tls.enabled:
        needed = [("tls.cert", tls.cert), ("tls.key", tls.key)]
        if tls.require_client_cert:
            needed.append(("tls.ca", tls.ca))
        for key, value in needed:
            if not value:
                raise ConfigError(f"{where}: {key!r} must name a PEM file when tls.enabled is true")
            if not Path(value).is_file():
                raise ConfigError(f"{where}: {key!r} names {value!r}, which is not a readable file")
    for seq in SEQUENCES:
        rgb = getattr(settings.rtstruct, f"color_{seq}")
        if len(rgb) != 3:
            raise ConfigError(f"{where}: 'rtstruct.color_{seq}' must be three integers [R, G, B]; found {list(rgb)}")
    for key, value in (("roi_name_t1c", settings.rtstruct.roi_name_t1c), ("roi_name_t2", settings.rtstruct.roi_name_t2),
                       ("roi_name_flair", settings.rtstruct.roi_name_flair)):
        if not 1 <= len(value) <= 64 or "\\" in value:
            raise ConfigError(f"{where}: 'rtstruct.{key}' must be 1-64 characters without backslash; found {value!r}")
    qa = settings.qa
    if qa.consensus_on not in ("", *SEQUENCES):
        raise ConfigError(f"{where}: 'qa.consensus_on' must be empty (off) or one of {', '.join(SEQUENCES)}; "
                          f"found {qa.consensus_on!r}")
    if not 1 <= len(qa.consensus_roi_name) <= 64 or "\\" in qa.consensus_roi_name:
        raise ConfigError(f"{where}: 'qa.consensus_roi_name' must be 1-64 characters without backslash; "
                          f"found {qa.consensus_roi_name!r}")
    if qa.min_ml > qa.max_ml:
        raise ConfigError(f"{where}: 'qa.min_ml' ({qa.min_ml:g}) must not exceed 'qa.max_ml' ({qa.max_ml:g})")
    for dest in settings.destinations:
        if not dest.formats or len(set(dest.formats)) != len(dest.formats):
            raise ConfigError(f"{where}: destination {dest.name!r} 'destinations.formats' must list rtstruct and/or "
                              f"seg, each once; found {[f.value for f in dest.formats]}")
    names = [d.name for d in settings.destinations]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: destinations.name must be unique; {dupes[0]!r} appears twice")
    inf = settings.inference
    if inf.backend is InferenceBackend.RAY and not re.fullmatch(r"https?://[^/\s]+/?", inf.url):
        raise ConfigError(f"{where}: 'inference.url' must be http(s)://host:port of the Ray Serve proxy; found {inf.url!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", inf.application):
        raise ConfigError(f"{where}: 'inference.application' must be 1-64 letters, digits, '.', '_' or '-'; "
                          f"found {inf.application!r}")
    for seq in ("t1c", "t2", "flair"):
        folders = getattr(settings.models, seq)
        if not folders or any(not f.strip() for f in folders):
            raise ConfigError(f"{where}: 'models.{seq}' must name one or more model folders under models.dir "
                              f"(a string or an array of non-empty strings); found {list(folders)}")


# Path keys (section field, key): resolved by _resolve_paths.
_PATH_KEYS = (("storage", "root"), ("models", "dir"), ("import_", "dir"), ("tls", "cert"), ("tls", "key"),
              ("tls", "ca"))


def _resolve_paths(settings: Settings, raw: dict[str, Any], source: Path | None) -> Settings:
    """Relative paths in a file -> against the file's folder; left-out path keys -> :data:`DEFAULTS_ROOT`.

    Resolving against the current directory made ``serve`` started from another folder look for
    (and create) ``./spool`` and ``./models`` there, and then run with no model (issue 21).
    Without a *source* (a dict built in code) paths given are kept as they are.
    """
    for section, key in _PATH_KEYS:
        part = getattr(settings, section)
        value = getattr(part, key)
        if not str(value):
            continue  # "" = not set (import.dir, tls files)
        table = raw.get(_TOML_KEYS.get(section, section))
        given = isinstance(table, dict) and key in table
        base = (source.absolute().parent if source is not None else None) if given else DEFAULTS_ROOT
        if base is None or Path(value).is_absolute():
            continue
        resolved = os.path.normpath(base / value)
        part = dataclasses.replace(part, **{key: type(value)(resolved)})
        settings = dataclasses.replace(settings, **{section: part})
    return settings


def widened_access(old: Settings, new: Settings) -> list[str]:
    """What *new* opens up compared with *old*: each change in words, for a warning on reload.

    Restart-only keys (TLS, ``node.require_called_aet``) are listed too: the widening happens at
    the next start.
    """
    changes = []
    old_aets, new_aets = set(old.access.allowed_calling_aets), set(new.access.allowed_calling_aets)
    if old_aets and not new_aets:
        changes.append("access.allowed_calling_aets emptied: any calling AE title is admitted")
    elif old_aets and new_aets - old_aets:
        changes.append(f"access.allowed_calling_aets now also admits {sorted(new_aets - old_aets)}")
    if old.tls.enabled and not new.tls.enabled:
        changes.append("tls.enabled turned off: plain TCP callers are admitted (at the next start)")
    elif old.tls.enabled and old.tls.require_client_cert and not new.tls.require_client_cert:
        changes.append("tls.require_client_cert turned off (at the next start)")
    if old.node.require_called_aet and not new.node.require_called_aet:
        changes.append("node.require_called_aet turned off: any called AE title is answered (at the next start)")
    return changes


def removed_destinations(old: Settings, new: Settings) -> list[str]:
    """Names of the destinations in *old* that *new* no longer has."""
    kept = {d.name for d in new.destinations}
    return [d.name for d in old.destinations if d.name not in kept]


def _tname(value: Any) -> str:
    return type(value).__name__
