"""Multi-turn episodes: environments, tools, the episode's tokens kept as sampled between turns."""

from .environment import Environment
from .episode import Episode
from .render import TemplatePrefixError
from .runner import iter_episodes, run_episodes
from .tools import ToolCall, ToolEnvironment, parse_tool_calls

__all__ = ["Environment", "Episode", "TemplatePrefixError", "ToolCall", "ToolEnvironment", "iter_episodes",
           "parse_tool_calls", "run_episodes"]
