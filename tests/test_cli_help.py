"""`lightspan <verb> --help` for every verb; `lightspan train --help` lists every field of the config schema (its
type, default and meaning, generated from the dataclasses); `lightspan config show` prints YAML that load_config
reads back to the same config."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pretrain.cli import USAGE, VERBS
from pretrain.cli import main as lightspan
from pretrain.config import Config, load_config
from pretrain.config_doc import FALLBACK, field_docs, format_value

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def leaf_fields(cls, prefix=""):
    """(path, type, default) of every non-dataclass field, recursively (Config -> sections -> fields)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from leaf_fields(typ, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", typ, default


@pytest.fixture(scope="module")
def train_help():
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_train_help_lists_every_config_field_with_type_default_and_meaning(train_help):
    lines = {line.split()[0]: line for line in train_help.splitlines() if line.startswith("  ") and line.split()}
    fields = list(leaf_fields(Config))
    assert len(fields) > 60
    for path, typ, default in fields:
        assert path in lines, f"{path} missing from `lightspan train --help`"
        words = lines[path].split()
        assert words[1] == getattr(typ, "__name__", str(typ)), (path, words[1])
        assert words[2] == format_value(default), (path, words[2])
        assert len(words) > 3 and words[3] != "-", (f"{path} has no meaning in the help: add a trailing # comment to "
                                                     f"the field in its dataclass")
    assert "--config" in train_help and "--dry-run" in train_help and "--section.key=VALUE" in train_help


def test_meanings_come_from_the_source_comments():
    docs = {d.path: d for d in field_docs()}
    assert docs["data.prepared_dir"].meaning.startswith("token shards + index + tokenizer live here")
    assert docs["data.prepared_dir"].source == "comment"
    # a comment block above a field, first sentence
    assert docs["train.grad_clip"].meaning.startswith("the largest global gradient norm")
    # choices and ranges of the schema are added
    assert "[> 0]" in docs["train.lr"].meaning and "fsdp2" in docs["parallel.dp_engine"].meaning
    assert set(FALLBACK) <= set(docs), "FALLBACK names a field the schema does not have"
    relying = sorted(p for p, d in docs.items() if d.source == "fallback")
    print("fields documented by config_doc.FALLBACK (no comment in the source yet):", relying)


VERB_HELP = [["prepare"], ["data"], ["data", "stats"], ["train"], ["convert"], ["eval"], ["bench"],
             ["bench", "lightning"], ["generate"], ["config"], ["config", "show"], ["config", "fields"], ["plan"], ["bench", "memory"], ["bench", "compile"]]


def test_every_verb_is_covered():
    assert {v[0] for v in VERB_HELP} == set(VERBS)
    for verb in VERBS:
        assert f"  {verb} " in USAGE


@pytest.mark.parametrize("words", VERB_HELP, ids=" ".join)
def test_every_verb_answers_help(words, capsys):
    try:
        status = lightspan([*words, "--help"])
    except SystemExit as e:  # argparse's own --help
        status = e.code or 0
    out = capsys.readouterr().out
    assert status == 0 and "usage:" in out, out


def test_top_level_help_and_prepare_help_name_the_config_form(capsys):
    assert lightspan(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert lightspan(["prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "lightspan prepare --config FILE" in out and "--source" in out


def test_config_show_round_trips_through_load_config(tmp_path, capsys):
    overrides = ["--train.lr=1e-3", "--parallel.tp=2", "--train.grad_clip=inf", "--model.lrpe_layers=[0,1]",
                 "--data.tokenizer="]
    assert lightspan(["config", "show", "--config", str(TINY), *overrides]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# resolved from {TINY} + ")
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == load_config(TINY, overrides)
    assert lightspan(["config", "show"]) == 0  # the schema's defaults
    (tmp_path / "defaults.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "defaults.yaml") == load_config(None)


def test_config_show_refuses_a_bad_override_in_one_line(capsys):
    assert lightspan(["config", "show", "--config", str(TINY), "--model.heads=3"]) == 2
    assert "model.heads" in capsys.readouterr().err


def test_config_fields_is_the_table_of_train_help(train_help, capsys):
    assert lightspan(["config", "fields"]) == 0
    assert capsys.readouterr().out.strip() in train_help
