"""Extraction of one knee: the pure per-subject pipeline (regions -> network -> vectors -> similarities)."""
