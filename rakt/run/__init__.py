"""`rakt run CONFIG.yaml`: the whole pipeline from one config, as named steps in a run directory.

config.py loads the run config (embedded default, `base:`, `--set`); plan.py turns it into steps (one stage call
each, rakt/stages.py); steps.py runs, skips, clears or resumes them and reports their state. The run
directory's layout and the arms' names are rakt/rundir.py.
"""
from rakt.run.config import load_run_config, read_run_config
from rakt.run.plan import Step, plan
from rakt.run.steps import KILL_BEFORE_RECORD, execute, status, status_text

__all__ = ["KILL_BEFORE_RECORD", "Step", "execute", "load_run_config", "plan", "read_run_config", "status",
           "status_text"]
