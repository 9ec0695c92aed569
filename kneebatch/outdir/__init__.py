"""The output folder's bookkeeping: marking OUT, records on disk, claims, failures, result keys,
atomic writes."""
