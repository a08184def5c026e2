"""Ansible playbooks driven through ansible-runner, against localhost only (connection local).

Nothing here changes this machine: preflight needs no connection, and the rendering cases write
into pytest's tmp_path (code_dir/venv_path/render_dir are pointed there).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import ansible_runner
import pytest
import yaml

pytestmark = pytest.mark.ansible

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = sorted(p for p in [*REPO.glob("*.yml"), *(REPO / "playbooks").glob("*.yml")])
VENV = Path(sys.prefix)  # the controller venv: has ansible, torch and pyckpt (its `pyckpt` validates)


@pytest.fixture(autouse=True)
def _controller_path(monkeypatch):
    # ansible-runner starts `ansible-playbook` from PATH: use the one next to this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(tmp_path: Path, playbook: Path | str, inventory: Path | str, extravars: dict | None = None,
        cmdline: str = "") -> tuple[int, str]:
    private = tmp_path / "runner"
    private.mkdir(exist_ok=True)
    result = ansible_runner.run(
        private_data_dir=str(private),
        project_dir=str(REPO),
        playbook=str(playbook),
        inventory=str(inventory),
        extravars=extravars or {},
        cmdline=cmdline,
        envvars={"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
                 "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml", "ANSIBLE_LOCALHOST_WARNING": "false"},
        quiet=True,
        timeout=300,
    )
    return result.rc, result.stdout.read()


def local(tmp_path: Path, **extra) -> dict:
    """Extra vars that keep a play on this machine, as this user, inside tmp_path."""
    return {"ansible_connection": "local", "ansible_become": False,
            "ansible_python_interpreter": sys.executable,
            "shared_path": str(tmp_path / "shared"), "code_dir": str(tmp_path / "shared/checkpoint4"),
            "snapshot_dir": str(tmp_path / "shared/snapshots"),
            # The physical inventory's cluster user does not exist here: own the files as root.
            "cluster_user": "root", "cluster_group": "root", **extra}


def make_inventory(tmp_path: Path, hosts: dict, **group_vars) -> Path:
    """A copy of inventory/physical with `hosts` as hosts.yml and `group_vars` over its group_vars."""
    inv = tmp_path / "inventory"
    shutil.copytree(REPO / "inventory/physical", inv)
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": hosts}}))
    all_vars = yaml.safe_load((inv / "group_vars/all.yml").read_text())
    all_vars.update(group_vars)
    (inv / "group_vars/all.yml").write_text(yaml.safe_dump(all_vars))
    return inv


def spec_hosts(**worker_vars: dict) -> dict:
    """The spec's cluster (master .100, workers .101-.103) with extra vars per worker."""
    workers = {f"node{i}": {"ansible_host": f"192.168.1.{100 + i}", **worker_vars.get(f"node{i}", {})}
               for i in (1, 2, 3)}
    return {"master": {"hosts": {"node0": {"ansible_host": "192.168.1.100"}}}, "workers": {"hosts": workers}}


# --- syntax -------------------------------------------------------------------------------------

@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_syntax_check(tmp_path, playbook):
    rc, out = run(tmp_path, playbook, REPO / "inventory/physical", cmdline="--syntax-check")
    assert rc == 0, out


def test_every_entry_playbook_is_checked():
    names = {str(p.relative_to(REPO)) for p in PLAYBOOKS}
    for wanted in ("setup-cluster.yml", "train.yml", "stop-training.yml", "status.yml", "playbooks/preflight.yml",
                   "playbooks/verify-shared.yml", "playbooks/cluster-config.yml", "playbooks/python-env.yml"):
        assert wanted in names


# --- preflight ----------------------------------------------------------------------------------

@pytest.mark.parametrize("inventory", ["physical", "single", "docker"])
def test_preflight_accepts_the_repo_inventories(tmp_path, inventory):
    rc, out = run(tmp_path, REPO / "playbooks/preflight.yml", REPO / "inventory" / inventory)
    assert rc == 0, out


def test_preflight_accepts_a_valid_rank_override(tmp_path):
    hosts = spec_hosts(node1={"node_rank": 3}, node3={"node_rank": 1})
    rc, out = run(tmp_path, REPO / "playbooks/preflight.yml", make_inventory(tmp_path, hosts))
    assert rc == 0, out


BAD_INVENTORIES = {
    "two masters": (
        {"master": {"hosts": {"node0": {"ansible_host": "192.168.1.100"}, "node1": {"ansible_host": "192.168.1.101"}}},
         "workers": {"hosts": {"node2": {"ansible_host": "192.168.1.102"}}}},
        {}, "must put exactly one host in group 'master'"),
    "no master": (
        {"workers": {"hosts": {"node1": {"ansible_host": "192.168.1.101"}}}},
        {}, "found 0: none"),
    "duplicate ranks": (
        spec_hosts(node2={"node_rank": 1}), {}, "the inventory gives node0=0, node1=1, node2=1, node3=3"),
    "rank gap": (
        spec_hosts(node3={"node_rank": 7}), {}, "Node ranks must be 0..3, each used once"),
    "master not rank 0": (
        spec_hosts(node1={"node_rank": 0}), {}, "with the master at 0"),
    "host outside the subnet": (
        spec_hosts(node2={"ansible_host": "10.0.0.7"}), {},
        "node2: address 10.0.0.7 (host var cluster_address, else ansible_host) is not an IP address inside "
        "cluster_subnet 192.168.1.0/24"),
    "cluster_address outside the subnet": (
        spec_hosts(node3={"cluster_address": "192.168.2.3"}), {}, "node3: address 192.168.2.3"),
    "duplicate addresses": (
        spec_hosts(node3={"ansible_host": "192.168.1.101"}), {}, "Two nodes share an address"),
    "world size mismatch": (
        spec_hosts(), {"world_size": 3}, "world_size=3 but the inventory has 4 nodes x nproc_per_node=1 = 4 processes"),
    "world size mismatch with nproc": (
        spec_hosts(), {"world_size": 4, "nproc_per_node": 2}, "= 8 processes"),
    "port out of range": (
        spec_hosts(), {"master_port": 70000}, "Ports must be integers in 1-65535 and distinct; got master_port=70000"),
    "port not a number": (
        spec_hosts(), {"nfs_port": "nfs"}, "nfs_port=nfs"),
    "ports clash": (
        spec_hosts(), {"master_port": 2049}, "master_port=2049, nfs_port=2049"),
    "rendezvous port clash": (
        spec_hosts(), {"rdzv_port": 29500}, "master_port=29500, nfs_port=2049, portmapper_port=111, rdzv_port=29500"),
    "bad subnet": (
        spec_hosts(), {"cluster_subnet": "192.168.1.7/24"}, "is not a network in CIDR form"),
    "unknown backend": (
        spec_hosts(), {"backend": "mpi"}, "backend=mpi (gloo|nccl|auto)"),
    "single mode with four nodes": (
        spec_hosts(), {"distributed_mode": "single"}, "distributed_mode=single runs on one machine"),
    "code outside the share": (
        spec_hosts(), {"code_dir": "/opt/checkpoint4"}, "must be inside shared_path=/shared"),
}


@pytest.mark.parametrize("case", BAD_INVENTORIES, ids=list(BAD_INVENTORIES))
def test_preflight_rejects_bad_inventories(tmp_path, case):
    hosts, group_vars, message = BAD_INVENTORIES[case]
    rc, out = run(tmp_path, REPO / "playbooks/preflight.yml", make_inventory(tmp_path, hosts, **group_vars))
    assert rc != 0, out
    assert message in " ".join(out.split()), out


def test_train_stops_at_preflight_on_a_bad_inventory(tmp_path):
    # The entry playbook runs preflight first: a bad inventory fails before any host is contacted.
    inv = make_inventory(tmp_path, spec_hosts(node2={"node_rank": 1}))
    rc, out = run(tmp_path, REPO / "train.yml", inv)
    assert rc != 0
    assert "Node ranks must be" in " ".join(out.split())
    assert "UNREACHABLE" not in out


# --- rendering ----------------------------------------------------------------------------------

def task_hosts(out: str, task: str, status: str = "ok") -> set[str]:
    """Hosts reported `status` for the task named `task` in ansible-playbook's output."""
    hosts, inside = set(), False
    for line in out.splitlines():
        if line.startswith(("TASK [", "PLAY RECAP", "RUNNING HANDLER [")):
            inside = line.startswith("TASK [") and task in line
        elif inside and line.startswith(f"{status}: ["):
            hosts.add(line.split("[", 1)[1].split("]", 1)[0])
    return hosts


def inventory_hosts(inventory: str) -> set[str]:
    groups = yaml.safe_load((REPO / "inventory" / inventory / "hosts.yml").read_text())["all"]["children"]
    return {host for group in ("master", "workers") for host in (groups[group].get("hosts") or {})}


def read_env(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def docker_nodes() -> tuple[int, str]:
    hosts = yaml.safe_load((REPO / "inventory/docker/hosts.yml").read_text())["all"]["children"]
    master = next(iter(hosts["master"]["hosts"].values()))["cluster_address"]
    return 1 + len(hosts["workers"]["hosts"] or {}), master


@pytest.mark.parametrize("inventory", ["physical", "docker", "single"])
def test_cluster_config_renders_every_key(tmp_path, inventory):
    nodes, master = {"physical": (4, "192.168.1.100"), "single": (1, "127.0.0.1")}.get(inventory) or docker_nodes()
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory" / inventory,
                  local(tmp_path, venv_path=str(VENV)))
    assert rc == 0, out
    config = tmp_path / "shared/checkpoint4/config"
    rendered = config / f"distributed.{inventory}.env"
    assert read_env(rendered) == {
        "DISTRIBUTED_MODE": inventory, "WORLD_SIZE": str(nodes), "MASTER_ADDR": master, "MASTER_PORT": "29500",
        "BACKEND": "gloo", "SHARED_FS_PATH": str(tmp_path / "shared/snapshots"),
        "SHARED_FS_TYPE": "local" if inventory == "single" else "nfs",
        "PHYSICAL_NODES": str(nodes), "NPROC_PER_NODE": "1",
    }
    assert rendered.read_text().startswith("#\n# Ansible managed\n#\n")
    assert os.readlink(config / "distributed.env") == rendered.name
    # pyckpt's validation (the controller venv has pyckpt) ran, and passed, on every node.
    assert task_hosts(out, "Validate the file with pyckpt's own loader") == inventory_hosts(inventory)


def test_cluster_config_world_size_and_passthrough(tmp_path):
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical",
                  local(tmp_path, venv_path=str(VENV), nproc_per_node=2,
                        cluster_config_extra={"NCCL_DEBUG": "INFO"}))
    assert rc == 0, out
    env = read_env(tmp_path / "shared/checkpoint4/config/distributed.physical.env")
    assert (env["WORLD_SIZE"], env["NPROC_PER_NODE"], env["PHYSICAL_NODES"]) == ("8", "2", "4")
    assert env["NCCL_DEBUG"] == "INFO"
    assert "NODE_RANK" not in env


def test_cluster_config_header_names_the_mode(tmp_path):
    # Elastic mode changes only the header (ranks and node count come from the rendezvous); the keys stay.
    args = (tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical")
    rc, out = run(*args, local(tmp_path, venv_path=str(VENV)))
    assert rc == 0, out
    rendered = tmp_path / "shared/checkpoint4/config/distributed.physical.env"
    static_text, static_env = rendered.read_text(), read_env(rendered)
    assert "NODE_RANK is deliberately absent" in static_text and "rendezvous" not in static_text
    rc, out = run(*args, local(tmp_path, venv_path=str(VENV), elastic_training=True))
    assert rc == 0, out
    elastic_text = rendered.read_text()
    assert read_env(rendered) == static_env
    flat = " ".join(line.lstrip("# ") for line in elastic_text.splitlines() if line.startswith("#"))
    assert ("Elastic mode: the node ranks and the node count of a run come from torchrun's rendezvous" in flat
            and "PHYSICAL_NODES and WORLD_SIZE below are the planned maximum" in flat), elastic_text
    assert "NODE_RANK is deliberately absent" not in elastic_text


def test_a_role_variable_in_group_vars_wins_over_the_shared_name(tmp_path):
    # docs/OPERATIONS.md, Variables: the roles' defaults read the shared names and no play sets a role
    # variable, so one set in the inventory takes effect (the other keys still follow the shared names).
    inv = make_inventory(tmp_path, spec_hosts(), cluster_config_master_port=29600)
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", inv, local(tmp_path, venv_path=str(VENV)))
    assert rc == 0, out
    env = read_env(tmp_path / "shared/checkpoint4/config/distributed.physical.env")
    assert (env["MASTER_PORT"], env["MASTER_ADDR"], env["WORLD_SIZE"]) == ("29600", "192.168.1.100", "4")


def test_cluster_config_is_idempotent(tmp_path):
    args = (tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical",
            local(tmp_path, venv_path=str(VENV)))
    assert run(*args)[0] == 0
    rc, out = run(*args)
    assert rc == 0, out
    assert "changed=0" in out and "changed=1" not in out, out


def test_cluster_config_fails_when_pyckpt_rejects_the_file(tmp_path):
    # Every node's address set to loopback (a host name resolving to 127.0.0.1 does this): the file
    # renders, and the role's validation step fails with pyckpt's own message, naming key and file.
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical",
                  local(tmp_path, venv_path=str(VENV), cluster_address="127.0.0.1"))
    assert rc != 0, out
    flat = " ".join(out.split())
    assert "Validate the file with pyckpt's own loader" in flat
    assert "MASTER_ADDR=''127.0.0.1'' is a loopback address but PHYSICAL_NODES=4" in flat  # YAML-quoted
    assert "distributed.physical.env:" in flat


def test_cluster_config_without_pyckpt_skips_validation(tmp_path):
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/single",
                  local(tmp_path, venv_path=str(tmp_path / "no-venv")))
    assert rc == 0, out
    assert (tmp_path / "shared/checkpoint4/config/distributed.single.env").exists()


S3_LOCATION = "s3://ckpt/run1/checkpoint.bin"


def test_cluster_config_renders_the_snapshot_location(tmp_path):
    # snapshot_location (the full snapshot path) is SNAPSHOT_PATH in the file, validated by pyckpt; unset,
    # the file has no SNAPSHOT_PATH line (test_cluster_config_renders_every_key) and pyckpt uses
    # SHARED_FS_PATH/checkpoint.bin.
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical",
                  local(tmp_path, venv_path=str(VENV), snapshot_location=S3_LOCATION))
    assert rc == 0, out
    env = read_env(tmp_path / "shared/checkpoint4/config/distributed.physical.env")
    assert env["SNAPSHOT_PATH"] == S3_LOCATION and env["SHARED_FS_PATH"] == str(tmp_path / "shared/snapshots")
    assert not any(key.startswith("AWS_") for key in env)
    assert task_hosts(out, "Validate the file with pyckpt's own loader") == inventory_hosts("physical")


@pytest.mark.parametrize("location", ["runs/checkpoint.bin", "s3://ckpt/run1/", "s3://ckpt/x\nMASTER_PORT=1"])
def test_cluster_config_refuses_a_bad_snapshot_location_before_rendering(tmp_path, location):
    rc, out = run(tmp_path, REPO / "playbooks/cluster-config.yml", REPO / "inventory/physical",
                  local(tmp_path, venv_path=str(VENV), snapshot_location=location.replace("\\n", "\n")))
    assert rc != 0, out
    assert "SNAPSHOT_PATH (snapshot_location" in " ".join(out.split())
    assert not (tmp_path / "shared/checkpoint4/config/distributed.physical.env").exists()


def render_units(tmp_path: Path, inventory: Path, suffix: str = ".service", **extra) -> dict[str, str]:
    """The training unit (suffix .service) or the environment file (.env) of every node."""
    out_dir = tmp_path / "units"
    out_dir.mkdir()
    rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", inventory,
                  {**local(tmp_path), "render_dir": str(out_dir), **extra})
    assert rc == 0, out
    return {p.stem: p.read_text() for p in out_dir.glob(f"*{suffix}")}


def test_training_unit_per_node_of_the_physical_cluster(tmp_path):
    units = render_units(tmp_path, REPO / "inventory/physical", training_steps=500, training_checkpoint_interval=50)
    assert sorted(units) == ["node0", "node1", "node2", "node3"]
    for rank, host in enumerate(["node0", "node1", "node2", "node3"]):
        unit = units[host]
        assert (f" --nnodes=4 --nproc_per_node=1 --node_rank={rank} --master_addr=192.168.1.100 "
                f"--master_port=29500 --max_restarts=0 {tmp_path}/shared/checkpoint4/train.py "
                f"--snapshot-path {tmp_path}/shared/snapshots/checkpoint.bin --checkpoint-interval 50 --steps 500 "
                f"--config-dir {tmp_path}/shared/checkpoint4/config") in unit
        assert "ExecStart=/shared/venv/bin/torchrun " in unit
        assert f"Environment=NODE_RANK={rank}\n" in unit
        assert "Environment=DISTRIBUTED_MODE=physical\n" in unit
        assert "Environment=OMP_NUM_THREADS=1\n" in unit
        assert f"WorkingDirectory={tmp_path}/shared/checkpoint4\n" in unit
        assert "Restart=on-failure\n" in unit
        # No facts were gathered: no interface to name, so GLOO/NCCL_SOCKET_IFNAME are left to gloo and NCCL.
        assert "GLOO_SOCKET_IFNAME" not in unit and "NCCL_SOCKET_IFNAME" not in unit
        # What any training script reads: the snapshot path and where load_config() finds the config.
        assert f'Environment="PYCKPT_SNAPSHOT_PATH={tmp_path}/shared/snapshots/checkpoint.bin"\n' in unit
        assert f'Environment="PYCKPT_CONFIG_DIR={tmp_path}/shared/checkpoint4/config"\n' in unit


def test_training_unit_rank_override_and_interface(tmp_path):
    inv = make_inventory(tmp_path, spec_hosts(node1={"node_rank": 3}, node3={"node_rank": 1}),
                         gloo_socket_ifname="eth1", nproc_per_node=2)
    units = render_units(tmp_path, inv)
    assert "--node_rank=3 " in units["node1"] and "Environment=NODE_RANK=3\n" in units["node1"]
    assert "--node_rank=1 " in units["node3"] and "Environment=NODE_RANK=1\n" in units["node3"]
    assert all("--nproc_per_node=2 " in u and "Environment=GLOO_SOCKET_IFNAME=eth1\n" in u for u in units.values())


def test_training_unit_names_the_cluster_interface_for_gloo_and_nccl(tmp_path):
    # cluster_ifname is the fact cluster-facts.yml derives from the cluster address (given here, as no
    # facts are gathered); nccl_socket_ifname, like gloo_socket_ifname, overrides it per host.
    inv = make_inventory(tmp_path, spec_hosts(node2={"nccl_socket_ifname": "ib0"}))
    units = render_units(tmp_path, inv, cluster_ifname="ens5")
    for host, unit in units.items():
        assert "Environment=GLOO_SOCKET_IFNAME=ens5\n" in unit
        assert f"Environment=NCCL_SOCKET_IFNAME={'ib0' if host == 'node2' else 'ens5'}\n" in unit


def test_training_unit_runs_a_script_of_ones_own_with_its_own_arguments(tmp_path):
    # Issue 18, item 9: the arguments are the user's list, not train.py's options, each one kept whole
    # through systemd's parsing (blanks, quotes, backslashes, %specifiers, $variables).
    args = ["--epochs", "3", "--out", "/tmp/a b", "50%", "$HOME", 'say "hi"', "back\\slash", ""]
    units = render_units(tmp_path, REPO / "inventory/physical", training_script="/opt/my job/fine_tune.py",
                         training_script_args=args, training_extra_args=["--seed=7"])
    exec_start = next(line for line in units["node0"].splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(
        ' --max_restarts=0 "/opt/my job/fine_tune.py" --epochs 3 --out "/tmp/a b" 50%% $$HOME "say \\"hi\\"" '
        '"back\\\\slash" "" --seed=7'), exec_start
    assert "--snapshot-path" not in exec_start and "--config-dir" not in exec_start


def test_training_unit_follows_an_s3_snapshot_location(tmp_path):
    # The job's --snapshot-path and PYCKPT_SNAPSHOT_PATH are the location; no snapshot directory to mount
    # (RequiresMountsFor keeps the code directory only), credentials only through training_environment.
    units = render_units(tmp_path, REPO / "inventory/physical", snapshot_location=S3_LOCATION,
                         training_environment={"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-1"})
    for unit in units.values():
        assert f" --snapshot-path {S3_LOCATION} --checkpoint-interval " in exec_start(unit)
        assert f'Environment="PYCKPT_SNAPSHOT_PATH={S3_LOCATION}"\n' in unit
        assert f"RequiresMountsFor={tmp_path}/shared/checkpoint4\n" in unit
        assert "\nEnvironmentFile=/etc/default/checkpoint4-training\n" in unit
        assert "minio" not in unit and "AWS_" not in unit
        assert "/shared/snapshots" not in unit


def test_the_job_s_variables_go_to_a_root_only_file_not_the_world_readable_unit(tmp_path):
    # A unit file is world-readable (and `systemctl show` prints its Environment= to every user): S3 keys in
    # training_environment go to training_environment_file, each value double-quoted for systemd's parser.
    secret = 'wJal"rXUt\\nFEMI/K7MDENG'
    env = render_units(tmp_path, REPO / "inventory/physical", ".env",
                       training_environment={"AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "eu-west-1"})
    assert sorted(env) == ["node0", "node1", "node2", "node3"]
    lines = [line for line in env["node0"].splitlines() if not line.startswith("#")]
    assert lines == ['AWS_REGION="eu-west-1"', 'AWS_SECRET_ACCESS_KEY="wJal\\"rXUt\\\\nFEMI/K7MDENG"'], lines


@pytest.mark.parametrize("bad", [{"AWS-REGION": "x"}, {"AWS_SECRET_ACCESS_KEY": "two\nlines"}])
def test_a_variable_systemd_cannot_read_back_is_refused_by_name(tmp_path, bad):
    out_dir = tmp_path / "units"
    out_dir.mkdir()
    rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", REPO / "inventory/physical",
                  {**local(tmp_path), "render_dir": str(out_dir), "training_environment": bad})
    assert rc != 0
    assert f"training_environment: {next(iter(bad))}: a variable's name must match" in " ".join(out.split()), out


def test_training_unit_follows_a_filesystem_snapshot_location(tmp_path):
    units = render_units(tmp_path, REPO / "inventory/physical", snapshot_location="/mnt/fast/run1/ck.bin")
    for unit in units.values():
        assert " --snapshot-path /mnt/fast/run1/ck.bin --checkpoint-interval " in exec_start(unit)
        assert 'Environment="PYCKPT_SNAPSHOT_PATH=/mnt/fast/run1/ck.bin"\n' in unit
        assert f"RequiresMountsFor={tmp_path}/shared/checkpoint4 /mnt/fast/run1\n" in unit


# The extra variables of tests/ansible/static-units/rich-*.service.# The extra variables of tests/ansible/static-units/rich-*.service.
STATIC_RICH = {"cluster_ifname": "ens5", "nccl_socket_ifname": "ib0", "nproc_per_node": 2,
               "training_environment": {"TORCH_SHOW_CPP_STACKTRACES": "1", "MY_VAR": "a b"},
               "training_extra_args": ["--seed=7", "x y"]}


def test_static_unit_is_unchanged(tmp_path):
    # Static mode renders byte for byte what it rendered before elastic mode existed (the files in
    # static-units/ were rendered by that template), with elastic_training unset or false; one deliberate
    # change since: training_environment moved from Environment= lines to a root-only EnvironmentFile=.
    golden = REPO / "tests/ansible/static-units"
    # The inventory's own paths (not tmp_path): the golden files hold them.
    here = {"ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": sys.executable}
    for name, extra in [("plain", {}), ("plain", {"elastic_training": False}), ("rich", STATIC_RICH)]:
        out_dir = tmp_path / f"{name}-{len(extra)}"
        out_dir.mkdir()
        rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", REPO / "inventory/physical",
                      {**here, **extra, "render_dir": str(out_dir)})
        assert rc == 0, out
        for expected in golden.glob(f"{name}-*.service"):
            host = expected.stem.split("-", 1)[1]
            assert (out_dir / f"{host}.service").read_text() == expected.read_text(), f"{name} {host}"


def exec_start(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart="))


def test_training_unit_in_elastic_mode(tmp_path):
    units = render_units(tmp_path, REPO / "inventory/physical", elastic_training=True, training_steps=500)
    assert sorted(units) == ["node0", "node1", "node2", "node3"]
    for rank, host in enumerate(["node0", "node1", "node2", "node3"]):
        unit = units[host]
        is_host = "true" if host == "node0" else "false"   # the master hosts the rendezvous store, no one else
        assert exec_start(unit) == (
            f"ExecStart=/shared/venv/bin/torchrun --nnodes=3:4 --nproc_per_node=1 --rdzv_backend=c10d "
            f"--rdzv_endpoint=192.168.1.100:29400 --rdzv_id=checkpoint4 --local_addr=192.168.1.10{rank} "
            f"--rdzv_conf=is_host={is_host},join_timeout=900,last_call_timeout=10,keep_alive_interval=2,"
            f"keep_alive_max_attempt=5 --max_restarts=100 --monitor_interval=1 {tmp_path}/shared/checkpoint4/train.py "
            f"--snapshot-path {tmp_path}/shared/snapshots/checkpoint.bin --checkpoint-interval 100 --steps 500 "
            f"--config-dir {tmp_path}/shared/checkpoint4/config --parallel ddp"), host
        # Ranks come from the rendezvous: nothing in the unit names one.
        assert "NODE_RANK" not in unit and "--node_rank" not in unit and "--master_port" not in unit
        assert "\nEnvironment=TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in unit
        assert "\nDescription=checkpoint4 distributed training (elastic: node rank from the rendezvous)\n" in unit
        assert "# Node ranks come from the rendezvous at every (re)start, not from the inventory." in unit
        assert f"# checkpoint4 training on {host}, elastic: 3 to 4 nodes," in unit
        for kept in ("Restart=on-failure", "KillMode=control-group", "RemainAfterExit=yes",
                     "Environment=DISTRIBUTED_MODE=physical", f'Environment="PYCKPT_CONFIG_DIR={tmp_path}/shared/checkpoint4/config"'):
            assert f"\n{kept}\n" in unit, kept


def test_training_unit_elastic_knobs(tmp_path):
    # The cluster-wide names set the range and the port; the role's knobs the rest (a training_ knob wins).
    inv = make_inventory(tmp_path, spec_hosts(node2={"cluster_address": "192.168.1.77"}), elastic_training=True,
                         elastic_min_nodes=2, rdzv_port=29411, nproc_per_node=2)
    units = render_units(tmp_path, inv, training_rdzv_id="run 7", training_elastic_max_restarts=5,
                         training_rdzv_conf={"join_timeout": 60, "last_call_timeout": 1})
    assert (" --nnodes=2:4 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=192.168.1.100:29411 "
            '--rdzv_id="run 7" --local_addr=192.168.1.77 --rdzv_conf=is_host=false,join_timeout=60,last_call_timeout=1 '
            "--max_restarts=5 --monitor_interval=1 ") in exec_start(units["node2"])
    # training_elastic: false in the inventory wins over elastic_training: true: the static unit.
    (tmp_path / "static").mkdir()
    static = render_units(tmp_path / "static", inv, training_elastic=False)
    assert " --node_rank=2 --master_addr=192.168.1.100 --master_port=29500 --max_restarts=0 " in static["node2"]


def test_elastic_workers_say_plainly_when_the_master_is_lost(tmp_path):
    """The rendered ExecStopPost, run by bash as systemd would run it (systemd is not in the loop here:
    `$$` unescaped by hand, SERVICE_RESULT set as systemd sets it), against a real closed and a real
    listening port on 127.0.0.1 standing in for the master's rendezvous port."""
    import shlex
    import socket
    import subprocess

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        units = render_units(tmp_path, REPO / "inventory/physical", elastic_training=True,
                             training_master_addr="127.0.0.1", training_rdzv_port=port)
        assert "ExecStopPost" not in units["node0"]     # the master hosts the rendezvous itself
        line = next(x for x in units["node2"].splitlines() if x.startswith("ExecStopPost="))
        argv = shlex.split(line.removeprefix("ExecStopPost=").replace("$$", "$"))

        def after(result: str) -> str:
            return subprocess.run(argv, env={"PATH": os.environ["PATH"], "SERVICE_RESULT": result},
                                  capture_output=True, text=True, timeout=30).stdout
        assert after("exit-code") == ""                 # the master answers: torch's own error is the story
    assert after("success") == ""                       # a run that ended well says nothing
    said = " ".join(after("exit-code").split())
    assert said.startswith(f"checkpoint4: the master 127.0.0.1 does not answer on the rendezvous port {port}: "
                           "the elastic job cannot go on without the master"), said
    assert "make another host the master in the inventory and run setup-cluster.yml and train.yml" in said


@pytest.mark.parametrize("min_nodes", [0, 5])
def test_training_min_nodes_outside_the_node_count_fails(tmp_path, min_nodes):
    inv = make_inventory(tmp_path, spec_hosts(), elastic_training=True, elastic_min_nodes=min_nodes)
    rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", inv, {**local(tmp_path), "render_dir": str(tmp_path)})
    assert rc != 0, out
    assert (f"training_min_nodes={min_nodes} on node0 (elastic_min_nodes in the inventory, when set): the fewest nodes "
            "the elastic job runs on must be 1 to 4, the number of nodes (training_nnodes)") in " ".join(out.split()), out
    assert not list(tmp_path.glob("*.service"))


def test_training_min_nodes_is_not_checked_in_static_mode(tmp_path):
    inv = make_inventory(tmp_path, spec_hosts(), elastic_min_nodes=0)
    assert sorted(render_units(tmp_path, inv)) == ["node0", "node1", "node2", "node3"]


def gpu_stand_in(tmp_path: Path, gpus: int) -> Path:
    """A stand-in `nvidia-smi` (this machine has no GPU) that reports `gpus` GPUs, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n# stand-in nvidia-smi of tests/ansible: --query-gpu=index lists the GPUs\n"
                      f"[ \"$1\" = --query-gpu=index ] && seq 0 {gpus - 1} && exit 0\nexit 2\n")
    script.chmod(0o755)
    return bin_dir


def test_training_nproc_auto_counts_the_gpus_nvidia_smi_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{gpu_stand_in(tmp_path, 8)}{os.pathsep}{os.environ['PATH']}")
    units = render_units(tmp_path, REPO / "inventory/physical", training_nproc_per_node="auto")
    assert sorted(units) == ["node0", "node1", "node2", "node3"]
    assert all(" --nproc_per_node=8 " in unit and "\n# 8 process(es) per node" in unit for unit in units.values())


def test_training_nproc_auto_is_one_without_nvidia_smi(tmp_path):
    units = render_units(tmp_path, REPO / "inventory/physical", training_nproc_per_node="auto")
    assert all(" --nproc_per_node=1 " in unit for unit in units.values())


def test_training_nproc_must_agree_across_nodes(tmp_path):
    # node1 is told 2 processes, the others count their GPUs (none here: 1): torchrun needs one number.
    inv = make_inventory(tmp_path, spec_hosts(node1={"training_nproc_per_node": 2}), training_nproc_per_node="auto")
    rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", inv,
                  {**local(tmp_path), "render_dir": str(tmp_path)})
    assert rc != 0, out
    assert "The nodes would run different numbers of processes (node0=1, node1=2, node2=1, node3=1)" in " ".join(
        out.split()), out


def test_training_nproc_rejects_a_bad_value(tmp_path):
    inv = make_inventory(tmp_path, spec_hosts(), training_nproc_per_node="gpus")
    rc, out = run(tmp_path, REPO / "tests/ansible/render-unit.yml", inv, {**local(tmp_path), "render_dir": str(tmp_path)})
    assert rc != 0, out
    assert "training_nproc_per_node=gpus on node0: use a positive number or auto" in " ".join(out.split()), out


# --- launch script ------------------------------------------------------------------------------

def test_launch_script_runs_train_yml_on_the_given_inventory(tmp_path):
    # The wrapper passes -i and the train.py options to train.yml, whose preflight rejects this
    # inventory before any host is contacted.
    import subprocess

    inv = make_inventory(tmp_path, spec_hosts(node3={"node_rank": 7}))
    proc = subprocess.run(["bash", str(REPO / "scripts/launch_distributed.sh"), "-i", str(inv), "--steps", "50"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    assert proc.returncode != 0
    assert "Node ranks must be 0..3" in " ".join(proc.stdout.split()), proc.stdout + proc.stderr
    assert "PLAY [Status" not in proc.stdout  # a failed launch stops before the status report


# --- verify-shared ------------------------------------------------------------------------------

def test_verify_shared_passes_when_every_node_sees_one_directory(tmp_path):
    # The four "nodes" all run here (connection local) on one directory: a shared filesystem.
    rc, out = run(tmp_path, REPO / "playbooks/verify-shared.yml", REPO / "inventory/physical",
                  local(tmp_path, cluster_user="root", cluster_group="root"))
    assert rc == 0, out
    assert "node3 sees the files of all 4 nodes" in out
    assert sorted(p.name for p in (tmp_path / "shared/.cluster-verify").iterdir()) == ["node0", "node1", "node2",
                                                                                      "node3"]


def test_verify_shared_fails_for_a_node_that_does_not_share(tmp_path):
    # node2 writes to its own directory (as if its NFS mount were missing): the others miss its file,
    # and node2 misses theirs. A file node2 left in the share on an earlier run must not count.
    hosts = spec_hosts(node2={"shared_path": str(tmp_path / "node2-local"),
                              "snapshot_dir": str(tmp_path / "node2-local/snapshots")})
    inv = make_inventory(tmp_path, hosts, shared_path=str(tmp_path / "shared"),
                         snapshot_dir=str(tmp_path / "shared/snapshots"), cluster_user="root", cluster_group="root")
    (tmp_path / "node2-local/snapshots").mkdir(parents=True)
    (tmp_path / "node2-local/.cluster-verify").mkdir()
    (tmp_path / "shared/.cluster-verify").mkdir(parents=True)
    (tmp_path / "shared/.cluster-verify/node2").write_text("20261124T000000.000000-1\n")
    extra = {"ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": sys.executable}
    rc, out = run(tmp_path, REPO / "playbooks/verify-shared.yml", inv, extra)
    assert rc != 0
    flat = " ".join(out.split())
    assert "node0 does not see the current file of node2" in flat
    assert "node2 does not see the current file of node0, node1, node3" in flat


# --- local cluster settings (the checks run before any container is made) ------------------------

BAD_LOCAL_CLUSTER = {
    "engine": ({"local_cluster_engine": "lxc"}, "local_cluster_engine=lxc (podman|docker)"),
    "no workers": ({"local_cluster_workers": 0}, "local_cluster_workers=0 (>= 1)"),
    "name": ({"local_cluster_name": "Ck_4"}, "local_cluster_name=Ck_4"),
    "subnet not a network": ({"local_cluster_subnet": "10.77.0.5/24"}, "local_cluster_subnet=10.77.0.5/24"),
    "too many workers": ({"local_cluster_subnet": "10.77.0.0/28", "local_cluster_workers": 8},
                         "local_cluster_workers=8"),
    "nodes outside the cluster subnet": ({"local_cluster_workers": 60},
                                         "must lie inside local_cluster_subnet"),
}


@pytest.mark.parametrize("case", BAD_LOCAL_CLUSTER, ids=list(BAD_LOCAL_CLUSTER))
def test_local_cluster_rejects_bad_settings_before_creating_anything(tmp_path, case):
    settings, message = BAD_LOCAL_CLUSTER[case]
    state = tmp_path / "state"
    rc, out = run(tmp_path, "local-cluster.yml", "localhost,",
                  {**settings, "local_cluster_state_dir": str(state),
                   "local_cluster_inventory_dir": str(tmp_path / "inventory")})
    assert rc != 0, out
    assert message in " ".join(out.split()), out
    assert not state.exists() and not (tmp_path / "inventory").exists(), "created things before failing"


# --- status -------------------------------------------------------------------------------------

def status_stand_ins(tmp_path: Path, units: dict[str, dict]) -> Path:
    """Stand-in `systemctl` and `journalctl` (no systemd here), first on PATH. `units`: unit name ->
    {"show": systemctl show's properties, "group": the journal entry of its latest group line or None}."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for unit, data in units.items():
        (bin_dir / f"{unit}.show").write_text("".join(f"{k}={v}\n" for k, v in data["show"].items()))
        if data.get("group"):
            (bin_dir / f"{unit}.group").write_text(json.dumps(data["group"]) + "\n")
    # systemctl show <unit> ...: the properties. journalctl --unit <unit> --grep ...: the group entry (JSON,
    # exit 1 without one, like journalctl); journalctl without --grep: the log tail.
    (bin_dir / "systemctl").write_text(
        '#!/bin/sh\n# stand-in systemctl of tests/ansible\n[ "$1" = show ] && cat "$(dirname "$0")/$2.show"\n')
    (bin_dir / "journalctl").write_text(
        '#!/bin/sh\n# stand-in journalctl of tests/ansible\ndir=$(dirname "$0"); unit=$2\n'
        'case "$*" in *--grep*) cat "$dir/$unit.group" 2>/dev/null || exit 1 ;; *) echo "step 7 loss 0.5" ;; esac\n')
    for name in ("systemctl", "journalctl"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def unit_show(state: str = "active/running", restarts: int = 0, invocation: str = "inv") -> dict:
    active, sub = state.split("/")
    return {"LoadState": "loaded", "ActiveState": active, "SubState": sub, "Result": "success", "ExecMainStatus": 0,
            "NRestarts": restarts, "ActiveEnterTimestamp": "Mon 2026-01-05 10:00:00 UTC", "InvocationID": invocation}


def group_entry(time_s: int, hostname: str, node_rank: int, members: list[str], restart: int,
                invocation: str = "inv") -> dict:
    return {"__REALTIME_TIMESTAMP": str(time_s * 1_000_000), "_HOSTNAME": hostname, "_SYSTEMD_INVOCATION_ID": invocation,
            "MESSAGE": f"group: world_size={len(members)} nodes={len(members)} node_rank={node_rank} restart={restart} "
                       f"members={','.join(members)}"}


def status_lines(tmp_path: Path, monkeypatch, units: dict[str, dict], **group_vars) -> list[str]:
    """status.yml on the physical inventory (every node on this machine, unit checkpoint4-<node>), with the
    stand-ins answering for the units; the lines of its cluster report."""
    monkeypatch.setenv("PATH", f"{status_stand_ins(tmp_path, units)}{os.pathsep}{os.environ['PATH']}")
    hosts = spec_hosts(**{f"node{i}": {"training_service_name": f"checkpoint4-node{i}"} for i in (1, 2, 3)})
    hosts["master"]["hosts"]["node0"]["training_service_name"] = "checkpoint4-node0"
    inv = make_inventory(tmp_path, hosts, **group_vars)
    rc, out = run(tmp_path, REPO / "status.yml", inv, local(tmp_path, venv_path=str(tmp_path / "no-venv")))
    assert rc == 0, out
    report = out[out.index("TASK [Status | the cluster]"):]
    return [line.strip().strip("-").strip().strip("'\"") for line in report.splitlines() if line.strip().startswith("- ")]


def test_status_in_elastic_mode_reports_the_group_and_its_ranks(tmp_path, monkeypatch):
    # node3 died: the others re-formed at 3 (their agents restarted once; node1's unit also once by systemd).
    # Its own latest line is the older 4-node group's: it is not in the current group, so its rank is ?.
    # node2's line is from an earlier run of its unit (another invocation): its agent restarts do not count.
    old = ["h0", "h1", "h2", "h3"]
    new = ["h0", "h2", "h1"]
    units = {
        "checkpoint4-node0": {"show": unit_show(), "group": group_entry(200, "h0", 0, new, 1)},
        "checkpoint4-node1": {"show": unit_show(restarts=1), "group": group_entry(201, "h1", 2, new, 1)},
        "checkpoint4-node2": {"show": unit_show(restarts=3), "group": group_entry(202, "h2", 1, new, 5, "older")},
        "checkpoint4-node3": {"show": unit_show("activating/auto-restart", 4), "group": group_entry(100, "h3", 3, old, 0)},
    }
    lines = status_lines(tmp_path, monkeypatch, units, elastic_training=True)
    assert lines[:4] == [
        "node0 (rank 0): active/running, restarts 1, latest snapshot step none",
        "node1 (rank 2): active/running, restarts 2, latest snapshot step none",
        "node2 (rank 1): active/running, restarts 3, latest snapshot step none",
        "node3 (rank ?): activating/auto-restart, restarts 4, latest snapshot step none",
    ], lines
    assert lines[4] == "group: world size 3, nodes h0,h2,h1, restarts 4, latest snapshot step none", lines


def test_status_in_static_mode_keeps_the_inventory_ranks(tmp_path, monkeypatch):
    members = ["h0", "h1", "h2", "h3"]
    units = {f"checkpoint4-node{i}": {"show": unit_show(restarts=i), "group": group_entry(100, f"h{i}", 3 - i, members, 0)}
             for i in range(4)}
    units["checkpoint4-node3"]["group"] = None   # no group line yet
    lines = status_lines(tmp_path, monkeypatch, units)
    assert lines[:4] == [f"node{i} (rank {i}): active/running, restarts {i}, latest snapshot step none"
                         for i in range(4)], lines
    assert lines[4] == "group: world size 4, nodes h0,h1,h2,h3, restarts 3, latest snapshot step none", lines


def test_status_before_any_group_line(tmp_path, monkeypatch):
    units = {f"checkpoint4-node{i}": {"show": unit_show("inactive/dead"), "group": None} for i in range(4)}
    lines = status_lines(tmp_path, monkeypatch, units, elastic_training=True)
    assert lines[0] == "node0 (rank ?): inactive/dead, restarts 0, latest snapshot step none", lines
    assert lines[4].startswith("group: none reported yet"), lines


def test_status_lists_the_snapshots_at_an_s3_location(tmp_path, monkeypatch):
    # status.yml's listing is `pyckpt ls --json <the job's snapshot path>`: with an s3:// snapshot_location,
    # that URL, with the job's environment (training_environment: the AWS_* variables). A stand-in
    # venv's `pyckpt` records what it was given and answers like `pyckpt ls --json`.
    venv = tmp_path / "venv/bin"
    venv.mkdir(parents=True)
    (venv / "pyckpt").write_text(
        '#!/bin/sh\n# stand-in pyckpt of tests/ansible\n'
        'echo "$* AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL" >> "$(dirname "$0")/calls"\n'
        'echo \'[{"status": "current", "step": 40}, {"status": "committed", "step": 20}]\'\n')
    (venv / "pyckpt").chmod(0o755)
    units = {f"checkpoint4-node{i}": {"show": unit_show(), "group": None} for i in range(4)}
    monkeypatch.setenv("PATH", f"{status_stand_ins(tmp_path, units)}{os.pathsep}{os.environ['PATH']}")
    hosts = spec_hosts(**{f"node{i}": {"training_service_name": f"checkpoint4-node{i}"} for i in (1, 2, 3)})
    hosts["master"]["hosts"]["node0"]["training_service_name"] = "checkpoint4-node0"
    inv = make_inventory(tmp_path, hosts, snapshot_location=S3_LOCATION,
                         training_environment={"AWS_ENDPOINT_URL": "http://minio:9000"})
    rc, out = run(tmp_path, REPO / "status.yml", inv, local(tmp_path, venv_path=str(tmp_path / "venv")))
    assert rc == 0, out
    assert (venv / "calls").read_text().splitlines() == [f"ls --json {S3_LOCATION} AWS_ENDPOINT_URL=http://minio:9000"] * 4
    assert "node0 (rank 0): active/running, restarts 0, latest snapshot step 40" in out
