"""An engine in its own process: the core loop, typed messages, the `RemoteLLM` client, OpenAI-compatible HTTP."""
