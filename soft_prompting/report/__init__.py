"""The report of a train or compare run: one self-contained HTML page and a Markdown twin.

python -m soft_prompting.report run_dir=outputs/compare/toy_double/...
"""

from soft_prompting.report.build import ReportConfig, build_report, main

__all__ = ["ReportConfig", "build_report", "main"]
