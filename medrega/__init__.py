"""MedRegA pipeline: domain code shared by the stages (config, vocabulary, sources, records, metrics)."""
