"""Run the numbered notebooks headless and report on them (`python -m instantid_lab.notebooks`, `make run`).

- `runner`  execute every notebook with papermill into an output folder: the executed notebook, its
            HTML and its figures; a summary table; the exit status says whether all passed
- `report`  `<out>/index.html`: the summary table and every notebook's figures, readable offline
"""

from .report import write_report
from .runner import (
                     NOTEBOOK_PATTERN,
                     NOTEBOOKS_DIR,
                     LocalKernelManager,
                     NotebookResult,
                     export_html,
                     find_notebooks,
                     main,
                     run_all,
                     run_notebook,
                     summary,
)

__all__ = ["NOTEBOOK_PATTERN", "NOTEBOOKS_DIR", "LocalKernelManager", "NotebookResult", "export_html",
           "find_notebooks", "main", "run_all", "run_notebook", "summary", "write_report"]
