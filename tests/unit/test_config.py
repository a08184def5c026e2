"""load_config: precedence (defaults < file < environment/torchrun) and every bad-input error."""
from __future__ import annotations

import dataclasses
import warnings

import pytest

from pyckpt import ConfigError, load_config
from tests.conftest import SPEC_PHYSICAL_ENV

NO_CUDA = lambda: False  # noqa: E731
CUDA = lambda: True  # noqa: E731


def write(tmp_path, text: str, mode: str = "physical"):
    config_dir = tmp_path / "config"
    config_dir.mkdir(exist_ok=True)
    path = config_dir / f"distributed.{mode}.env"
    path.write_text(text)
    return path


PHYSICAL = """\
# rendered by ansible
DISTRIBUTED_MODE=physical
WORLD_SIZE=4
MASTER_ADDR=192.168.1.100
MASTER_PORT=29500
BACKEND=gloo
SHARED_FS_PATH=/shared
SHARED_FS_TYPE=nfs
PHYSICAL_NODES=4
"""


def test_file_values_are_read_and_typed(tmp_path):
    path = write(tmp_path, PHYSICAL)
    cfg = load_config(path, environ={"NODE_RANK": "2"}, cuda_available=NO_CUDA)
    assert (cfg.mode, cfg.world_size, cfg.master_addr, cfg.master_port) == ("physical", 4, "192.168.1.100", 29500)
    assert (cfg.backend, cfg.shared_fs_path, cfg.shared_fs_type, cfg.physical_nodes) == ("gloo", "/shared", "nfs", 4)
    assert (cfg.node_rank, cfg.rank, cfg.local_rank) == (2, 2, 0)
    assert cfg.origin("MASTER_PORT") == f"{path}:5"
    assert cfg.origin("NODE_RANK") == "environment"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.world_size = 8  # type: ignore[misc]


def test_mode_selects_the_file_in_the_config_dir(tmp_path):
    write(tmp_path, PHYSICAL)
    cfg = load_config(config_dir=tmp_path / "config", environ={"DISTRIBUTED_MODE": "physical"},
                      cuda_available=NO_CUDA)
    assert cfg.source_file.endswith("distributed.physical.env") and cfg.world_size == 4


def test_active_symlink_is_used_when_mode_unset(tmp_path):
    path = write(tmp_path, PHYSICAL)
    (tmp_path / "config" / "distributed.env").symlink_to(path.name)
    cfg = load_config(config_dir=tmp_path / "config", environ={}, cuda_available=NO_CUDA)
    assert cfg.mode == "physical"


def test_single_mode_runs_on_defaults_without_a_file(tmp_path):
    cfg = load_config(config_dir=tmp_path, environ={}, cuda_available=NO_CUDA)
    assert (cfg.mode, cfg.world_size, cfg.rank, cfg.backend, cfg.source_file) == ("single", 1, 0, "gloo", None)


def test_missing_file_for_cluster_mode_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="setup-cluster.yml"):
        load_config(config_dir=tmp_path, environ={"DISTRIBUTED_MODE": "physical"}, cuda_available=NO_CUDA)


def test_environment_wins_over_file(tmp_path):
    path = write(tmp_path, PHYSICAL)
    cfg = load_config(path, environ={"MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.1"}, cuda_available=NO_CUDA)
    assert (cfg.master_port, cfg.master_addr) == (29999, "10.0.0.1")
    assert cfg.origin("MASTER_PORT") == "environment"


def test_torchrun_variables_win(tmp_path):
    path = write(tmp_path, PHYSICAL.replace("WORLD_SIZE=4", "WORLD_SIZE=4\nNPROC_PER_NODE=1"))
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "2", "MASTER_ADDR": "192.168.1.100", "MASTER_PORT": "29400"}
    cfg = load_config(path, environ=env, cuda_available=NO_CUDA)
    assert (cfg.rank, cfg.local_rank, cfg.world_size, cfg.nproc_per_node, cfg.node_rank) == (5, 1, 8, 2, 2)
    assert cfg.master_port == 29400 and cfg.launched_by_torchrun
    assert cfg.origin("WORLD_SIZE") == "torchrun"


def test_an_elastic_rendezvous_with_fewer_nodes_than_planned_is_this_run_s_layout(tmp_path):
    """torchrun --nnodes=2:4 formed a group of 3 nodes: the file's PHYSICAL_NODES=4 is the planned maximum."""
    path = write(tmp_path, PHYSICAL)
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "1",
           "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "3", "MASTER_ADDR": "192.168.1.102", "MASTER_PORT": "41234"}
    cfg = load_config(path, environ=env, cuda_available=NO_CUDA)
    assert (cfg.world_size, cfg.physical_nodes, cfg.node_rank, cfg.rank) == (3, 3, 2, 2)
    assert "GROUP_WORLD_SIZE" in cfg.origin("PHYSICAL_NODES") and "plans 4" in cfg.origin("PHYSICAL_NODES")
    # Outside torchrun a GROUP_WORLD_SIZE in the environment means nothing: the file's count stands.
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        load_config(path, environ={"WORLD_SIZE": "3", "GROUP_WORLD_SIZE": "3"}, cuda_available=NO_CUDA)


def test_quotes_comments_and_export(tmp_path):
    path = write(tmp_path, 'export DISTRIBUTED_MODE="physical"\nWORLD_SIZE=2 # two nodes\n'
                           "PHYSICAL_NODES='2'\nMASTER_ADDR=10.1.1.1\nGLOO_SOCKET_IFNAME=eth1\n")
    cfg = load_config(path, environ={}, cuda_available=NO_CUDA)
    assert (cfg.mode, cfg.world_size, cfg.physical_nodes) == ("physical", 2, 2)
    assert dict(cfg.passthrough) == {"GLOO_SOCKET_IFNAME": "eth1"}


def test_auto_backend_follows_hardware(tmp_path):
    assert load_config(environ={}, config_dir=tmp_path, cuda_available=CUDA).backend == "nccl"
    assert load_config(environ={}, config_dir=tmp_path, cuda_available=NO_CUDA).backend == "gloo"


def test_unknown_key_warns_with_line(tmp_path):
    path = write(tmp_path, PHYSICAL + "MASTER_PROT=1\n")
    with pytest.warns(UserWarning, match=r"distributed\.physical\.env:10: unknown key MASTER_PROT"):
        load_config(path, environ={}, cuda_available=NO_CUDA)


@pytest.mark.parametrize(
    "change, env, expected",
    [
        (("MASTER_PORT=29500", "MASTER_PORT=abc"), {}, r"physical\.env:5: MASTER_PORT='abc' is not a number; use an "
                                                       r"integer 1-65535"),
        (("MASTER_PORT=29500", "MASTER_PORT=70000"), {}, r"MASTER_PORT='70000' is out of range"),
        (("WORLD_SIZE=4", "WORLD_SIZE=3"), {}, r"physical\.env:3: WORLD_SIZE='3' disagrees with PHYSICAL_NODES=4 "
                                               r".*set WORLD_SIZE=4"),
        (("BACKEND=gloo", "BACKEND=nccl"), {}, r"physical\.env:6: BACKEND='nccl' needs CUDA.*use BACKEND=gloo"),
        (("BACKEND=gloo", "BACKEND=mpi"), {}, r"BACKEND='mpi' is not allowed; use one of nccl, gloo, auto"),
        (("DISTRIBUTED_MODE=physical", "DISTRIBUTED_MODE=cloud"), {}, r"DISTRIBUTED_MODE='cloud' is not allowed"),
        (("SHARED_FS_TYPE=nfs", "SHARED_FS_TYPE=s3"), {}, r"SHARED_FS_TYPE='s3' is not allowed; use one of local, nfs"),
        (("MASTER_ADDR=192.168.1.100", "MASTER_ADDR=127.0.0.1"), {}, r"MASTER_ADDR='127.0.0.1' is a loopback"),
        (("MASTER_ADDR=192.168.1.100", "MASTER_ADDR=not-an-address!"), {}, r"MASTER_ADDR='not-an-address!' is not "
                                                                           r"a host name or address"),
        (("", ""), {"NODE_RANK": "4"}, r"environment variable: NODE_RANK='4' must be below PHYSICAL_NODES=4"),
        (("", ""), {"NODE_RANK": "-1"}, r"NODE_RANK='-1' is out of range"),
        (("", ""), {"RANK": "9"}, r"RANK='9' must be below WORLD_SIZE=4"),
        (("WORLD_SIZE=4", "WORLD_SIZE=4\nthis line is wrong"), {}, r"physical\.env:4: cannot parse 'this line is "
                                                                    r"wrong'; expected KEY=VALUE"),
        (("MASTER_ADDR=192.168.1.100", "MASTER_ADDR='192.168.1.100"), {}, r"unterminated quote"),
        (("", ""), {"INIT_TIMEOUT_S": "0"}, r"INIT_TIMEOUT_S='0' is not a positive number"),
    ],
)
def test_bad_input_names_key_value_origin_and_fix(tmp_path, change, env, expected):
    path = write(tmp_path, PHYSICAL.replace(*change) if change[0] else PHYSICAL)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, environ=env, cuda_available=NO_CUDA)


def test_single_mode_refuses_several_nodes(tmp_path):
    with pytest.raises(ConfigError, match="DISTRIBUTED_MODE=single means one machine"):
        load_config(config_dir=tmp_path, environ={"PHYSICAL_NODES": "2"}, cuda_available=NO_CUDA)


def test_world_size_derived_from_nodes_and_processes(tmp_path):
    path = write(tmp_path, "DISTRIBUTED_MODE=docker\nPHYSICAL_NODES=3\nNPROC_PER_NODE=2\nMASTER_ADDR=10.77.0.2\n",
                 mode="docker")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path, environ={"NODE_RANK": "1", "LOCAL_RANK": "1"}, cuda_available=NO_CUDA)
    assert (cfg.world_size, cfg.rank) == (6, 3)


# -- issue 18: the spec followed by hand --------------------------------------------------------------

SPEC_PHYSICAL = SPEC_PHYSICAL_ENV


def test_node_rank_with_the_one_cluster_file_uses_it(tmp_path):
    """The spec's way: config/distributed.physical.env written by hand, no distributed.env link, no
    DISTRIBUTED_MODE, `NODE_RANK=k python train.py`: node k of the physical cluster, not single mode."""
    write(tmp_path, SPEC_PHYSICAL)
    write(tmp_path, "DISTRIBUTED_MODE=single\n", mode="single")  # the repo's own file is there too
    for rank in (0, 1, 3):
        cfg = load_config(config_dir=tmp_path / "config", environ={"NODE_RANK": str(rank)}, cuda_available=NO_CUDA)
        assert (cfg.mode, cfg.world_size, cfg.rank, cfg.node_rank) == ("physical", 4, rank, rank)
        assert cfg.source_file.endswith("distributed.physical.env")
    # Without NODE_RANK the one cluster file is still the one meant (rank 0, the master).
    assert load_config(config_dir=tmp_path / "config", environ={}, cuda_available=NO_CUDA).mode == "physical"


def test_several_cluster_files_and_no_mode_fail_listing_them(tmp_path):
    write(tmp_path, SPEC_PHYSICAL)
    write(tmp_path, "DISTRIBUTED_MODE=docker\nPHYSICAL_NODES=2\nMASTER_ADDR=10.77.0.2\n", mode="docker")
    with pytest.raises(ConfigError) as err:
        load_config(config_dir=tmp_path / "config", environ={"NODE_RANK": "1"}, cuda_available=NO_CUDA)
    text = str(err.value)
    assert "distributed.docker.env" in text and "distributed.physical.env" in text
    assert "DISTRIBUTED_MODE=<mode>" in text and "PYCKPT_CONFIG=<file>" in text and "distributed.env" in text
    # Any of the ways it names chooses.
    cfg = load_config(config_dir=tmp_path / "config", environ={"NODE_RANK": "1", "DISTRIBUTED_MODE": "docker"},
                      cuda_available=NO_CUDA)
    assert (cfg.mode, cfg.world_size) == ("docker", 2)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_node_rank_without_a_cluster_file_never_trains_alone(tmp_path, rank):
    write(tmp_path, "DISTRIBUTED_MODE=single\n", mode="single")
    with pytest.raises(ConfigError) as err:
        load_config(config_dir=tmp_path / "config", environ={"NODE_RANK": rank}, cuda_available=NO_CUDA)
    text = str(err.value)
    assert f"NODE_RANK='{rank}'" in text and "world size 1" in text and "distributed.physical.env" in text
    assert "unset NODE_RANK" in text


def test_without_node_rank_or_cluster_file_the_single_file_is_read(tmp_path):
    write(tmp_path, "DISTRIBUTED_MODE=single\nSHARED_FS_PATH=runs/snaps\n", mode="single")
    cfg = load_config(config_dir=tmp_path / "config", environ={}, cuda_available=NO_CUDA)
    assert (cfg.mode, cfg.world_size, cfg.shared_fs_path) == ("single", 1, "runs/snaps")
    # torchrun's workers carry their world size: no file needed, NODE_RANK or not.
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0"}
    assert load_config(config_dir=tmp_path / "config", environ=torchrun, cuda_available=NO_CUDA).world_size == 2


def test_single_mode_with_a_node_rank_says_single_runs_one_node(tmp_path):
    with pytest.raises(ConfigError, match=r"NODE_RANK='1' but DISTRIBUTED_MODE=single runs one node.*"
                                          r"DISTRIBUTED_MODE=physical"):
        load_config(config_dir=tmp_path, environ={"NODE_RANK": "1", "DISTRIBUTED_MODE": "single"},
                    cuda_available=NO_CUDA)


def test_the_spec_physical_block_is_valid(tmp_path):
    path = write(tmp_path, SPEC_PHYSICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path, environ={"NODE_RANK": "2"}, cuda_available=NO_CUDA)
    assert (cfg.world_size, cfg.physical_nodes, cfg.rank, cfg.master_addr) == (4, 4, 2, "192.168.1.100")
    assert cfg.node_addrs == ("192.168.1.100", "192.168.1.101", "192.168.1.102", "192.168.1.103")
    assert cfg.as_env()["PHYSICAL_NODES"] == "192.168.1.100,192.168.1.101,192.168.1.102,192.168.1.103"
    # SHARED_FS_PATH means what the spec means: the directory that holds the snapshots.
    assert cfg.shared_fs_path == cfg.snapshot_dir == "/shared/snapshots"


LIST = "PHYSICAL_NODES=192.168.1.100,192.168.1.101,192.168.1.102,192.168.1.103"


@pytest.mark.parametrize(
    "change, expected",
    [
        ((LIST, "PHYSICAL_NODES=192.168.1.100,192.168.1.101,192.168.1.102"),
         r"WORLD_SIZE='4' disagrees with PHYSICAL_NODES listing 3 nodes .*set WORLD_SIZE=3"),
        ((LIST, "PHYSICAL_NODES=192.168.1.101,192.168.1.100,192.168.1.102,192.168.1.103"),
         r"physical\.env:8: PHYSICAL_NODES='192\.168\.1\.101,.*' starts with 192\.168\.1\.101 but "
         r"MASTER_ADDR=192\.168\.1\.100 \(.*physical\.env:3\); list the master \(node rank 0\) first"),
        ((LIST, "PHYSICAL_NODES=192.168.1.100,192.168.1.100,192.168.1.102,192.168.1.103"),
         r"lists 192\.168\.1\.100 more than once"),
        ((LIST, "PHYSICAL_NODES=192.168.1.100,,192.168.1.102,192.168.1.103"),
         r"PHYSICAL_NODES='192\.168\.1\.100,,.*' has '', which is not a host name or address; use a node count"),
        ((LIST, "PHYSICAL_NODES=192.168.1.100,192.168.1.300,192.168.1.102,192.168.1.103"),
         r"has '192\.168\.1\.300', which is not a host name or address"),
        ((LIST, "PHYSICAL_NODES=0"), r"PHYSICAL_NODES='0' is out of range; use a node count"),
    ],
)
def test_bad_node_lists_name_the_key_the_entry_and_the_fix(tmp_path, change, expected):
    path = write(tmp_path, SPEC_PHYSICAL.replace(*change))
    with pytest.raises(ConfigError, match=expected):
        load_config(path, environ={}, cuda_available=NO_CUDA)


def test_node_list_accepts_host_names_and_agrees_with_nproc_per_node(tmp_path):
    path = write(tmp_path, "DISTRIBUTED_MODE=docker\nPHYSICAL_NODES=node0,node1\nNPROC_PER_NODE=2\n"
                           "MASTER_ADDR=NODE0\n", mode="docker")
    cfg = load_config(path, environ={"NODE_RANK": "1"}, cuda_available=NO_CUDA)
    assert (cfg.world_size, cfg.physical_nodes, cfg.rank, cfg.node_addrs) == (4, 2, 2, ("node0", "node1"))


# -- SNAPSHOT_PATH: the full snapshot path, a filesystem path or an s3:// URL --------------------

def test_snapshot_path_defaults_to_checkpoint_bin_in_shared_fs_path(tmp_path):
    cfg = load_config(write(tmp_path, PHYSICAL), environ={}, cuda_available=NO_CUDA)
    assert cfg.snapshot_path == "/shared/checkpoint.bin" and cfg.origin("SNAPSHOT_PATH") == "default"
    assert cfg.as_env()["SNAPSHOT_PATH"] == "/shared/checkpoint.bin"
    # An empty value is unset (what the cluster_config role renders without a snapshot_location).
    cfg = load_config(write(tmp_path, PHYSICAL + "SNAPSHOT_PATH=\n"), environ={}, cuda_available=NO_CUDA)
    assert cfg.snapshot_path == "/shared/checkpoint.bin"


@pytest.mark.parametrize("value", ["s3://ckpt/run1/checkpoint.bin", "/mnt/fast/run1/checkpoint.bin"])
def test_snapshot_path_from_the_file(tmp_path, value):
    path = write(tmp_path, PHYSICAL + f"SNAPSHOT_PATH={value}\n")
    cfg = load_config(path, environ={}, cuda_available=NO_CUDA)
    assert cfg.snapshot_path == value and cfg.origin("SNAPSHOT_PATH") == f"{path}:10"
    assert cfg.shared_fs_path == cfg.snapshot_dir == "/shared"   # SHARED_FS_PATH keeps its meaning
    assert cfg.as_env()["SNAPSHOT_PATH"] == value


def test_snapshot_path_environment_wins_under_either_name(tmp_path):
    path = write(tmp_path, PHYSICAL + "SNAPSHOT_PATH=s3://ckpt/file/checkpoint.bin\n")
    cfg = load_config(path, environ={"SNAPSHOT_PATH": "s3://ckpt/env/checkpoint.bin"}, cuda_available=NO_CUDA)
    assert (cfg.snapshot_path, cfg.origin("SNAPSHOT_PATH")) == ("s3://ckpt/env/checkpoint.bin", "environment")
    # PYCKPT_SNAPSHOT_PATH (what the training unit sets) is the same setting.
    cfg = load_config(path, environ={"PYCKPT_SNAPSHOT_PATH": "/shared/x/checkpoint.bin"}, cuda_available=NO_CUDA)
    assert cfg.snapshot_path == "/shared/x/checkpoint.bin"
    assert cfg.origin("SNAPSHOT_PATH") == "environment (PYCKPT_SNAPSHOT_PATH)"
    same = {"SNAPSHOT_PATH": "s3://b/k", "PYCKPT_SNAPSHOT_PATH": "s3://b/k"}
    assert load_config(path, environ=same, cuda_available=NO_CUDA).snapshot_path == "s3://b/k"


def test_snapshot_path_under_both_names_must_agree(tmp_path):
    path = write(tmp_path, PHYSICAL)
    with pytest.raises(ConfigError, match=r"SNAPSHOT_PATH='s3://b/one' and PYCKPT_SNAPSHOT_PATH='s3://b/two' "
                                          r"disagree; they are one setting .*unset one or make them equal"):
        load_config(path, environ={"SNAPSHOT_PATH": "s3://b/one", "PYCKPT_SNAPSHOT_PATH": "s3://b/two"},
                    cuda_available=NO_CUDA)


@pytest.mark.parametrize(
    "value, env, expected",
    [
        ("s3://", {}, r"physical\.env:10: SNAPSHOT_PATH='s3://' is not a snapshot path \('s3://' names no bucket"),
        ("s3://ckpt", {}, r"SNAPSHOT_PATH='s3://ckpt' is not a snapshot path \('s3://ckpt' cannot be a snapshot "
                          r"path: it must name an object"),
        ("s3://ckpt/run1/", {}, r"SNAPSHOT_PATH='s3://ckpt/run1/' is not a snapshot path .*must name an object"),
        ("runs/checkpoint.bin", {}, r"physical\.env:10: SNAPSHOT_PATH='runs/checkpoint.bin' is not a snapshot path "
                                    r"\(a relative path.*\); use an absolute path or an s3://BUCKET/KEY URL, e\.g\. "
                                    r"SNAPSHOT_PATH=/shared/snapshots/checkpoint\.bin"),
        ("/shared/snapshots/", {}, r"SNAPSHOT_PATH='/shared/snapshots/' is not a snapshot path .*must name a file"),
        ("gs://ckpt/checkpoint.bin", {}, r"SNAPSHOT_PATH='gs://ckpt/checkpoint\.bin' is not a snapshot path \(the "
                                         r"scheme gs:// is not a store pyckpt has\)"),
        ("", {"PYCKPT_SNAPSHOT_PATH": "ckpt.bin"}, r"environment variable PYCKPT_SNAPSHOT_PATH: SNAPSHOT_PATH="
                                                    r"'ckpt\.bin' is not a snapshot path \(a relative path"),
        ("", {"SNAPSHOT_PATH": "s3:///k"}, r"environment variable: SNAPSHOT_PATH='s3:///k' .*names no bucket"),
    ],
)
def test_bad_snapshot_path_names_key_value_origin_and_fix(tmp_path, value, env, expected):
    path = write(tmp_path, PHYSICAL + f"SNAPSHOT_PATH={value}\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(path, environ=env, cuda_available=NO_CUDA)
