"""Options are declared once, in the config dataclasses: the commands' help and defaults come from them."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import typer
from typer.testing import CliRunner

from uge_protect.cli.app import SHARD_SOURCES, app
from uge_protect.cli.fit_cmd import FIT_SOURCES
from uge_protect.errors import UserError
from uge_protect.eval.config import EvalConfig
from uge_protect.methods.em.config import EMClipConfig, EMConfig
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.options import check_options, default_text, field_default, format_value, spec_of

runner = CliRunner()
COMMANDS = ({("fit", name): sources for name, sources in FIT_SOURCES.items()}
            | {("shard",): SHARD_SOURCES, ("eval",): ((EvalConfig, None),)})


def _click_command(path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _params(path):
    return {p.name: p for p in _click_command(path).params}


def test_every_config_field_has_help_text():
    for sources in COMMANDS.values():
        for cls, _ in sources:
            for field in dataclasses.fields(cls):
                spec = spec_of(field)
                assert spec is not None and spec.help.strip(), f"{cls.__name__}.{field.name} has no help"
                if spec.cli and not spec.required and field_default(field) is None:
                    assert spec.default_help, f"{cls.__name__}.{field.name}: say what its None default means"


@pytest.mark.parametrize("path", list(COMMANDS))
def test_command_defaults_are_the_dataclass_defaults(path):
    params = _params(path)
    seen = set()
    for cls, _ in COMMANDS[path]:
        for field in dataclasses.fields(cls):
            spec = spec_of(field)
            if not spec.cli:  # Python only (or an argument written by the command)
                continue
            param = params[field.name]
            if spec.required:
                assert param.required, (path, field.name)
            elif field.name not in seen:  # the first config with the field sets the help and what is passed
                assert spec.help.rstrip(".")[1:] in param.help, (path, field.name)
                plain_flag = getattr(param, "is_flag", False) and not param.secondary_opts
                expected = field_default(field) if spec.passed or plain_flag else None
                assert param.default == expected, (path, field.name, param.default)
            if not spec.required:
                assert default_text(field, spec) in param.help, (path, field.name, param.help)
            seen.add(field.name)


def test_help_lists_every_option_with_its_default():
    for path in COMMANDS:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        from_configs = {f.name for cls, _ in COMMANDS[path] for f in dataclasses.fields(cls) if spec_of(f).cli}
        for name, param in _params(path).items():
            if param.param_type_name == "option" and name != "help":
                assert param.opts[0] in result.output and param.help, (path, name)
                assert name not in from_configs or param.required or "(default: " in param.help, (path, name)
    fit_em = _params(("fit", "em"))
    assert "(default: 20 sample/class; 10 clip)" in fit_em["pgd_steps"].help
    assert "(default: 20 sample, 30 class; 10 clip)" in fit_em["max_rounds"].help
    assert fit_em["bank_size"].help.startswith("clip: ") and fit_em["surrogate"].help.startswith("sample/class: ")
    assert "(default: 8/255)" in fit_em["epsilon"].help
    assert _params(("shard",))["mode"].help.startswith("t2ue: ")


def test_the_command_passes_what_was_given_and_the_passed_defaults(monkeypatch, tmp_path):
    import uge_protect.pipeline.fit as fit

    calls = []
    monkeypatch.setattr(fit, "fit_from_shards", lambda method, train, output, options, **kw: calls.append(
        (method, train, output, {k: v for k, v in options.items() if v is not None}, kw)))
    out = str(tmp_path / "a")
    assert runner.invoke(app, ["fit", "em", "x.tar", "-o", out]).exit_code == 0
    assert calls[-1] == ("em", ["x.tar"], out, {"mode": "sample", "epsilon": 8 / 255, "seed": 0, "device": "auto"},
                         {})
    result = runner.invoke(app, ["fit", "t2ue", "x.tar", "-o", out, "--class-names", "a,b", "--lock-text",
                                 "--steps", "3", "-q"])
    assert result.exit_code == 0, result.output
    assert calls[-1][3] == {"epsilon": 8 / 255, "seed": 0, "device": "auto", "class_names": ["a", "b"],
                            "lock_text": True, "steps": 3}
    assert calls[-1][4] == {"checkpoint_every": 100, "resume": False}
    assert logging.getLogger("uge_protect").handlers[0].level == logging.WARNING  # -q: warnings only
    result = runner.invoke(app, ["fit", "uge", "x.tar", "-o", out, "--authorized", "small_cnn", "--image-only"])
    assert result.exit_code == 0, result.output
    assert calls[-1][3] == {"authorized": "small_cnn", "label_conditioned": False, "epsilon": 8 / 255, "seed": 0,
                            "device": "auto"}
    result = runner.invoke(app, ["fit", "uge", "x.tar", "-o", out])
    assert result.exit_code == 2 and "--authorized" in result.output


def test_bounds_and_choices_come_from_the_metadata():
    for config, message in (
        (EMConfig(step_size=0.0), "step size must be in (0, 1], got 0.0"),
        (EMConfig(stop_error=1.0), "stop error must be in [0, 1), got 1.0"),
        (EMConfig(lr=0.0), "learning rate must be > 0, got 0.0"),
        (EMConfig(pgd_steps=0), "pgd steps must be >= 1, got 0"),
        (EMClipConfig(batch_size=1), "batch size must be >= 2 for a contrastive loss, got 1"),
        (T2UEConfig(text_pool="max"), "unknown text pooling 'max'; choose eot or mean"),
        (T2UEConfig(em_rounds=0), "EM rounds must be >= 1, got 0"),
    ):
        with pytest.raises(UserError) as err:
            check_options(config)
        assert str(err.value) == message
    check_options(EMConfig())
    # fit em's modes: every mode is named, the clip mode is EMClipConfig's
    with pytest.raises(UserError, match=r"^unknown EM mode 'pixel'; choose sample, class or clip$"):
        EMConfig.from_options({"mode": "pixel"})
    assert EMConfig(mode="class").max_rounds == 30 and EMConfig().max_rounds == 20
    assert (format_value(8 / 255), format_value(0.8 / 255), format_value(0.1), format_value(True)) == (
        "8/255", "0.8/255", "0.1", "on")
