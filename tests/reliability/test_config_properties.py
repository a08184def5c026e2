"""Property tests (hypothesis) of pyckpt.load_config over env files and environment variables.

Whatever the file and the environment hold, load_config returns a valid Config or raises ConfigError
whose message names the key (or the unparsable line) and where it came from; never another exception.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyckpt import Config, ConfigError, load_config
from pyckpt.config import KNOWN_KEYS, TORCHRUN_KEYS

pytestmark = pytest.mark.reliability
KEYS = sorted(KNOWN_KEYS | set(TORCHRUN_KEYS) | {"GROUP_RANK", "LOCAL_RANK"})
GOOD = {
    "DISTRIBUTED_MODE": ["single", "docker", "physical", "PHYSICAL"],
    "BACKEND": ["gloo", "nccl", "auto"],
    "SHARED_FS_TYPE": ["local", "nfs"],
    "MASTER_ADDR": ["127.0.0.1", "192.168.1.100", "master", "::1", "localhost"],
    "SHARED_FS_PATH": ["/shared", "/tmp/x"],
}
ODD = ["", " ", "0", "1", "2", "4", "-1", "65536", "abc", "nan", "inf", "-inf", "1e400", "9" * 5000, " 4 ",
       "１", "1_0", "0x10", "3.5", "'", '"', "#", "a b", "\t", "\u2028"]
ORIGINS = ("environment variable", "torchrun variable", "default", "derived", "argument")


def values(key: str):
    return st.one_of(st.sampled_from(GOOD.get(key, []) + ODD), st.text(max_size=12),
                     st.integers(-3, 70000).map(str))


line = st.one_of(
    st.sampled_from(KEYS + ["UNKNOWN_KEY", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME"]).flatmap(
        lambda k: st.tuples(st.sampled_from(["", "export ", "  "]), st.just(k), st.sampled_from(["=", " = ", "=="]),
                            values(k), st.sampled_from(["", "'", '"']), st.sampled_from(["", " # note"]))
        .map(lambda t: f"{t[0]}{t[1]}{t[2]}{t[4]}{t[3]}{t[4]}{t[5]}")),
    st.sampled_from(["", "# comment", "   ", "export", "=value", "KEY", "1KEY=2", "KEY='open"]),
    st.text(max_size=30),
)
env_files = st.one_of(st.lists(line, max_size=12).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
                      st.binary(max_size=200))
environs = st.dictionaries(st.sampled_from(KEYS), st.one_of(*(values(k) for k in KEYS)).filter(lambda v: "\0" not in v),
                           max_size=6)


def check(data: bytes, environ: dict, cuda: bool, tmp_dir: str) -> None:
    path = os.path.join(tmp_dir, "distributed.physical.env")
    with open(path, "wb") as f:
        f.write(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = load_config(path, environ=environ, cuda_available=lambda: cuda)
    except ConfigError as exc:
        message = str(exc)
        names_key = any(f"{k}=" in message for k in KEYS) or any(
            p in message for p in ("cannot parse", "not UTF-8", "unterminated quote"))
        names_origin = path in message or any(o in message for o in ORIGINS)
        assert names_key and names_origin, f"ConfigError without key or origin: {message}"
        return
    assert isinstance(config, Config)
    assert 0 <= config.rank < config.world_size and 1 <= config.master_port <= 65535
    assert 0 <= config.node_rank < config.physical_nodes
    assert config.backend in ("gloo", "nccl") and config.mode in ("single", "docker", "physical")
    assert math.isfinite(config.init_timeout_s) and config.init_timeout_s > 0, config.init_timeout_s
    hash(config)  # immutable


@settings(max_examples=int(os.environ.get("PYCKPT_HYPOTHESIS_EXAMPLES", "400")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=env_files, environ=environs, cuda=st.booleans())
@example(data=b"INIT_TIMEOUT_S=nan\n", environ={}, cuda=False)
@example(data=b"INIT_TIMEOUT_S=inf\n", environ={}, cuda=False)
@example(data=b"WORLD_SIZE=2\nPHYSICAL_NODES=2\n", environ={"MASTER_PORT": "abc"}, cuda=False)
def test_load_config_gives_config_or_config_error(tmp_path, data, environ, cuda):
    check(data, environ, cuda, str(tmp_path))


@pytest.mark.parametrize("make", ["directory", "broken-symlink", "symlink-loop"])
def test_config_path_that_is_not_a_readable_file(tmp_path, make):
    target = tmp_path / "distributed.physical.env"
    if make == "directory":
        target.mkdir()
    elif make == "broken-symlink":
        target.symlink_to(tmp_path / "missing")
    else:
        target.symlink_to(target)
    with pytest.raises(ConfigError, match=str(target)):
        load_config(str(target), environ={}, cuda_available=lambda: False)
