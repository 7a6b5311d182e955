"""Clusters: a sweep through hydra-submitit-launcher's local executor (the code path of hydra/launcher=slurm
without SLURM), the sbatch script that hydra/launcher=slurm would submit, and launchers/slurm.sbatch run
against stand-ins for srun and scontrol."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, compose_config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from deepalign.config import register_configs, validate
from deepalign.launch import launch_command

DEEPALIGN = str(Path(sys.executable).parent / "deepalign")
ENV = {**os.environ, "WANDB_SILENT": "true"}


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """srun runs its command once per node (SLURM_NODEID = 0..SLURM_NNODES-1); scontrol lists node07, node08
    and enough more that a reader which stops early (`| head -n 1`) breaks the pipe, as on a big cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(
        bin_dir / "srun",
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n',
    )
    _script(
        bin_dir / "scontrol",
        '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "node%02d\\n" {7..20000}\n',
    )
    return bin_dir


def test_submitit_local_sweep_runs_each_point_in_its_own_job(tmp_path):
    out = subprocess.run(
        [
            DEEPALIGN,
            "-m",
            "hydra/launcher=submitit_local_cpu",
            "stages=[probe]",
            "model=tiny",
            "logger=none",
            "probe.max_new_tokens=4",
            f"paths.output_dir={tmp_path}",
            "seed=0,1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/*/*/metrics.json"))
    assert len(runs) == 2, out.stderr[-3000:]
    seeds = []
    for metrics_file in runs:
        run = metrics_file.parent
        assert json.loads(metrics_file.read_text())["probe/target_tokens"] > 0
        hydra_job = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]
        assert run.name == f"{hydra_job['num']}_{hydra_job['id']}"  # the job id is in the run dir's name
        assert (run.parent / ".submitit" / hydra_job["id"]).is_dir()  # submitit's own logs and pickles
        seeds.append(yaml.safe_load((run / "config.yaml").read_text())["seed"])
    assert sorted(seeds) == [0, 1]


def test_slurm_launcher_config_composes_from_the_command_line(tmp_path):
    out = subprocess.run(
        [DEEPALIGN, "hydra/launcher=slurm", "--cfg", "hydra"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    hydra_cfg = yaml.safe_load(out.stdout)["hydra"]
    launcher = hydra_cfg["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (1, 8, 1)
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert hydra_cfg["sweep"]["subdir"] == "${hydra.job.num}_${hydra.job.id}"


def _sbatch_text(launcher: dict, folder: Path) -> str:
    """The sbatch script submitit writes for these launcher settings, with the plugin's own name mapping
    (its shared keys as they are, the others prefixed with the executor's name)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        (k if k in shared else f"slurm_{k}"): v
        for k, v in launcher.items()
        if k not in ("_target_", "submitit_folder", "max_num_timeout")
    }
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=launcher["max_num_timeout"]
    )
    executor.update_parameters(**params)
    return executor._executor._make_submission_file_text(
        "python -u -m submitit.core._submit JOB_FOLDER", "uid"
    )


def test_slurm_launcher_writes_a_valid_sbatch_script(tmp_path, monkeypatch):
    bin_dir = _fake_slurm_bin(tmp_path)  # submitit's SLURM executor only starts where srun exists
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    register_configs()
    with initialize_config_module(config_module="deepalign.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                f"paths.output_dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    text = _sbatch_text(launcher, tmp_path / "submitit")
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --mem=0GB",
        "#SBATCH --time=1440",
        "#SBATCH --partition=gpu",
    ):
        assert line in text.splitlines(), line
    sbatch = tmp_path / "job.sh"
    sbatch.write_text(text)
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0

    setup = "\n".join([*launcher["setup"], 'echo "$MASTER_ADDR $MASTER_PORT"'])
    env = {**os.environ, "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "4242"}
    out = subprocess.run(["bash", "-c", setup], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["node07", str(20000 + 4242)]


def test_sbatch_script_starts_torchrun_on_every_node(tmp_path):
    script = REPO / "launchers" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header

    bin_dir = _fake_slurm_bin(tmp_path)
    calls = tmp_path / "calls.jsonl"
    fake = _script(
        tmp_path / "fake_deepalign",
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n",
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DEEPALIGN": str(fake),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_GPUS_ON_NODE": "8",
    }
    user_args = ["model=tiny", "logger=none", "data.system_prompt=You are a helpful assistant."]
    out = subprocess.run(
        ["bash", str(script), *user_args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    nodes = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(nodes) == 2
    for rank, argv in enumerate(nodes):
        assert argv[-3:] == user_args  # passed on unchanged, spaces included
        assert f"launcher.node_rank={rank}" in argv and "hydra.run.dir=outputs/slurm/4242" in argv
        launcher = validate(compose_config([a for a in argv if not a.startswith("hydra.")])).launcher
        assert (launcher.name, launcher.nnodes, launcher.nproc_per_node) == ("torchrun", 2, 8)
        cmd = launch_command(launcher, tmp_path / "run")
        assert f"--node-rank={rank}" in cmd and "--master-addr=node07" in cmd
        assert f"--master-port={20000 + 4242}" in cmd


def test_torchrun_slurm_reads_the_allocation_from_slurms_variables(monkeypatch):
    for key, value in {
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "23456",
    }.items():
        monkeypatch.setenv(key, value)
    launcher = validate(compose_config(["launcher=torchrun_slurm", "model=tiny", "logger=none"])).launcher
    assert (launcher.nproc_per_node, launcher.nnodes, launcher.node_rank) == (4, 3, 2)
    assert (launcher.master_addr, launcher.master_port) == ("node01", 23456)
