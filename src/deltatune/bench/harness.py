"""The benchmark harness: a job grid, a resumable run log, a fresh process per run, the environment, the report.

Every benchmark (and `deltatune compare`) is the same loop: list the runs as a grid of settings, skip those the
run log already holds (a JSONL file, one finished run a line, appended as each run finishes), run the rest —
each in a fresh child process when it measures time or memory, the child printing its result as the last JSON
line of its stdout — and write the report (Markdown, and PNG plots) atomically, headed by the environment it
ran in. This module is that loop, written once; the benchmarks keep only what they measure and how they show it.
"""
from __future__ import annotations

import datetime
import io
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from deltatune.core.atomic import atomic_write_bytes, atomic_write_text
from deltatune.errors import BenchmarkError, ConfigError

Job = Mapping[str, Any]
Record = dict[str, Any]
Identity = Callable[[Mapping[str, Any]], Any]
STDERR_TAIL = 3000  # characters of a failed child's stderr kept in the error: its traceback, not its whole log


# --- the job grid -------------------------------------------------------------------------------------------
def job_grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values as one dict per job, the last axis varying fastest.

    `job_grid(method=("lora", "sara"), seed=(0, 1))` -> lora/0, lora/1, sara/0, sara/1.
    """
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


# --- the run log --------------------------------------------------------------------------------------------
class RunLog:
    """The finished runs of a benchmark: a JSONL file, one record a line, appended as each run finishes.

    `identity` says which runs are the same: the names of the keys that identify a job (every record holds
    its job's values under the same names; other keys are results), or a function of a job or a record that
    returns its identity. A record lacking an identity key identifies nothing, so it is never taken for a job.
    A crash while appending can leave a torn last line (no newline, not JSON): it is reported once with a
    warning and dropped, and its run runs again. Any other line that is not JSON stops the benchmark with
    an error naming the line, rather than silently re-running or skipping what it held.
    """

    def __init__(self, path: str | os.PathLike, identity: Sequence[str] | Identity) -> None:
        self.path = Path(path)
        self._identity = _key_identity(tuple(identity)) if not callable(identity) else identity

    def identity(self, job_or_record: Mapping[str, Any]) -> str | None:
        """The canonical (JSON) identity of a job or record, or None when it lacks what identifies a run."""
        value = self._identity(job_or_record)
        return None if value is None else json.dumps(value, sort_keys=True, default=str)

    def records(self) -> list[Record]:
        """Every finished run, in the order it was appended."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().split("\n")
        torn = lines.pop()  # "" when the file ends with a newline, as every complete append leaves it
        records = [self._parse(line, number) for number, line in enumerate(lines, start=1) if line.strip()]
        if torn.strip():
            tail = _json_or_none(torn)
            if tail is None:
                warnings.warn(f"{self.path} ends in a torn line {len(lines) + 1} (a run was interrupted while "
                              "being recorded); it is ignored and its run will run again", stacklevel=2)
            else:
                records.append(tail)  # a complete record, only the final newline missing (edited by hand)
        return records

    def find(self, job: Job, records: Sequence[Record] | None = None) -> Record | None:
        """The finished record of `job`, or None (the last one when a run was recorded twice)."""
        wanted = self.identity(job)
        found = [r for r in (self.records() if records is None else records) if self.identity(r) == wanted]
        return found[-1] if found and wanted is not None else None

    def pending(self, jobs: Iterable[Job]) -> list[Job]:
        """The jobs without a finished record, in order, each identity once."""
        finished = {self.identity(r) for r in self.records()}
        todo: dict[str | None, Job] = {}
        for job in jobs:
            key = self.identity(job)
            if key is None:
                raise ConfigError(f"job {dict(job)} lacks the keys that identify a run in {self.path}; give "
                                  "every job its identifying settings")
            if key not in finished:
                todo.setdefault(key, job)
        return list(todo.values())

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one finished run as one whole line (a crash loses at most the run being written)."""
        line = json.dumps(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mend_torn_tail()
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def _parse(self, line: str, number: int) -> Record:
        record = _json_or_none(line)
        if record is None:
            raise ConfigError(f"{self.path} line {number} is not JSON; delete that line (or the file) to re-run "
                              "the runs it held")
        return record

    def _mend_torn_tail(self) -> None:
        """Before appending: drop a torn last line, or end a complete one with its missing newline."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        with self.path.open("r+b") as handle:
            if _json_or_none(data[cut:].decode("utf-8", "replace")) is None:
                handle.truncate(cut)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")


def _key_identity(keys: tuple[str, ...]) -> Identity:
    if not keys:
        raise ConfigError("a run log needs at least one identifying key, e.g. identity=('method', 'seed')")

    def identity(mapping: Mapping[str, Any]) -> list[Any] | None:
        return [mapping[k] for k in keys] if all(k in mapping for k in keys) else None

    return identity


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# --- running ------------------------------------------------------------------------------------------------
def run_jobs(jobs: Iterable[Job], log: RunLog, run: Callable[[Job], Mapping[str, Any]], *, workers: int = 1,
             describe: Callable[[Job], str] | None = None) -> list[Record]:
    """Run every job the log does not hold yet, `workers` at a time, appending each record as it finishes.

    `run(job)` returns the job's record, which must carry the job's identity (otherwise a re-run could never
    skip it). A failed job does not stop the others: they finish and are logged, then the first failure is
    raised. Returns the new records, in the order they finished.
    """
    if workers < 1:
        raise ConfigError(f"workers={workers} is invalid: expected at least 1 run at a time")
    todo = log.pending(jobs)
    finished: list[Record] = []
    failures: list[BaseException] = []

    def record(job: Job, result: Mapping[str, Any]) -> None:
        if log.identity(result) != log.identity(job):
            raise BenchmarkError(f"the record of job {dict(job)} does not carry its identity "
                                 f"({log.identity(result)} instead of {log.identity(job)}); return the job's "
                                 "identifying settings in its record")
        log.append(result)
        finished.append(dict(result))

    with ThreadPoolExecutor(workers) as pool:
        futures: dict[Future, Job] = {}
        for index, job in enumerate(todo, start=1):
            if describe is not None:
                print(f"[{index}/{len(todo)}] {describe(job)}", flush=True)
            futures[pool.submit(run, job)] = job
            if workers == 1:  # one at a time: in order, and the start messages interleave with the runs
                _collect(futures.popitem(), record, failures)
        for future in as_completed(futures):
            _collect((future, futures[future]), record, failures)
    if failures:
        raise failures[0]
    return finished


def _collect(item: tuple[Future, Job], record: Callable[[Job, Mapping[str, Any]], None],
             failures: list[BaseException]) -> None:
    future, job = item
    try:
        record(job, future.result())
    except Exception as error:  # noqa: BLE001 - kept and raised after the other runs finished
        if failures:
            print(f"run {dict(job)} failed too: {str(error).splitlines()[0]}", file=sys.stderr, flush=True)
        failures.append(error)


def run_process(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                label: str | None = None) -> subprocess.CompletedProcess:
    """Run `command` in a fresh process, capturing its text output; refuse a non-zero exit with its stderr's end.

    The error's first line names the run and the exit code; the lines after it are the child's last
    STDERR_TAIL characters of stderr (its traceback), so a failure far from the terminal is still explained.
    """
    completed = subprocess.run(list(command), capture_output=True, text=True, check=False,
                               env=None if env is None else dict(env))
    if completed.returncode != 0:
        raise BenchmarkError(f"{label or shlex.join(command)} failed with exit code {completed.returncode}; "
                             f"the end of its stderr:\n{completed.stderr[-STDERR_TAIL:]}")
    return completed


def run_child(command: Sequence[str], *, env: Mapping[str, str] | None = None,
              label: str | None = None) -> Record:
    """Run one job in a fresh process and return its result: the last line of its stdout, a JSON object.

    A fresh process per run keeps runs independent (memory high-water marks, thread pools, allocator caches,
    global seeds); the child's other output (progress, logs) may precede the result line.
    """
    completed = run_process(command, env=env, label=label)
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    result = _json_or_none(lines[-1]) if lines else None
    if not isinstance(result, dict):
        raise BenchmarkError(f"{label or shlex.join(command)} printed no JSON object as its last stdout line "
                             f"(it ended with {lines[-1][-200:]!r} instead); print the result with "
                             "deltatune.bench.harness.emit" if lines else
                             f"{label or shlex.join(command)} printed nothing; print the result with "
                             "deltatune.bench.harness.emit")
    return result


def emit(result: Mapping[str, Any]) -> None:
    """In a child run: print the result as the last stdout line, where `run_child` reads it."""
    print(json.dumps(result), flush=True)


def script_command(script: str | os.PathLike, *args: str) -> list[str]:
    """The command that runs a benchmark script again with this interpreter (for its child runs)."""
    return [sys.executable, str(script), *args]


# --- the environment ----------------------------------------------------------------------------------------
def environment(*, threads: int | None = None, command: str | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: date, torch and Python versions, cores, threads, git commit, command."""
    import torch

    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "python": platform.python_version(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads() if threads is None else threads, "commit": git_commit(),
            "command": command_line() if command is None else command}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, with the script path relative to the working directory when it is below it."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", str(script), *argv[1:]])


def git_commit(directory: str | os.PathLike | None = None) -> str:
    """Short hash of the checkout's HEAD, `+dirty` when files differ from it; "unknown" outside a git checkout."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:  # no git on this machine
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment_line(env: Mapping[str, Any]) -> str:
    """One sentence of the environment for a report header (fields the record lacks are left out)."""
    parts = [env.get("date"), env.get("torch") and f"torch {env['torch']}",
             env.get("python") and f"Python {env['python']}", env.get("cores") and f"{env['cores']} cores",
             env.get("threads") and f"{env['threads']} thread(s)",
             env.get("commit") and f"deltatune at {env['commit']}"]
    return ", ".join(str(p) for p in parts if p) + "."


# --- numbers ------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float], *, scale: float = 100.0, digits: int = 1, empty: str = "–") -> str:
    """"mean ± sample std" of `values` × `scale`; one value alone (a ± 0 would claim a spread never measured);
    `empty` when there is none."""
    if not values:
        return empty
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


# --- the report ---------------------------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib; install deltatune[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(path: str | os.PathLike, figure: Any, *, dpi: int = 110, **savefig: Any) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=dpi, **savefig)
    finally:
        pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 1) -> None:
    """Write raw results as JSON atomically."""
    atomic_write_text(path, json.dumps(payload, indent=indent))


READING_NOTES = "\n## Reading"  # the hand-written section after a generated report


def kept_notes(path: str | os.PathLike) -> str:
    """The hand-written "## Reading ..." section at the end of the report at `path` ("" when there is none), so
    that re-generating the report keeps it."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    return old[old.index(READING_NOTES):] if READING_NOTES in old else ""


def write_report(path: str | os.PathLike, markdown: str, figures: Mapping[str | os.PathLike, Any] | None = None,
                 *, dpi: int = 110, keep_reading: bool = True) -> None:
    """Write the plots (PNG, path -> figure), then the Markdown, each atomically: a crash leaves every file
    either complete or as it was, and the table never points to a plot not written yet. `keep_reading`: a
    generated `markdown` without its own "## Reading" section gets the hand-written one of the report it
    replaces (`kept_notes`), so a re-run never loses it."""
    if keep_reading and READING_NOTES not in markdown:
        markdown += kept_notes(path)
    for figure_path, figure in (figures or {}).items():
        write_figure(figure_path, figure, dpi=dpi)
    atomic_write_text(path, markdown)


class StepTimer:
    """A training callback timing every optimizer step, on_step_begin to on_step_end (wall seconds)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, **_: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, **_: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
