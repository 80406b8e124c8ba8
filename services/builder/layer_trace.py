"""What llama.cpp computes inside a GGUF, layer by layer, for the export's self-check.

llama.cpp's graph names each transformer block's output `l_out-N`; its scheduler's evaluation
callback (the hook llama.cpp's own `eval-callback` tool uses) hands those tensors over as they
are computed. Kept here: the last prompt token's hidden state after each block, and the logits
for the next token. With transformers' hidden states for the same tokens, a wrong export is
located at the first block where the two part.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LAYER_OUTPUT = b"l_out-"
_FINAL_NORM = b"result_norm"  # the last block's output after the output norm
_GGML_TYPE_F32 = 0


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's `struct ggml_tensor` (type, buffer, ne[4])."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
    ]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
    ]  # fmt: skip
    return lib


@dataclass(frozen=True)
class ForwardTrace:
    layers: list[np.ndarray]  # the last token's hidden state after each block
    final_norm: np.ndarray  # the last block's, after the output norm
    logits: np.ndarray  # the next token's logits


def trace_forward(gguf_path: Path, tokens: list[int], n_threads: int = 2) -> ForwardTrace:
    """One forward pass of llama.cpp over `tokens`, observed block by block."""
    import llama_cpp as llama

    ggml = _ggml()
    seen: dict[bytes, np.ndarray] = {}

    def observe(tensor: int, ask: bool, _user: int) -> bool:
        name = ggml.ggml_get_name(tensor) or b""
        if not (name.startswith(_LAYER_OUTPUT) or name == _FINAL_NORM):
            return not ask  # not asked for: let the scheduler go on
        if ask:
            return True
        head = _TensorHead.from_address(tensor)
        if head.type == _GGML_TYPE_F32:
            data = np.empty(ggml.ggml_nbytes(tensor) // 4, dtype=np.float32)
            ggml.ggml_backend_tensor_get(tensor, data.ctypes.data, 0, data.nbytes)
            seen[name] = data[-head.ne[0] :].copy()
        return True

    callback = llama.ggml_backend_sched_eval_callback(observe)
    model = llama.llama_model_load_from_file(str(gguf_path).encode(),
                                             llama.llama_model_default_params())  # fmt: skip
    if not model:
        raise ValueError(f"llama.cpp could not load {gguf_path}")
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = max(64, len(tokens))
    params.n_threads = params.n_threads_batch = n_threads
    params.cb_eval = callback
    context = llama.llama_init_from_model(model, params)
    try:
        array = (llama.llama_token * len(tokens))(*tokens)
        if llama.llama_decode(context, llama.llama_batch_get_one(array, len(tokens))) != 0:
            raise ValueError("llama.cpp could not evaluate the self-check prompt")
        n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(context, -1), shape=(n_vocab,))
        blocks = sorted(int(n[len(_LAYER_OUTPUT) :]) for n in seen if n != _FINAL_NORM)
        return ForwardTrace([seen[_LAYER_OUTPUT + str(i).encode()] for i in blocks],
                            seen[_FINAL_NORM], logits.copy())  # fmt: skip
    finally:
        llama.llama_free(context)
        llama.llama_model_free(model)
