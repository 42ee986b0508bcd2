"""The results and the report of a `rakt run`: results.py writes results.json/csv, gather.py reads the run
directory, document.py renders report.md/report.html, plots.py draws the figures."""
from rakt.report.document import write_report
from rakt.report.gather import pool_sources

__all__ = ["pool_sources", "write_report"]
