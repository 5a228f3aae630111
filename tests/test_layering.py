"""Data flows one way: a stage imports only from the stages before it, and the library never imports crv.testing."""

import ast
from pathlib import Path

CRV = Path(__file__).resolve().parents[1] / "crv"

#: the pipeline's stages in order (modules of one rank may import each other); crv/testing is for tests only
STAGES = [("digest",), ("tasks",), ("lm",), ("reasoner", "finetune"), ("transcoders",), ("attribution",), ("fingerprint",),
          ("extract",), ("classify",), ("evaluate",), ("features",), ("interventions",), ("api",), ("client",),
          ("errors",), ("cli",)]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}


def imports(path: Path) -> list[str]:
    """Every ``crv.*`` module a file imports, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crv."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("crv.")]
    return out


def test_every_stage_imports_only_from_earlier_stages():
    against = []
    for path in CRV.rglob("*.py"):
        stage = path.relative_to(CRV).with_suffix("").parts[0]
        if stage in ("__init__", "__main__", "testing"):
            continue
        assert stage in RANK, f"{path}: stage {stage!r} is not in the layering (add it to STAGES)"
        for module in imports(path):
            target = module.split(".")[1]
            if target == "testing" or RANK.get(target, -1) > RANK[stage]:
                against.append(f"{path.relative_to(CRV.parent)} imports {module}")
    assert not against, "imports against the layering:\n" + "\n".join(against)
