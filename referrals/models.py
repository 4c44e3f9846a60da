"""Referral workflow (issue 3): not built yet."""
