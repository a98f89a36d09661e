"""Fault injection from outside: each case runs `train.py` or `eval.py` in a subprocess on a toy task run
(built once) or the tiny task world, with a bad input, a changed setting or an interruption, and checks the
exit status, the message, and that nothing was half-written or silently reused.

The cases are those of a user's first week: rerunning a workdir with other settings, a longer run, another
method, Ctrl-C, a damaged newest checkpoint (and all of them damaged), damaged weights, a checkpoint without
its tokenizer, mistyped config keys, integer ground truths, a workdir that is a file, a bad setting that
used to be found only at stage 5."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import trainer_overrides

# Integration: whole jobs in subprocesses (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")


def _run(args, timeout=600):
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr


def _task(work, *extra, timeout=600):
    return _run(["train.py", "--config=configs/task.py:toy", f"--config.workdir={work}", *extra], timeout)


def _default_sigint():
    """A child's Ctrl-C as a terminal's: pytest-xdist's workers ignore SIGINT, and a child inherits that
    (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _snapshot(root) -> dict:
    """Every file under root with its size and modification time: a refused run changes none of them."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("  config.")]


@pytest.fixture(scope="module")
def toy(toy_task_run):
    """A finished toy task run (2 RL steps, checkpoints at steps 1 and 2; conftest's)."""
    return toy_task_run[0]


def _copy(toy, tmp_path, stages=None):
    """A copy of the toy run; with `stages`, only those stages' outputs and records."""
    work = tmp_path / "run"
    if stages is None:
        shutil.copytree(toy, work)
        return work
    for name in ("data", "tokenizer", "warm", "eval"):
        shutil.copytree(toy / name, work / name)
    (work / "eval" / "final.json").unlink()
    records = json.loads((toy / "stages.json").read_text())
    (work / "stages.json").write_text(json.dumps({k: v for k, v in records.items() if k in stages}))
    return work


FIRST_FOUR = ("data", "tokenizer", "warm start", "evaluate warm start")


# ------------------------------------------------------------------------------------------------------
# Reruns and resumes that used to reuse old results


def test_a_rerun_under_other_settings_stops_naming_them_and_writes_nothing(toy, tmp_path):
    work = _copy(toy, tmp_path)
    before = _snapshot(work)
    rc, out, err = _task(work, "--config.algo.preset=grpo", "--config.optim.lr=1e-2")
    assert rc == 1, out + err
    lines = _error_lines(err)
    assert lines[0] == f"error: stage 'AttnRL' of the task run in {work} was made with other settings:"
    assert "  config.algo.preset: 'attnrl' there, 'grpo' now" in lines
    assert "  config.optim.lr: 0.0003 there, 0.01 now" in lines
    assert "use a new config.workdir" in err and "Traceback" not in err
    assert "done, skipped" not in out  # stopped before any stage
    assert _snapshot(work) == before


def test_a_longer_run_needs_the_flag(toy, tmp_path):
    """Without --config.accept_changes a longer run is refused; with it the run extends and the new policy
    is evaluated (the damaged-checkpoint test below runs that job)."""
    work = _copy(toy, tmp_path)
    before = _snapshot(work)
    rc, out, err = _task(work, "--config.train.steps=3")
    assert rc == 1 and "config.train.steps: 2 there, 3 now" in err
    assert "--config.accept_changes=train.steps" in err
    assert _snapshot(work) == before


def test_a_deleted_export_is_made_again_from_the_checkpoint(toy, tmp_path):
    work = _copy(toy, tmp_path)
    shutil.rmtree(work / "rl" / "export")
    final = (work / "eval" / "final.json").stat().st_mtime_ns
    rc, out, err = _task(work)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "[5/7] AttnRL: running" in out and (work / "rl" / "export" / "step_2" / "config.json").is_file()
    # The same step's policy: its evaluation stands.
    assert "[6/7] evaluate final: done, skipped" in out
    assert (work / "eval" / "final.json").stat().st_mtime_ns == final


def test_labels_follow_the_method_that_ran(toy, tmp_path):
    work = _copy(toy, tmp_path, stages=FIRST_FOUR)
    rc, out, err = _task(work, "--config.algo.preset=grpo")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "[5/7] GRPO: running" in out and "after GRPO" in out and "AttnRL" not in out
    assert json.loads((work / "summary.json").read_text())["method"] == "GRPO"
    page = (work / "report" / "index.html").read_text()
    assert "<title>GRPO on the built-in arithmetic-chain task" in page and "AttnRL on" not in page


def test_ctrl_c_during_rl_saves_and_exits_zero(toy, tmp_path):
    """Ctrl-C (SIGINT) as SIGTERM (tests/trainer_test.py and tests/multihost_test.py send that one)."""
    sig = signal.SIGINT
    work = _copy(toy, tmp_path, stages=FIRST_FOUR)
    cmd = [sys.executable, "train.py", "--config=configs/task.py:toy", f"--config.workdir={work}"]
    proc = subprocess.Popen(
        [*cmd, "--config.train.steps=200", "--config.algo.preset=grpo"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    ckpt = work / "rl" / "ckpt"
    deadline = time.time() + 600
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before RL checkpointed"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"{sig.name}: saved step" in out and "stopped during GRPO" in out
    assert "Run the same command again to resume." in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "RL" not in json.loads((work / "stages.json").read_text())  # not finished: not recorded


# ------------------------------------------------------------------------------------------------------
# Damaged checkpoints and weights


def _newest_step_data_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs if "/d/" in d + "/"]
    return max(files, key=os.path.getsize)


def test_a_damaged_newest_checkpoint_falls_back_and_the_longer_run_evaluates_its_policy(toy, tmp_path):
    """A longer run (accept_changes) whose newest checkpoint is damaged: it resumes from the previous step,
    trains to the new end and evaluates the new policy, not the step-2 result (tests/checkpoint_test.py
    has the other kinds of damage, in-process)."""
    work = _copy(toy, tmp_path)
    path = _newest_step_data_file(work / "rl" / "ckpt" / "2")
    os.truncate(path, os.path.getsize(path) // 3)
    rc, out, err = _task(work, "--config.train.steps=3", "--config.accept_changes=train.steps")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"checkpoint step 2 in {work / 'rl' / 'ckpt'} is damaged" in out
    assert "resuming from step 1, the newest intact step" in out and "resumed from step 1" in out
    assert (work / "rl" / "ckpt.damaged" / "2").is_dir()  # kept aside, not deleted
    assert (work / "rl" / "export" / "step_3" / "config.json").is_file()
    assert "config.train.steps: 2 -> 3" in out  # the step-1 checkpoint's settings, extended
    assert "[6/7] evaluate final: running" in out  # the new policy is evaluated, not the step-2 result
    records = json.loads((work / "stages.json").read_text())
    assert records["RL"]["export"] == records["evaluate final"]["policy"] == "rl/export/step_3"
    assert records["RL"]["settings"]["train.steps"] == 3


def test_no_intact_checkpoint_stops_with_two_lines_and_deletes_nothing(toy, tmp_path):
    work = _copy(toy, tmp_path)
    for step in ("1", "2"):
        (work / "rl" / "ckpt" / step / "meta" / "metadata").unlink()
    before = _snapshot(work / "rl")
    rc, out, err = _task(work, "--config.train.steps=3", "--config.accept_changes=train.steps")
    assert rc == 1, out + err
    message = err[err.index("error:") :].strip().splitlines()
    assert len(message) == 2 and "no kept checkpoint step restores (steps [1, 2]; step 2:" in message[0]
    assert (
        message[1]
        == f"Delete {work / 'rl' / 'ckpt'} to start the run over (or restore the steps from a copy)."
    )
    assert _snapshot(work / "rl") == before


@pytest.mark.parametrize("damage", ["truncated", "header overwritten"])
def test_damaged_weights_name_the_file(toy, tmp_path, damage):
    ckpt = tmp_path / "warm"
    shutil.copytree(toy / "warm", ckpt)
    weights = ckpt / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, os.path.getsize(weights) // 2)
    else:
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 16)
    out_prefix = tmp_path / "out" / "results"
    rc, out, err = _run(
        [
            "eval.py",
            f"--checkpoint={ckpt}",
            f"--config.eval.data={toy / 'data' / 'eval'}",
            f"--config.eval.output={out_prefix}",
        ]
    )
    assert rc == 1 and f"error: {weights}: not a readable safetensors file" in err, out + err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_checkpoint_without_its_tokenizer_is_named(toy, tmp_path):
    ckpt = tmp_path / "warm"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(toy / "warm" / name, ckpt / name)
    rc, out, err = _run(
        [
            "eval.py",
            f"--checkpoint={ckpt}",
            f"--config.eval.data={toy / 'data' / 'eval'}",
            f"--config.eval.output={tmp_path / 'out' / 'results'}",
        ]
    )
    assert rc == 1, out + err
    assert f"error: --checkpoint='{ckpt}': no tokenizer files in this directory" in err
    assert "chat template" not in err and "Traceback" not in err


def test_integer_ground_truths_are_accepted(toy, tmp_path):
    rows = [
        {
            "data_source": "ints",
            "prompt": [{"role": "user", "content": "Start at 3. Add 4."}],
            "reward_model": {"ground_truth": 7, "style": "rule"},
            "extra_info": {"index": i},
        }
        for i in range(2)
    ]
    data = tmp_path / "ints.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    assert pa.types.is_integer(pq.read_schema(data).field("reward_model").type.field("ground_truth").type)
    out_prefix = tmp_path / "results"
    rc, out, err = _run(
        [
            "eval.py",
            f"--checkpoint={toy / 'warm'}",
            f"--config.eval.data={data}",
            "--config.eval.k=1",
            "--config.eval.max_new_tokens=16",
            f"--config.eval.output={out_prefix}",
            "--config.model.dtype=float32",
        ]
    )
    assert rc == 0, out[-3000:] + err[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["benchmarks"]["ints"]["problems"] == 2


# ------------------------------------------------------------------------------------------------------
# Settings refused before any work


@pytest.mark.parametrize(
    "script,args,message",
    [
        (
            "train.py",
            ["--config=configs/task.py:toy", "--config.optim.lrr=1e-3"],
            "did you mean config.optim.lr?",
        ),
        (
            "train.py",
            ["--config=configs/task.py:toy", "--config.optimizer.lr=1e-3"],
            "did you mean config.optim.lr?",
        ),
        ("eval.py", ["--config.eval.kk=2"], "did you mean config.eval.k?"),
    ],
)
def test_an_unknown_config_key_is_one_line_with_the_closest_key(script, args, message):
    rc, out, err = _run([script, *args])
    assert rc == 1
    lines = [
        line for line in err.splitlines() if line.strip() and "cuda" not in line and "WARNING" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("error: --config.") and lines[0].endswith(message), err


@pytest.mark.parametrize("config", ["configs/task.py:toy", "configs/tiny.py", "configs/base.py"])
def test_a_workdir_that_is_a_file_is_refused_first(tmp_path, config):
    path = tmp_path / "file"
    path.write_text("not a directory")
    rc, out, err = _run(["train.py", f"--config={config}", f"--config.workdir={path}"])
    assert rc == 1 and f"error: config.workdir='{path}': {path} is a file, not a directory" in err, out + err
    assert "Traceback" not in err and "forward" not in err + out and path.read_text() == "not a directory"


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.sampler.page_size=12", "config.sampler.page_size must be a power of two"),
        ("--config.algo.preset=ppo", "unknown algorithm preset 'ppo'"),
        ("--config.optim.lr=-1.0", "lr and grad_clip must be positive"),
        ("--config.accept_changes=algo.preset", "algo.preset cannot be changed within a run"),
    ],
)
def test_the_task_job_checks_every_setting_before_stage_one(tmp_path, override, message):
    work = tmp_path / "run"
    rc, out, err = _task(work, override, timeout=120)
    assert rc == 1 and message in err, out + err
    assert "[1/7]" not in out and not work.exists()


def test_a_trainer_resume_under_other_settings_stops(task_world, tmp_path):
    settings = trainer_overrides(task_world, tmp_path, 1)
    common = ["train.py", "--config=configs/base.py", *(f"--config.{k}={v}" for k, v in settings.items())]
    rc, out, err = _run(common)
    assert rc == 0, out[-3000:] + err[-3000:]
    before = _snapshot(tmp_path)
    rc, out, err = _run(
        [*common, "--config.train.steps=2", "--config.algo.preset=grpo", "--config.optim.lr=1e-2"]
    )
    assert rc == 1, out + err
    assert f"error: the training run in {tmp_path} was made with other settings:" in err
    assert "config.algo.preset: 'attnrl' there, 'grpo' now" in err
    assert "config.optim.lr: 0.001 there, 0.01 now" in err and "config.train.steps: 1 there, 2 now" in err
    assert "--config.accept_changes=train.steps" in err and "mesh" not in out  # before the model is built
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["weights truncated", "no tokenizer"])
def test_the_trainer_names_a_damaged_model_directory(task_world, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(task_world / "model", model)
    if damage == "weights truncated":
        weights = model / "model.safetensors"
        os.truncate(weights, os.path.getsize(weights) // 2)
        message = f"error: {weights}: not a readable safetensors file"
    else:
        for f in model.iterdir():
            if f.name.startswith("tokenizer") or f.name in (
                "vocab.json",
                "merges.txt",
                "chat_template.jinja",
            ):
                f.unlink()
        message = (
            f"error: config.model.hf_path (its tokenizer)='{model}': no tokenizer files in this directory"
        )
    rc, out, err = _run(
        ["train.py", "--config=configs/base.py", f"--config.workdir={tmp_path / 'run'}",
         f"--config.model.hf_path={model}", f"--config.data.train_path={task_world / 'train.parquet'}"]
    )  # fmt: skip
    assert rc == 1 and message in err, out + err
    assert "Traceback" not in err and not (tmp_path / "run" / "ckpt").exists()


def test_ctrl_c_before_rl_keeps_the_finished_stages(tmp_path):
    """Ctrl-C during the warm start: exit 130 with one line saying what is kept, no traceback, no warm
    checkpoint; the stages before it are recorded and skipped by the next run."""
    work, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "train.py", "--config=configs/task.py:toy", f"--config.workdir={work}"],
            cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint,
        )  # fmt: skip
        deadline = time.time() + 300
        while "[3/7] warm start: running" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted: finished stages and saved checkpoint steps are kept" in text
    assert "Traceback" not in text and not (work / "warm").exists()
    assert set(json.loads((work / "stages.json").read_text())) == {"data", "tokenizer"}
