"""An OpenAI-compatible HTTP server around :class:`lowbit.runtime.llm.LLM`."""
