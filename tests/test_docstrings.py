"""The public constructors and the policies' entry points document every parameter in an Args section
(issue 29), and document nothing that is not a parameter: a renamed or added parameter fails here."""

from __future__ import annotations

import inspect
import re

import pytest

ARG_LINE = re.compile(r"^ {4}(\w+):")  # a parameter's line in the section, indented one level past "Args:"


def documented_args(doc: str) -> list[str]:
    """The names an "Args:" section lists (its lines at one indent past the header, up to a blank line)."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return []
    names = []
    for line in lines[start:]:
        if not line.strip():
            break
        match = ARG_LINE.match(line)
        if match:
            names.append(match.group(1))
    return names


def _public_callables():
    from prism_client import AsyncPrismClient, PrismClient
    from services.gpu_agent.agent_service import AgentService
    from services.gpu_agent.engine.engine import Engine
    from services.scheduler.policies import POLICIES

    # (name, the signature's callable, where its Args section is: a class documents its constructor on
    # itself or on __init__)
    yield "Engine", Engine.__init__, Engine.__init__.__doc__
    yield "AgentService", AgentService.__init__, AgentService.__init__.__doc__
    yield "PrismClient", PrismClient.__init__, PrismClient.__doc__
    yield "AsyncPrismClient", AsyncPrismClient.__init__, AsyncPrismClient.__doc__
    for name, policy in sorted(POLICIES.items()):
        yield f"policy {name}", policy, policy.__doc__


CALLABLES = list(_public_callables())


@pytest.mark.parametrize("name, func, doc", CALLABLES, ids=[c[0] for c in CALLABLES])
def test_every_parameter_is_documented_in_an_args_section(name, func, doc):
    params = [p for p in inspect.signature(func).parameters if p != "self"]
    assert doc, f"{name} has no docstring"
    assert documented_args(doc) == params, f"{name}: Args section against the signature"


def test_the_args_parser_reads_only_the_section():
    doc = """Does a thing.

    Args:
        a: the first.
        b: the second, whose text goes on
            over two lines (not: a parameter).

    Returns:
        c: not an argument.
    """
    assert documented_args(doc) == ["a", "b"]
    assert documented_args("No section.") == []
