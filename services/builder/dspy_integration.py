"""DSPy plumbing: GGUF students for `dspy.BootstrapFinetune`, served in-process by llama.cpp.

    engine = LlamaCppEngine()
    student_lm = dspy.LM("llamacpp/" + str(base_gguf), engine=engine, provider=GGUFProvider())
    student.set_lm(student_lm)
    distilled = dspy.BootstrapFinetune(metric=metric).compile(
        student, teacher=teacher, trainset=trainset
    )
    # distilled's LM is "llamacpp/<fine-tuned .gguf>", answered by the same engine.

DSPy has no GGUF, llama.cpp or Ollama support of its own; this adds both halves: an engine
(`complete(Request) -> Response`) and a fine-tuning `Provider` that trains LoRA, exports GGUF
and quantizes, with the same stage functions as `edgedistill build`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob

from services.builder.spec import LoraSpec
from services.core.pipeline import request_messages

PREFIX = "llamacpp/"


def _dense_student(base: Path, out: Path) -> None:
    """The GGUF's dense transformers copy, from the host's stage cache when a fine-tune on this
    host made it before (it takes longer than a small fine-tune)."""
    from services.builder import host_cache
    from services.builder.data import file_sha256
    from services.builder.student import dense_hf_copy, gguf_student
    from services.core.gguf_metadata import chat_template

    template = chat_template(base)
    if not template:
        raise ValueError(f"{base}: the GGUF has no chat template to fine-tune with")
    key = hashlib.sha256(json.dumps([file_sha256(base), template]).encode()).hexdigest()
    if cached := host_cache.stage_entry("dense-student", key):
        host_cache.link_tree(cached, out)
        return
    dense_hf_copy(gguf_student(str(base), base), out, template)
    if why := host_cache.keep_stage("dense-student", key, out):
        logging.getLogger(__name__).warning("dense student not kept in the host cache: %s", why)


def _gguf_path(model: str) -> Path:
    return Path(model.split(PREFIX, 1)[1] if PREFIX in model else model)


class LlamaCppEngine:
    """A dspy.LM engine for GGUF files: the model string is "llamacpp/<path to .gguf>"."""

    def __init__(self, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._backends: dict[Path, Any] = {}
        self._lock = threading.Lock()  # one llama.cpp context per model, one call at a time

    def _backend(self, model: str) -> Any:
        import os

        from services.runtime.backends.llamacpp import LlamaCppBackend

        path = _gguf_path(model).resolve()
        if path not in self._backends:
            self._backends[path] = LlamaCppBackend(
                path, n_ctx=self._n_ctx, n_threads=self._n_threads or os.cpu_count() or 1
            )
        return self._backends[path]

    def complete(self, request: Any) -> Any:
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import Message, Response, TextPart, Usage

        from services.core.sampling import SAMPLING_DEFAULTS
        from services.runtime.backends import Finished, GenerationParams, TokenPiece

        validate_request(request)
        messages = request_messages(request)
        config = request.config
        params = GenerationParams(
            max_tokens=config.max_tokens or 512,
            temperature=config.temperature if config.temperature is not None else 0.0,
            top_p=config.top_p if config.top_p is not None else SAMPLING_DEFAULTS.top_p,
            seed=getattr(config, "seed", None) or 0,
            stop=tuple(config.stop),
        )
        with self._lock:
            backend = self._backend(request.model)
            prompt = backend.prepare(messages)
            pieces, finished = [], None
            for event in backend.generate(prompt, params, lambda: False):
                if isinstance(event, TokenPiece):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    finished = event
        assert finished is not None
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart("".join(pieces) + finished.text)]),
            finish_reason="length" if finished.reason == "length" else "stop",
            usage=Usage(
                input_tokens=finished.prompt_tokens, output_tokens=finished.completion_tokens
            ),
        )

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()


class GGUFProvider(Provider):
    """Fine-tunes a GGUF student with LoRA and returns "llamacpp/<quantized GGUF>"."""

    def __init__(
        self,
        work_dir: Path = Path("build/dspy-finetune"),
        lora: LoraSpec | None = None,
        quantization: str = "Q8_0",
        device: str = "auto",
        n_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.finetunable = True
        self.TrainingJob = TrainingJob
        self.work_dir = work_dir
        self.lora = lora or LoraSpec()
        self.quantization = quantization
        self.device = device
        self.n_threads = n_threads
        self.seed = seed

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return model.startswith(PREFIX)

    def launch(self, lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        pass  # in-process: the engine loads the GGUF on first use

    def kill(self, lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        pass

    def finetune(
        self,
        job: Any,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: Any,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        import os

        from services.builder import export, finetune

        base = _gguf_path(model)
        if not base.is_file():
            raise ValueError(f"{model}: no such GGUF file")
        lora = self.lora.model_copy(update=train_kwargs or {})
        key = hashlib.sha256(
            json.dumps([str(base), train_data, lora.model_dump(), self.seed], default=str).encode()
        ).hexdigest()[:16]
        work = self.work_dir / key
        student_dir, finetune_dir = work / "student", work / "finetune"
        for folder in (student_dir, finetune_dir):
            folder.mkdir(parents=True, exist_ok=True)
        dataset = work / "dataset.jsonl"
        dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_data))
        if not (student_dir / "config.json").is_file():
            _dense_student(base, student_dir)
        threads = self.n_threads or os.cpu_count() or 1
        finetune.train_lora(
            base_dir=student_dir, dataset_path=dataset, lora=lora, device=self.device,
            seed=self.seed, n_threads=threads, out_dir=finetune_dir,
        )  # fmt: skip
        f16 = work / "student.F16.gguf"
        prompts = [r["messages"][:-1] for r in train_data[:2]]
        name = f"{base.stem}-distilled"
        export.export_student(student_dir, finetune_dir / "adapter", base, f16, name, prompts)
        if self.quantization == "F16":
            return PREFIX + str(f16.resolve())
        quantized = work / f"student.{self.quantization}.gguf"
        export.quantize(f16, quantized, self.quantization, threads)
        return PREFIX + str(quantized.resolve())
