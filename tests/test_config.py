"""Tests for relay.config: loading, validation, overrides, round trip."""



from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from relay.config import (
    Config,
    LoggingConfig,
    PublishConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    parse_config,
)
from relay.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def keys(mapping: Dict[str, Any], prefix: str = "") -> List[str]:
    """Every dotted key of a nested mapping."""
    found = []
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        found.append(key)
        if isinstance(value, dict):
            found += keys(value, key + ".")
    return sorted(found)


def test_none_gives_defaults() -> None:
    """No path means the built-in defaults."""
    assert Config() == load_config(None)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty or comment-only file means the built-in defaults."""
    assert Config() == load_config(write(tmp_path, "# nothing set\n"))


def test_defaults() -> None:
    """The defaults run the simulator and publish on hikyuu's ipc address and loopback tcp."""
    config = Config()
    assert "simulator" == config.source.kind
    expected = ("ipc:///tmp/hikyuu_real.ipc", "tcp://127.0.0.1:9200")
    assert expected == config.publish.addresses
    assert "auto" == config.logging.format


def test_relay_yaml_is_the_defaults() -> None:
    """config/relay.yaml loads to exactly Config()."""
    assert Config() == load_config(CONFIG_DIR / "relay.yaml")


def test_relay_yaml_lists_every_key() -> None:
    """config/relay.yaml documents every key the config has (add new fields there too)."""
    with open(CONFIG_DIR / "relay.yaml", encoding="utf-8") as file:
        documented = yaml.safe_load(file)
    assert keys(config_to_dict(Config())) == keys(documented)


def test_production_example_loads() -> None:
    """config/production-qmt.yaml loads: qmt source, tcp on all interfaces, JSON log file."""
    config = load_config(str(CONFIG_DIR / "production-qmt.yaml"))
    assert "qmt" == config.source.kind
    assert "tcp://0.0.0.0:9200" in config.publish.addresses
    assert config.logging.file is not None


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    """Keys left out keep their defaults; a section with every key commented out is allowed."""
    text = "publish:\n  heartbeat_interval: 2\nnormalise:\n  # book_levels: 5\n"
    config = load_config(write(tmp_path, text))
    expected = dataclasses.replace(Config(), publish=PublishConfig(heartbeat_interval=2.0))
    assert expected == config
    assert isinstance(config.publish.heartbeat_interval, float)


def test_types_are_converted(tmp_path: Path) -> None:
    """Lists become tuples, ints become floats where a float is expected, YAML dates strings."""
    text = (
        "source:\n  simulator:\n    speed: 10\n    date: 2024-01-02\n"
        "  qmt:\n    markets: [SH]\n"
        "logging:\n  file: relay.log\n"
    )
    config = load_config(write(tmp_path, text))
    assert 10.0 == config.source.simulator.speed
    assert "2024-01-02" == config.source.simulator.date
    assert ("SH",) == config.source.qmt.markets
    assert "relay.log" == config.logging.file


def test_ipv6_and_windows_friendly_values(tmp_path: Path) -> None:
    """Bracketed IPv6 tcp addresses are accepted; a UTF-8 BOM (Notepad) is ignored."""
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffpublish:\n  addresses: ['tcp://[::1]:9200']\n".encode())
    assert ("tcp://[::1]:9200",) == load_config(path).publish.addresses


def test_pathlike_and_str_paths(tmp_path: Path) -> None:
    """Both str and os.PathLike paths work."""
    path = write(tmp_path, "shutdown_timeout: 1.5\n")
    assert load_config(os.fspath(path)) == load_config(path)


BAD = [
    ("unknown top key", "sauce:\n  kind: qmt\n", "sauce"),
    ("unknown nested key", "publish:\n  adress: ['tcp://h:1']\n", "publish.adress"),
    (
        "int given a string",
        "source:\n  simulator:\n    securities: lots\n",
        "source.simulator.securities",
    ),
    ("int given a float", "normalise:\n  book_levels: 5.0\n", "normalise.book_levels"),
    ("int given a bool", "normalise:\n  price_decimals: true\n", "normalise.price_decimals"),
    ("bool given an int", "normalise:\n  drop_auction: 1\n", "normalise.drop_auction"),
    ("float given a string", "shutdown_timeout: soon\n", "shutdown_timeout"),
    ("float given a bool", "publish:\n  heartbeat_interval: true\n", "publish.heartbeat_interval"),
    ("float not finite", "source:\n  replay:\n    speed: .inf\n", "source.replay.speed"),
    ("str given an int", "source:\n  replay:\n    file: 3\n", "source.replay.file"),
    ("section not a mapping", "publish: tcp://h:1\n", "publish"),
    ("bad literal", "logging:\n  level: verbose\n", "logging.level"),
    ("bad source kind", "source:\n  kind: xtquant\n", "source.kind"),
    (
        "bad address at index 1",
        "publish:\n  addresses: ['ipc:///a', 'htp://x']\n",
        "publish.addresses[1]",
    ),
    ("bad port", "publish:\n  addresses: ['tcp://h:70000']\n", "publish.addresses[0]"),
    ("port zero", "publish:\n  addresses: ['tcp://h:0']\n", "publish.addresses[0]"),
    ("missing port", "publish:\n  addresses: ['tcp://h']\n", "publish.addresses[0]"),
    (
        "duplicate address",
        "publish:\n  addresses: ['tcp://h:1', 'tcp://h:1']\n",
        "publish.addresses",
    ),
    ("empty addresses", "publish:\n  addresses: []\n", "publish.addresses"),
    ("single string for a list", "publish:\n  addresses: tcp://h:1\n", "publish.addresses"),
    ("list item wrong type", "source:\n  qmt:\n    markets: [SH, 1]\n", "source.qmt.markets[1]"),
    ("negative interval", "logging:\n  stats_interval: -1\n", "logging.stats_interval"),
    ("zero timeout", "shutdown_timeout: 0\n", "shutdown_timeout"),
    ("zero speed", "source:\n  simulator:\n    speed: 0\n", "source.simulator.speed"),
    ("message too small", "publish:\n  max_message_bytes: 100\n", "publish.max_message_bytes"),
    (
        "too few securities",
        "source:\n  simulator:\n    securities: 5\n",
        "source.simulator.securities",
    ),
    ("bad date", "source:\n  simulator:\n    date: '2024-02-30'\n", "source.simulator.date"),
    ("book levels out of range", "normalise:\n  book_levels: 11\n", "normalise.book_levels"),
    ("negative backups", "logging:\n  file_backups: -1\n", "logging.file_backups"),
    ("tiny log file", "logging:\n  file_max_bytes: 10\n", "logging.file_max_bytes"),
    ("YAML syntax error", "publish:\n  addresses: [tcp://h:1\n", ""),
    ("duplicate YAML key", "publish: {}\npublish: {}\n", ""),
    ("non-mapping top level", "- publish\n- logging\n", ""),
    ("scalar top level", "just words\n", ""),
]


@pytest.mark.parametrize(("text", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    """Each bad file raises ConfigError naming the file and the dotted key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (str(path), key) == (info.value.path, info.value.key)
    assert str(info.value).startswith(f"{path}: {key}")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (path, "", "file not found") == (info.value.path, info.value.key, info.value.reason)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    """A path that cannot be read as a file is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) == info.value.path


def test_messages(tmp_path: Path) -> None:
    """Messages list the valid keys, the choices, the expected address form and YAML position."""
    cases = {
        "publish:\n  adress: x\n": "publish.adress: unknown key 'adress'; "
        "valid: addresses, heartbeat_interval, max_message_bytes",
        "logging:\n  format: xml\n": "logging.format: expected one of 'auto', 'json', "
        "'console'; got 'xml'",
        "publish:\n  addresses: [ipc:///a, htp://x]\n": "publish.addresses[1]: expected "
        "ipc://PATH, tcp://HOST:PORT or tls+tcp://HOST:PORT, got 'htp://x'",
        "normalise:\n  drop_auction: 0\n": "normalise.drop_auction: expected boolean "
        "(true or false), got integer 0",
        "a: [1\n": "invalid YAML at line 2, column 1",
        "publish: 1\npublish: 2\n": "invalid YAML at line 2, column 1: duplicate key 'publish'",
    }
    actual = {}
    for text in cases:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        actual[text] = str(info.value)[len(f"{tmp_path / 'relay.yaml'}: ") :]
    assert cases == {text: actual[text][: len(cases[text])] for text in cases}


def test_parse_config_from_mapping() -> None:
    """parse_config validates an in-memory mapping and names the given path in errors."""
    assert Config() == parse_config({})
    with pytest.raises(ConfigError) as info:
        parse_config({"shutdown_timeout": -2}, path="<test>")
    assert ("<test>", "shutdown_timeout") == (info.value.path, info.value.key)


def test_config_to_dict_round_trips(tmp_path: Path) -> None:
    """Dumping config_to_dict() as YAML and loading it gives back an equal config."""
    config = load_config(CONFIG_DIR / "production-qmt.yaml")
    path = write(tmp_path, yaml.safe_dump(config_to_dict(config), allow_unicode=True))
    assert config == load_config(path)


def test_overrides_replace_values() -> None:
    """Command-line overrides replace file values and leave the rest alone."""
    config = apply_overrides(
        Config(),
        source="replay",
        publish=["tcp://0.0.0.0:9300"],
        replay_file="day.h5",
        replay_speed=4,
        log_level="debug",
    )
    expected = Config()
    expected = dataclasses.replace(
        expected,
        source=dataclasses.replace(
            expected.source,
            kind="replay",
            replay=dataclasses.replace(expected.source.replay, file="day.h5", speed=4.0),
        ),
        publish=dataclasses.replace(expected.publish, addresses=("tcp://0.0.0.0:9300",)),
        logging=LoggingConfig(level="debug"),
    )
    assert expected == config


def test_no_overrides_is_identity() -> None:
    """With every override None the config is returned unchanged."""
    config = Config()
    assert config is apply_overrides(config)


BAD_OVERRIDES = [
    ("bad source", {"source": "xtquant"}, "--source"),
    ("bad address", {"publish": ["tcp://h:1", "htp://x"]}, "--publish"),
    ("empty publish", {"publish": []}, "--publish"),
    ("duplicate publish", {"publish": ["tcp://h:1", "tcp://h:1"]}, "--publish"),
    ("publish as one string", {"publish": "tcp://h:1"}, "--publish"),
    ("zero replay speed", {"replay_speed": 0.0}, "--replay-speed"),
    ("bad log level", {"log_level": "INFO"}, "--log-level"),
]


@pytest.mark.parametrize(
    ("overrides", "key"), [b[1:] for b in BAD_OVERRIDES], ids=[b[0] for b in BAD_OVERRIDES]
)
def test_bad_override_names_the_option(overrides: Dict[str, Any], key: str) -> None:
    """A bad override raises ConfigError from "<command line>" naming the option."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), **overrides)
    assert ("<command line>", key) == (info.value.path, info.value.key)
