"""`rakt <stage> ...`: each stage's flags mirror its config dataclass; `--config FILE.yaml` sets defaults."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rakt.pipeline.config import ConfigError, RegisteredNames, from_dict
from rakt.pipeline.config_yaml import dump_yaml, load_yaml
from rakt.indexes.base import IndexSpecError
from rakt.pipeline.io import MACHINE_ERRORS, InputError, setup_logging
from rakt.stages import STAGES, run_stage


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", help="YAML file with this stage's keys (or a section named after the stage)")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        if "default" not in text:
            text += f" (default: {default!r})"
        kw = {"help": text, "default": argparse.SUPPRESS}
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
            if isinstance(kw["choices"], RegisteredNames):  # listed when the help is shown, not when rakt starts
                kw["metavar"] = f.name.upper()
                kw["help"] += "; one of: %(choices)s"
        if isinstance(default, list):
            kw["nargs"] = "*" if f.metadata.get("positional") else "+"
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(default)
        if f.metadata.get("positional"):
            kw.setdefault("nargs", "?")
            parser.add_argument(f.name, metavar=f.name.upper(), **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rakt", description="Retrieval-augmented knowledge transfer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        desc = stage.help
        if name == "index":
            index = sub.add_parser("index", help="build or describe an index")
            isub = index.add_subparsers(dest="index_command", required=True)
            _add_config_flags(isub.add_parser("build", help=desc, description=desc), STAGES["index"].config)
            info = isub.add_parser("info", help="describe an index (kind, model, dim, count, parts)")
            info.add_argument("path", help="index spec or directory")
            continue
        _add_config_flags(sub.add_parser(name, help=desc, description=desc), stage.config)
    inspect = sub.add_parser("inspect", help="counts per class/query and a score histogram of a manifest")
    inspect.add_argument("manifest", help="transfer-manifest directory or candidates directory")
    run = sub.add_parser("run", help="the whole pipeline (and experiment arms) from one config, skipping "
                                     "finished steps", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", default="", help="run config YAML, or the name of an embedded one: "
                     "default (the main job, CIFAR-10) | experiment (all arms, 3 seeds) | fashion, fashion-experiment "
                     "(the same on Fashion-MNIST carved out of the pool); see --show-config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set distill.epochs=3 --set 'experiment.seeds=[0,1,2]'")
    run.add_argument("--run-dir", default="", help="run directory (default: the config's run_dir)")
    run.add_argument("--only", default="", help="run only this step (or the steps under it, e.g. arms/retrieved-task-s0) and the "
                          "steps it needs, e.g. --only shards builds just the transfer set")
    run.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    status = sub.add_parser("status", help="what a run directory has done: every step's state, seconds, result")
    status.add_argument("run_dir", help="run directory of `rakt run`")
    report = sub.add_parser("report", help="(re)write results.json/csv, report.md and report.html of a run "
                                           "directory (also of a run still going or stopped part-way)")
    report.add_argument("run_dir", help="run directory of `rakt run`")
    return parser


RUN_HELP = """Run every stage from one config: embed -> index -> retrieve -> curate -> materialize/download ->
adapt -> (per experiment arm and seed) distill -> finetune -> evaluate, then results.csv and report.html.
Each step records its config hash in RUN_DIR/steps/; a rerun skips unchanged finished steps, reruns changed
ones (and what depends on them) and resumes a step that was killed. Without CONFIG the embedded default runs:
CIFAR-10 (10 labels/class) from the offline data kit ($RAKT_DATA or ../shared/data)."""


def _run_commands(args: argparse.Namespace) -> int:
    from rakt import run
    if args.command == "status":
        print(run.status_text(args.run_dir))
        return 0
    if args.command == "report":
        from rakt.report import write_report
        from rakt.report.results import write_results
        cfg = run.read_run_config(args.run_dir)
        write_results(args.run_dir, cfg)  # the arms finished so far, also of a run still going or stopped
        print(json.dumps(write_report(args.run_dir), indent=2, default=str))
        return 0
    cfg = run.load_run_config(args.config, args.overrides, args.run_dir)
    if args.show_config:
        print(dump_yaml(cfg), end="")
        return 0
    out = run.execute(cfg, only=args.only)
    from rakt.report.results import results_text
    print(results_text(out["results"]))
    print(f"ran {len(out['ran'])} step(s), skipped {len(out['skipped'])} finished; `rakt status {out['run_dir']}`"
          + (f"; report: {out['results']['report']['html']}" if out["results"].get("report") else ""))
    return 0


def stage_config(stage: str, args: argparse.Namespace):
    """Merge YAML defaults and CLI flags into the stage's validated config."""
    values = load_yaml(args.config, section=stage) if getattr(args, "config", None) else {}
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "command", "index_command", "verbose")}
    cli = {k: v for k, v in cli.items() if v is not None}
    values.update(cli)
    return from_dict(STAGES[stage].config, values, where=args.config or f"rakt {stage}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command == "index" and args.index_command == "info":
            from rakt.indexes.registry import open_index
            print(json.dumps(open_index(args.path).info(), indent=2, default=str))
            return 0
        if args.command in ("run", "status", "report"):
            return _run_commands(args)
        if args.command == "inspect":
            from rakt.pipeline.inspect import inspect_text
            print(inspect_text(args.manifest))
            return 0
        cfg = stage_config(args.command, args)
        summary = run_stage(args.command, cfg)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    except (ConfigError, InputError, IndexSpecError) as e:
        print(f"rakt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in MACHINE_ERRORS:
            raise
        where = e.filename or getattr(args, "out", None) or getattr(args, "run_dir", None) or "the output"
        print(f"rakt: error: {where}: {e.strerror}; {MACHINE_ERRORS[e.errno]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
