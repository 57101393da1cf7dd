"""Configuration: every mistake a user can make stops with ONE line that names the key.

Errors are checked through the command line (``specialists.cli.main`` returns 2 and prints
exactly one ``error: ...`` line to stderr, no traceback, and the run directory is not created),
and for a sample also from ``load_config`` (a :class:`ConfigError` whose message is that line).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
from omegaconf import DictConfig

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


# ------------------------------------------- every declared constraint, swept with invalid values


def invalid_texts(rule) -> list[str]:
    """Override texts no value of ``rule`` may take (scikit-learn's ``generate_invalid_param_val``),
    derived from its declared parameters alone: just past each finite bound of an Interval (the
    next float, the next whole number, the bound itself when it is open) and a value of the
    wrong type; a string among no Options; a path no file is at; ... Plain types and null: the
    schema's types refuse the rest."""
    from specialists.rundir.constraints import Each, File, Interval, NonEmpty, Options, Parsed, Prefix

    if isinstance(rule, Interval):
        out = ["1.5" if rule.kind is int else "abc"]
        for bound, closed, away in ((rule.lo, rule.closed in ("both", "left"), -math.inf),
                                    (rule.hi, rule.closed in ("both", "right"), math.inf)):
            if bound is None:
                continue
            if not closed:
                out.append(repr(bound))
            else:
                out.append(repr(bound + (1 if away > 0 else -1)) if rule.kind is int else repr(math.nextafter(bound, away)))
        return out
    if isinstance(rule, (Options, Parsed)):
        assert "not-an-option" not in list(getattr(rule, "choices", ()))
        return ["not-an-option"]
    if isinstance(rule, Prefix):
        # a name the machine cannot resolve: a module nowhere (python:, as timm: would import timm, seconds)
        return ["not-a-prefix:x"] + (["python:no_such_module_sweep:f"] if rule.resolve and "python:" in rule.prefixes
                                     else [])
    if isinstance(rule, File):
        return [f"/nonexistent/specialists-sweep{rule.suffix or ''}"] + (["/tmp/x.not" + rule.suffix] if rule.suffix else [])
    if isinstance(rule, Each):
        return [f"[{t}]" for t in invalid_texts(rule.item)]
    if isinstance(rule, NonEmpty):
        return ["''"]
    assert rule is None or isinstance(rule, type), f"the sweep does not know {type(rule).__name__}: add it here"
    return []


def test_every_declared_constraint_refuses_values_outside_it_in_one_line():
    """Each setting's declared constraints (inherited ones included: specialists.lr is
    TrainConfig's) against values just outside them: exactly one ConfigError line naming the key,
    from the same merge, validation and machine checks ``load_config`` runs."""
    from omegaconf import OmegaConf

    from specialists.rundir.config import Config, apply_overrides, check_environment, validate
    from specialists.rundir.constraints import declared, sections

    base = load_config(None, ["run_dir=/tmp/unused"])
    swept = set()
    for prefix, cls in sections(Config):
        for name, rules in declared(cls).items():
            key = prefix + name
            if isinstance(OmegaConf.select(base, key), DictConfig):
                continue
            for text in [t for rule in rules for t in invalid_texts(rule)]:
                before = OmegaConf.select(base, key)
                before = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
                with pytest.raises(ConfigError) as info:
                    apply_overrides(base, [f"{key}={text}"])
                    validate(base)
                    check_environment(base)
                msg = str(info.value)
                assert "\n" not in msg and (f"'{key}'" in msg or f"'{key}[" in msg), (key, text, msg)
                OmegaConf.update(base, key, before, merge=False)  # back to the valid base for the next key
                swept.add(key)
    validate(base)  # restored: every refusal above was that value's own
    # an independent list of keys with bounds: each must have been swept (a declaration that
    # went missing, or a section the walk skips, shows here)
    assert {"seed", "data.split_seed", "ablate.seed", "generalist.lr", "specialists.lr", "student.lr",
            "student.tree.penalty", "student.model.dropout", "launch.dist_timeout", "data.max_length",
            "combine.tol", "ablate.counts", "run_dir", "device", "data.name", "model.name", "student.model.name",
            "model.pretrained", "student.model.pretrained", "generalist.init", "specialists.branch",
            "data.tokenizer", "student.teacher_url"} <= swept


def test_interval_and_options_by_hand():
    from specialists.rundir.constraints import Interval, Options, message

    half_open = Interval(float, 0, 1, "right")
    assert [half_open.ok(v) for v in (0, 1e-300, 0.5, 1, 1.0 + 1e-15, True, "0.5")] == [
        False, True, True, True, False, False, False]
    whole = Interval(int, 1)
    assert [whole.ok(v) for v in (0, 1, 10**30, 1.0, False)] == [False, True, True, False, False]
    assert (str(half_open), str(whole), str(Interval(float, hi=2, closed="neither"))) == ("in (0, 1]", ">= 1", "< 2")
    registry = {"b": 1, "a": 2}
    opts = Options(registry)
    registry["c"] = 3  # a plug-in registered later is a valid choice too
    assert opts.ok("c") and not opts.ok("d") and str(opts) == "one of a, b, c"
    assert message(0, [None, whole]) == "0 is not >= 1"
    assert message("x", [opts, Interval(int, 0, 3, note="steps")]) == "'x' is not one of a, b, c nor in [0, 3] (steps)"


def test_a_subsection_inherits_its_parents_constraints_and_may_override_them():
    from specialists.rundir.config import GeneralistConfig, SpecialistsConfig, TrainConfig
    from specialists.rundir.constraints import Interval, declared

    assert declared(GeneralistConfig)["lr"] is declared(TrainConfig)["lr"] and "init" in declared(GeneralistConfig)
    assert "init" not in declared(SpecialistsConfig)

    class Tighter(TrainConfig):
        _constraints = {"lr": [Interval(float, 0, 1)]}

    assert str(declared(Tighter)["lr"][0]) == "in [0, 1]" and declared(Tighter)["epochs"] == declared(TrainConfig)["epochs"]


# ------------------------------------------ the machine's checks: once, in the process that starts the work


def test_the_machine_is_checked_by_the_driver_only(tmp_path, monkeypatch):
    """A missing file is one line from ``load_config`` (the CLI's and the Python API's entry),
    but not in a torchrun rank other than 0 (rank 0 checks for all), nor where a run's saved
    config is reopened (a Ray worker's ``as_run``, inference): there the file is not needed,
    or its reader says so in one line."""
    from specialists.engine.executors import as_run
    from specialists.rundir.config import config_from_yaml_text, to_yaml

    missing = [f"run_dir={tmp_path}", f"model.pretrained={tmp_path / 'nope.pt'}", "model.name=python:no_such_mod:f"]
    with pytest.raises(ConfigError, match="'model.name'"):
        load_config(None, missing)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = load_config(None, missing)  # rank 1: rank 0 checked it
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="'model.name'"):
        load_config(None, missing)
    with pytest.raises(ConfigError, match="'model.pretrained'"):
        load_config(None, missing[:2], environment=True)
    assert config_from_yaml_text(to_yaml(cfg)).model.pretrained == str(tmp_path / "nope.pt")
    assert as_run(to_yaml(cfg)).cfg.model.name == "python:no_such_mod:f"  # a Ray worker's run
    # the pure checks still run everywhere
    with pytest.raises(ConfigError, match="'generalist.lr'"):
        config_from_yaml_text(to_yaml(cfg).replace("lr: 0.05", "lr: 0.0", 1))
