"""CLI surface and bad input: one clear line, non-zero exit, before any work, nothing overwritten."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_flag_with_its_default():
    from train.config import TrainConfig

    proc = _cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert text.count("(default:") == len(dataclasses.fields(TrainConfig))
    for flag in ["--model", "--dataset", "--text-template", "--output-dir", "--max-steps",
                 "--num-train-epochs", "--per-device-train-batch-size", "--gradient-accumulation-steps",
                 "--learning-rate", "--weight-decay", "--warmup-steps", "--lr-scheduler-type",
                 "--max-grad-norm", "--logging-steps", "--eval-steps", "--save-steps",
                 "--resume-from-checkpoint", "--mixed-precision", "--gradient-checkpointing", "--seed",
                 "--max-length", "--quantization {none,nf4,fp4,int8}", "--r R", "--lora-alpha",
                 "--lora-dropout", "--target-modules", "--backend {auto,torch,triton}", "--merge"]:
        assert flag in text, flag


def test_parse_args_round_trips_to_the_dataclass():
    from train.config import TrainConfig, parse_args

    assert parse_args([]) == TrainConfig()
    cfg = parse_args(["--r", "4", "--no-completion-only-loss", "--merge", "--quantization", "int8"])
    assert (cfg.r, cfg.completion_only_loss, cfg.merge, cfg.quantization) == (4, False, True, "int8")


def test_argparse_refusals_are_one_line(capsys):
    """A bad choice or an unknown flag: exit 2 and one `error:` line, no usage block (train's is
    dozens of lines); the compare and train.generate parsers are the same class."""
    from compare.__main__ import build_parser as compare_parser
    from train.config import build_parser
    from train.generate import build_parser as generate_parser

    for parser, argv in ((build_parser(), ["--backend", "cuda"]), (build_parser(), ["--bogus"]),
                         (compare_parser(), ["speed", "--batch", "2", "--nope"]),
                         (compare_parser(), ["sweeep"]), (generate_parser(), [])):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_old_kernel_flag_is_read_as_backend_with_a_note(capsys):
    """--kernel is --backend's old name: same value, one note on stderr; a sweep key too."""
    from train.config import parse_args

    assert parse_args(["--backend", "torch"]).backend == "torch"
    assert capsys.readouterr().err == ""
    for argv in (["--kernel", "torch"], ["--kernel=torch"]):
        assert parse_args(argv).backend == "torch"
        assert capsys.readouterr().err.strip() == "note: --kernel is deprecated: use --backend"

    from compare.ablation import validate_grid
    from train import TrainConfig

    with pytest.warns(FutureWarning, match="'kernel' is deprecated: use 'backend'"):
        base, grid = validate_grid(TrainConfig, {"kernel": "torch"}, {"r": [4]})
    assert base == {"backend": "torch"} and grid == {"r": [4]}


def test_cli_bad_input_exits_2_with_one_line_and_keeps_earlier_output(tmp_path, data_file):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"step": 7}')
    (out / "log.jsonl").write_text("earlier run\n")
    # --overwrite-output-dir: even a run allowed to replace the earlier one changes nothing of it
    # when its input is bad.
    proc = _cli("--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(out), "--overwrite-output-dir")
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "missing.jsonl does not exist" in lines[0], proc.stderr[-2000:]
    assert (out / "log.jsonl").read_text() == "earlier run\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7", "log.jsonl"]


def _expect(cfg, match):
    from train import TrainError, run

    with pytest.raises(TrainError, match=match) as info:
        run(cfg)
    assert "\n" not in str(info.value)  # one line
    out = Path(cfg.output_dir)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.usefixtures("no_model_load")
class TestBadInput:
    def test_missing_dataset_file(self, base_cfg, tmp_path):
        _expect(base_cfg(dataset=str(tmp_path / "nope.jsonl")), r"nope\.jsonl does not exist")

    def test_template_names_missing_column_lists_columns(self, base_cfg):
        _expect(base_cfg(text_template="{text} ->: {grade}"),
                r"column\(s\) text, grade that the dataset lacks; its columns are: quote, author, tags, label")

    def test_empty_dataset_file(self, base_cfg, tmp_path):
        (tmp_path / "empty.jsonl").write_text("\n")
        _expect(base_cfg(dataset=str(tmp_path / "empty.jsonl")), "is empty")

    def test_csv_with_header_only_is_empty(self, base_cfg, tmp_path):
        (tmp_path / "empty.csv").write_text("quote,tags\n")
        _expect(base_cfg(dataset=str(tmp_path / "empty.csv")), "is empty")

    @pytest.mark.parametrize("n", [0, -5])
    def test_max_length_not_positive(self, base_cfg, n):
        _expect(base_cfg(max_length=n), rf"--max-length must be > 0 \(got {n}\)")

    def test_batch_does_not_fit_the_data(self, base_cfg):
        _expect(base_cfg(per_device_train_batch_size=20, gradient_accumulation_steps=2),
                r"train split has 36 rows but one optimizer step needs 40")

    def test_unwritable_output_dir(self, base_cfg, tmp_path):
        (tmp_path / "afile").write_text("x")
        _expect(base_cfg(output_dir=str(tmp_path / "afile" / "out")), "is a file")

    def test_resume_without_checkpoint(self, base_cfg, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("x")
        _expect(base_cfg(output_dir=str(out), resume_from_checkpoint="latest"), "no checkpoint-")
        _expect(base_cfg(output_dir=str(out), resume_from_checkpoint=str(out)), "not a checkpoint directory")

    def test_quantization_without_bitsandbytes(self, base_cfg, monkeypatch):
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
        _expect(base_cfg(quantization="nf4"), "--quantization nf4 needs bitsandbytes")

    def test_fp16_without_gpu(self, base_cfg):
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is valid with a GPU")
        _expect(base_cfg(mixed_precision="fp16"), "fp16 needs a CUDA GPU")

    def test_missing_model_dir(self, base_cfg, tmp_path):
        # Not the hub client's "Repo id must be in the form ...": the path was meant as a folder.
        _expect(base_cfg(model=str(tmp_path / "no_model")), "no_model: no such local directory")
        _expect(base_cfg(model="./no/such/model"), "no such local directory")

    def test_model_dir_without_config(self, base_cfg, tmp_path):
        (tmp_path / "empty_model").mkdir()
        _expect(base_cfg(model=str(tmp_path / "empty_model")), "cannot read its config as a local directory")

    def test_separator_missing_from_template(self, base_cfg):
        _expect(base_cfg(text_template="{quote}: {tags}"), "does not occur in --text-template")
