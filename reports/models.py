"""Reduced-transfer reports (issue 5): not built yet."""
