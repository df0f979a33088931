"""MLC LLM re-created on Apache TVM 0.27: `from mlc_llm import MLCEngine, AsyncMLCEngine`."""
__version__ = "0.1.0"

__all__ = ["AsyncMLCEngine", "EngineConfig", "MLCEngine"]


def __getattr__(name: str):
    # Lazy: `import mlc_llm` (the CLI, the build side) must not load the TVM runtime and the engine.
    if name in ("MLCEngine", "AsyncMLCEngine"):
        from .serve import engine

        return getattr(engine, name)
    if name == "EngineConfig":
        from .serve.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'mlc_llm' has no attribute '{name}'")
