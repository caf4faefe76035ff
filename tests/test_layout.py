"""The shape of the code: modules import each other in one direction (no cycle, imports inside functions
counted), no function runs longer than 80 lines, and one learning-rate schedule serves every training loop."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """{module: modules of bertexp it imports, anywhere in it}, and the functions longer than 80 lines."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "bertexp").rglob("*.py")}
    graph, long = {m: set() for m in files}, []
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in files:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name not in (mod, "bertexp"):
                    graph[mod].add(name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return graph, long


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    def reaches(a: str, b: str) -> bool:
        todo, seen = list(graph[a]), set()
        while todo:
            x = todo.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                todo.extend(graph[x])
        return False

    return sorted(m for m in graph if reaches(m, m))


def test_no_import_cycle_and_no_function_over_80_lines():
    graph, long = _import_graph()
    assert graph["bertexp.job"] >= {"bertexp.lifecycle", "bertexp.naming"}  # the walk sees function-level imports
    assert _cycles(graph) == []
    assert long == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph, _ = _import_graph()
    graph["bertexp.rundir"].add("bertexp.job")  # the cycle the lifecycle refactor removed
    assert "bertexp.rundir" in _cycles(graph)


def test_one_learning_rate_schedule_for_pretraining_finetuning_and_the_benchmark():
    """The warm-up / decay arithmetic lives in bertexp.optim; the loops call ProgressLR.apply."""
    sources = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
               for p in [*(ROOT / "bertexp").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]}
    arithmetic = [f for f, text in sources.items() if re.search(r"\b(lr_factor|warmup_done)\(|\.warm\(", text)]
    assert arithmetic == ["bertexp/optim.py"]  # nowhere else is "warm-up over? then decay from here" worked out
    for loop in ("bertexp/train.py", "bertexp/finetune.py", "benchmarks/time_to_quality.py"):
        assert re.search(r"\.apply\(", sources[loop]) and "build_scheduler(" in sources[loop], loop
