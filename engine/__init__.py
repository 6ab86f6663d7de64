"""The reference engine: a tiny OpenAI-compatible LLM server that embeds the kvbus agent."""
