"""Prompt sets: one template per line with `{}` for the subject, optional tags after ` | `.

    a {} in the jungle | background
    an oil painting of a {} | style
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personalize.errors import ConfigError
from personalize.locations import CONFIG_ROOT

TAGS = {"background", "colour", "style", "outfit", "action", "material", "attribute"}


@dataclass(frozen=True)
class PromptItem:
    template: str
    tags: frozenset[str] = frozenset()

    def fill(self, subject: str) -> str:
        return self.template.replace("{}", subject)


def prompt_set_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".txt":
        return path
    return CONFIG_ROOT / "prompts" / f"{name_or_path}.txt"


def available_prompt_sets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "prompts").glob("*.txt"))


def parse_prompt_lines(text: str, source: str) -> list[PromptItem]:
    items, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        template, _, tag_text = line.partition(" | ")
        template = template.strip()
        tags = frozenset(t.strip() for t in tag_text.split(",") if t.strip())
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            problems.append(f"line {number}: {template!r} must hold exactly one '{{}}' and no other braces")
        unknown = sorted(tags - TAGS)
        if unknown:
            problems.append(f"line {number}: unknown tags {unknown}; allowed: {sorted(TAGS)}")
        items.append(PromptItem(template, tags))
    if problems:
        raise ConfigError(source, problems)
    if not items:
        raise ConfigError(source, ["no prompts in the file"])
    return items


def load_prompt_set(name_or_path: str) -> list[PromptItem]:
    path = prompt_set_path(name_or_path)
    if not path.is_file():
        raise ConfigError(str(path), [f"unknown prompt set {name_or_path!r}; available: {', '.join(available_prompt_sets())}"])
    return parse_prompt_lines(path.read_text(), str(path))


def context_set_for(setting: str, kind: str) -> str:
    """CoRe's regularisation set: `auto` picks by concept kind (animate / object)."""
    if setting == "auto":
        return "context_animate" if kind == "animate" else "context_inanimate"
    if setting in ("animate", "inanimate", "universal"):
        return f"context_{setting}"
    return setting


def templates(prompt: str | list[str]) -> list[str]:
    """A method's training prompt(s): a template, a list of them, or '@name' for a prompt set."""
    if isinstance(prompt, list):
        return prompt
    if prompt.startswith("@"):
        return [item.template for item in load_prompt_set(prompt[1:])]
    return [prompt]
