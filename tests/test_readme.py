"""The README's promises that can be checked without servers.

Its quickstart (three steps against local servers, no provider account) was
also run by hand in a fresh clone; this keeps what it relies on true: the
commands exist and parse, `.env.example` configures the three providers the
local servers stand for, the links resolve, and the README stays short.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from agent_factory.cli.main import _parser
from agent_factory.engine.environment import load_environment, settings_from_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"
MAX_BYTES = 10 * 1024
#: The development commands: `.ci/run` calls the second.
DEV_COMMANDS = (
    "python3 dev.py demo     # three embedded PostgreSQL providers, a crash and a hang of the "
    "primary, live",
    "python3 dev.py test     # ruff, mypy and the whole test suite against real PostgreSQL "
    "servers",
)
#: The variables of the spec's setup instructions (docs/configuration.md has them all).
SPEC_VARIABLES = (
    "DATABASE_PROVIDER", "DATABASE_FAILOVER_ENABLED", "DATABASE_FAILOVER_ORDER",
    "SUPABASE_DB_HOST", "SUPABASE_DB_PASSWORD", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
    "RAILWAY_DB_URL", "NEON_DB_URL",
)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str, after: str) -> list[str]:
    """The fenced blocks of the section whose heading starts with ``after``."""
    start = text.index(after)
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```[a-z]*\n(.*?)```", section, re.S)


def commands(block: str) -> list[str]:
    """Each line of a shell block without its comment."""
    lines = []
    for line in block.splitlines():
        command = line.split("  #", 1)[0].strip()
        if command:
            lines.append(command)
    return lines


def quickstart() -> list[str]:
    return [c for block in code_blocks(readme(), "## Quickstart") for c in commands(block)]


def local_providers() -> ModuleType:
    path = ROOT / "scripts" / "local_providers.py"
    spec = importlib.util.spec_from_file_location("local_providers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short() -> None:
    assert len(README.read_bytes()) <= MAX_BYTES


def test_development_commands_are_there_verbatim() -> None:
    lines = readme().splitlines()
    for command in DEV_COMMANDS:
        assert command in lines
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_has_the_three_steps_in_order() -> None:
    steps = quickstart()
    wanted = ["cp .env.example .env", "agent-factory-db schema deploy --all",
              "agent-factory-db health"]
    positions = [steps.index(step) for step in wanted]
    assert positions == sorted(positions)
    # The local servers start before the schema is deployed on them.
    start = steps.index("python scripts/local_providers.py start")
    assert start < positions[1]


def test_quickstart_commands_exist() -> None:
    parser = _parser()
    for command in quickstart():
        words = shlex.split(command)
        if words[0] == "agent-factory-db":
            parser.parse_args(words[1:])             # SystemExit on an unknown command
        elif words[0] == "cp" or (words[0] == "python" and words[1].endswith(".py")):
            assert (ROOT / words[1]).is_file(), command


def declared_extras() -> set[str]:
    """The extras of pyproject.toml (read as text: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z][a-z0-9_-]*) = \[", section, re.M))


def test_install_lines_name_real_extras() -> None:
    extras = declared_extras()
    named = re.findall(r'agent-factory\[([a-z,]+)\]|"\.\[([a-z,]+)\]"', readme())
    assert named
    for group in named:
        for extra in ",".join(group).split(","):
            if extra:
                assert extra in extras, extra
    for extra in extras - {"dev"}:
        assert f"`{extra}`" in readme(), f"README does not name the extra {extra!r}"


def test_env_example_configures_the_three_local_providers() -> None:
    env = load_environment({}, dotenv=ENV_EXAMPLE)
    settings = settings_from_env({}, dotenv=ENV_EXAMPLE)
    assert settings.primary == env["DATABASE_PROVIDER"] == "supabase"
    assert settings.failover_order == ("supabase", "railway", "neon")
    assert settings.failover_enabled
    script = local_providers()
    ports = dict(script.SERVERS)
    for name, provider in settings.providers.items():
        params = provider.params
        assert params["host"] == "127.0.0.1"
        assert int(params["port"]) == ports[name]
        assert params["password"] == script.PASSWORD


def test_env_example_mirrors_the_spec() -> None:
    text = ENV_EXAMPLE.read_text()
    for variable in SPEC_VARIABLES:
        assert re.search(rf"^#?\s*{variable}=", text, re.M), variable
    # Commented examples hold placeholders only.
    for line in text.splitlines():
        if re.match(r"#\s+[A-Z_]+=", line) and ("PASSWORD" in line or "KEY" in line
                                                  or "://" in line):
            assert re.search(r"<[a-z-]+>", line), line


def test_env_example_real_variables_win() -> None:
    settings = settings_from_env({"DATABASE_PROVIDER": "railway"}, dotenv=ENV_EXAMPLE)
    assert settings.primary == "railway"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(title.replace(" ", "-"))
    return anchors


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{path.name}: {target}"


def test_readme_links_every_doc() -> None:
    text = readme()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in text, doc.name
