"""Where the project's bundled configuration lives: method recipes, prompt sets, batch and sweep examples."""

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
