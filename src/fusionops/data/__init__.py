"""Manifests, the stable grouped split, and the prepare stage."""
