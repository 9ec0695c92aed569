"""Report: the per-subject QC picture, the cohort figures and the HTML page."""
