"""One node's share of a run: flags over SLURM's variables over torchrun's, one-line refusals, the
torchrun command per node."""

import pytest

from holderpo_megatron.trainer.nodes import NodeLaunch, first_slurm_host

SLURM = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[003-006,9],cpu1"}


@pytest.mark.parametrize("nodelist,first", [("gpu[003-006,9],cpu1", "gpu003"), ("a,b", "a"), ("node7", "node7"),
                                            ("n[12,15]", "n12")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_one_node_by_default():
    n = NodeLaunch.resolve(nnodes=1, nproc_per_node=8, env={})
    assert (n.nnodes, n.node_rank, n.master_addr, n.master_port) == (1, 0, "127.0.0.1", 29500)
    cmd = n.torchrun_command(["--config", "r.yaml"])
    assert "--standalone" in cmd and "--nproc-per-node=8" in cmd and cmd[-2:] == ["--config", "r.yaml"]


def test_slurm_variables_and_flags_win_over_them():
    n = NodeLaunch.resolve(nnodes=4, nproc_per_node=8, env=SLURM)
    assert (n.nnodes, n.node_rank, n.master_addr, n.master_port) == (4, 2, "gpu003", 29500)
    n = NodeLaunch.resolve(nnodes=4, nproc_per_node=8, env=dict(SLURM, MASTER_PORT="29400"),
                           flags={"node_rank": 3, "master_addr": "head", "master_port": None})
    assert (n.node_rank, n.master_addr, n.master_port) == (3, "head", 29400)
    cmd = " ".join(n.torchrun_command([]))
    assert "--nnodes=4 --node-rank=3 --master-addr=head --master-port=29400 --rdzv-backend=static" in cmd
    assert n.worker_env() == {"HOLDERPO_COLLECTIVE_TIMEOUT_S": "1800"}


@pytest.mark.parametrize("kw,env,match", [
    (dict(nnodes=4, flags={"nnodes": 2}), {}, "--nnodes=2 nodes, but the recipe says parallel.nnodes=4"),
    (dict(nnodes=4), SLURM | {"SLURM_NNODES": "2"}, r"\$SLURM_NNODES=2 nodes, but the recipe says parallel.nnodes=4"),
    (dict(nnodes=2, flags={"node_rank": 2, "master_addr": "h"}), {}, "--node-rank=2 is not a node rank of 2 nodes"),
    (dict(nnodes=2), {}, "a run of several nodes needs node 0's address: --master-addr HOST"),
    (dict(nnodes=1, flags={"master_port": 70000}), {}, "--master-port=70000 is not a port"),
    (dict(nnodes=1), {"MASTER_PORT": "x"}, r"\$MASTER_PORT='x' is not an integer"),
])
def test_bad_node_settings_are_one_line_errors(kw, env, match):
    with pytest.raises(ValueError, match=match):
        NodeLaunch.resolve(nproc_per_node=8, env=env, **kw)
