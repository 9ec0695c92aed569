"""Results: the output schema, one subject's files, the Parquet datasets (gather, merge) and the
analysis tables."""
