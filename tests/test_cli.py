"""The ``nagents-frames`` command through its real entry point (a subprocess) against the fake server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nagents_frames.cli import ExitCode, build_parser, main
from nagents_frames.testing import FakeLLMServer

CLI = Path(sys.executable).parent / "nagents-frames"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "NAGENTS_FRAMES_DEBUG"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the installed console script and capture its output."""
    return subprocess.run(
        [str(CLI), *map(str, args)], capture_output=True, text=True, env=env or _env(), cwd=cwd, timeout=timeout,
        check=False,
    )


def run_many(*argvs: list[Any], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Several independent runs of the console script at once (the machine is shared: keep tests short)."""
    procs = [
        subprocess.Popen([str(CLI), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env or _env())
        for argv in argvs
    ]
    done = []
    for proc, argv in zip(procs, argvs):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line must be a JSON object (machine-readable mode)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def srv() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as s:
        yield s


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "review": ["good", "bad", None, "fine"]}), path)
    return path


def test_entry_point_is_installed() -> None:
    assert CLI.exists(), "pip install -e . provides the nagents-frames console script"
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("nagents-frames ")


def test_run_parquet_to_parquet(srv: FakeLLMServer, reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    proc = run_cli("run", reviews, out, "--model", "echo", "--base-url", srv.base_url,
                   "--prompt", "Review #{id}: {review}", "--usage")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # not a terminal: no bar, nothing on stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # a one-line summary
    assert "wrote 4 rows" in proc.stderr and "1 with errors" in proc.stderr
    table = pq.read_table(out)
    assert table.column_names == ["id", "review", "response", "error", "prompt_tokens", "completion_tokens",
                                  "latency_s", "attempts"]
    assert table.column("id").to_pylist() == [1, 2, 3, 4]
    assert table.column("response").to_pylist() == ["echo: Review #1: good", "echo: Review #2: bad", None,
                                                    "echo: Review #4: fine"]
    errors = table.column("error").to_pylist()
    assert errors[2].startswith("PromptError") and errors.count(None) == 3
    assert srv.stats.requests == 3
    assert all("Authorization" not in h for h in srv.stats.headers)  # no key at all is fine for a local server
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_richer_prompts_from_flags(srv: FakeLLMServer, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "temp": [0.0, 0.7], "key": ["a", "b"]}), src)
    proc = run_cli("run", src, tmp_path / "o.parquet", "--model", "echo", "--base-url", srv.base_url,
                   "--prompt", "Label: {text}", "--system", "Be terse.", "--example", "Label: q", "A",
                   "--param-column", "temperature=temp", "--max-tokens", "50", "--id-column", "key")
    assert proc.returncode == 0, proc.stderr
    bodies = sorted(srv.stats.bodies, key=lambda b: b["messages"][-1]["content"])
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Label: q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Label: x"},
    ]
    assert [b["temperature"] for b in bodies] == [0.0, 0.7]
    assert all(b["max_tokens"] == 50 for b in bodies)


def test_prompt_column_csv_and_ndjson_inputs(srv: FakeLLMServer, tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("prompt,n\nhello,1\nworld,2\n")
    nd = tmp_path / "parts"
    nd.mkdir()
    (nd / "0.jsonl").write_text('{"q": "one"}\n{"q": "two"}\n')
    (nd / "1.jsonl").write_text('{"q": "three"}\n')
    a, b = run_many(
        ["run", csv, tmp_path / "a.parquet", "--model", "echo", "--base-url", srv.base_url, "--prompt-column", "prompt"],
        ["run", nd, tmp_path / "b.parquet", "--model", "echo", "--base-url", srv.base_url, "--prompt", "{q}"],
    )
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert pq.read_table(tmp_path / "a.parquet").column("response").to_pylist() == ["echo: hello", "echo: world"]
    assert pq.read_table(tmp_path / "b.parquet").column("response").to_pylist() == [
        "echo: one", "echo: two", "echo: three"
    ]


def test_json_progress_events(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"t": [f"row {i}" for i in range(60)]}), src)
    with FakeLLMServer(latency=0.05) as s:
        proc = run_cli("run", src, tmp_path / "o.parquet", "--model", "echo", "--base-url", s.base_url,
                       "--prompt", "{t}", "--json", "--concurrency", "4", "--progress-interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    evs = events(proc.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert evs[0]["rows_total"] == 60 and evs[0]["model"] == "echo"
    progress = [e for e in evs if e["event"] == "progress"]
    assert progress, "a run of ~1s with --progress-interval 0.1 reports progress"
    for key in ("rows_done", "rows_total", "errors", "prompt_tokens", "completion_tokens", "rows_per_s", "eta_s"):
        assert key in progress[0]
    done_counts = [e["rows_done"] for e in progress]
    assert done_counts == sorted(done_counts)
    done = evs[-1]
    assert (done["rows"], done["errors"], done["exit_code"]) == (60, 0, 0)
    assert done["completion_tokens"] > 0 and done["peak_rss_mb"] > 0


def test_progress_bar_on_a_terminal(srv: FakeLLMServer, reviews: Path, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        proc = subprocess.run(
            [str(CLI), "run", str(reviews), str(tmp_path / "o.parquet"), "--model", "echo", "--base-url",
             srv.base_url, "--prompt", "{review}"],
            stdout=subprocess.PIPE, stderr=follower, env=_env(COLUMNS="120"), timeout=90, check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "4/4" in screen and "row" in screen and "errors=1" in screen


USAGE_CASES = [
    (["run", "{missing}", "{out}", "--model", "echo", "--prompt", "{review}"], "does not exist"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{nope}"], "ColumnNotFoundError"),
    (["run", "{reviews}", "{out}", "--prompt", "{review}"], "--model is required"),
    (["run", "{reviews}", "{out}", "--model", "echo"], "--prompt"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "x", "--prompt-column", "review"], "not allowed with"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--concurrency", "0"], "concurrency"),
    (["run", "{reviews}", "{reviews}", "--model", "echo", "--prompt", "{review}"], "must not be one of"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--api-key", "sk-x"],
     "there is no --api-key flag"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--api-key=sk-x"],
     "there is no --api-key flag"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--api-key-f", "sk-x"],
     "there is no --api-key-f flag"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--conc", "3"], "unrecognized arguments"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--provider", "nope"], "unknown provider"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--response-format", "{missing}"],
     "does not exist"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--expand"], "needs a response_format"),
    (["run", "{reviews}", "{out}", "--model", "echo", "--prompt", "{review}", "--fail-on-errors", "2"], "fraction"),
    (["jobs"], "--store PATH is required"),
    (["jobs", "--store", "{missing}"], "does not exist"),
    (["frobnicate"], "invalid choice"),
]


def _argv(args: list[str], tmp_path: Path, reviews: Path, base_url: str) -> list[str]:
    subst = {"{missing}": str(tmp_path / "missing.parquet"), "{out}": str(tmp_path / "out.parquet"),
             "{reviews}": str(reviews)}
    argv = [subst.get(a, a) for a in args]
    return argv + (["--base-url", base_url] if argv[0] == "run" else [])


@pytest.mark.parametrize(("args", "needle"), USAGE_CASES)
def test_usage_errors_exit_2_with_one_line(srv: FakeLLMServer, reviews: Path, tmp_path: Path, args: list[str],
                                          needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the argument matrix runs in-process (same main() as the console script); the subprocess case is below
    code = main(_argv(args, tmp_path, reviews, srv.base_url))
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nagents-frames: error: ") and needle in lines[0], err
    assert "sk-x" not in err
    assert srv.stats.requests == 0
    assert not (tmp_path / "out.parquet").exists()


def test_usage_error_through_the_console_script(srv: FakeLLMServer, reviews: Path, tmp_path: Path) -> None:
    for args, needle in (USAGE_CASES[1], USAGE_CASES[7]):
        proc = run_cli(*_argv(args, tmp_path, reviews, srv.base_url))
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "sk-x" not in proc.stderr
    assert srv.stats.requests == 0


def test_auth_failure_exits_1_without_output(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with FakeLLMServer(api_key="sk-right") as s:
        proc = run_cli("run", reviews, out, "--model", "echo", "--base-url", s.base_url, "--prompt", "{review}",
                       env=_env(OPENAI_API_KEY="sk-wrong-secret"))
        sent = s.stats.requests
    assert proc.returncode == ExitCode.FAILED == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "AuthenticationError 401" in line
    assert "sk-wrong-secret" not in proc.stderr + proc.stdout
    assert not out.exists() and list(tmp_path.glob(".out.parquet.tmp-*")) == []
    assert sent <= 3  # a fatal error stops the run after the probe requests


def test_key_from_env_and_from_key_file(reviews: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-test-secret-123"
    with FakeLLMServer(api_key=secret) as s:
        key_file = tmp_path / "key.txt"
        key_file.write_text(secret + "\n")
        common = ["--model", "echo", "--base-url", s.base_url, "--prompt", "{review}"]
        (ok,) = run_many(["run", reviews, tmp_path / "a.parquet", *common], env=_env(OPENAI_API_KEY=secret))
        (ok2,) = run_many(["run", reviews, tmp_path / "b.parquet", *common, "--api-key-file", key_file])
        assert ok.returncode == 0, ok.stderr
        assert ok2.returncode == 0, ok2.stderr
        auths = {h.get("Authorization") for h in s.stats.headers}
    assert auths == {f"Bearer {secret}"}
    for proc in (ok, ok2):
        assert secret not in proc.stdout + proc.stderr
    for name in ("a.parquet", "b.parquet"):
        assert secret.encode() not in (tmp_path / name).read_bytes()
    assert main(["run", str(reviews), str(tmp_path / "c.parquet"), "--model", "echo", "--base-url",
                 "http://127.0.0.1:9/v1", "--prompt", "{review}", "--api-key-file", str(tmp_path / "nokey.txt")]) == 2
    assert "API key file" in capsys.readouterr().err


def test_row_errors_exit_code(reviews: Path, tmp_path: Path) -> None:
    with FakeLLMServer(error_on_content={"bad": 400}) as s:
        common = ["--model", "echo", "--base-url", s.base_url, "--prompt", "{review}"]
        default, strict, lenient = run_many(
            ["run", reviews, tmp_path / "a.parquet", *common],
            ["run", reviews, tmp_path / "b.parquet", *common, "--fail-on-errors", "--json"],
            ["run", reviews, tmp_path / "c.parquet", *common, "--fail-on-errors", "0.6"],
        )
    assert default.returncode == 0, default.stderr  # by default, row errors are data, not a failure
    assert strict.returncode == ExitCode.ROW_ERRORS == 3
    done = events(strict.stdout)[-1]
    assert done["event"] == "done" and done["errors"] == 2 and done["exit_code"] == 3
    assert pq.read_table(tmp_path / "b.parquet").num_rows == 4  # the output is still written
    assert lenient.returncode == 0  # 2 of 4 rows is under 60%


def test_config_file_and_flag_precedence(srv: FakeLLMServer, reviews: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "step.toml"
    cfg.write_text(
        f'model = "echo"\nbase_url = "{srv.base_url}"\n\n[run]\nprompt = "From config: {{review}}"\n'
        'max_tokens = 40\nconcurrency = 2\nusage = true\nexamples = [["q", "a"]]\n'
    )
    a, b = run_many(
        ["run", reviews, tmp_path / "a.parquet", "--config", cfg],
        ["run", reviews, tmp_path / "b.parquet", "--config", cfg, "--prompt-column", "review", "--max-tokens", "7"],
    )
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column("response").to_pylist()[0] == "echo: From config: good"
    assert "prompt_tokens" in table.column_names
    assert pq.read_table(tmp_path / "b.parquet").column("response").to_pylist()[0] == "echo: good"
    from_file = [x for x in srv.stats.bodies if x["messages"][-1]["content"].startswith("From config")]
    from_flags = [x for x in srv.stats.bodies if not x["messages"][-1]["content"].startswith("From config")]
    assert len(from_file) == len(from_flags) == 3
    assert all(x["max_tokens"] == 40 and x["messages"][0]["content"] == "q" for x in from_file)
    assert all(x["max_tokens"] == 7 and x["messages"][0]["content"] == "q" for x in from_flags)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('api_key = "sk-123"\n', "API keys are read only from the environment"),
        ("concurency = 3\n", "unknown setting 'concurency'"),
        ('concurrency = "many"\n', "must be an integer"),
        ("model = \n", "not valid TOML"),
    ],
)
def test_bad_config_files(reviews: Path, tmp_path: Path, text: str, needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code = main(["run", str(reviews), str(tmp_path / "o.parquet"), "--config", str(cfg), "--model", "m",
                 "--prompt", "{review}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err
    assert "sk-123" not in err


def test_structured_output_through_the_cli(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["label", "n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"j": ['{"label": "a", "n": 1}', "oops", '{"label": "b", "n": 2.5}']}), src)
    with FakeLLMServer(echo_prefix="") as s:
        common = ["--model", "echo", "--base-url", s.base_url, "--prompt", "{j}",
                  "--response-format", tmp_path / "schema.json"]
        struct, expanded = run_many(
            ["run", src, tmp_path / "s.parquet", *common],
            ["run", src, tmp_path / "e.parquet", *common, "--expand", "--fail-on-errors"],
        )
        assert s.stats.bodies[0]["response_format"]["type"] == "json_schema"
    assert struct.returncode == 0, struct.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.schema.field("response").type == pa.struct([("label", pa.string()), ("n", pa.int64())])
    assert table.column("response").to_pylist() == [{"label": "a", "n": 1}, None, None]
    errors = table.column("error").to_pylist()
    assert errors[0] is None and all(e.startswith("ResponseValidationError") for e in errors[1:])
    assert expanded.returncode == 3
    assert pq.read_table(tmp_path / "e.parquet").column_names == ["j", "label", "n", "error"]


def test_estimate(tmp_path: Path, reviews: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_cli("estimate", reviews, "--model", "gpt-4o-mini", "--prompt", "Review: {review}",
                   "--max-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    (est,) = events(proc.stdout)
    assert est["event"] == "estimate"
    assert (est["rows"], est["requests"], est["skipped"], est["completion_tokens"]) == (4, 3, 1, 30)
    assert est["cost"] is not None and est["cost"] > 0
    assert main(["estimate", str(reviews), "--model", "gpt-4o-mini", "--prompt", "Review: {review}"]) == 0
    assert "4 rows" in capsys.readouterr().out


def test_sigint_stops_cleanly_and_a_rerun_resumes(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    n = 800
    pq.write_table(pa.table({"t": [f"row {i}" for i in range(n)]}), src)
    out = tmp_path / "out.parquet"
    store = tmp_path / "jobs.duckdb"
    argv = [str(CLI), "run", str(src), str(out), "--model", "echo", "--prompt", "{t}", "--json", "--concurrency",
            "8", "--chunk-size", "50", "--store", str(store)]
    with FakeLLMServer(latency=0.03) as s:
        argv += ["--base-url", s.base_url]
        proc = subprocess.Popen([*argv, "--progress-interval", "0.1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # wait until some chunks are stored
            event = json.loads(line)
            if event["event"] == "progress" and event["rows_written"] >= 100:
                break
            assert time.monotonic() < deadline
        at_signal = s.stats.requests
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        first_run = s.stats.requests
        assert first_run - at_signal <= 8  # at most the requests already on their way (--concurrency 8)
        time.sleep(0.3)
        assert s.stats.requests == first_run  # no request leaves after the interrupt
        assert proc.returncode == ExitCode.INTERRUPTED == 130
        assert events(rest)[-1] == {"event": "interrupted", "exit_code": 130}
        assert "stopping" in err and "resume" in err
        assert first_run < n
        assert not out.exists() and list(tmp_path.glob(".out.parquet.tmp-*")) == []  # no half-written OUT
        jobs = run_cli("jobs", "--store", store, "--format", "json")
        (job,) = events(jobs.stdout)
        assert job["status"] == "cancelled" and job["succeeded"] >= 100
        stored = run_cli("sql", "--store", store, "select row_index from results where error is null", "--json")
        stored_rows = [e["row_index"] for e in events(stored.stdout)]
        assert len(stored_rows) == job["succeeded"]

        s.configure(latency=0.0)  # the rerun need not be slow; concurrency is not part of the job's identity
        again = run_cli(*argv[1:], "--concurrency", "32")
        assert again.returncode == 0, again.stderr
        done = events(again.stdout)[-1]
        assert done["event"] == "done" and done["rows"] == n and done["errors"] == 0
        # rows whose answers were stored before the interrupt were not paid for twice; only rows in flight
        # or in chunks not yet written (a few chunks of the executor's window) are sent again
        assert all(s.stats.prompts[f"row {i}"] == 1 for i in stored_rows)
        assert s.stats.requests - n <= 4 * 50
    table = pq.read_table(out)
    assert table.column("response").to_pylist() == [f"echo: row {i}" for i in range(n)]
    status = run_cli("status", job["id"], "--store", store, "--json")
    (info,) = events(status.stdout)
    assert (info["status"], info["total"], info["succeeded"], info["runs"]) == ("completed", n, n, 2)


def test_store_subcommands(srv: FakeLLMServer, reviews: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "jobs.duckdb"
    run = run_cli("run", reviews, tmp_path / "o.parquet", "--model", "echo", "--base-url", srv.base_url,
                  "--prompt", "{review}", "--store", store, "--job-name", "nightly")
    assert run.returncode == 0, run.stderr
    (job,) = events(run_cli("jobs", "--store", store, "--json").stdout)
    assert (job["name"], job["status"], job["total"], job["succeeded"], job["failed"]) == ("nightly", "completed",
                                                                                          4, 3, 1)
    res = run_cli("results", job["id"], "-o", tmp_path / "res.parquet", "--store", store)
    assert res.returncode == 0, res.stderr
    results = pq.read_table(tmp_path / "res.parquet")
    assert results.column("row_index").to_pylist() == [0, 1, 2, 3]
    assert results.column("response").to_pylist() == ["echo: good", "echo: bad", None, "echo: fine"]

    # the rest in-process (the same main() as the console script) to keep the test short
    def cli(*args: Any) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = cli("jobs", "--store", store)
    assert code == 0 and "nightly" in out and "completed" in out and out.rstrip().endswith("(1 row)")
    code, out, _ = cli("sql", "--store", store, "select status, count(*) as n from jobs group by status",
                       "--format", "csv")
    assert code == 0 and out.splitlines() == ["status,n", "completed,1"]
    code, out, _ = cli("sql", "--store", store, "select row_index, error_type from results where error is not null",
                       "--format", "json")
    assert events(out) == [{"row_index": 2, "error_type": "PromptError"}]
    code, _, _ = cli("sql", "--store", store, "select * from results", "--format", "parquet", "-o",
                     tmp_path / "q.parquet")
    assert code == 0 and pq.read_table(tmp_path / "q.parquet").num_rows == 4
    code, _, err = cli("sql", "--store", store, "delete from jobs")
    assert code == 2 and "read-only" in err
    code, _, err = cli("sql", "--store", store, "selec 1")
    assert code == 2 and "SQL error" in err
    code, _, err = cli("status", "no-such-job", "--store", store)
    assert code == ExitCode.NOT_FOUND == 4 and "no-such-job" in err
    code, out, _ = cli("status", job["id"], "--store", store)
    assert code == 0 and "nightly" in out and "succeeded" in out
    code, _, err = cli("cancel", job["id"], "--store", store)
    assert code == 0 and "already ended (completed)" in err
    code, _, err = cli("retry", job["id"], "--store", store)
    assert code == 2 and "run the same command again" in err


async def test_retry_and_resume_job_api_jobs(tmp_path: Path) -> None:
    from nagents_frames import BatchManager, BatchRequest, BatchStatus, Provider
    from nagents_frames.store import BatchStore

    store_path = tmp_path / "jobs.duckdb"
    async with FakeLLMServer(error_on_content={"flaky": 400}) as s:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=s.base_url)
        store = await BatchStore(store_path).initialize()
        manager = BatchManager(provider=provider, store=store)
        requests = [BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"{'flaky' if i % 3 == 0 else 'ok'} {i}"}])
                    for i in range(9)]
        job = await manager.submit(requests)
        job = await manager.wait(job.id)
        assert (job.status, job.failed) == (BatchStatus.COMPLETED, 3)
        cancelled = await manager.submit([BatchRequest(id="x", messages=[{"role": "user", "content": "later"}])])
        await manager.cancel(cancelled.id)
        await manager.close()
        await store.close()
        s.configure(error_on_content={})
        env = _env()
        retry = await _async_cli("retry", job.id, "--store", str(store_path), "--json", env=env)
        assert retry[0] == 0, retry[2]
        (event,) = events(retry[1])
        assert (event["event"], event["status"], event["succeeded"], event["failed"]) == ("retry", "completed", 9, 0)
        resume = await _async_cli("resume", cancelled.id, "--store", str(store_path), env=env)
        assert resume[0] == 0, resume[2]
        assert "completed" in resume[2]
        assert s.stats.prompts["later"] == 1 or s.stats.prompts["later"] == 2


async def _async_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The console script from async test code (the fake server runs in this test's loop)."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(str(CLI), *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return int(proc.returncode or 0), out.decode(), err.decode()


def test_parser_documents_every_subcommand() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert set(sub.choices) >= {"run", "estimate", "jobs", "status", "results", "cancel", "retry", "resume", "sql"}
    run = sub.choices["run"]
    flags = {opt for action in run._actions for opt in action.option_strings}
    assert not any("key" in f and "file" not in f for f in flags)  # no flag takes a key itself


# The kernel carries the launching process's peak RSS over into a child's ru_maxrss at exec time, so the
# child is started by a small fresh launcher that reports the child's own rusage.
_LAUNCHER = """
import json, os, subprocess, sys
report, argv = sys.argv[1], sys.argv[2:]
proc = subprocess.Popen(argv)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def _peak_rss_mb(argv: list[str], report: Path) -> tuple[int, float, str]:
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *argv], capture_output=True, text=True,
                          env=_env(), timeout=300, check=False)
    usage = json.loads(report.read_text())
    return int(usage["code"]), usage["maxrss_kb"] / 1024, proc.stdout


@pytest.mark.slow
def test_large_input_streams_with_bounded_memory(tmp_path: Path) -> None:
    # a million rows (about 450 MB in memory); 300 distinct prompts, so the run is bound by streaming, not HTTP
    rows, width = 1_000_000, 420
    src = tmp_path / "big.parquet"
    filler = ("lorem ipsum dolor sit amet " * (width // 27 + 1))[: width - 8]
    in_memory = 0
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("payload", pa.string())])
    with pq.ParquetWriter(src, schema, compression="zstd") as writer:
        for start in range(0, rows, 100_000):
            ids = range(start, start + 100_000)
            part = pa.table({"id": list(ids), "text": [f"item {i % 300}" for i in ids],
                             "payload": [f"{i:08d}{filler}" for i in ids]}, schema=schema)
            in_memory += part.nbytes
            writer.write_table(part)
    in_memory_mb = in_memory / 2**20
    assert in_memory_mb > 400
    small = tmp_path / "small.parquet"  # the same rows, 40 times fewer: the CLI's own footprint
    pq.write_table(pq.read_table(src).slice(0, rows // 40), small)
    out = tmp_path / "out.parquet"
    with FakeLLMServer() as s:
        s.stats.keep_bodies = False
        code, cli_peak, stdout = _peak_rss_mb(
            [str(CLI), "run", str(src), str(out), "--model", "echo", "--base-url", s.base_url, "--prompt",
             "Classify: {text}", "--json", "--progress-interval", "5"], tmp_path / "cli.json")
        small_code, small_peak, _ = _peak_rss_mb(
            [str(CLI), "run", str(small), str(tmp_path / "small-out.parquet"), "--model", "echo", "--base-url",
             s.base_url, "--prompt", "Classify: {text}", "--json"], tmp_path / "small.json")
    assert code == 0 and small_code == 0
    done = events(stdout)[-1]
    assert done["event"] == "done" and done["rows"] == rows and done["errors"] == 0
    assert pq.ParquetFile(out).metadata.num_rows == rows
    last = pq.ParquetFile(out).read_row_group(pq.ParquetFile(out).metadata.num_row_groups - 1, columns=["id", "response"])
    assert last.column("id").to_pylist()[-1] == rows - 1
    assert last.column("response").to_pylist()[-1] == f"echo: Classify: item {(rows - 1) % 300}"
    loader = "import nagents_frames.cli, pyarrow.parquet as pq, sys; print(pq.read_table(sys.argv[1]).num_rows)"
    code, load_peak, _ = _peak_rss_mb([sys.executable, "-c", loader, str(src)], tmp_path / "load.json")
    assert code == 0
    # loading the input whole needs more than its in-memory size; streaming 40 times the rows grows the
    # CLI's peak by a small part of the data's size (imports and buffers are the same for both runs)
    assert load_peak > in_memory_mb
    assert cli_peak - small_peak < 0.25 * in_memory_mb, (cli_peak, small_peak, in_memory_mb)
    assert cli_peak < 0.75 * load_peak, (cli_peak, load_peak)


def test_load_config_sections_and_relative_paths(tmp_path: Path) -> None:
    from nagents_frames.config import RunConfig, load_config

    sub = tmp_path / "conf"
    sub.mkdir()
    cfg = sub / "step.toml"
    cfg.write_text('model = "m"\nstore = "jobs.duckdb"\napi_key_file = "/abs/key"\n[run]\nmodel = "n"\n'
                   'response_format = "schema.json"\nfail_on_errors = true\nstop = "END"\n')
    values = load_config(cfg)
    assert values["model"] == "n"  # [run] wins over the top level
    assert values["store"] == str(sub.resolve() / "jobs.duckdb")
    assert values["response_format"] == str(sub.resolve() / "schema.json")
    assert values["api_key_file"] == "/abs/key"
    merged = RunConfig.from_sources(values, {"model": "flag", "concurrency": None})
    assert (merged.model, merged.fail_on_errors, merged.stop, merged.concurrency) == ("flag", 0.0, ("END",), 64)


def test_cli_import_stays_light() -> None:
    code = "import sys, nagents_frames.cli; print(sorted(m for m in ('pandas', 'ray', 'matplotlib', 'tqdm', 'jsonschema') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60,
                          check=True)
    assert proc.stdout.strip() == "[]"


# --- native batch mode, reports, Ray ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_native_mode_runs_through_the_batch_api(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nagents_frames.testing import batch_stats, configure_batches

    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": ["d0", "d1", "d2", "d3", "d4"], "text": ["a", "b", None, "d", "boom"]}), source)
    out, store = tmp_path / "out.parquet", tmp_path / "jobs.duckdb"
    with FakeLLMServer(error_on_content={"boom": 500}) as server:
        configure_batches(server, in_progress_polls=2, finalizing_polls=1)  # results come back shuffled
        proc = run_cli("run", source, out, "--provider", kind, "--model", "echo", "--base-url", server.base_url,
                       "--prompt", "Say {text}", "--id-column", "doc", "--mode", "native", "--poll-interval", "0.02",
                       "--store", store, "--json", env=_env(OPENAI_API_KEY="sk-t", ANTHROPIC_API_KEY="sk-t"))
        stats = batch_stats(server)
        realtime = [p for p in server.stats.paths if p.endswith(("/chat/completions", "/messages"))]
        assert not realtime, "nothing may go through the real-time endpoints"
    assert proc.returncode == 0, proc.stderr
    evs = events(proc.stdout)
    job = next(e for e in evs if e["event"] == "job")
    done = evs[-1]
    assert job["mode"] == "native" and job["requests"] == 4  # the row without a prompt is never sent
    assert done["event"] == "done" and done["job_id"] == job["id"] and done["status"] == "completed"
    assert done["rows"] == 5 and done["errors"] == 2
    assert len(stats.created) == 1 and stats.requests_per_batch == [4] and stats.polls >= 3
    assert [b.kind for b in stats.batches.values()] == [kind]  # the API of the chosen provider
    table = pq.read_table(out)
    assert table.column_names == ["doc", "text", "response", "error"]
    rows = table.to_pylist()
    assert [r["doc"] for r in rows] == ["d0", "d1", "d2", "d3", "d4"]  # input order, not the provider's
    assert [r["response"] for r in rows[:2]] == ["echo: Say a", "echo: Say b"] and rows[3]["response"] == "echo: Say d"
    assert rows[2]["response"] is None and rows[2]["error"].startswith("PromptError")
    assert rows[4]["response"] is None and rows[4]["error"] is not None
    # the job is an ordinary job of the store: native mode, row i is request i, ids from --id-column
    assert main(["status", job["id"], "--store", str(store), "--json"]) == 0
    status = events(capsys.readouterr().out)[0]
    assert status["status"] == "completed" and status["total"] == 5
    assert status["succeeded"] == 3 and status["failed"] == 2  # the server error and the row without a prompt
    assert main(["sql", "--store", str(store), "--format", "json",
                 f"select j.mode, r.row_index, r.request_id, r.error_type from jobs j join results r on "
                 f"r.job_id = j.id where j.id = '{job['id']}' order by r.row_index"]) == 0
    stored = events(capsys.readouterr().out)
    assert [(r["mode"], r["row_index"], r["request_id"]) for r in stored] == [
        ("native", i, f"d{i}") for i in range(5)]
    assert stored[2]["error_type"] == "PromptError" and stored[0]["error_type"] is None


def test_native_mode_without_store_and_auth_failure(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with FakeLLMServer(api_key="sk-right") as server:
        base = ["run", reviews, out, "--model", "echo", "--base-url", server.base_url, "--prompt", "{review}",
                "--mode", "native", "--poll-interval", "0.02"]
        good = run_cli(*base, env=_env(OPENAI_API_KEY="sk-right"))
        assert good.returncode == 0, good.stderr
        assert pq.read_table(out).column("response").to_pylist() == ["echo: good", "echo: bad", None, "echo: fine"]
        out.unlink()
        bad = run_cli(*base, env=_env(OPENAI_API_KEY="sk-wrong"))
    assert bad.returncode == ExitCode.FAILED
    assert bad.stderr.strip().splitlines()[-1].startswith("nagents-frames: error: ") and "sk-wrong" not in bad.stderr
    assert not out.exists()


def _start_native(source: Path, out: Path, server: FakeLLMServer, *extra: str | Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``run --mode native`` and return the process and its job id, once the provider has the batch."""
    from nagents_frames.testing import batch_stats

    proc = subprocess.Popen(
        [str(CLI), "run", str(source), str(out), "--model", "echo", "--base-url", server.base_url, "--prompt",
         "{review}", "--mode", "native", "--poll-interval", "0.02", "--json", *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(OPENAI_API_KEY="sk-t"),
    )
    assert proc.stdout is not None
    job = None
    for line in proc.stdout:  # bounded: the process prints "start", then "job" (or fails and closes stdout)
        event = json.loads(line)
        if event["event"] == "job":
            job = event["id"]
            break
    assert job is not None, proc.communicate(timeout=30)
    for _ in range(400):  # at most ~20 s: the batch is polled every 20 ms
        if batch_stats(server).polls >= 2:
            break
        time.sleep(0.05)
    assert batch_stats(server).polls >= 2
    return proc, job


def test_native_interrupt_then_resume_polls_the_same_batch(reviews: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from nagents_frames.testing import batch_stats, configure_batches

    out, store = tmp_path / "out.parquet", tmp_path / "jobs.duckdb"
    with FakeLLMServer() as server:
        sim = configure_batches(server, in_progress_polls=10**6)  # never finishes until we say so
        proc, job_id = _start_native(reviews, out, server, "--store", store)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.INTERRUPTED, err
        assert not out.exists() and f"nagents-frames resume {job_id} --store {store}" in err
        assert len(sim.created) == 1 and sim.cancels == 0  # the batch keeps running at the provider
        sim.in_progress_polls = 1
        resumed = run_cli("resume", job_id, "--store", store, "--base-url", server.base_url, "--poll-interval",
                          "0.02", "--json", env=_env(OPENAI_API_KEY="sk-t"))
        assert resumed.returncode == 0, resumed.stderr
        assert events(resumed.stdout)[-1] == {"event": "resume", "id": job_id, "status": "completed", "total": 4,
                                              "succeeded": 3, "failed": 1}
        assert len(batch_stats(server).created) == 1, "resume polls the batch it has, it creates none"
    assert main(["results", job_id, "-o", str(tmp_path / "res.parquet"), "--store", str(store)]) == 0
    res = pq.read_table(tmp_path / "res.parquet").sort_by("row_index")
    assert res.column("response").to_pylist() == ["echo: good", "echo: bad", None, "echo: fine"]


def test_native_interrupt_without_store_cancels_the_batch(reviews: Path, tmp_path: Path) -> None:
    from nagents_frames.testing import configure_batches

    with FakeLLMServer() as server:
        sim = configure_batches(server, in_progress_polls=10**6)
        proc, _ = _start_native(reviews, tmp_path / "out.parquet", server)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.INTERRUPTED, err
        # no store remembers the batch, so nobody could collect it: it is cancelled at the provider
        assert len(sim.created) == 1 and sim.cancels == 1
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--poll-interval", "1"], "--poll-interval only applies with --mode native"),
    (["--mode", "native", "--poll-interval", "0"], "positive number"),
    (["--mode", "batch"], "invalid choice"),
    (["--address", "auto"], "only apply with --engine ray"),
    (["--num-actors", "2"], "only apply with --engine ray"),
    (["--engine", "ray", "--mode", "native"], "does not combine with --engine ray"),
    (["--engine", "ray", "--num-actors", "0"], "must be a positive integer"),
    (["--mode", "native", "--response-format", "{schema}"], "not supported with --mode native"),
])
def test_mode_and_engine_flag_errors(srv: FakeLLMServer, reviews: Path, tmp_path: Path, args: list[str],
                                     needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"label": {"type": "string"}}}))
    argv = ["run", str(reviews), str(tmp_path / "out.parquet"), "--model", "echo", "--prompt", "{review}",
            "--base-url", srv.base_url, *[str(schema) if a == "{schema}" else a for a in args]]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert srv.stats.requests == 0 and not (tmp_path / "out.parquet").exists()


def test_run_reports_the_job_id_and_report_draws_it(srv: FakeLLMServer, reviews: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "jobs.duckdb"
    argv = ["run", reviews, tmp_path / "out.parquet", "--model", "echo", "--base-url", srv.base_url,
            "--prompt", "{review}", "--store", store]
    human = run_cli(*argv)
    assert human.returncode == 0, human.stderr
    machine = run_cli(*argv, "--json")  # the same command again: the same (resumed) job
    done = events(machine.stdout)[-1]
    job_id = done["job_id"]
    assert job_id.startswith("stream_") and f"job {job_id} in {store}" in human.stderr
    listed = events(run_cli("jobs", "--store", store, "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]

    html, png = tmp_path / "report.html", tmp_path / "report.png"
    procs = run_many(["report", job_id, "-o", html, "--store", store],
                     ["report", job_id, "-o", png, "--store", store, "--json"])
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    page = html.read_text(encoding="utf-8")
    assert "<img" in page and "data:image/png;base64," in page and job_id in page
    assert events(procs[1].stdout) == [{"event": "report", "id": job_id, "output": str(png),
                                        "bytes": png.stat().st_size}]

    assert main(["report", "no_such_job", "-o", str(tmp_path / "x.png"), "--store", str(store)]) == ExitCode.NOT_FOUND
    assert "no_such_job" in capsys.readouterr().err
    assert main(["report", job_id, "-o", str(tmp_path / "x.pdf"), "--store", str(store)]) == ExitCode.USAGE
    assert ".html or .png" in capsys.readouterr().err
    assert main(["report", job_id, "-o", str(tmp_path / "x.png")]) == ExitCode.USAGE
    assert "--store PATH is required" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.pdf").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["{missing}", "{out_dir}"], "missing.parquet"),
    (["{reviews}", "{out_dir}", "--prompt", "{nope}"], "nope"),
    (["{csv}", "{out_dir}"], "Parquet only"),
    (["{reviews}", "{reviews}"], "is a file"),
])
def test_ray_engine_checks_before_starting_a_cluster(reviews: Path, tmp_path: Path, args: list[str], needle: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.csv").write_text("review\ngood\n")
    subst = {"{missing}": tmp_path / "missing.parquet", "{out_dir}": tmp_path / "out", "{reviews}": reviews,
             "{csv}": tmp_path / "in.csv"}
    argv = ["run", *[str(subst.get(a, a)) for a in args], "--engine", "ray", "--model", "echo",
            "--base-url", "http://127.0.0.1:9/v1"]
    if "--prompt" not in argv:
        argv += ["--prompt", "{review}"]
    assert main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_ray_engine_parquet_in_directory_out(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra: pip install nagents-frames[ray]")
    source = tmp_path / "in.parquet"
    n = 45
    pq.write_table(pa.table({"n": list(range(n)), "text": [None if i % 9 == 4 else f"t{i}" for i in range(n)]}),
                   source, row_group_size=20)
    out, store = tmp_path / "out", tmp_path / "jobs.duckdb"
    with FakeLLMServer() as server:
        # a local cluster of 2 CPUs started by the command itself; no usage stats, no dashboard
        proc = run_cli("run", source, out, "--engine", "ray", "--local-cpus", "2", "--num-actors", "2",
                       "--rows-per-file", "20", "--chunk-size", "10", "--model", "echo", "--base-url",
                       server.base_url, "--prompt", "Say {text}", "--store", store, "--json",
                       env=_env(RAY_USAGE_STATS_ENABLED="0"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events(proc.stdout)
    done = evs[-1]
    assert done["event"] == "done" and done["engine"] == "ray" and done["rows"] == n and done["errors"] == 5
    assert done["job_id"] and Path(done["output"]) == out.resolve() and done["files"] == 3
    assert sum(1 for e in evs if e["event"] == "progress") == 3
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("row_index")
    assert table.column("n").to_pylist() == list(range(n)) == table.column("row_index").to_pylist()
    responses = table.column("response").to_pylist()
    errors = table.column("error").to_pylist()
    for i in range(n):
        if i % 9 == 4:
            assert responses[i] is None and errors[i].startswith("PromptError")
        else:
            assert responses[i] == f"echo: Say t{i}" and errors[i] is None
    status = events(run_cli("status", done["job_id"], "--store", store, "--json").stdout)[0]
    assert status["status"] == "completed" and status["succeeded"] == n - 5 and status["failed"] == 5
