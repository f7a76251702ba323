"""Base model + tokenizer loading: a hub id, a local directory, or the bundled tiny Llama.

Quantization goes through transformers' `BitsAndBytesConfig` (the seeds' path), so the base's
linear layers are bitsandbytes `Linear4bit` / `Linear8bitLt` that lora_core wraps.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers

from .config import BUILTIN_MODEL, TrainConfig
from .errors import TrainError

ASSETS = Path(__file__).parent / "assets"
# bos/eos/pad/unk ids match assets/tiny_llama.json (pad 0, bos 1, eos 2).
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built locally (no download).

    Deterministic: ids are SPECIAL_TOKENS then `string.printable` order, so a saved adapter and a
    rebuilt tokenizer always agree. 101 ids; the bundled model's vocab (128) leaves room.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # join characters back without separators
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def builtin_config() -> transformers.LlamaConfig:
    """The bundled tiny Llama's config (train/assets/tiny_llama.json).

    initializer_range 0.1 (~1/sqrt(hidden)) rather than HF's 0.02: the base stays frozen and random,
    and with 0.02 the frozen lm_head can only produce logits of about +-2.5 after the final RMSNorm,
    which caps how peaked any LoRA-trained prediction can get.
    """
    d = json.loads((ASSETS / "tiny_llama.json").read_text())
    d.pop("architectures", None)
    d.pop("model_type", None)
    return transformers.LlamaConfig(**d)


def save_builtin(path: str | Path, seed: int = 0) -> Path:
    """Build the bundled tiny Llama (seeded random init) + char tokenizer and save both to `path`."""
    path = Path(path)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(builtin_config())
    # Not model.save_pretrained: once torch.distributed is initialized, transformers 5 writes the
    # weights on rank 0 only, and each process of a multi-process run saves its own copy here.
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})
    build_char_tokenizer().save_pretrained(path)
    return path


def model_config(model_name: str) -> transformers.PretrainedConfig:
    """The config of --model (config.json only, no weights); the first check that --model exists."""
    if model_name == BUILTIN_MODEL:
        return builtin_config()
    path = Path(model_name).expanduser()
    if not path.exists() and _looks_like_path(model_name):
        # Without this, the hub client's "Repo id must be in the form ..." would be the message.
        raise TrainError(f"--model {model_name}: no such local directory; pass an existing model "
                         f"directory or a hub id (namespace/name, online)")
    if path.is_file():
        raise TrainError(f"--model {model_name} is a file; pass a model directory (with config.json) "
                         f"or a hub id")
    try:
        return transformers.AutoConfig.from_pretrained(model_name)
    except Exception as e:  # no config.json, offline hub, unknown id: one line, no traceback
        first = (str(e).splitlines() or [type(e).__name__])[0]
        where = "local directory" if path.is_dir() else "hub id"
        raise TrainError(f"--model {model_name}: cannot read its config as a {where} ({first}); pass a "
                         f"local model directory or a hub id (online)") from None


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "namespace/name"; anything else that is not on disk was meant as a path.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def is_seq2seq(model_name: str) -> bool:
    """Whether --model is an encoder-decoder (reads its config; TrainError if it cannot)."""
    return bool(getattr(model_config(model_name), "is_encoder_decoder", False))


def _names(text: str):
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def lora_config(cfg: TrainConfig, seq2seq: bool, total_steps: int | None = None):
    """The lora_core config of a run: a LoraConfig, or the --method's config (TrainError if
    lora_core refuses a value). total_steps: AdaLoRA's schedule length (default: --max-steps)."""
    import lora_core

    task = "SEQ_CLS" if cfg.task == "seq-cls" else "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    targets = _names(cfg.target_modules)
    try:
        if cfg.method == "ia3":
            return lora_core.IA3Config(target_modules=targets, task_type=task,
                                       feedforward_modules=_names(cfg.feedforward_modules) or None)
        if cfg.method == "adalora":
            total = total_steps or max(cfg.max_steps, cfg.tinit + cfg.tfinal + 1)
            return lora_core.AdaLoraConfig(
                init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT,
                beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight, total_step=total,
                lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type=task)
        if cfg.method == "adaption-prompt":
            return lora_core.AdaptionPromptConfig(adapter_len=cfg.adapter_len, task_type=task,
                                                  adapter_layers=cfg.adapter_layers or _num_layers(cfg.model))
        if cfg.method == "prompt-tuning":
            text = cfg.prompt_tuning_init == "TEXT"
            return lora_core.PromptTuningConfig(
                num_virtual_tokens=cfg.num_virtual_tokens, task_type=task, prompt_tuning_init=cfg.prompt_tuning_init,
                prompt_tuning_init_text=cfg.prompt_tuning_init_text if text else None,
                tokenizer_name_or_path=cfg.model if text else None)
        from .config import lora_kwargs
        return lora_core.LoraConfig(**lora_kwargs(cfg), task_type=task)
    except ValueError as e:  # for LoRA, a rule between options (e.g. --lora-bias with --use-dora)
        what = "LoRA options" if cfg.method == "lora" else f"--method {cfg.method}"
        raise TrainError(f"{what}: {str(e).splitlines()[0]}") from None


def _num_layers(model_name: str) -> int:
    config = model_config(model_name)
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1))


def check_target_modules(cfg: TrainConfig) -> None:
    """Refuse --target-modules that match no linear layer, before any weight is loaded: the model's
    module tree is built on the meta device from its config (no memory, no weights), then lora_core
    matches the targets against it and its message names the layers there are."""
    from accelerate import init_empty_weights
    from lora_core.inject import available_linear_names, find_targets

    config = model_config(cfg.model)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq and cfg.task == "seq-cls":
        raise TrainError(f"--task seq-cls: --model {cfg.model} is an encoder-decoder; classify with a "
                         f"decoder-only (Llama-like) or encoder (BERT-like) model")
    lcfg = lora_config(cfg, seq2seq)
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    if cfg.task == "seq-cls":
        auto = transformers.AutoModelForSequenceClassification
    try:
        with init_empty_weights():
            skeleton = auto.from_config(config)
    except Exception:  # an architecture that cannot be built from its config alone: the real load
        return          # checks the targets (get_lora_model raises the same message, as TrainError)
    if cfg.method in ("adaption-prompt", "prompt-tuning"):  # no target layers: the model type and sizes
        from lora_core.methods import adaption_prompt
        try:
            lcfg.prepare_for(skeleton)
            if cfg.method == "adaption-prompt":
                adaption_prompt.target_paths(skeleton, lcfg)
        except ValueError as e:
            raise TrainError(f"--method {cfg.method}: {str(e).splitlines()[0]}") from None
        return
    try:
        found = find_targets(skeleton, lcfg)
        if hasattr(lcfg, "prepare_for"):
            lcfg.prepare_for(skeleton)  # IA3's feed-forward default for the architecture
    except ValueError as e:
        raise TrainError(f"--target-modules {cfg.target_modules}: {str(e).splitlines()[0]}") from None
    if isinstance(lcfg.target_modules, set):
        # peft only refuses a list when no name matches; a typo in one name would silently leave
        # those layers out of the adapter.
        unused = sorted(n for n in lcfg.target_modules if not any(k == n or k.endswith("." + n) for k in found))
        if unused:
            raise TrainError(f"--target-modules {cfg.target_modules}: {', '.join(unused)} matched no linear layer "
                             f"of this {type(skeleton).__name__}; its linear layers (name suffixes): "
                             f"{available_linear_names(skeleton)}")


def bitsandbytes_problem(quantization: str) -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can (checked before any work)."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError or a broken native library
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        return "transformers reports bitsandbytes as unavailable on this machine"
    return None


def quantization_config(quantization: str, quant_storage: str = "uint8") -> transformers.BitsAndBytesConfig | None:
    """The recipes' BitsAndBytesConfig: nf4 + double quant + bf16 compute; fp4 plain; int8.

    quant_storage: dtype name of the tensor holding the packed 4-bit bytes (the same bytes, viewed
    as uint8 or as a float dtype; FSDP shards only float parameters).
    """
    if quantization == "none":
        return None
    if quantization in ("nf4", "fp4"):
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=(quantization == "nf4"),
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=getattr(torch, quant_storage))
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    raise TrainError(f"unknown --quantization {quantization!r}; use none, nf4, fp4 or int8")


def load_tokenizer(model_name: str):
    """The model's tokenizer (or the built-in char tokenizer), with a pad token for batching."""
    if model_name == BUILTIN_MODEL:
        tok = build_char_tokenizer()
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(model_name)
        except Exception as e:
            if not Path(model_name).is_dir():
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise TrainError(f"--model {model_name}: cannot load its tokenizer ({first})") from None
            tok = build_char_tokenizer()  # a local tiny model saved without a tokenizer
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; eos is safe since padded labels are -100.
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model_name: str, quantization: str, seed: int,
                    device: torch.device | str = "cpu", quant_storage: str = "uint8",
                    num_labels: int | None = None):
    """The frozen base: bundled tiny Llama (built at `seed`) or `from_pretrained`, maybe quantized.
    With num_labels: the model's sequence-classification form (a new head of num_labels classes,
    drawn from the seed; the head is what --task seq-cls trains in full).

    A bundled model that must be quantized is first saved to a temp dir, since bitsandbytes
    quantizes in `from_pretrained`.
    """
    qcfg = quantization_config(quantization, quant_storage)
    if model_name == BUILTIN_MODEL:
        if qcfg is None:
            torch.manual_seed(seed)
            if num_labels is not None:
                config = builtin_config()
                config.num_labels = num_labels
                return transformers.LlamaForSequenceClassification(config)
            return transformers.LlamaForCausalLM(builtin_config())
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_builtin(tmp, seed)
            return _from_pretrained(tmp, qcfg, device, num_labels, seed)
    return _from_pretrained(model_name, qcfg, device, num_labels, seed)


def _from_pretrained(name: str, qcfg, device, num_labels: int | None = None, seed: int = 0):
    seq2seq = getattr(transformers.AutoConfig.from_pretrained(name), "is_encoder_decoder", False)
    cls = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    kwargs: dict = {"dtype": torch.float32}
    if num_labels is not None:
        cls, kwargs["num_labels"] = transformers.AutoModelForSequenceClassification, num_labels
        torch.manual_seed(seed)  # the new head is drawn at load
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        # bitsandbytes puts the weights where they are used: this process's device.
        kwargs["device_map"] = {"": torch.device(device)}
    return cls.from_pretrained(name, **kwargs)
