"""The build, as a list of stage declarations read top to bottom (see base.Stage)."""

from services.builder.stages.base import Stage, StageRunner, stage_key
from services.builder.stages.distill import (
    CONVERT,
    DATASET,
    EXPORT,
    FINETUNE,
    QUANTIZE,
    STUDENT,
    TRACES,
)
from services.builder.stages.release import CALIBRATE, EVALUATE, PACKAGE

STAGES: tuple[Stage, ...] = (
    TRACES,  # 1. the teacher's answers that pass the metric
    DATASET,  # 2. chat records, formatted exactly as the runtime prompts
    CONVERT,  # a Hugging Face student without a GGUF, converted by llama.cpp
    STUDENT,  # the student as a dense transformers checkpoint
    FINETUNE,  # 3. LoRA, loss on the assistant's tokens
    EXPORT,  # 4. merged weights -> F16 GGUF, self-checked
    QUANTIZE,  # 5. llama.cpp quantizations
    EVALUATE,  # 6. teacher vs untuned vs distilled on held-out dev
    CALIBRATE,  # 7. the router's threshold, the reports
    PACKAGE,  # 8. the verifiable bundle, published as BUILD/bundle
)

__all__ = ["STAGES", "Stage", "StageRunner", "stage_key"]
