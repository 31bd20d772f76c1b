"""Open-loop load generator, run report (JSON, Markdown, charts) and benchmarks for fraudactors.

``fraudactors loadgen`` sends transactions at a scheduled arrival rate whether or not the engine
keeps up, and measures latency from the *scheduled* send time (no coordinated omission).
"""
