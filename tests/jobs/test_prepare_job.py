"""`python jobs/prepare.py ...` as users run it: exit codes, outputs, one-line errors before Ray starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PREPARE = str(REPO_ROOT / "jobs" / "prepare.py")
RAY_STARTED = "Started a local Ray instance"


def run_prepare(*overrides: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PREPARE, *overrides], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def environment_without_ray() -> dict[str, str]:
    """No RAY_ADDRESS: if the job got as far as Ray it would start one and say so."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_prepare_job_writes_shards_and_manifest(job_env, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i} says hello to the expert router\n" * 40)
    # Relative paths resolve against the cwd the user ran the job from.
    result = run_prepare("data.input=corpus", "data.dataset_dir=out/ds", "data.vocab_size=300", "data.seq_len=16",
                         "data.validation_fraction=0.3", env=job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    dataset_dir = tmp_path / "out" / "ds"
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["config"]["input"] == str(corpus)
    assert manifest["documents"]["used"] == 6
    for split in ("train", "validation"):
        for shard in manifest["splits"][split]["shards"]:
            assert (dataset_dir / shard["file"]).is_file()
    assert f"Prepared dataset {dataset_dir}" in result.stdout
    assert f"manifest:   {dataset_dir}/manifest.json" in result.stdout
    assert "documents:  6 read, 6 used, 0 skipped" in result.stdout
    # Same command again: the dataset is reused, not rewritten.
    again = run_prepare("data.input=corpus", "data.dataset_dir=out/ds", "data.vocab_size=300", "data.seq_len=16",
                        "data.validation_fraction=0.3", env=job_env, cwd=tmp_path)
    # (Other libraries may log to stdout first, so look for the line rather than the start.)
    assert again.returncode == 0 and f"Reused dataset {dataset_dir}" in again.stdout.splitlines()


@pytest.mark.parametrize(
    "override, named",
    [("data.nope=1", "data.nope"), ("data.seq_len=abc", "data.seq_len"), ("data.seq_len=1", "data.seq_len"),
     ("data.vocab_size=100", "data.vocab_size")],
    ids=["unknown-key", "wrong-type", "seq-len-too-small", "vocab-too-small"],
)
def test_bad_override_fails_with_a_clear_message_before_ray(override, named):
    result = run_prepare(override, env=environment_without_ray())
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert RAY_STARTED not in result.stderr + result.stdout


def test_missing_input_is_one_line_data_error_before_ray(tmp_path):
    result = run_prepare(f"data.input={tmp_path}/missing", f"data.dataset_dir={tmp_path}/ds", env=environment_without_ray())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"data error: data.input: {tmp_path}/missing does not exist"
    assert RAY_STARTED not in result.stderr + result.stdout
