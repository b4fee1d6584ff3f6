"""No lost files: saves touch only their own files, every write survives kill -9 at any step, full disks and
Ctrl-C end in one line, and an interrupted `deltatune train --resume` ends bit-identical to an unbroken run."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core import atomic
from deltatune.errors import AdapterFileError, TrainingError
from deltatune.merging import config_from_dict, run_merge
from deltatune.train.checkpoint import Checkpoint, list_checkpoints, read_checkpoint, write_checkpoint
from merging.tiny_checkpoints import make_models
from reliability.support import assert_one_line_error, assert_one_line_message, run_cli, tree_digest

ADAPTER_FILES = {"deltatune": ["deltatune_adapter.safetensors", "deltatune_config.json"],
                 "peft": ["adapter_config.json", "adapter_model.safetensors"]}
DIGITS = ("--task", "digits", "--method", "lora", "-p", "targets=conv1,conv2", "--batch-size", "64")


# --- models, folders ---------------------------------------------------------------------------------------------
def adapted(value: float, alpha: float = 2.0) -> nn.Module:
    """A LoRA adapter whose every tensor is `value` (so two saves are told apart exactly)."""
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(4, 4)), dt.LoRAConfig(rank=2, alpha=alpha, targets=("0",)))
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for tensor in delta.parameters():
                tensor.fill_(value)
    return model


def loaded_value(folder: Path) -> float:
    """The single value of the adapter saved in `folder` (every tensor holds it)."""
    torch.manual_seed(0)
    model = dt.load_adapter(nn.Sequential(nn.Linear(4, 4)), folder)
    values = torch.cat([t.flatten() for _, _, d in dt.iter_deltas(model) for t in d.parameters()]).unique()
    assert values.numel() == 1, values
    return float(values)


def fake_project(root: Path) -> dict[str, str]:
    """A source tree, logs and a hidden file: what a user keeps beside an adapter."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "main.py").write_text("print('hello')\n")
    (root / "logs").mkdir()
    (root / "logs" / "run.log").write_text("step 1 loss 0.5\n" * 50)
    (root / "notes.md").write_text("# notes\n")
    (root / ".env").write_text("KEY=1\n")
    return tree_digest(root)


def without(digest: dict[str, str], names) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k not in set(names)}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".env")


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True, check=True)
    return int(process.stdout)


# --- saves write only their own files ---------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_save_into_a_project_folder_adds_only_the_adapter_files(tmp_path, format):
    before = fake_project(tmp_path)
    dt.save_adapter(adapted(1.0), tmp_path, format=format)
    after = tree_digest(tmp_path)
    assert without(after, ADAPTER_FILES[format]) == before  # every other file byte-identical, none removed
    assert sorted(set(after) - set(before)) == ADAPTER_FILES[format]
    assert loaded_value(tmp_path) == 1.0


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_saving_twice_keeps_one_adapter_the_second(tmp_path, format):
    before = fake_project(tmp_path)
    dt.save_adapter(adapted(1.0), tmp_path, format=format)
    dt.save_adapter(adapted(2.0, alpha=4.0), tmp_path, format=format)
    after = tree_digest(tmp_path)
    assert without(after, ADAPTER_FILES[format]) == before and hidden(tmp_path) == []
    assert loaded_value(tmp_path) == 2.0


@pytest.mark.parametrize("path", [".", "sub/dir"])
def test_dot_and_relative_paths_save_under_the_working_directory(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    before = fake_project(tmp_path)
    dt.save_adapter(adapted(3.0), path)
    assert loaded_value(tmp_path / path) == 3.0
    assert {k: v for k, v in tree_digest(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_an_existing_other_file_is_refused_by_name_and_untouched(tmp_path, format):
    victim = tmp_path / "model.txt"
    victim.write_text("precious")
    before = tree_digest(tmp_path)
    with pytest.raises(AdapterFileError) as caught:
        dt.save_adapter(adapted(1.0), victim, format=format)
    assert_one_line_message(caught.value, str(victim), "existing file", "folder")
    assert tree_digest(tmp_path) == before


def test_a_path_naming_the_adapters_own_file_saves_into_its_folder(tmp_path):
    dt.save_adapter(adapted(1.0), tmp_path)
    assert dt.save_adapter(adapted(2.0), tmp_path / "deltatune_config.json") == tmp_path
    assert loaded_value(tmp_path) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ADAPTER_FILES["deltatune"]


@pytest.mark.parametrize("first, second", [("deltatune", "peft"), ("peft", "deltatune")])
def test_a_folder_holding_the_other_format_is_refused(tmp_path, first, second):
    dt.save_adapter(adapted(1.0), tmp_path, format=first)
    before = tree_digest(tmp_path)
    with pytest.raises(AdapterFileError) as caught:
        dt.save_adapter(adapted(2.0), tmp_path, format=second)
    assert_one_line_message(caught.value, "already holds", "another folder")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_a_torn_pair_new_weights_old_config_is_refused_at_load(tmp_path, format):
    """What a kill between the two renames leaves: the new weights beside the old config."""
    weights, config = (ADAPTER_FILES[format][0], ADAPTER_FILES[format][1]) if format == "deltatune" else \
        (ADAPTER_FILES[format][1], ADAPTER_FILES[format][0])
    dt.save_adapter(adapted(1.0), tmp_path / "old", format=format)
    dt.save_adapter(adapted(2.0, alpha=4.0), tmp_path / "new", format=format)
    shutil.copyfile(tmp_path / "new" / weights, tmp_path / "old" / weights)
    model = nn.Sequential(nn.Linear(4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError) as caught:
        dt.load_adapter(model, tmp_path / "old")
    assert_one_line_message(caught.value, weights, "interrupted", "save the adapter again")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_folder_saved_without_the_weights_record_still_loads(tmp_path):
    dt.save_adapter(adapted(1.0), tmp_path)
    config = tmp_path / "deltatune_config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("weights_")}))
    assert loaded_value(tmp_path) == 1.0


def test_a_changed_weights_file_of_the_same_size_is_refused(tmp_path):
    dt.save_adapter(adapted(1.0), tmp_path)
    weights = tmp_path / "deltatune_adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last tensor byte: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="size or sha256"):
        dt.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)


# --- modes, litter ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def tiny_checkpoint(value: float) -> Checkpoint:
    return Checkpoint(model={"w": torch.full((3, 3), value)}, optimizer={"state": {}, "param_groups": []},
                      scheduler={"last_epoch": int(value)}, state={"global_step": 4, "value": value},
                      tensors={"rng": torch.arange(4) + int(value)})


def merge_config(base: Path, dirs: list[Path], weight: float):
    raw = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(d), "parameters": {"weight": weight}} for d in dirs]}
    return config_from_dict(raw, None, yaml.safe_dump(raw))


@pytest.mark.parametrize("kind", ["adapter", "checkpoint", "merge"])
def test_written_folders_and_files_get_the_umask_mode(tmp_path, kind):
    with umask(0o022):
        if kind == "adapter":
            out = dt.save_adapter(adapted(1.0), tmp_path / "new" / "adapter")
        elif kind == "checkpoint":
            out = write_checkpoint(tmp_path / "new" / "checkpoints", 4, tiny_checkpoint(1.0), keep_last=2)
        else:
            base, dirs, _, _ = make_models(tmp_path / "inputs")
            out = run_merge(merge_config(base, dirs, 0.5), tmp_path / "new" / "merged", progress=False).out_dir
    assert modes(tmp_path / "new") == {("dir", 0o755), ("file", 0o644)}
    assert out.exists()


def test_a_replaced_file_keeps_its_own_mode(tmp_path):
    dt.save_adapter(adapted(1.0), tmp_path)
    (tmp_path / "deltatune_config.json").chmod(0o600)
    dt.save_adapter(adapted(2.0), tmp_path)
    assert (tmp_path / "deltatune_config.json").stat().st_mode & 0o777 == 0o600


def plant_litter(folder: Path, name: str, pid: int) -> list[Path]:
    litter = [folder / f".{name}.{pid}-abc123.tmp", folder / f".{name}.{pid}-def456.staging"]
    litter[0].write_bytes(b"half a file")
    litter[1].mkdir()
    (litter[1] / "model.safetensors").write_bytes(b"half a checkpoint")
    return litter


@pytest.mark.parametrize("kind", ["adapter", "checkpoint"])
def test_litter_of_dead_writers_is_cleaned_and_live_writers_kept(tmp_path, kind):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if kind == "adapter":
            folder, name = tmp_path, "deltatune_adapter.safetensors"
        else:
            folder, name = tmp_path / "checkpoints", "step-000004"
            folder.mkdir()
        dead = plant_litter(folder, name, dead_pid())
        alive = plant_litter(folder, name, live.pid)
        if kind == "adapter":
            dt.save_adapter(adapted(1.0), tmp_path)
        else:
            write_checkpoint(folder, 4, tiny_checkpoint(1.0), keep_last=2)
        assert not any(p.exists() for p in dead)
        assert all(p.exists() for p in alive)  # another process may still be writing them
    finally:
        live.kill()
        live.wait()


def test_an_aside_copy_is_restored_when_the_final_path_is_missing(tmp_path):
    """The fallback swap's crash window: old renamed aside, new not yet renamed in."""
    aside = tmp_path / f".step-000004.{dead_pid()}-0a1b2c3d.old"
    write_checkpoint(tmp_path, 4, tiny_checkpoint(1.0), keep_last=2)
    (tmp_path / "step-000004").rename(aside)
    atomic.clean_litter(tmp_path / "step-000004")
    assert read_checkpoint(tmp_path / "step-000004").state["value"] == 1.0 and hidden(tmp_path) == []


def test_a_file_an_older_version_hid_is_restored_never_deleted(tmp_path):
    hidden_file = tmp_path / ".notes.txt.old-12345"
    hidden_file.write_text("precious")
    atomic.clean_litter(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "precious"
    hidden_file.write_text("also precious")
    atomic.clean_litter(tmp_path / "notes.txt")  # the target exists now: the hidden copy stays
    assert hidden_file.read_text() == "also precious"


# --- kill -9 at every write step --------------------------------------------------------------------------------
KILL_POINTS = ("replace", "rename", "fsync", "unlink", "rmdir")


def _arm_killer(k: int, fallback: bool) -> None:
    """SIGKILL this process just before its k-th rename / fsync / delete / exchange."""
    calls = [0]

    def killing(original):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return call

    for name in KILL_POINTS:
        setattr(os, name, killing(getattr(os, name)))
    atomic.exchange = killing((lambda first, second: False) if fallback else atomic.exchange)


def run_killed(write, k: int, fallback: bool) -> str:
    """Run `write` in a forked child that kills itself at step k: "killed" or "completed"."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            _arm_killer(k, fallback)
            write()
        except BaseException:  # noqa: BLE001 - reported to the parent through the exit status
            code = 3
        os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the writer hung at kill point {k}")
        time.sleep(0.002)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the write failed at kill point {k}"
    return "completed"


def kill_at_every_step(prepare, write, check_killed, check_complete, fallback: bool) -> int:
    """For k = 1, 2, ...: prepare the old content, kill the write at its k-th step, check what is left, then
    check that a plain next write succeeds; stop when the write completes before step k. Returns the steps."""
    for k in range(1, 200):
        prepare()
        if run_killed(write, k, fallback) == "completed":
            check_complete()
            return k - 1
        check_killed(k)
        write()
        check_complete()
    pytest.fail("the write never completed")


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_kill_at_every_step_of_save_adapter(tmp_path, format):
    folder = tmp_path / "project"
    project: dict[str, str] = {}
    torn = []

    def prepare():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        project.update(fake_project(folder))
        dt.save_adapter(adapted(1.0), folder, format=format)

    def write():
        dt.save_adapter(adapted(2.0, alpha=4.0), folder, format=format)

    def check_killed(k):
        assert without(tree_digest(folder), [*ADAPTER_FILES[format], *hidden(folder)]) == project
        try:
            assert loaded_value(folder) in (1.0, 2.0)
        except AdapterFileError as error:  # only the torn pair of a kill between the two renames
            assert "interrupted" in str(error), error
            torn.append(k)

    def check_complete():
        assert loaded_value(folder) == 2.0 and hidden(folder) == []
        assert without(tree_digest(folder), ADAPTER_FILES[format]) == project

    steps = kill_at_every_step(prepare, write, check_killed, check_complete, fallback=False)
    assert steps >= 5 and len(torn) == 1  # two fsyncs, two renames, a folder fsync; one torn window


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "fallback"])
def test_kill_at_every_step_of_a_checkpoint_overwrite(tmp_path, fallback):
    root = tmp_path / "checkpoints"
    target = root / "step-000004"

    def prepare():
        shutil.rmtree(root, ignore_errors=True)
        write_checkpoint(root, 2, tiny_checkpoint(0.0), keep_last=3)
        write_checkpoint(root, 4, tiny_checkpoint(1.0), keep_last=3)

    def write():
        write_checkpoint(root, 4, tiny_checkpoint(2.0), keep_last=3)

    def check_killed(k):
        assert read_checkpoint(root / "step-000002").state["value"] == 0.0
        if not target.exists():  # only the fallback's window between its two renames: old is aside
            assert fallback, f"kill point {k} left no checkpoint at {target}"
            asides = [p for p in root.iterdir() if p.name.endswith(".old")]
            assert len(asides) == 1 and read_checkpoint(asides[0]).state["value"] == 1.0
            atomic.clean_litter(target)  # what the next write does first: the old copy is back in place
        checkpoint = read_checkpoint(target)
        value = checkpoint.state["value"]
        assert value in (1.0, 2.0) and torch.equal(checkpoint.model["w"], torch.full((3, 3), value))

    def check_complete():
        assert read_checkpoint(target).state["value"] == 2.0
        assert [s for s, _ in list_checkpoints(root)] == [2, 4] and hidden(root) == []

    assert kill_at_every_step(prepare, write, check_killed, check_complete, fallback) >= 8


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "fallback"])
def test_kill_at_every_step_of_merge_overwrite(tmp_path, fallback):
    base, dirs, _, _ = make_models(tmp_path / "inputs")
    inputs = tree_digest(tmp_path / "inputs")
    out = tmp_path / "work" / "out"
    old_config, new_config = merge_config(base, dirs, 0.5), merge_config(base, dirs, 1.0)
    run_merge(old_config, tmp_path / "old", progress=False)
    run_merge(new_config, tmp_path / "new", progress=False)
    old, new = tree_digest(tmp_path / "old"), tree_digest(tmp_path / "new")
    assert old != new

    def prepare():
        shutil.rmtree(out.parent, ignore_errors=True)
        run_merge(old_config, out, progress=False)

    def write():
        run_merge(new_config, out, overwrite=True, progress=False)

    def check_killed(k):
        assert tree_digest(tmp_path / "inputs") == inputs
        if not out.exists():
            assert fallback, f"kill point {k} left no output at {out}"
            asides = [p for p in out.parent.iterdir() if p.name.endswith(".old")]
            assert len(asides) == 1 and tree_digest(asides[0]) == old
            atomic.clean_litter(out)  # what the next write does first: the old output is back in place
        assert tree_digest(out) in (old, new), f"kill point {k} left a partial output"

    def check_complete():
        assert tree_digest(out) == new and sorted(p.name for p in out.parent.iterdir()) == ["out"]

    assert kill_at_every_step(prepare, write, check_killed, check_complete, fallback) >= 6


# --- full disks -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def full_disk(mount_point: Path, free_bytes: int, size: str = "2m"):
    """A small tmpfs at `mount_point`, filled up to `free_bytes` of free space (root only; else skip)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a small tmpfs")
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda: fill(mount_point, free_bytes)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(mount_point: Path, free_bytes: int) -> None:
    available = shutil.disk_usage(mount_point).free
    (mount_point / "filler").write_bytes(b"\0" * max(0, available - free_bytes))


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if p.name not in (".env",)]


def test_save_on_a_full_disk_is_one_line_and_keeps_the_old_adapter(tmp_path):
    with full_disk(tmp_path / "disk", free_bytes=16 * 1024) as fill_up:
        folder = tmp_path / "disk" / "adapter"
        dt.save_adapter(adapted(1.0), folder)
        before = tree_digest(folder)
        fill_up()
        big = dt.adapt(nn.Sequential(nn.Linear(256, 256)), dt.LoRAConfig(rank=64, targets=("0",)))
        with pytest.raises(AdapterFileError) as caught:
            dt.save_adapter(big, folder)
        assert_one_line_message(caught.value, str(folder), "no space left on device", "free disk space")
        assert tree_digest(folder) == before and no_temporaries(tmp_path / "disk") == []
        assert loaded_value(folder) == 1.0


@pytest.mark.slow  # a CLI training run: over 10 s on a loaded machine
def test_train_on_a_full_disk_exits_2_with_one_line(tmp_path):
    with full_disk(tmp_path / "disk", free_bytes=40 * 1024) as fill_up:
        out = tmp_path / "disk" / "run"
        out.mkdir()
        (out / "notes.md").write_text("keep me")
        fill_up()
        before = tree_digest(out)
        result = run_cli("train", *DIGITS, "--max-steps", "2", "--out", str(out), cwd=tmp_path)
        assert_one_line_error(result, "no space left on device", "free disk space")
        assert (out / "notes.md").read_text() == "keep me" and not (out / "adapter").exists()
        assert no_temporaries(tmp_path / "disk") == []
        assert set(before) <= set(tree_digest(out))


def test_merge_overwrite_on_a_full_disk_exits_2_and_keeps_the_old_output(tmp_path):
    base, dirs, _, _ = make_models(tmp_path / "inputs")
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}))
    with full_disk(tmp_path / "disk", free_bytes=4 * 1024) as fill_up:
        out = tmp_path / "disk" / "merged"
        run_merge(merge_config(base, dirs, 0.5), out, progress=False)
        before = tree_digest(out)
        fill_up()
        result = run_cli("merge", str(tmp_path / "merge.yml"), "--out", str(out), "--overwrite", "--no-progress")
        assert_one_line_error(result, str(out), "no space left on device")
        assert tree_digest(out) == before and no_temporaries(tmp_path / "disk") == []


# --- train --resume, kill -9 and Ctrl-C -------------------------------------------------------------------------
SIGNAL_AT_STEP = """
import os, signal, sys
# A child of a background job inherits SIGINT as ignored (POSIX shells ignore it for `cmd &`); a user's Ctrl-C
# reaches a foreground process with Python's default handler, which is what is tested here.
signal.signal(signal.SIGINT, signal.default_int_handler)
from deltatune.train import trainer
step = trainer.Trainer._optimizer_step
def step_then_signal(self, *args, **kwargs):
    step(self, *args, **kwargs)
    if self.global_step == int(os.environ["AT_STEP"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
trainer.Trainer._optimizer_step = step_then_signal
from deltatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_signalled(signal_name: str, at_step: int, *argv: str) -> subprocess.CompletedProcess:
    """`deltatune ARGV` that sends itself `signal_name` right after optimizer step `at_step`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SIGNAL=signal_name, AT_STEP=str(at_step))
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_second"} for line in lines]


@pytest.mark.slow
def test_kill_9_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    settings = (*DIGITS, "--max-steps", "7", "--checkpoint-every", "2")
    straight = run_cli("train", *settings, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = run_cli_signalled("SIGKILL", 5, "train", *settings, "--out", str(tmp_path / "resumed"))
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [2, 4]  # lost: step 5
    resumed = run_cli("train", *settings, "--out", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "adapter" / "deltatune_adapter.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "deltatune_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "straight") == records(tmp_path / "resumed")  # losses, eval loss and accuracy
    accuracy = [line.split("trainable")[0] for line in (straight.stdout, resumed.stdout)]
    assert accuracy[0] == accuracy[1] and "test accuracy" in accuracy[0]


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    result = run_cli("train", *DIGITS, "--max-steps", "2", "--out", str(tmp_path / "empty"), "--resume")
    assert_one_line_error(result, "no complete checkpoint", "without resume")
    assert not (tmp_path / "empty").exists() or list((tmp_path / "empty").rglob("*")) == []


def test_resume_with_other_settings_names_the_field(tmp_path):
    from deltatune.recipe import finetune

    common = dict(params={"targets": ("conv1", "conv2")}, max_steps=2, batch_size=64, progress=False)
    finetune("digits", "lora", out_dir=tmp_path, **common)
    before = tree_digest(tmp_path)
    with pytest.raises(TrainingError) as caught:
        finetune("digits", "lora", out_dir=tmp_path, resume=True, **{**common, "params": {**common["params"],
                                                                                           "rank": 4}})
    assert_one_line_message(caught.value, "config.rank=8", "config.rank=4", "same settings")
    with pytest.raises(TrainingError) as caught:
        finetune("digits", "lora", out_dir=tmp_path, resume=True, **{**common, "max_steps": 3})
    assert_one_line_message(caught.value, "max_steps=2", "max_steps=3")
    assert tree_digest(tmp_path) == before


@pytest.mark.slow  # a CLI training run: over 10 s on a loaded machine
def test_ctrl_c_exits_130_naming_the_intact_checkpoint_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    result = run_cli_signalled("SIGINT", 3, "train", *DIGITS, "--max-steps", "6", "--checkpoint-every", "2",
                               "--out", str(out))
    line = assert_one_line_error(result, "interrupted", "step-000002", "--resume", status=130)
    assert "intact" in line
    assert read_checkpoint(out / "checkpoints" / "step-000002").state["global_step"] == 2
    assert no_temporaries(out) == []


def test_train_parses_checkpoint_every_and_resume():
    from deltatune.cli import build_parser

    args = build_parser().parse_args(["train", "--checkpoint-every", "50", "--resume"])
    assert args.checkpoint_every == 50 and args.resume is True
    assert build_parser().parse_args(["train"]).checkpoint_every is None
