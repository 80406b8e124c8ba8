"""llama.cpp's converter, tensors only: `python llama_tensors.py LLAMA_CPP_TREE HF_DIR OUT`.

Writes the Hugging Face model in HF_DIR as an F16 GGUF laid out exactly as llama.cpp's own
convert_hf_to_gguf.py lays it out for the model's family (q/k permutations, norm offsets, fused
projections, tied embeddings), without a tokenizer: the export takes the tokenizer and the chat
template from the student's base GGUF. Run as a script in its own process because the converter
puts its vendored gguf-py first on sys.path; it imports nothing from edgedistill.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(tree: Path, hf_dir: Path, out_path: Path) -> None:
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(hf_dir, False)
    model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))

    class TensorsOnly(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch

        def set_vocab(self) -> None:
            """The tokenizer comes from the base GGUF, not from here."""

    with torch.inference_mode():
        TensorsOnly(hf_dir, gguf.LlamaFileType.MOSTLY_F16, out_path, eager=True).write()


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
