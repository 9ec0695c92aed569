"""Scan: read a CT and its mask, check headers and geometry, orient, split bilateral scans, make the
regions."""
