"""The build host check's arithmetic (services/builder/device_check.py): which dev rows two
devices' models answered alike, and the training figures it reports."""

import pytest

from services.builder.device_check import agreement, training_figures


def answer(ticket: str, category: str) -> dict:
    return {"inputs": {"ticket": ticket}, "outputs": {"category": category}, "outcome": "OK"}


def test_rows_are_matched_by_their_inputs_whatever_their_order():
    cpu = [answer("a", "billing"), answer("b", "network"), answer("c", "access")]
    cuda = [answer("c", "access"), answer("a", "billing"), answer("b", "security")]
    result = agreement(cpu, cuda)
    assert (result["n"], result["same"], result["share"]) == (3, 2, 0.6667)
    assert result["differing"] == [{"ticket": "b"}]


def test_every_output_field_must_agree():
    cpu = [{"inputs": {"t": "a"}, "outputs": {"category": "billing", "urgent": True}}]
    cuda = [{"inputs": {"t": "a"}, "outputs": {"category": "billing", "urgent": False}}]
    assert agreement(cpu, cuda)["same"] == 0


def test_runs_over_different_rows_are_refused():
    with pytest.raises(ValueError, match="different rows"):
        agreement([answer("a", "billing")], [answer("z", "billing")])


def test_training_figures_come_from_the_loss_record():
    loss = {"steps": 270, "epochs": 3.0, "examples": 360, "seconds": 90.0,
            "tokens_per_second": 1234.5, "final_loss": 0.012345, "chosen_step": 236,
            "calibration_curve": [{"step": 34, "score": 0.4},
                                  {"step": 68, "score": 0.9}]}  # fmt: skip
    figures = training_figures(loss)
    assert figures["steps_per_second"] == 3.0
    assert figures["final_loss"] == 0.0123
    assert figures["calibration_curve"] == [(34, 0.4), (68, 0.9)]


IMPORT_ORDER = """
import sys


class Recorder:
    seen = []

    def find_spec(self, name, path=None, target=None):
        Recorder.seen.append(name)


sys.meta_path.insert(0, Recorder())
sys.argv = ["edgedistill", *sys.argv[1:]]
import services.cli  # noqa: E402

print(" ".join(Recorder.seen))
"""


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_serve_loads_llama_cpp_before_any_other_native_library(command: str) -> None:
    """A CUDA build of llama-cpp-python segfaulted creating its context when numpy and
    pydantic-core were loaded first (seen on the H200); `serve` loads it first, `predict` (a
    client) not at all at import."""
    import subprocess
    import sys

    order = subprocess.run([sys.executable, "-c", IMPORT_ORDER, command], capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    if command == "predict":
        assert "llama_cpp" not in order
        return
    first = order.index("llama_cpp")
    assert all(order.index(lib) > first for lib in ("numpy", "pydantic_core") if lib in order)
    assert "numpy" in order[first:]  # the check means something: numpy is loaded after it


def test_the_kv_cache_goes_under_the_name_the_installed_transformers_takes() -> None:
    """transformers 5.17 (the GPU host's) takes `past_key_values`, 5.25 `cache`: a name the
    forward does not know is swallowed by **kwargs and the cache silently ignored (found by
    running the fine-tune math tests under 5.17: the shared-prefix loss was off)."""
    from services.builder.finetune import cache_argument

    class Older:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):  # type: ignore[no-untyped-def]
            ...

    class Newer:
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):  # type: ignore[no-untyped-def]
            ...

    kv = object()
    assert cache_argument(Older(), kv) == {"past_key_values": kv}
    assert cache_argument(Newer(), kv) == {"cache": kv}


def test_a_cuda_check_without_a_gpu_stops_at_once_saying_what_to_do(tmp_path, capsys) -> None:
    import torch

    from services.builder.device_check import main

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "DEVICE=cpu" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no stage ran
