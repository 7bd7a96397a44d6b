"""The stages of the joint-graph pass (passes/pipeline.py runs them in order)."""
