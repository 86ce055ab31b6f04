"""The application steps over a Context: models, versions, compatibility, search, lineage."""
