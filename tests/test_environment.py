"""pyproject.toml, environment.yml and constraints.txt describe the same environment."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    return {name_of(r): r for r in reqs}


def conda_pip_requirements() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    items = [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]
    return {name_of(r): r for r in items if not r.startswith("-e")}


def test_environment_yml_lists_the_package_dependencies():
    assert pyproject_requirements().keys() == conda_pip_requirements().keys()


def test_versions_agree_and_torch_is_pinned_only_in_the_constraints():
    package, conda = pyproject_requirements(), conda_pip_requirements()
    constraints = {name_of(line): line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    assert constraints["torch"] == "torch==2.13.0"
    assert "==" not in package["torch"], "the package itself must require a torch range"
    assert set(constraints) <= set(package)
    for name, requirement in conda.items():
        expected = constraints.get(name, package[name])
        assert requirement.replace(" ", "") == expected.replace(" ", ""), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == ["make test"]
    assert "make test" in readme and "make run" in readme
