"""One table of defaults: the command, the task and training configs and the README agree."""
import dataclasses
from pathlib import Path

from xbraid_transformers.app.cli import build_parser, make_configs, option_values
from xbraid_transformers.app.defaults import DEFAULTS, default_mgrit, markdown_table
from xbraid_transformers.app.tasks import TASKS, TaskConfig
from xbraid_transformers.app.trainer import TrainConfig
from xbraid_transformers.control import ControlConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_table_of_defaults():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- defaults-table")
    shown = text[text.index("\n", start) + 1:text.index("<!-- end defaults-table")].strip()
    assert shown == markdown_table()


def test_configs_default_to_the_table():
    task, train, control = TaskConfig(), TrainConfig(), ControlConfig()
    for config in (task, train, control):
        for f in dataclasses.fields(config):
            if f.name in DEFAULTS:
                assert getattr(config, f.name) == DEFAULTS[f.name], (type(config).__name__, f.name)
    assert task.mgrit == default_mgrit()


def test_the_command_line_defaults_are_the_table_where_a_task_sets_nothing():
    args = build_parser().parse_args(["train", "--task", "synthetic"])
    values = option_values(args)
    assert args.mode == DEFAULTS["mode"]
    own = set(TASKS["synthetic"].defaults)
    assert all(values[k] == v for k, v in TASKS["synthetic"].defaults.items())
    assert {k: v for k, v in values.items() if k not in own} == \
        {k: v for k, v in DEFAULTS.items() if k not in own}
    task_cfg, train_cfg = make_configs(values, "synthetic", args.mode, None)
    assert task_cfg.mgrit == default_mgrit()
    assert train_cfg.mode == DEFAULTS["mode"] and train_cfg.clip == DEFAULTS["clip"]


def test_the_gradient_trigger_is_chosen_on_the_command_line():
    args = build_parser().parse_args(["train", "--task", "synthetic", "--trigger", "gradient",
                                      "--grad-threshold", "0.3"])
    _, train_cfg = make_configs(option_values(args), "synthetic", args.mode, None)
    assert (train_cfg.control.trigger, train_cfg.control.grad_threshold) == ("gradient", 0.3)


def test_every_task_trains_with_the_time_to_quality_study_s_default_policy():
    """The defaults the study measured for `xbt train` and `xbt compare` (README, "Time to
    quality"): two MGRIT levels, cfactor 4, F-relaxation, 2 forward / 1 backward iterations,
    adaptive mode with the rho > 1 trigger switching to serial. No task overrides them."""
    from xbraid_transformers.app.reproduce.time_to_quality import default_policy
    assert default_policy() == "adaptive-rho"
    for task in ("gpt", "bert", "cls", "vit", "mt", "synthetic"):
        for quick in (False, True):
            args = build_parser().parse_args(["compare" if quick else "train", "--task", task]
                                             + (["--quick"] if quick else []))
            values = option_values(args, quick=quick)
            mgrit = default_mgrit(values)
            assert (mgrit.levels, mgrit.cfactor, mgrit.relax, mgrit.fwd_iters, mgrit.bwd_iters) == \
                (2, 4, "F", 2, 1), (task, quick)
            assert (values["mode"], values["trigger"], values["threshold"], values["action"]) == \
                ("adaptive", "rho", 1.0, "serial"), (task, quick)
