"""`python run.py --help`: the composed config with each field's description beside it, taken from the
comments of the YAML files in conf/ that set it (the option of each group that was composed, and
conf/config.yaml), so the help and the files say the same thing.

A field's description is its line's comment with the comment lines aligned under it; a field with none
takes the comment block just above it.
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
_KEY = re.compile(r"^(\w+):(.*)$")
GENERIC = {"_target_": "the class this group builds (Hydra instantiate)",
           "_partial_": "built in part now, completed at run time"}


def _comment(text: str) -> str | None:
    """The comment of a YAML line (a `#` outside quotes), or None."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[i + 1:].strip()
    return None


def descriptions(path: Path) -> dict[str, str]:
    """Top-level key -> description, from the comments of one YAML file."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").splitlines()
    above: list[str] = []
    key = None
    for line in lines:
        m = _KEY.match(line)
        if m and m.group(1) != "defaults":
            key = m.group(1)
            inline = _comment(m.group(2))
            text = inline if inline is not None else " ".join(above)
            if text:
                out[key] = text
            above = []
        elif line.startswith("#"):
            above.append(line.lstrip("#").strip())
            key = None
        elif line.strip().startswith("#") and key in out:  # a comment continued under the one above
            out[key] += " " + line.strip().lstrip("#").strip()
        else:  # a blank line or a nested value: what was above describes nothing that follows
            above, key = [], None
    return out


def schema_descriptions() -> dict[str, dict[str, str]]:
    """Schema class name -> field -> the comment on its line in bertexp/schema.py (inherited fields under the
    class that declares them)."""
    import ast
    import io
    import tokenize

    from bertexp import schema

    source = Path(schema.__file__).read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {f.target.id: comments[f.lineno] for f in node.body
                              if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name) and f.lineno in comments}
    return out


def option_descriptions(group: str, option: str, seen: frozenset = frozenset()) -> dict[str, str]:
    """Descriptions of a group option's fields: its own file's comments, then those of the options it builds
    on (its defaults list), then its schema's (bertexp/schema.py)."""
    from bertexp.schema import SCHEMAS

    path = CONF / group / f"{option}.yaml"
    out = descriptions(path)
    if not path.is_file() or option in seen:
        return out
    bases = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s+-\s+(/schema/)?([\w.]+)(@_here_)?\s*(#.*)?$", line)
        if m and m.group(2) != "_self_":
            bases.append((bool(m.group(1)), m.group(2)))
    by_class = schema_descriptions()
    for is_schema, name in bases:
        if is_schema:
            if name in SCHEMAS:
                for cls in SCHEMAS[name].__mro__:
                    out = {**by_class.get(cls.__name__, {}), **out}
        else:
            out = {**option_descriptions(group, name, seen | {option}), **out}
    return out


def render(root: DictConfig) -> str:
    """The composed config (without `hydra`), each field followed by `# its description`."""
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None) or {}
    top = descriptions(CONF / "config.yaml")
    out = []
    for name in root:
        if name == "hydra":
            continue
        node = root._get_node(name)
        option = choices.get(name)
        described = {**GENERIC, **(option_descriptions(name, option) if option else {})}
        text = OmegaConf.to_yaml({name: node}).rstrip("\n").splitlines()
        for line in text:
            m = re.match(r"^( {2})?(\w+):", line)
            key = m and m.group(2)
            about = (described.get(key) if m and m.group(1) else top.get(key)) if key else None
            out.append(f"{line:<40} # {about}" if about else line)
    return "\n".join(out).replace("$", "$$")  # Hydra fills the help template with string.Template


def register() -> None:
    if not OmegaConf.has_resolver("fields_help"):
        OmegaConf.register_new_resolver("fields_help", lambda *, _root_: render(_root_))
