"""The package imports downwards only: models and data know nothing of PEFT, PEFT nothing of the
trainer, and the trainer and the evaluator get placement and the model from runtime.py and
build.py, never from each other. Checked on the source (imports inside functions included)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mambapeft"

# A module may import modules of its own layer's package and of lower layers only. Modules in one
# layer but different packages (train and eval) may not import each other.
LAYERS = [
    {"io", "method_check", "gpus"},  # torch-free, as the next: the Snakefile imports them
    {"runspec"},
    {"search"},  # torch-free too: common.smk imports its plan
    {"data"},
    {"models"},
    {"peft"},
    {"runtime"},
    {"build"},
    {"train", "eval", "export"},
    {"bench", "report", "setup_gpu"},
    {"cli"},
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """'mambapeft.peft.lora' -> 'peft'; 'mambapeft.runtime' -> 'runtime'."""
    return module.split(".")[1]


def imported_modules(path: Path) -> set[str]:
    module = "mambapeft." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mambapeft.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found |= {target} if node.module else {f"{base}.{a.name}" for a in node.names}
            elif (node.module or "").startswith("mambapeft."):
                found.add(node.module)
    return {m for m in found if m.count(".") >= 1}


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert unit in LAYER_OF, f"{unit} is in no layer of tests/test_layering.py: place it"
    for target in imported_modules(path):
        other = unit_of(target)
        if other == unit:
            continue
        assert other in LAYER_OF, f"{path.name} imports {target}, which is in no layer"
        assert LAYER_OF[other] < LAYER_OF[unit], f"{unit}/{path.name} imports {target}: an upward or sideways import"
