"""lora_core: our LoRA layer, its injection into Hugging Face models, several named adapters per
model, merge and adapter combination, and PEFT-format adapter files; beside LoRA, peft's IA3,
AdaLoRA, adaption prompts (Llama-Adapter) and prompt tuning, and astraios' bottleneck adapters
(`lora_core.methods`), through the same `get_lora_model(base, config)`.

    from lora_core import LoraConfig, get_lora_model
    model = get_lora_model(base_model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.print_trainable_parameters()
    model = AutoLoraModelForCausalLM.from_pretrained("path/to/adapter")  # the base its config names
"""
from .adapters import LoraAdapter
from .auto import (AutoLoraModel, AutoLoraModelForCausalLM, AutoLoraModelForFeatureExtraction,
                   AutoLoraModelForQuestionAnswering, AutoLoraModelForSeq2SeqLM,
                   AutoLoraModelForSequenceClassification, AutoLoraModelForTokenClassification)
from .config import LoftQConfig, LoraConfig
from .dora import DoraAdapter
from .embedding import LoraEmbedding, LoraEmbeddingAdapter
from .inject import ModulesToSave, find_targets, inject_lora
from .layer import LoraLinear
from .methods.adalora import AdaLoraConfig
from .methods.adaption_prompt import AdaptionPromptConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.prompt_tuning import PromptTuningConfig
from .model import LoraModel, get_lora_model
from .optim import create_loraplus_optimizer
from .prepare import prepare_model_for_kbit_training
from .status import TunerLayerStatus, TunerModelStatus

__all__ = ["LoraConfig", "get_lora_model", "LoraModel", "LoraLinear", "LoraAdapter", "LoraEmbedding",
           "LoraEmbeddingAdapter",
           "prepare_model_for_kbit_training", "ModulesToSave", "find_targets", "inject_lora",
           "TunerLayerStatus", "TunerModelStatus", "DoraAdapter", "LoftQConfig", "create_loraplus_optimizer",
           "AutoLoraModel", "AutoLoraModelForCausalLM", "AutoLoraModelForSeq2SeqLM",
           "AutoLoraModelForSequenceClassification", "AutoLoraModelForTokenClassification",
           "AutoLoraModelForQuestionAnswering", "AutoLoraModelForFeatureExtraction",
           "IA3Config", "AdaLoraConfig", "BottleneckConfig", "AdaptionPromptConfig", "PromptTuningConfig"]
