"""MLC LLM re-created on Apache TVM 0.27."""
__version__ = "0.1.0"
