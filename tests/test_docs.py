"""The user's guide stays true to the code: README and docs/ keep their size limits, their links
and section references resolve, every documented `nfdm-de` command parses against the real CLI,
Python blocks marked runnable run, and no tracked file narrates the project's own history."""

import re
import shlex
import subprocess
from pathlib import Path

import jax
import pytest
import typer

from nfdm_de.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
GUIDE = [README, *DOC_PAGES]

README_MAX_LINES = 200
DOCS_MAX_LINES = 1200
FIRST_COMMAND_MAX_LINE = 20
TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest'
)
# Development history (which round of work did what) belongs in git, not in the product.
HISTORY = re.compile(r"\bsession [0-9]|\bissue [0-9]|#[0-9]+ \(issue", re.IGNORECASE)
HISTORY_EXEMPT = {"CHANGELOG.md"}

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:docs|examples|benchmarks|tests|nfdm_de|cli)/[\w./-]*\w\.(?:md|py))"
)
# A page followed by a quoted section title (or several, joined by commas and "and"), as the
# code's comments cite the guide; quotes may be single inside string literals.
SECTION_REF = re.compile(r"docs/([\w-]+\.md),\s*((?:[\"'][^\"'\n]+[\"'](?:,?\s*(?:and\s+)?)?)+)")
QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


def fenced_blocks(path: Path, language: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block whose info string starts with `language`."""
    blocks = []
    for info, body in FENCE.findall(path.read_text(encoding="utf-8")):
        words = info.split()
        if words and words[0] == language:
            blocks.append((info.strip(), body))
    return blocks


def shell_commands(body: str) -> list[list[str]]:
    """Each simple command of a bash block as its words (continuations joined, chains split)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\||&", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]  # environment assignments before the command
            if words:
                commands.append(words)
    return commands


def documented_cli_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for page in GUIDE:
        for _, body in fenced_blocks(page, "bash"):
            for words in shell_commands(body):
                if Path(words[0]).name == "nfdm-de":
                    calls.append((page.name, words[1:]))
    return calls


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the history check reads the tracked files from git")
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_development_history_in_tracked_files():
    hits = []
    for path in tracked_files():
        if path.name in HISTORY_EXEMPT or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, (
        "Say what the code is and measures today; the history lives in git "
        "(or in CHANGELOG.md as user-visible changes):\n" + "\n".join(hits)
    )


def test_guide_sizes():
    readme_lines = len(README.read_text(encoding="utf-8").splitlines())
    docs_lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in DOC_PAGES}
    assert readme_lines <= README_MAX_LINES, f"README.md has {readme_lines} lines"
    assert sum(docs_lines.values()) <= DOCS_MAX_LINES, f"docs/*.md: {docs_lines}"


def test_readme_starts_with_the_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines, 1) if "nfdm-de train" in line)
    assert first <= FIRST_COMMAND_MAX_LINE, f"the first command is on line {first}"
    # .ci/run runs the README's test command: keep the two in step.
    bash = [body for _, body in fenced_blocks(README, "bash")]
    assert any(TEST_COMMAND in body.splitlines() for body in bash)


def test_links_and_paths_resolve():
    missing = []
    for page in GUIDE:
        text = page.read_text(encoding="utf-8")
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                missing.append(f"{page.name}: link {target}")
        for path in REPO_PATH.findall(text):
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: path {path}")
    assert not missing, "\n".join(missing)


def _headings(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    return {m.strip() for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_section_references_resolve():
    sources = [p for p in tracked_files() if p.suffix in (".py", ".md") and p.is_file()]
    sources += [p for p in GUIDE if p not in sources]
    broken, found = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        # Join references that a string literal or a comment wraps over two lines.
        text = re.sub(r"\"\s*\n\s*\"", "", text)
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)
        for page, quoted in SECTION_REF.findall(text):
            target = ROOT / "docs" / page
            headings = _headings(target) if target.exists() else set()
            for section in QUOTED.findall(quoted):
                found += 1
                if section.strip() not in headings:
                    broken.append(f"{path.relative_to(ROOT)}: docs/{page}, {section!r}")
    assert found > 0
    assert not broken, "\n".join(broken)


def test_documented_commands_parse_against_the_cli():
    calls = documented_cli_calls()
    assert len(calls) >= 20, "the guide's nfdm-de commands were not found"
    group = typer.main.get_command(app)
    failures = []
    for page, args in calls:
        name, rest = args[0], args[1:]
        command = group.commands.get(name)
        if command is None:
            failures.append(f"{page}: no command {name!r}")
            continue
        try:
            command.make_context(name, list(rest), resilient_parsing=False)
        except Exception as error:  # click's (or typer's bundled click's) usage errors
            message = getattr(error, "format_message", lambda e=error: str(e))()
            failures.append(f"{page}: nfdm-de {shlex.join(args)}: {message}")
    assert not failures, "\n".join(failures)


def runnable_python_blocks() -> list[tuple[str, str]]:
    return [
        (f"{page.name}[{i}]", body)
        for page in GUIDE
        for i, (info, body) in enumerate(fenced_blocks(page, "python"))
        if info.split()[1:2] == ["run"]
    ]


def test_runnable_python_blocks_compile():
    blocks = runnable_python_blocks()
    assert len(blocks) >= 2
    for name, body in blocks:
        compile(body, name, "exec")


@pytest.mark.slow
@pytest.mark.parametrize("name,body", runnable_python_blocks(), ids=lambda v: str(v)[:20])
def test_runnable_python_blocks_run(name, body):
    # A block is user code as a reader runs it. One that trains with optax runs under JAX's
    # default (standard) promotion: optax's Adam raises a Python float to its int32 step count,
    # which strict promotion refuses. The rest run as the suite does (strict).
    promotion = "standard" if "optax" in body else jax.config.jax_numpy_dtype_promotion
    with jax.numpy_dtype_promotion(promotion):
        exec(compile(body, name, "exec"), {"__name__": "__docs__"})
