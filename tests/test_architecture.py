"""The shape of the package: imports point one way, modules stay small.

Read from the source with ``ast`` (nothing is imported), so the test sees every import,
those made inside functions and under ``TYPE_CHECKING`` included.
"""

from __future__ import annotations

import ast
import os

import pytest

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src",
                      "smtpbridge")

#: The layers, lowest first.  A module may import modules of its own layer or below.
#: The data flows listener -> session -> policy -> mapper -> delivery -> upstream; the
#: configuration and the value types sit below all of them.
LAYERS: list[tuple[str, set[str]]] = [
    ("values", {"model", "secret", "errors", "replies", "networks", "wire", "interfaces"}),
    ("config", {"tomlreader", "oauthconfig", "upstreamconfig", "opsconfig", "config"}),
    ("tools", {"lines", "sasl", "tls", "users", "throttle", "trace", "rewrite", "deadline",
               "limits", "clienthello", "handshake", "summary", "ratelimit", "names"}),
    ("upstream", {"client", "upstreamsession", "clientauth", "connector", "oauthwire", "oauth",
                  "pool", "loan"}),
    ("delivery", {"spoolfile", "spool", "spooldirs", "dsn", "bodyfilter", "bodypump",
                  "earlybody", "record", "relay", "spoolsend", "queuerunner"}),
    ("mapper", {"mapping"}),
    ("policy", {"policy"}),
    ("session", {"serverbase", "serverauth", "mailcommands", "server"}),
    ("listener", {"listener", "demo", "proxyheader"}),
    ("roots", {"service", "tap", "cli", "oauthflows", "oauthlogin", "queuecli", "fakeupstream",
               "testing", "metrics", "admin", "logs", "sdnotify", "workers"}),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
LIMIT = 400  # lines: a module over this is two modules


def modules() -> list[str]:
    return sorted(name[:-3] for name in os.listdir(SOURCE)
                  if name.endswith(".py") and name != "__init__.py")


def imports(module: str) -> set[str]:
    """The smtpbridge modules that C{module} imports, wherever in the file."""
    with open(os.path.join(SOURCE, f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "smtpbridge":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("smtpbridge."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("smtpbridge."))
    return found - {module}


def test_every_module_has_a_layer():
    assert [m for m in modules() if m not in RANK] == []


@pytest.mark.parametrize("module", modules())
def test_imports_point_down(module):
    upward = sorted(name for name in imports(module)
                    if RANK.get(name, len(LAYERS)) > RANK.get(module, -1))
    assert upward == [], f"{module} ({LAYERS[RANK[module]][0]}) imports from above: {upward}"


def test_the_import_graph_has_no_cycle():
    graph = {module: imports(module) for module in modules()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if state.get(name) == "open":
                cycle = path[path.index(name):] + [name]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if name not in state:
                visit(name, [*path, name])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_config_and_values_import_nothing_from_the_runtime():
    base = LAYERS[0][1] | LAYERS[1][1]
    for module in sorted(base):
        assert imports(module) <= base, module


@pytest.mark.parametrize("module", modules())
def test_modules_stay_small(module):
    with open(os.path.join(SOURCE, f"{module}.py"), encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines <= LIMIT, f"{module}.py has {lines} lines; split it"
