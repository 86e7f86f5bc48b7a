"""Recipes as data: per format, the type or precision of every tensor and why; the SmoothQuant fold map."""
