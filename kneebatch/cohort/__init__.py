"""A cohort run: the dask cluster, scheduling subjects, the worker task, status and progress."""
