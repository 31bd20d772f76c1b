"""The streaming engine (`fraudactors run`): ingestor -> feature workers -> inference -> publisher."""
