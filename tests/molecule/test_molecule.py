"""Runs `molecule test` for every roles/*/molecule/default scenario (podman, real containers).

Each scenario creates its containers from localhost/checkpoint4-debian:bookworm (built by
tests/images/build-image.sh), converges the role, checks idempotence, runs its side effect and
verify playbooks (asserts on the containers' real state) and destroys everything it created.
The full log of each run is kept in .cache/molecule/<role>.log.

The scenarios run concurrently, MOLECULE_JOBS (default 3) at a time, started in the tests' order
by a session fixture; each test waits for its own scenario's result. One scenario alone leaves about
a fifth of the 2 cores idle (container boots, nc probe timeouts, podman exec round trips), and the
six one after another took 25-35 min of a CI run. They cannot collide: every scenario has its own
container names and its own podman network (roles/*/molecule/default/molecule.yml), Molecule keeps
its state per role, and the torch wheelhouse that two scenarios' prepare steps share is filled
once here before any of them starts. MOLECULE_JOBS=1 runs them one after another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p.parent for p in REPO.glob("roles/*/molecule/default/molecule.yml"))
CONTAINERS_CONF = REPO / ".cache" / "containers" / "containers.conf"
LOG_DIR = REPO / ".cache" / "molecule"
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
# A scenario takes 1.5-3 min on an idle 2-core machine; leave room for a loaded one.
SCENARIO_TIMEOUT = 1500
# Scenarios at once: 3 fills 2 cores; more only makes each one slower.
JOBS = max(1, int(os.environ.get("MOLECULE_JOBS", "3")))

pytestmark = pytest.mark.molecule


def container_env() -> dict[str, str]:
    """The environment molecule (and podman under it) needs here."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    # podman here needs runc and explicit ulimits: tests/images/setup-podman.sh writes them.
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    env["ANSIBLE_FORCE_COLOR"] = "false"
    env["NO_COLOR"] = "1"
    env["PY_COLORS"] = "0"
    return env


@pytest.fixture(scope="session")
def podman_image() -> None:
    """Podman installed and the test image present (building it is a no-op when it exists)."""
    if shutil.which("podman") is None:
        message = "podman is not installed: run `make setup-containers` (tests/images/setup-podman.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it in the Makefile: missing means broken setup
        pytest.skip(message)
    env = container_env()
    if not CONTAINERS_CONF.exists():
        subprocess.run(["bash", str(REPO / "tests/images/write-containers-conf.sh")], check=True, env=env)
    build = subprocess.run(
        ["bash", str(REPO / "tests/images/build-image.sh")],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    if build.returncode != 0:
        pytest.fail(f"building the test image failed:\n{build.stdout}\n{build.stderr}")


def test_scenarios_found() -> None:
    assert {p.parents[1].name for p in SCENARIOS} >= {"nfs_server", "nfs_client", "firewall"}


def run_scenario(scenario: Path) -> tuple[str, int, Path]:
    """`molecule test` for one scenario: (output, returncode, log path); destroys it on a timeout."""
    role_dir = scenario.parents[1]
    log_path = LOG_DIR / f"{role_dir.name}.log"
    cmd = [
        str(Path(sys.executable).parent / "molecule"),
        "--base-config", str(REPO / ".config/molecule/config.yml"),
        "test", "--scenario-name", scenario.name,
    ]
    try:
        result = subprocess.run(
            cmd, cwd=role_dir, env=container_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=SCENARIO_TIMEOUT,
        )
        output, returncode = result.stdout, result.returncode
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        output += f"\n*** molecule test timed out after {SCENARIO_TIMEOUT} s ***\n"
        returncode = -1
        # Do not leave the scenario's containers running.
        subprocess.run(cmd[:3] + ["destroy", "--scenario-name", scenario.name], cwd=role_dir,
                       env=container_env(), capture_output=True, timeout=300)
    log_path.write_text(output)
    return output, returncode, log_path


@pytest.fixture(scope="session")
def scenario_runs(request: pytest.FixtureRequest, podman_image: None):
    """Starts every selected scenario, JOBS at a time, in the order the tests run.

    Each test then waits only for its own scenario: it starts once the one before it has finished,
    and its scenario started no later than that (a worker frees up only when some earlier scenario
    ends), so a test's wait never exceeds its own scenario's run time and the per-test timeout holds.
    """
    selected = [item.callspec.params["scenario"] for item in request.session.items
                if item.originalname == "test_molecule_scenario" and hasattr(item, "callspec")]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    # The prepare steps of python_env and training both `pip download` torch into
    # this wheelhouse unless it is there (`creates:`): fill it once so they never race on it.
    if not list(WHEELHOUSE.glob("torch-2.13.0*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "torch==2.13.0", "-d", str(WHEELHOUSE)], check=True, capture_output=True, timeout=600)
    executor = ThreadPoolExecutor(max_workers=JOBS, thread_name_prefix="molecule")
    runs: dict[Path, Future] = {s: executor.submit(run_scenario, s) for s in dict.fromkeys(selected)}
    yield runs
    # Normally all done; after an interruption, start no more and let the running ones clean up.
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(SCENARIO_TIMEOUT + 60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.parents[1].name for p in SCENARIOS])
def test_molecule_scenario(scenario: Path, scenario_runs: dict[Path, Future]) -> None:
    role_dir = scenario.parents[1]
    output, returncode, log_path = scenario_runs[scenario].result()
    if returncode != 0:
        tail = "\n".join(output.splitlines()[-400:])
        pytest.fail(f"molecule test failed for {role_dir.name} (rc={returncode}); full log: {log_path}\n{tail}",
                    pytrace=False)
