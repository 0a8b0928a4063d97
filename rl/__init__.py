"""spa-rl: multi-turn agent RL with stepwise credit assignment (SPA)."""

__version__ = "0.1.0"
