"""Multi-turn episodes: environments, tools, the episode's tokens kept as sampled between turns."""

from .environment import Environment
from .episode import Episode
from .render import TemplatePrefixError
from .runner import run_episodes

__all__ = ["Environment", "Episode", "TemplatePrefixError", "run_episodes"]
