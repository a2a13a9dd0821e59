"""llama.cpp as the oracle of the GGUF tests, through llama-cpp-python: its bundled libggml-base's quantizers
(ctypes) and its runtime's logits beside ours. Import only after pytest.importorskip("llama_cpp")."""
import ctypes
import os

import numpy as np
import torch


def ggml_lib() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base with ggml_quantize_chunk and dequantize_row_mxfp4 typed."""
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.dequantize_row_mxfp4.restype = None
    lib.dequantize_row_mxfp4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk(type `name`, x (rows, n_per_row) float32, imatrix (n_per_row,) or None): the blocks'
    bytes, (rows, n_per_row / block * block bytes) uint8."""
    import gguf

    from fasttune.export import kquants

    x = np.ascontiguousarray(x, dtype=np.float32)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    block, size = kquants.BLOCKS[name]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    n = lib.ggml_quantize_chunk(int(gguf.GGMLQuantizationType[name]), x.ctypes.data, out.ctypes.data, 0,
                                x.shape[0], x.shape[1], None if qw is None else qw.ctypes.data)
    assert n == out.size
    return out


PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b"]


def lora_merged_gguf(family: str, folder, **overrides):
    """A tiny `family` model (tests/tiny.py, vocab 416, GPT-2 BPE tokenizer) with random LoRA on every linear layer,
    exported to f16 GGUF in `folder`: (model ready for inference, tokenizer, GGUF path, its gguf.GGUFReader)."""
    import gguf
    from bpe_tokenizers import make_bpe_tokenizer
    from peft_oracle import randomize_lora_b
    from tiny import hf_model

    from fasttune import FastLanguageModel

    bpe = make_bpe_tokenizer("gpt2")
    hf_model(family, vocab_size=416, **overrides).save_pretrained(folder / "m")
    bpe.save_pretrained(folder / "m")
    model, tok = FastLanguageModel.from_pretrained(str(folder / "m"))
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    randomize_lora_b(model)
    model = FastLanguageModel.for_inference(model)
    path = model.save_pretrained_gguf(folder / "m.gguf", tok, quantization_method="f16", progress=False)
    reader = gguf.GGUFReader(path)
    return model, tok, path, reader


def compare_logits(model, tok, path, prompts, n_threads: int = 2, f32_cache: bool = False):
    """(max |logit difference| / our logit range, top-1 agreement over all positions, top-1 equal at every
    prompt's end) of llama.cpp running the GGUF at `path` against `model`. f32_cache: llama.cpp keeps keys and
    values in fp32 instead of its default f16, so the file is measured rather than the cache's rounding (which
    OLMo's normed keys feel more than most)."""
    import llama_cpp

    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=n_threads, **cache)
    worst, agree, total, last_equal = 0.0, 0, 0, True
    for text in prompts:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)])
        worst = max(worst, float(np.abs(theirs - ours).max() / (ours.max() - ours.min())))
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        total += len(ids)
        last_equal &= bool(theirs[-1].argmax() == ours[-1].argmax())
    llm.close()
    return worst, agree / total, last_equal


def llama_quantize(src, dst, method: str):
    """llama.cpp's llama_model_quantize of the GGUF at `src` into `dst` with `method` (a fasttune name such as
    "q4_k_m" or "mxfp4_moe": llama.cpp's LLAMA_FTYPE_MOSTLY_<METHOD>), one thread; returns dst."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def mtmd_run(text_gguf, mmproj, before: str, image, after: str, n_threads: int = 2):
    """llama.cpp's libmtmd on a prompt with one image or audio clip: `before` + the media + `after` (libmtmd wraps
    it in the family's start/end tokens itself) through the text GGUF and its mmproj. `image`: (H, W, 3) uint8 RGB
    of the size the model's processor would resize it to (libmtmd then leaves it as it is), or a clip: (samples,)
    float32 at the mmproj's sampling rate. Returns (the media's embeddings (tokens, hidden) float32, every chunk of
    it in order (Qwen3-VL: its
    DeepStack features follow on each row), the last position's logits (vocab,) float32, the prompt's token
    count)."""
    import llama_cpp
    import llama_cpp.llama_cpp as L
    import llama_cpp.mtmd_cpp as M

    llm = llama_cpp.Llama(str(text_gguf), n_ctx=512, n_batch=512, n_ubatch=512, verbose=False, n_threads=n_threads,
                          type_k=0, type_v=0)  # fp32 KV cache: the file is measured, not the cache's rounding
    params = M.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, n_threads, False, False
    params.image_min_tokens, params.image_max_tokens = 1, 4096  # transformers' pixel limits decided the size
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, f"libmtmd could not load {mmproj}"
    if image.ndim == 1:  # an audio clip
        clip = np.ascontiguousarray(image, dtype=np.float32)
        bitmap = M.mtmd_bitmap_init_from_audio(clip.size, (ctypes.c_float * clip.size).from_buffer_copy(clip.tobytes()))
    else:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        data = (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes())
        bitmap = M.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
    text = (before + M.mtmd_default_marker().decode() + after).encode()
    prompt = M.mtmd_input_text(text, len(text), False, True)
    chunks = M.mtmd_input_chunks_init()
    try:
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        parts = []  # each image / audio chunk's embeddings, in prompt order (InternVL: its tiles, then the thumbnail)
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) in (M.MTMD_INPUT_CHUNK_TYPE_IMAGE, M.MTMD_INPUT_CHUNK_TYPE_AUDIO):
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                assert M.mtmd_encode_chunk(ctx, chunk) == 0
                width = L.llama_model_n_embd_inp(llm._model.model)  # Qwen3-VL: + one DeepStack feature per layer
                part = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * width,))
                parts.append(part.reshape(n, -1).copy())
        embeddings = np.concatenate(parts) if parts else None
        n_past = L.llama_pos(0)
        assert M.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
        count = M.mtmd_helper_get_n_tokens(chunks)
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)
        llm.close()
    return embeddings, logits, count
