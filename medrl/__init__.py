"""medrl: when does reinforcement learning help medical vision-language models?"""

__version__ = "0.1.0"
