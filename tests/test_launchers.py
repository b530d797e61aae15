"""The launchers end to end: launchers/torchrun.sh and launchers/deepspeed.sh through the real torchrun
and deepspeed runners, the SLURM scripts' wiring with a stub scontrol/srun, and a real two-node run
(c10d rendezvous across two network namespaces joined by a veth pair)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
BIN = Path(sys.executable).parent  # torchrun and deepspeed of this interpreter's venv; never PATH's
ZERO3_MODALITY = "vision"

# Variables of an enclosing job or launcher that would change what the scripts do.
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
              "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_CONF", "LOCAL_ADDR", "NPROC_PER_NODE", "NUM_GPUS",
              "HOSTFILE", "TORCHRUN_ARGS", "DS_ARGS", "DS_ENV_FILE", "DRY_RUN", "GLOO_SOCKET_IFNAME",
              "CUDA_VISIBLE_DEVICES")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCHRUN=str(BIN / "torchrun"),
               DEEPSPEED=str(BIN / "deepspeed"), PYTHON=sys.executable)
    env.update(extra)
    return env


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _small(tmp_path: Path, *extra: str, tracking: bool = False) -> list[str]:
    """Three steps, one checkpoint at the end, everything under tmp_path."""
    track = [f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"] if tracking else ["tracking.enabled=false"]
    return _sets("train.max_steps=3", "checkpoint.every_steps=3", f"checkpoint.dir={tmp_path}/ckpt", *track, *extra)


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_checkpoint(tmp_path: Path, engine: str) -> None:
    ckpt = tmp_path / "ckpt" / "step_00000003"
    assert (ckpt / "COMPLETE").exists(), sorted(p.name for p in (tmp_path / "ckpt").glob("*"))
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and f"engine:\n  name: {engine}\n" in (ckpt / "recipe.yaml").read_text()


# ----------------------------------------------------------------------------- one node, real launchers


def test_torchrun_sh_two_ranks(tmp_path):
    engine = "fsdp"  # ddp through torchrun is the same launcher path; the engine itself is tested elsewhere
    cmd = [str(LAUNCHERS / "torchrun.sh"), str(REPO / "recipes/text/tiny.yaml"),
           *_small(tmp_path, f"engine.name={engine}", "train.global_batch_size=8", "train.micro_batch_size=4",
                   tracking=True)]
    proc = _run(cmd, _env(NPROC_PER_NODE="2"), tmp_path)
    assert "--standalone" in proc.stderr and "--nproc-per-node 2" in proc.stderr
    assert f"world 2; engine {engine}" in proc.stdout
    assert re.search(r"\[scaling\] step 3: loss [0-9.]+", proc.stdout), proc.stdout
    assert f"checkpoint: {tmp_path}/ckpt/step_00000003" in proc.stdout and "MLflow run" in proc.stdout
    assert (tmp_path / "mlruns.db").exists()
    _assert_checkpoint(tmp_path, engine)


def test_deepspeed_sh_zero3_two_ranks(tmp_path):
    # No engine.name: deepspeed.sh adds engine.name=deepspeed; the runner passes --local_rank to both ranks.
    cmd = [str(LAUNCHERS / "deepspeed.sh"), str(REPO / f"recipes/{ZERO3_MODALITY}/tiny.yaml"),
           *_small(tmp_path, "engine.zero_stage=3", "train.global_batch_size=8", "train.micro_batch_size=4")]
    proc = _run(cmd, _env(NUM_GPUS="2", MASTER_PORT=str(_free_port())), tmp_path)
    out = proc.stdout + proc.stderr
    assert "--num_gpus 2" in proc.stderr and "--set engine.name=deepspeed" in proc.stderr
    assert "--local_rank=0" in out and "--local_rank=1" in out
    assert "world 2; engine deepspeed" in proc.stdout
    _assert_checkpoint(tmp_path, "deepspeed")


def test_launcher_usage_and_engine_override(tmp_path):
    for script in ("torchrun.sh", "deepspeed.sh"):
        proc = subprocess.run([str(LAUNCHERS / script)], env=_env(), capture_output=True, text=True)
        assert proc.returncode == 2 and "RECIPE [--set key.path=value ...]" in proc.stderr, proc.stderr
    recipe = str(REPO / "recipes/text/tiny.yaml")
    dry = _env(DRY_RUN="1", NUM_GPUS="2")
    proc = _run([str(LAUNCHERS / "deepspeed.sh"), recipe, "--set", "train.max_steps=3"], dry, tmp_path)
    assert f"--module scaling.pretrain {recipe} --set engine.name=deepspeed --set train.max_steps=3" in proc.stderr
    proc = _run([str(LAUNCHERS / "deepspeed.sh"), recipe, "--set", "engine.name=ddp"], dry, tmp_path)
    assert "engine.name=deepspeed" not in proc.stderr and "--set engine.name=ddp" in proc.stderr
    assert "--master_port 29600" in proc.stderr and "--hostfile" not in proc.stderr
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    node1 = dict(dry, HOSTFILE=str(hostfile), NODE_RANK="1", MASTER_ADDR="node0")
    proc = _run([str(LAUNCHERS / "deepspeed.sh"), recipe], node1, tmp_path)
    assert f"--master_addr node0 --hostfile {hostfile} --no_ssh --node_rank 1 --module" in proc.stderr


# ----------------------------------------------------------------------------- SLURM scripts, stubbed

_NODES = ["gpu-07", "gpu-08"]


def _slurm_stubs(tmp_path: Path) -> Path:
    """`scontrol show hostnames LIST` prints the two nodes; `srun CMD...` runs CMD once per node, in order,
    with that node's SLURM_NODEID (as srun --ntasks-per-node=1 would, minus the parallelism)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        '[[ $1 == show && $2 == hostnames && $3 == "gpu-[07-08]" ]] || { echo "unexpected: $*" >&2; exit 1; }\n'
        f"printf '%s\\n' {' '.join(_NODES)}\n")
    (stubs / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'echo "srun $*" >&2\n'
        "while [[ $1 == -* ]]; do shift; done\n"
        f"for i in $(seq 0 $(( {len(_NODES)} - 1 ))); do SLURMD_NODENAME=node$i SLURM_NODEID=$i \"$@\" || exit; done\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    return stubs


def _slurm_env(tmp_path: Path, **extra: str) -> dict:
    return _env(PATH=f"{_slurm_stubs(tmp_path)}:{os.environ.get('PATH', '/usr/bin:/bin')}", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO),
                TMPDIR=str(tmp_path), **extra)


def test_slurm_hostfile_from_node_list(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile  # the runner's own parser

    env = _slurm_env(tmp_path, SLURM_GPUS_PER_NODE="h100:4")
    out = tmp_path / "hostfile"
    _run([str(LAUNCHERS / "slurm_hostfile.sh"), str(out)], env, tmp_path)
    assert dict(_parse_hostfile(out.read_text().splitlines(True))) == {"gpu-07": 4, "gpu-08": 4}
    proc = _run([str(LAUNCHERS / "slurm_hostfile.sh")], dict(env, GPUS_PER_NODE="8"), tmp_path)  # stdout
    assert dict(_parse_hostfile(proc.stdout.splitlines(True))) == {"gpu-07": 8, "gpu-08": 8}
    assert dict(_parse_hostfile((LAUNCHERS / "hostfile.example").read_text().splitlines(True))) == {
        "worker-0": 8, "worker-1": 8}
    env.pop("SLURM_GPUS_PER_NODE")
    proc = subprocess.run([str(LAUNCHERS / "slurm_hostfile.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "set GPUS_PER_NODE" in proc.stderr


def test_slurm_sbatch_scripts_wire_the_launchers(tmp_path):
    recipe, overrides = "recipes/speech/base.yaml", ["--set", "train.max_steps=10", "--set", "engine.name=fsdp"]
    env = _slurm_env(tmp_path, DRY_RUN="1", NPROC_PER_NODE="4")
    proc = _run(["bash", str(LAUNCHERS / "slurm_torchrun.sbatch"), recipe, *overrides], env, REPO)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[launchers] ")]
    assert len(lines) == 2, proc.stderr
    for node, line in enumerate(lines):
        assert "--nproc-per-node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint gpu-07:29400 --rdzv-id 4242 " \
               f"--rdzv-conf is_host={int(node == 0)} -m scaling.pretrain {recipe} {' '.join(overrides)}" in line, line

    proc = _run(["bash", str(LAUNCHERS / "slurm_deepspeed.sbatch"), recipe, "--set", "train.max_steps=10"],
                dict(env, GPUS_PER_NODE="4"), REPO)
    hostfile = tmp_path / "scaling-hostfile-4242"
    assert hostfile.read_text().splitlines()[1:] == ["gpu-07 slots=4", "gpu-08 slots=4"]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("[launchers] ")]
    assert f"--master_addr gpu-07 --hostfile {hostfile} --module scaling.pretrain {recipe} " \
           "--set engine.name=deepspeed --set train.max_steps=10" in line, line
    assert "--num_gpus" not in line and "--no_ssh" not in line  # slots from the hostfile; pdsh starts the nodes
    (env_file,) = tmp_path.glob("scaling-deepspeed-env.*")  # what pdsh forwards to the other nodes
    assert "OMP_NUM_THREADS=1" in env_file.read_text().splitlines()


# ----------------------------------------------------------------------------- two nodes in network namespaces

_SUBNET = "198.18.0"  # 198.18.0.0/15 is reserved for benchmarking (RFC 2544); nothing else is reachable
_ids = itertools.count()


@dataclass
class Node:
    ns: str
    ifname: str
    addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _counters(node: Node) -> tuple[int, int]:
    stats = _ip("-n", node.ns, "-j", "-s", "link", "show", "dev", node.ifname).stdout
    rx, tx = (int(m) for m in re.findall(r'"(?:rx|tx)":\{"bytes":(\d+)', stats))
    return rx, tx


@pytest.fixture
def two_nodes():
    """Two namespaces joined by a veth pair: 198.18.0.1/24 and 198.18.0.2/24, plus `lo`. No other route,
    no IPv6, and a per-namespace /etc/hosts (ip netns exec mounts /etc/netns/NS/*) that maps this
    machine's hostname to the node's own address, with an empty resolv.conf: no DNS query leaves."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be created: `ip` (Debian/Ubuntu package iproute2) is not installed")
    tag = f"{os.getpid()}-{next(_ids)}"
    nodes = [Node(f"scaling-{tag}-{i}", f"scl{tag.replace('-', '')[-9:]}{'ab'[i]}", f"{_SUBNET}.{i + 1}")
             for i in range(2)]
    created, etc_netns = [], Path("/etc/netns")
    etc_created = not etc_netns.exists()
    try:
        for n in nodes:
            proc = _ip("netns", "add", n.ns, check=False)
            if proc.returncode:
                pytest.skip(f"network namespaces cannot be created: `ip netns add` failed: {proc.stderr.strip()}")
            created.append(n)
        a, b = nodes
        _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
        hostname = os.uname().nodename
        for n in nodes:
            subprocess.run(["ip", "netns", "exec", n.ns, "sh", "-c",
                            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6 "
                            f"/proc/sys/net/ipv6/conf/{n.ifname}/disable_ipv6; do [ -w $f ] && echo 1 > $f; done; true"],
                           check=True)
            _ip("-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", n.ifname)
            _ip("-n", n.ns, "link", "set", "lo", "up")
            _ip("-n", n.ns, "link", "set", n.ifname, "up")
            etc = etc_netns / n.ns
            etc.mkdir(parents=True)
            hosts = ["127.0.0.1 localhost"] + [f"{m.addr} node{i}" + (f" {hostname}" if m is n else "")
                                               for i, m in enumerate(nodes)]
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            (etc / "resolv.conf").write_text("")
            routes = _ip("-n", n.ns, "-4", "route", "show").stdout.split("\n")
            assert [r.split()[0] for r in routes if r.strip()] == [f"{_SUBNET}.0/24"], routes
            assert not _ip("-n", n.ns, "-6", "route", "show", check=False).stdout.strip()
        yield nodes
    finally:
        for n in created:
            for pid in _ip("netns", "pids", n.ns, check=False).stdout.split():  # leftovers of a failed run
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", n.ns, check=False)  # removes the veth pair too
            shutil.rmtree(etc_netns / n.ns, ignore_errors=True)
        if etc_created:
            try:
                etc_netns.rmdir()
            except OSError:
                pass


@pytest.mark.parametrize("modality, engine", [("vision", ["engine.name=fsdp"]),
                                              (ZERO3_MODALITY, ["engine.name=deepspeed", "engine.zero_stage=3"])],
                         ids=["fsdp", "zero3"])
def test_two_nodes_torchrun_rendezvous(tmp_path, two_nodes, modality, engine):
    """One rank per 'node', started as on SLURM: launchers/torchrun.sh on each node with NNODES, NODE_RANK
    and RDZV_ENDPOINT; gloo bound to the veth (GLOO_SOCKET_IFNAME), MASTER_ADDR from node 0's LOCAL_ADDR."""
    head = two_nodes[0]
    before = [_counters(n) for n in two_nodes]
    args = [str(LAUNCHERS / "torchrun.sh"), str(REPO / f"recipes/{modality}/tiny.yaml"),
            *_small(tmp_path, *engine, "train.global_batch_size=8", "train.micro_batch_size=4")]
    procs, logs = [], []
    for rank, n in enumerate(two_nodes):
        env = _env(NNODES="2", NODE_RANK=str(rank), RDZV_ENDPOINT=f"{head.addr}:29400", RDZV_ID=n.ns[:-2],
                   LOCAL_ADDR=n.addr, NPROC_PER_NODE="1", GLOO_SOCKET_IFNAME=n.ifname)
        logs.append(open(tmp_path / f"node{rank}.log", "w+"))
        procs.append(subprocess.Popen(["ip", "netns", "exec", n.ns, *args], env=env, cwd=tmp_path,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 240
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = []
    for f in logs:
        f.seek(0)
        text.append(f.read())
        f.close()
    report = "\n".join(f"--- node{i}\n{t[-4000:]}" for i, t in enumerate(text))
    assert codes == [0, 0], f"exit codes {codes}\n{report}"
    name = engine[0].split("=")[1]
    # one rank 0 across the two nodes: it alone prints the plan and the closing summary
    assert sum(f"world 2; engine {name}" in t for t in text) == 1, report
    assert sum("step 3: loss" in t for t in text) == 1, report
    for t in text:
        assert "--rdzv-backend c10d --rdzv-endpoint 198.18.0.1:29400" in t, report
    _assert_checkpoint(tmp_path, name)
    for n, (rx0, tx0) in zip(two_nodes, before):  # the ranks talked over the veth pair
        rx, tx = _counters(n)
        assert rx - rx0 > 10_000 and tx - tx0 > 10_000, (n, rx - rx0, tx - tx0)
