"""Configuration: every mistake a user can make stops with ONE line that names the key.

Errors are checked through the command line (``specialists.cli.main`` returns 2 and prints
exactly one ``error: ...`` line to stderr, no traceback, and the run directory is not created),
and for a sample also from ``load_config`` (a :class:`ConfigError` whose message is that line).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from specialists.cli import main
from specialists.errors import ConfigError
from specialists.rundir.config import load_config

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def cli_error(capsys, argv: list[str], run_dir: Path) -> str:
    """Run the CLI, expect exit status 2 with a one-line error; return that line."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not run_dir.exists(), "the run directory was created before the config was validated"
    return lines[0]


# (overrides, the key the message must name)
BAD_OVERRIDES = [
    (["data.nme=1"], "data.nme"),
    (["generalist.epochs=abc"], "generalist.epochs"),
    (["distill.temperature=abc"], "distill.temperature"),
    (["data=3"], "data"),  # a whole section given a plain value
    (["distill.temperature=0"], "distill.temperature"),
    (["distill.alpha=1.5"], "distill.alpha"),
    (["distill.alpha=-0.1"], "distill.alpha"),
    (["generalist.batch_size=0"], "generalist.batch_size"),
    (["student.batch_size=0"], "student.batch_size"),
    (["data.name=nosuchdata"], "data.name"),
    (["model.name=nosuchmodel"], "model.name"),
    (["student.model.name=nosuchmodel"], "student.model.name"),
    (["data.name=npz", "data.path=/nonexistent/specialists-data"], "data.path"),
    (["data.name=npz"], "data.path"),  # needs a path at all
    # quickstart: 5 x 4 = 20 synthetic classes
    (["subsets.num_specialists=21"], "subsets.num_specialists"),
    (["data.num_super=2", "data.classes_per_super=2", "subsets.num_specialists=5"], "subsets.num_specialists"),
    (["subsets.mode=nearest", "subsets.classes_per_specialist=21"], "subsets.classes_per_specialist"),
    (["subsets.num_specialists=0"], "subsets.num_specialists"),
    (["subsets.mode=nearest"], "subsets.classes_per_specialist"),
    (["student.teacher=probs"], "student.teacher_probs"),
]


@pytest.mark.parametrize("overrides,key", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, capsys, overrides, key):
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train-generalist", QUICKSTART, *overrides, f"run_dir={run_dir}"], run_dir)
    assert f"'{key}'" in line, line


def test_load_config_raises_config_error_with_the_same_line(tmp_path):
    for overrides, key in BAD_OVERRIDES[:5]:
        with pytest.raises(ConfigError) as info:
            load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *overrides])
        msg = str(info.value)
        assert "\n" not in msg and f"'{key}'" in msg, msg


def test_temperature_zero_through_the_cli_exactly_as_documented(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train-generalist", "configs/quickstart.yaml", "distill.temperature=0",
                              f"run_dir={run_dir}"], run_dir)
    assert "distill.temperature" in line


def test_override_without_equals_sign(tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train-generalist", QUICKSTART, "generalist.epochs", f"run_dir={run_dir}"], run_dir)
    assert "generalist.epochs" in line


# ------------------------------------------------------------------------------- YAML files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,fragment", [
    ("data:\n  nme: 1\n", "data.nme"),
    ("generalist:\n  epochs: abc\n", "generalist.epochs"),
    ("distill:\n  temperature: 0\n", "distill.temperature"),
    ("model:\n  name: nosuchmodel\n", "model.name"),
    ("data: 3\n", "'data'"),
    ("data: [1, 2\n", "bad.yaml"),  # YAML syntax error: the message names the file
    ("data:\n  name: synthetic\n\tfoo: 1\n", "bad.yaml"),  # tab indentation
    ("- 1\n- 2\n", "bad.yaml"),  # not a mapping
], ids=["unknown-key", "wrong-type", "T=0", "unknown-model", "section-as-value", "syntax", "tab", "list"])
def test_bad_yaml_file(tmp_path, capsys, text, fragment):
    cfg = write(tmp_path / "bad.yaml", text)
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train-generalist", str(cfg), f"run_dir={run_dir}"], run_dir)
    assert fragment in line


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["train-generalist", str(missing), f"run_dir={run_dir}"], run_dir)
    assert "nope.yaml" in line and "not found" in line


def test_base_inheritance_chain_and_override_precedence(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "seed: 7\nmodel:\n  name: mlp\n  width: 32\ngeneralist:\n  epochs: 3\n  lr: 0.2\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\ngeneralist:\n  epochs: 5\ndistill:\n  temperature: 3.0\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\nmodel:\n  width: 64\n")
    cfg = load_config(leaf)
    # root -> mid -> leaf, each file overriding only what it names; paths relative to each file
    assert cfg.seed == 7 and cfg.model.name == "mlp" and cfg.model.width == 64
    assert cfg.generalist.epochs == 5 and cfg.generalist.lr == 0.2
    assert cfg.distill.temperature == 3.0
    assert cfg.data.name == "synthetic" and cfg.specialists.epochs == 4  # untouched defaults
    assert "base" not in cfg  # the inheritance key is consumed, not kept as a config key
    # command-line overrides beat every YAML level
    cfg = load_config(leaf, ["generalist.epochs=9", "model.width=8", "seed=1", "distill.temperature=2.5"])
    assert (cfg.generalist.epochs, cfg.model.width, cfg.seed, cfg.distill.temperature) == (9, 8, 1, 2.5)
    assert isinstance(cfg.generalist.epochs, int) and isinstance(cfg.distill.temperature, float)


def test_yaml_beats_defaults_and_overrides_are_typed():
    cfg = load_config(QUICKSTART)
    assert cfg.model.width == 16 and cfg.generalist.epochs == 6  # from the YAML
    assert cfg.distill.temperature == 4.0  # the dataclass default
    cfg = load_config(QUICKSTART, ["generalist.epochs=2", "data.path=null"])
    assert cfg.generalist.epochs == 2 and cfg.data.path is None


def test_base_errors(tmp_path):
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)
    dangling = write(tmp_path / "dangling.yaml", "base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        load_config(dangling)


def test_a_bad_value_inside_a_base_file_names_the_key(tmp_path):
    write(tmp_path / "base.yaml", "distill:\n  alpha: 2.0\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 3\n")
    with pytest.raises(ConfigError, match="distill.alpha"):
        load_config(child)
    # ...and a command-line override can repair it
    assert load_config(child, ["distill.alpha=0.3"]).distill.alpha == 0.3


# ------------------------------------------------- every entry point validates the whole config

VERBS = ["run", "train-generalist", "find-subsets", "train-specialists", "evaluate", "ablate", "distill"]
# sections a given verb does not use must still be checked
UNUSED_SECTION_ERRORS = [("student.epochs=-1", "student.epochs"), ("student.lr=0", "student.lr"),
                         ("ablate.counts=[0]", "ablate.counts"), ("combine.top_n=0", "combine.top_n"),
                         ("specialists.subset_fraction=1.5", "specialists.subset_fraction")]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_validates_every_section_before_doing_anything(tmp_path, capsys, verb):
    # a different unused section per verb (rotating), plus the temperature for all of them
    unused = UNUSED_SECTION_ERRORS[VERBS.index(verb) % len(UNUSED_SECTION_ERRORS)]
    for i, (override, key) in enumerate([unused, ("distill.temperature=0", "distill.temperature")]):
        run_dir = tmp_path / f"run{i}"
        line = cli_error(capsys, [verb, QUICKSTART, override, f"run_dir={run_dir}"], run_dir)
        assert f"'{key}'" in line, line


def test_find_subsets_with_bad_student_value_fails_before_the_upstream_check(tmp_path, capsys):
    """With a valid config, find-subsets on an empty run dir complains about the missing
    generalist; with a bad ``student.*`` value it must complain about that instead."""
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["find-subsets", QUICKSTART, f"run_dir={run_dir}"]) == 2  # valid config: upstream missing
    assert "train-generalist" in capsys.readouterr().err
    run_dir = tmp_path / "run2"
    line = cli_error(capsys, ["find-subsets", QUICKSTART, "student.teacher=oracle", f"run_dir={run_dir}"], run_dir)
    assert "'student.teacher'" in line and "train-generalist" not in line


PIPELINE_SCRIPTS = ["train_generalist", "find_subsets", "train_specialists", "evaluate", "ablate", "distill", "run"]


@pytest.mark.parametrize("script", PIPELINE_SCRIPTS)
def test_pipeline_scripts_validate_too(tmp_path, capsys, script):
    mod = importlib.import_module(f"pipelines.{script}")
    run_dir = tmp_path / "run"
    capsys.readouterr()
    rc = mod.main([QUICKSTART, "distill.temperature=0", f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "distill.temperature" in lines[0], err
    assert not run_dir.exists()


def test_the_shipped_configs_are_valid(tmp_path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        # real-data configs point at ../shared/data, which may be absent: point them at a folder
        # that exists (validation checks existence only); everything else is checked as shipped
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            if "'data.path'" not in str(exc):
                raise
            cfg = load_config(path, [f"data.path={tmp_path}"])
        assert cfg.run_dir, path
