"""The first minutes of a new user: every startup mistake is answered before anything
loads, in one line naming the setting, with exit status 2; the command answers
`--version`, suggests the flag or command meant, and names a missing extra."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import cli


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", "serve", "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_missing_model_directory_is_named(tmp_path: Path) -> None:
    missing = one_line(serve("--model", str(tmp_path / "my-modle")))
    empty = one_line(serve("--model", str(tmp_path)))
    assert missing.startswith("microbatch serve: --model: no such directory:")
    assert "my-modle" in missing
    assert "not a model directory: it has no config.json" in empty


def test_several_models_need_names_once_each_and_one_process(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert one_line(serve("--model", f"emb={a}", "--model", str(b))) == (
        f"microbatch serve: --model: with several models each needs a name (NAME=PATH); "
        f"unnamed: {b}"
    )
    twice = one_line(serve("--model", f"emb={a}", "--model", f"emb={b}"))
    assert twice == "microbatch serve: --model: the name 'emb' is given twice"
    default = one_line(serve("--model", f"emb={a},rr={b}", "--default-model", "nli"))
    assert (
        default == "microbatch serve: --default-model 'nli' is not a served model; served: emb, rr"
    )
    assert "a model's name is letters" in one_line(serve("--model", f"=x{a}"))
    workers = serve("--model", f"emb={a}", "--model", f"rr={b}", "--workers", "2")
    assert workers.returncode == 2
    assert "--workers serves one model" in workers.stderr.splitlines()[0]


def test_versions_and_routes_are_checked_before_anything_loads(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    versions = ["--model", f"emb@v1={a}", "--model", f"emb@v2={b}"]
    twice = one_line(serve("--model", f"emb@v1={a}", "--model", f"emb@v1={b}"))
    assert twice == "microbatch serve: --model: 'emb@v1' is given twice"
    assert "a version is letters" in one_line(serve("--model", f"emb@/x={a}"))
    route = one_line(serve(*versions, "--route", '{"emb": {"v3": 1}}'))
    assert route == "microbatch serve: --route: emb has no version 'v3'; versions: v1, v2"
    model = one_line(serve(*versions, "--route", '{"rr": {"v1": 1}}'))
    assert model == "microbatch serve: --route: 'rr' is not a served model; served: emb"
    weights = one_line(serve(*versions, "--route", '{"emb": {"v1": -1}}'))
    assert weights == "microbatch serve: --route emb.v1: a weight is a whole number >= 0, got -1"
    assert "--route is not JSON" in one_line(serve(*versions, "--route", "emb=v1"))


def test_models_that_cannot_fit_the_device_are_refused_with_their_sizes() -> None:
    line = one_line(serve("--device", "cpu", "--max-batch-size", "1000000"))
    assert line.startswith("microbatch serve: --model: the models need ")
    assert "the built-in model" in line
    assert "activations of 1000000 x 256 tokens" in line
    assert line.endswith("lower --max-batch-size or --max-tokens, or serve fewer models")


def test_a_per_process_rate_limit_with_several_workers_is_refused() -> None:
    line = one_line(serve("--workers", "2", "--rate-limit-rps", "10"))
    assert line.startswith("microbatch serve: --rate-limit-rps counts per process")
    assert one_line(serve("--workers", "0")).startswith("microbatch serve: --workers:")


def test_a_device_this_machine_lacks_is_named() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cuda = one_line(serve("--device", "cuda"))
    unknown = one_line(serve("--device", "tpu"))
    assert cuda == (
        "microbatch serve: --device cuda: this machine has no CUDA device torch can use; "
        "use cpu or auto"
    )
    assert "unknown device 'tpu'" in unknown


def test_with_workers_the_engine_process_names_a_device_and_the_server_exits_2() -> None:
    """The supervisor imports no torch, so the engine process checks the devices, before
    it loads the model; the supervisor stops the front-ends and exits with its status."""
    result = serve("--workers", "2", "--device", "tpu")
    assert result.returncode == 2, result.stderr
    assert "microbatch serve: --device unknown device 'tpu'" in result.stderr
    assert "loading 1/1" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_named_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    line = one_line(result)
    assert (
        line
        == f"microbatch serve: --port {port}: the port is in use on 127.0.0.1 (0 picks a free one)"
    )


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_taken_by_a_server_still_loading_is_named_in_one_line(
    workers: str, tmp_path: Path
) -> None:
    """The first server holds its port from its first second, before its model loads:
    a second one started on it then is refused in one line, status 2, and loads nothing,
    and the first one goes on to serve."""
    from benchmarks.processes import free_port

    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
               "--workers", workers, "--no-compile", "--dtype", "float32"]  # fmt: skip
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not _listening(port):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.05)  # polling another process's socket; nothing to wait on here
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        line = one_line(second)
        assert line == (
            f"microbatch serve: --port {port}: the port is in use on 127.0.0.1 (0 picks a free one)"
        )
        deadline = time.monotonic() + 240
        while httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.5)  # the first server warming up in its own process
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
        log.close()


def test_a_model_that_fails_to_load_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # and no weights
    result = serve("--model", str(tmp_path), "--no-compile")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [reason] = [line for line in result.stderr.splitlines() if "cannot start:" in line]
    assert "ERROR uvicorn: cannot start: cannot load model" in reason
    assert "[None]" not in result.stderr


def test_a_mistyped_flag_or_command_gets_the_one_meant(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--max-wiat-ms", "5"]) == 2
    flag = capsys.readouterr().err.strip()
    assert cli.main(["serv"]) == 2
    command = capsys.readouterr().err.strip()
    assert flag.startswith(
        "microbatch serve: unknown option --max-wiat-ms; did you mean --max-wait-ms"
    )
    assert (
        command == "microbatch: unknown command 'serv'; did you mean 'serve'? (microbatch --help)"
    )


def test_version_and_a_help_that_shows_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"microbatch {cli.package_version()}"
    assert cli.main(["version"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "(default: null)" not in help_text
    assert "SecretStr" not in help_text
    assert "--api-keys KEY" in help_text
    assert "(default: 32)" in help_text


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from server import cli\n"
        "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'serve --help imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_tool_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m.startswith("benchmarks")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if not installed
    assert cli.main(["bench", "http://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "microbatch bench needs the bench extra (aiohttp is missing): "
        "pip install 'microbatch[bench]'"
    )


@pytest.mark.asyncio
async def test_docs_and_redoc_load_every_asset_from_the_server_itself() -> None:
    import re

    from tests.server.fakes import FakeTextModel
    from tests.server.test_app import serve as serve_app

    async with serve_app(FakeTextModel()) as client:  # in process: no network at all
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
            urls += re.findall(r"""url: ?["']([^"']+)["']""", html)
            assert urls, page
            for url in urls:
                assert url.startswith("/"), f"{page} loads {url} from elsewhere"
                assert (await client.get(url)).status_code == 200, url
            assert "https://" not in html, page
