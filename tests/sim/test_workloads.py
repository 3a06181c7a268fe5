"""Generators: Code-Writer exactness, seeding, composition rules and the user file schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokencake.sim.generators import BUILTIN, CodeWriter, get_generator, make_trace
from tokencake.sim.kvpool import chain_keys
from tokencake.sim.workload import NoiseConfig, Trace, WorkloadError, prompt_tokens

SHARED_JSON = Path(__file__).resolve().parents[3] / "shared" / "workloads" / "code_writer_dag.json"


def test_code_writer_structure_is_exact() -> None:
    tr = make_trace(CodeWriter(), qps=1.0, seed=0)
    assert len(tr.apps) == 24
    for app in tr.apps:
        assert len(app.nodes) == 29
        assert len(app.llm_nodes) == 27
        assert len(app.edges) == 36
        assert app.tool_waits == 18
        assert app.output_tokens == 6464
        waits = sorted(n.tool.duration_s for n in app.nodes if n.tool is not None)
        assert sum(waits) == pytest.approx(66.9)
        assert waits.count(0.1) == 6 and waits.count(8.0) == 3 and waits.count(10.0) == 2
    assert {a.initial_tokens for a in tr.apps} <= set(range(4603, 4608))


@pytest.mark.skipif(not SHARED_JSON.exists(), reason="shared workload data not present")
def test_packaged_dag_matches_shared_copy() -> None:
    packaged = CodeWriter().data
    assert packaged == json.loads(SHARED_JSON.read_text(encoding="utf-8"))


def test_append_only_composition_and_join() -> None:
    app = make_trace(CodeWriter(), qps=1.0, seed=0, n_apps=1).apps[0]
    p = app.prompts
    # A successor's prompt extends its predecessor's prompt + output + tool result.
    s1, j1 = p["search_1"], p["judger_1"]
    assert j1[: len(s1)] == s1
    assert j1[len(s1)] == app.outputs["search_1"]
    # Join: reviewer_1 starts with code_write_1's whole context, then the other branches.
    cw1 = p["code_write_1"]
    assert p["reviewer_1"][: len(cw1)] == cw1
    assert app.outputs["code_write_2"] in p["reviewer_1"]
    assert app.outputs["code_write_3"] in p["reviewer_1"]
    # Both reviewers share everything but their own instruction.
    assert p["reviewer_1"][:-1] == p["reviewer_2"][:-1]
    # Shared segments give shared hash-chain blocks.
    k1 = chain_keys(p["reviewer_1"], 16)
    k2 = chain_keys(p["reviewer_2"], 16)
    shared = prompt_tokens(p["reviewer_1"][:-1]) // 16
    assert k1[:shared] == k2[:shared]
    assert k1[shared:] != k2[shared:]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_same_seed_same_trace_other_seed_differs(name: str) -> None:
    gen = get_generator(name)
    noise = NoiseConfig("gaussian", 0.2, 0.3)
    a = make_trace(gen, qps=0.5, seed=7, n_apps=6, noise=noise)
    b = make_trace(gen, qps=0.5, seed=7, n_apps=6, noise=noise)
    c = make_trace(gen, qps=0.5, seed=8, n_apps=6, noise=noise)

    def sig(t: Trace) -> list[object]:
        return [
            (
                x.arrival_s,
                x.initial_tokens,
                [
                    (n.id, n.output_tokens, n.tool and (n.tool.duration_s, n.tool.predicted_s))
                    for n in x.nodes
                ],
            )
            for x in t.apps
        ]

    assert sig(a) == sig(b)
    assert sig(a) != sig(c)


def test_qps_changes_arrivals_not_apps() -> None:
    gen = get_generator("react-coding")
    a = make_trace(gen, qps=0.1, seed=3, n_apps=5)
    b = make_trace(gen, qps=1.0, seed=3, n_apps=5)
    assert [x.prompts for x in a.apps] == [x.prompts for x in b.apps]
    assert a.apps[-1].arrival_s > b.apps[-1].arrival_s


def test_noise_and_prediction_error() -> None:
    gen = CodeWriter()
    clean = make_trace(gen, qps=1, seed=1, n_apps=2)
    noisy = make_trace(gen, qps=1, seed=1, n_apps=2, noise=NoiseConfig("uniform", 0.5, 0.5))
    nt = [n.tool for a in noisy.apps for n in a.nodes if n.tool]
    ct = [n.tool for a in clean.apps for n in a.nodes if n.tool]
    assert all(t.duration_s == t.predicted_s for t in ct)
    assert any(t.duration_s != c.duration_s for t, c in zip(nt, ct, strict=True))
    assert any(t.predicted_s != t.duration_s for t in nt)
    none = make_trace(gen, qps=1, seed=1, n_apps=1, noise=NoiseConfig(hints=False))
    assert all(n.tool.predicted_s is None for n in none.apps[0].nodes if n.tool)


def test_react_tool_mix_follows_the_readme() -> None:
    tr = make_trace(get_generator("react-coding"), qps=1, seed=0, n_apps=400)
    kinds = [n.tool.kind for a in tr.apps for n in a.nodes if n.tool]
    share = kinds.count("editor") / len(kinds)
    # editor is 54.3% of all calls, 58% of the non-submit ones.
    assert 0.53 < share < 0.63
    assert kinds.count("heavy_shell") / len(kinds) > 0.18


def _user_file(tmp_path: Path, **over: object) -> Path:
    doc: dict[str, object] = {
        "schema": "tokencake-sim-workload/1",
        "name": "mine",
        "default_apps": 3,
        "apps": [
            {
                "name": "pair",
                "initial_tokens": {"min": 100, "max": 200},
                "nodes": [
                    {
                        "id": "a",
                        "output_tokens": 50,
                        "tool": {"kind": "search", "duration_s": 1.0, "result_tokens": 40},
                    },
                    {
                        "id": "b",
                        "predecessors": ["a"],
                        "output_tokens": 20,
                        "instruction_tokens": 10,
                    },
                ],
            }
        ],
    }
    doc.update(over)
    p = tmp_path / "w.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    return p


def test_user_workload_file(tmp_path: Path) -> None:
    gen = get_generator(str(_user_file(tmp_path)))
    tr = make_trace(gen, qps=1, seed=0)
    assert tr.workload == "mine" and len(tr.apps) == 3
    app = tr.apps[0]
    assert 100 <= app.initial_tokens <= 200
    assert app.prompts["b"][: len(app.prompts["a"])] == app.prompts["a"]


def test_plain_traffic_is_served_but_never_reaches_the_policy(tmp_path: Path) -> None:
    from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
    from tokencake.daemon.scheduler.events import Event
    from tokencake.protocol import DecisionRecord
    from tokencake.sim.engine import Simulator
    from tokencake.sim.profiles import get_profile
    from tokencake.sim.runner import policy_config

    path = _user_file(tmp_path)
    doc = json.loads(path.read_text())
    plain = {
        "name": "chat",
        "plain": True,
        "initial_tokens": 300,
        "nodes": [{"id": "reply", "output_tokens": 30}],
    }
    doc["apps"].append(plain)
    doc["default_apps"] = 12
    path.write_text(json.dumps(doc))
    tr = make_trace(get_generator(str(path)), qps=2, seed=1)
    chats = {a.app_id for a in tr.apps if a.plain}
    assert chats and len(chats) < len(tr.apps)
    seen: set[str] = set()

    class Spy(TokenCakePolicy):
        def on_event(self, event: Event, now: float) -> list[DecisionRecord]:
            seen.add(getattr(event, "app_id", ""))
            return super().on_event(event, now)

    profile = get_profile("qwen2.5-14b-a800")
    policy = Spy(policy_config(profile))
    res = Simulator(tr, policy, profile).run()
    assert len(res.app_latency_s) == len(tr.apps)  # every app served, plain ones too
    assert not seen & chats  # and the policy heard nothing of the plain ones
    assert seen - {""} == {a.app_id for a in tr.apps if not a.plain}


def test_user_workload_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="schema"):
        get_generator(str(_user_file(tmp_path, schema="other/2")))
    bad = _user_file(tmp_path)
    doc = json.loads(bad.read_text())
    doc["apps"][0]["nodes"][1]["predecessors"] = ["nope"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(WorkloadError, match="unknown node"):
        make_trace(get_generator(str(bad)), qps=1, seed=0)
    doc["apps"][0]["nodes"][0]["typo"] = 1
    bad.write_text(json.dumps(doc))
    with pytest.raises(WorkloadError, match="typo"):
        get_generator(str(bad))
    with pytest.raises(WorkloadError, match="unknown workload"):
        get_generator("no-such-workload")
