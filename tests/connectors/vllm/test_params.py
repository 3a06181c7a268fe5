"""The ``kv_transfer_params`` keys and the connector config; no vLLM needed."""

from __future__ import annotations

import pytest

from tokencake.agent_params import AgentParams, ToolHint, agent_params, kv_transfer_params
from tokencake.connectors.vllm.config import ConnectorConfig


def test_round_trip() -> None:
    raw = kv_transfer_params(
        "app", "coder", node="n1", importance=2.0, tool_kind="pytest", tool_predicted_s=8.0
    )
    assert agent_params(raw) == AgentParams("app", "coder", "n1", 2.0, ToolHint("pytest", 8.0))
    assert agent_params(kv_transfer_params("app", "a")) == AgentParams("app", "a")


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {},
        {"do_remote_prefill": True},
        {"tokencake": "x"},
        {"tokencake": {"app_id": "a"}},
        {"tokencake": {"app_id": "a", "agent_id": ""}},
        {"tokencake": {"app_id": "a", "agent_id": "b", "importance": "nan"}},
        {"tokencake": {"app_id": "a", "agent_id": "b", "tool": {"kind": "t", "predicted_s": -1}}},
        {"tokencake": {"app_id": "a", "agent_id": "b", "tool": "search"}},
    ],
)
def test_absent_or_malformed_is_ignored(raw: dict[str, object] | None) -> None:
    assert agent_params(raw) is None


def test_config_rejects_unknown_and_bad_values() -> None:
    assert ConnectorConfig.from_extra(None).save == "finished"
    with pytest.raises(ValueError, match="unknown"):
        ConnectorConfig.from_extra({"endpont": "ipc:///x"})
    with pytest.raises(ValueError, match="save"):
        ConnectorConfig.from_extra({"save": "sometimes"})
    with pytest.raises(ValueError, match="timeout_ms"):
        ConnectorConfig.from_extra({"timeout_ms": 0})
