"""The driver: the loop top to bottom (``evolve.py``), its contracts (``api.py``), the run folder
and its ledgers (``run_folder.py``), the report (``report.py``), the job entry (``main.py``) and the
same contracts in one process without Ray (``local.py``)."""
