"""Config loading: defaults, validation messages that name the key and the file, exit code 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmg_node import config
from dmg_node.cli import EXIT_CONFIG, main
from dmg_node.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_shipped_default_config_loads() -> None:
    """The shipped config/node.toml is valid and matches the documented defaults."""
    s = config.load()
    assert s.node.ae_title == "DMG_NODE" and s.node.port == 11112
    assert s.node.maximum_pdu_size == 0 and s.node.maximum_associations == 10
    assert s.assembly.quiet_seconds == 60 and s.assembly.late_policy == "reprocess"
    assert s.access.allowed_calling_aets == ()
    assert s.destinations[0].name == "tps"
    assert s.logging.format == "json" and s.logging.include_phi is False


def test_every_dataclass_default_matches_shipped_file() -> None:
    """The shipped file spells out the same values the code uses when a key is missing."""
    shipped = config.load()
    empty = config.from_dict({})
    for section in ("node", "storage", "assembly", "access", "models", "outbox", "rtstruct", "classify", "logging",
                    "inference"):
        assert getattr(shipped, section) == getattr(empty, section), section


def test_models_take_a_name_or_an_ordered_list(tmp_path: Path) -> None:
    """A sequence's model is one folder name (older configs) or several in order of preference."""
    s = config.load(_write(tmp_path, '[models]\nt1c = "my-t1c"\nt2 = ["t2-3d", "t2-2d"]\n'))
    assert s.models.t1c == ("my-t1c",)
    assert s.models.t2 == ("t2-3d", "t2-2d")
    assert s.models.flair == ("demo-flair",)
    assert config.from_dict({}).models.t2 == ("demo-t2-3d", "demo-t2")
    assert config.from_dict({}).models.t1c == ("demo-t1c-3d", "demo-t1c")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is valid: every key has a default."""
    s = config.load(_write(tmp_path, ""))
    assert s.node.port == 11112 and s.destinations == ()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[node]\nport = 70000\n", "'node.port' must be between 1 and 65535"),
        ("[node]\nport = \"104\"\n", "'node.port' must be an integer"),
        ("[node]\nbogus = 1\n", "unknown key 'node.bogus'"),
        ("[nodes]\nport = 1\n", "unknown key 'nodes'"),
        ("[node]\nae_title = \"THIS_TITLE_IS_WAY_TOO_LONG\"\n", "'node.ae_title' must be a DICOM AE title"),
        ("[node]\nae_title = \"BAD\\\\AE\"\n", "'node.ae_title' must be a DICOM AE title"),
        ("[assembly]\nlate_policy = \"sometimes\"\n", "'assembly.late_policy' must be one of reprocess, ignore"),
        ("[access]\nallowed_calling_aets = \"SCANNER\"\n", "'access.allowed_calling_aets' must be an array"),
        ("[[destinations]]\nname = \"a\"\nae_title = \"A\"\nhost = \"h\"\nport = 0\n", "'destinations[0].port'"),
        ("[[destinations]]\nname = \"a\"\nhost = \"h\"\nport = 5\n", "missing required key 'destinations[0].ae_title'"),
        ("[logging]\nformat = \"xml\"\n", "'logging.format' must be one of json, console"),
        ("[models]\ndevice = \"tpu\"\n", "'models.device' must be auto, cpu"),
        ("[models]\nt2 = []\n", "'models.t2' must name one or more model folders"),
        ("[models]\nt1c = [\"a\", \" \"]\n", "'models.t1c' must name one or more model folders"),
        ("[models]\nflair = 3\n", "'models.flair' must be an array"),
        ("[rtstruct]\ncolor_t2 = [255, 0]\n", "'rtstruct.color_t2' must be three integers"),
        ("[rtstruct]\ncolor = [255, 0, 0]\n", "set rtstruct.color_t1c, color_t2 and color_flair instead"),
        ("[storage]\nfsync = \"yes\"\n", "'storage.fsync' must be true or false"),
        ("node = 5\n", "[node] must be a table"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    """Each broken config raises ConfigError whose message names the file and the offending key."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read config file .*missing.toml"):
        config.load(tmp_path / "missing.toml")


def test_duplicate_destination_names(tmp_path: Path) -> None:
    """Destination names must be unique (the outbox keys on them)."""
    d = '[[destinations]]\nname = "tps"\nae_title = "A"\nhost = "h"\nport = 5\n'
    with pytest.raises(ConfigError, match="'tps' appears twice"):
        config.load(_write(tmp_path, d + d))


def test_cli_bad_config_exits_3_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dmg-node serve` with a bad config prints one clear line and exits with EXIT_CONFIG."""
    path = _write(tmp_path, "[node]\nport = -1\n")
    assert main(["serve", "--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node.port" in err[0] and str(path) in err[0]


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    """A relative path in a file is taken from the file's folder, not the current directory; a left-out
    path key takes the shipped default (the checkout's spool and models)."""
    (tmp_path / "etc").mkdir()
    s = config.load(_write(tmp_path / "etc", '[storage]\nroot = "spool"\n[models]\ndir = "../models"\n'
                                             '[import]\ndir = "drop"\n'))
    assert s.storage.root == tmp_path / "etc" / "spool"
    assert s.models.dir == tmp_path / "models"
    assert s.import_.path == tmp_path / "etc" / "drop"
    empty = config.load(_write(tmp_path, ""))
    assert empty.storage.root == config.DEFAULTS_ROOT / "spool"
    assert empty.models.dir == config.DEFAULTS_ROOT / "models"
    assert config.load(_write(tmp_path, '[storage]\nroot = "/abs/spool"\n')).storage.root == Path("/abs/spool")


def test_shipped_config_points_at_the_checkouts_models() -> None:
    """The shipped config finds the demo models wherever dmg-node is started from."""
    s = config.load()
    assert s.models.dir == config.DEFAULTS_ROOT / "models"
    assert s.storage.root == config.DEFAULTS_ROOT / "spool"
    assert (s.models.dir / s.models.t2[0] / "manifest.json").is_file()


def _schema_keys(cls: type, prefix: str = "") -> set[str]:
    import dataclasses

    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.name in ("source", "rules"):
            continue
        name = prefix + config._TOML_KEYS.get(f.name, f.name)
        if f.name == "destinations":
            keys |= _schema_keys(config.Destination, name + ".")
        elif dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Settings")):
            import typing

            keys |= _schema_keys(typing.get_type_hints(cls)[f.name], name + ".")
        else:
            keys.add(name)
    return keys


def _file_keys(raw: dict[str, object], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in raw.items():
        if isinstance(v, dict):
            keys |= _file_keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                keys |= _file_keys(item, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def test_node_toml_and_the_schema_have_the_same_keys() -> None:
    """config/node.toml, which says it documents every key, sets exactly the schema's keys (no more, no fewer)."""
    import tomllib

    in_file = _file_keys(tomllib.loads(config.DEFAULT_CONFIG.read_text()))
    in_schema = _schema_keys(config.Settings)
    assert in_schema - in_file == set(), "keys missing from config/node.toml"
    assert in_file - in_schema == set(), "keys in config/node.toml the schema does not know"


def test_rtstruct_series_numbers_differ_per_sequence_and_from_the_source() -> None:
    """Each sequence's RTSTRUCT gets its own Series Number, never the source series' number."""
    rt = config.from_dict({}).rtstruct
    numbers = {seq: rt.series_number(seq, 3) for seq in config.SEQUENCES}
    assert numbers == {"t1c": 9001, "t2": 9002, "flair": 9003}
    assert rt.series_number("t2", 9002) == 9012
    assert len({rt.color(seq) for seq in config.SEQUENCES}) == 3
