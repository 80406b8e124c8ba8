from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.bundles import CAPITALS_PROGRAM
from testkit.processes import ServerProcess, free_port, smollm2_gguf, start_runtime, wait_http


@pytest.fixture(scope="session", autouse=True)
def host_stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The builds of one test run share a stage cache of their own (the dense base student is
    made once), not the host's: a test never reads what another run left there."""
    from services.builder.host_cache import STAGE_CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STAGE_CACHE_ENV, str(tmp_path_factory.mktemp("stage-cache")))
        yield


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = smollm2_gguf()
    assert path.is_file(), f"{path} missing: run `make setup`"
    return path


@pytest.fixture(scope="session")
def program_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("program") / "program.json"
    path.write_text(json.dumps(CAPITALS_PROGRAM))
    return path


@pytest.fixture(scope="module")
def runtime(gguf_path: Path, program_path: Path) -> Iterator[ServerProcess]:
    server = start_runtime(
        "--model",
        str(gguf_path),
        "--program",
        str(program_path),
        "--n-ctx",
        "2048",
        "--max-queue",
        "4",
        "--max-tokens-limit",
        "512",
    )
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def openai_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2: a real API model on loopback."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
         "--model_alias", "teacher-smol", "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "1024", "--n_threads", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, "llama_cpp.server")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(10)
