"""Analyses over finished runs: FLOPs comparison tables (:mod:`.compare`) and the small-scale
reproduction study (:mod:`.study`)."""
