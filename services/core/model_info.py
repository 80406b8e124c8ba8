"""The part of GetModelInfo a program gives: its signature and its predictors' (the runtime's
answer, and the router's when no runtime is up and the API model answers)."""

from __future__ import annotations

from services.core.api import pb
from services.core.pipeline import PipelineSpec
from services.core.program import ProgramSpec


def describe_program(info: pb.ModelInfo, program: ProgramSpec | PipelineSpec) -> None:
    describe_signature(info.signature, program)
    if isinstance(program, PipelineSpec):
        for predictor in program.predictors:
            describe_signature(info.predictors.add(name=predictor.name).signature, predictor)


def describe_signature(signature: pb.ProgramSignature, program: ProgramSpec | PipelineSpec) -> None:
    signature.instructions = program.instructions
    for field in program.inputs:
        signature.input_fields.add(
            name=field.name, description=field.stated_description, type=field.type
        )
    for field in program.outputs:
        signature.output_fields.add(
            name=field.name, description=field.stated_description, type=field.type
        )
