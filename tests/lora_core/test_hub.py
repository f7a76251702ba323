"""push_to_hub uploads the adapter only (issue 14). huggingface_hub's HfApi calls are replaced by
fakes that record what would be sent (files filtered by the allow patterns as huggingface_hub
filters them); nothing reaches a network.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load

from lora_core import LoraConfig, get_lora_model
from tiny_models import load_tiny, save_tiny

HUB_BASE = "some-org/tiny-llama"  # a hub id the base claims to come from (never fetched)


class FakeHub:
    """Records HfApi.create_repo / file_exists / upload_folder calls; `files` maps path -> bytes."""

    def __init__(self, monkeypatch, readme_exists=False):
        self.calls, self.files, self.readme_exists = [], {}, readme_exists
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(api, repo_id, filename, **kwargs):
            hub.calls.append(("file_exists", repo_id, filename))
            return hub.readme_exists and filename == "README.md"

        def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            hub.calls.append(("upload_folder", repo_id, kwargs))
            root = Path(folder_path)
            paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            for rel in filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
                hub.files[rel] = (root / rel).read_bytes()
            return "commit-info"

        for name, fn in (("create_repo", create_repo), ("file_exists", file_exists), ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
        # the wrapped transformers model's own upload must never run
        monkeypatch.setattr(transformers.PreTrainedModel, "push_to_hub",
                            lambda *a, **k: hub.calls.append(("transformers push_to_hub",)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def _model(llama_dir, **cfg):
    model = get_lora_model(load_tiny(llama_dir, "llama"),
                           LoraConfig(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM", **cfg))
    model.peft_config["default"].base_model_name_or_path = HUB_BASE
    return model


def test_push_sends_only_the_adapter(llama_dir, monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch)
    model = _model(llama_dir)
    assert model.push_to_hub("me/my-adapter", commit_message="first", private=True, revision="main",
                             create_pr=True) == "commit-info"
    assert sorted(hub.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [c[0] for c in hub.calls] == ["create_repo", "file_exists", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    assert {k: hub.calls[2][2][k] for k in ("commit_message", "revision", "create_pr")} == \
        {"commit_message": "first", "revision": "main", "create_pr": True}

    weights = load(hub.files["adapter_model.safetensors"])
    model.save_pretrained(tmp_path / "saved")
    assert weights.keys() == load((tmp_path / "saved" / "adapter_model.safetensors").read_bytes()).keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)  # no base_layer.weight
    base_bytes = sum(p.numel() * p.element_size() for p in model.base_model.parameters() if not p.requires_grad)
    assert len(hub.files["adapter_model.safetensors"]) < base_bytes / 10
    assert json.loads(hub.files["adapter_config.json"]) == json.loads((tmp_path / "saved" / "adapter_config.json").read_text())

    card = hub.files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card and f"base_model: {HUB_BASE}" in card
    assert f"base_model:adapter:{HUB_BASE}" in card and "pipeline_tag: text-generation" in card
    assert "AutoLoraModelForCausalLM.from_pretrained('me/my-adapter')" in card


def test_existing_readme_is_kept_and_other_adapters_go_in_subfolders(llama_dir, monkeypatch):
    hub = FakeHub(monkeypatch, readme_exists=True)
    model = _model(llama_dir)
    model.add_adapter("other", LoraConfig(target_modules=["k_proj"], r=2))
    model.push_to_hub("me/two")
    assert sorted(hub.files) == ["adapter_config.json", "adapter_model.safetensors",
                                 "other/adapter_config.json", "other/adapter_model.safetensors"]
    hub.files.clear()
    model.push_to_hub("me/one", selected_adapters=["other"])
    assert sorted(hub.files) == ["other/adapter_config.json", "other/adapter_model.safetensors"]


def test_bad_adapter_refused_before_the_hub_is_contacted(llama_dir, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = _model(llama_dir)
    with torch.no_grad():
        model.base_model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.push_to_hub("me/broken")
    with pytest.raises(ValueError, match="unknown adapter"):
        _model(llama_dir).push_to_hub("me/x", selected_adapters=["nope"])
    assert hub.calls == [] and hub.files == {}


def test_local_base_path_is_not_hub_metadata(llama_dir, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = get_lora_model(load_tiny(llama_dir, "llama"), LoraConfig(target_modules=["q_proj"]))
    model.push_to_hub("me/local")
    card = hub.files["README.md"].decode()
    assert "base_model:" not in card.split("---")[1]  # a local folder means nothing on the hub
    assert "AutoLoraModel.from_pretrained('me/local')" in card  # no task type: the generic class


def test_model_card_written_and_updated(llama_dir, tmp_path):
    model = _model(llama_dir)
    model.create_or_update_model_card(tmp_path / "new")
    assert "library_name: peft" in (tmp_path / "new" / "README.md").read_text()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "README.md").write_text("---\nlicense: mit\n---\n# Mine\n\nMy own words.\n")
    model.create_or_update_model_card(tmp_path / "old")
    text = (tmp_path / "old" / "README.md").read_text()
    assert "My own words." in text and "license: mit" in text and "library_name: peft" in text
    assert f"base_model: {HUB_BASE}" in text
