"""FHIR gateway (issue 4): not built yet. The only package that imports fhir.resources."""
