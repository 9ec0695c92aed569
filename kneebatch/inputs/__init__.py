"""Inputs: the manifest, label maps, the manifest's extra columns, and synthetic phantoms."""
