"""MemoryFilter: validation, the SQL it renders, and in-process matching that agrees with LanceDB."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldagent_ray.memory import MemoryFilter, MemoryFilterError, build_where, sql_str
from worldagent_ray.memory.filters import FILTER_FIELDS


def test_build_where_quotes_strings_and_rejects_bad_values():
    assert build_where() is None
    w = build_where(success=True, phase=2, min_reward=0.5, run_id="o'brien; DROP TABLE x --")
    assert w == "(success = true) AND (phase = 2) AND (reward >= 0.5) AND (run_id = 'o''brien; DROP TABLE x --')"
    assert build_where(exclude_run_task=("r", "t'1")) == "(NOT (run_id = 'r' AND task_id = 't''1'))"
    assert sql_str("a'b") == "'a''b'"
    for kwargs, field in [
        ({"success": 1}, "success"),
        ({"success": "yes"}, "success"),
        ({"phase": 4}, "phase"),
        ({"phase": True}, "phase"),
        ({"phase": "1"}, "phase"),
        ({"min_reward": float("nan")}, "min_reward"),
        ({"min_reward": "0.5"}, "min_reward"),
        ({"split": "test"}, "split"),
        ({"status": "bad"}, "status"),
        ({"run_id": ""}, "run_id"),
        ({"exclude_run_task": ("r",)}, "exclude_run_task"),
        ({"run_id": "a\x00b"}, "NUL"),
        ({"sucess": True}, "unknown memory filter"),
    ]:
        with pytest.raises(MemoryFilterError, match=field):
            build_where(**kwargs)


def test_filter_normalises_values_and_is_one_place_for_every_read():
    f = MemoryFilter(phase=2, min_reward=1, exclude_run_task=["r", "t"])
    assert f.phase == 2 and isinstance(f.min_reward, float) and f.exclude_run_task == ("r", "t")
    assert MemoryFilter.from_kwargs({"run_id": "r"}) == MemoryFilter(run_id="r")
    assert set(FILTER_FIELDS) == {"success", "phase", "min_reward", "run_id", "split", "status", "exclude_run_task"}
    with pytest.raises(AttributeError):
        f.phase = 3  # frozen: a filter cannot change after validation


# A small real table whose rows cover every filtered column, with quotes in the strings.
_RUNS = ["run-a", "o'brien"]
_TASKS = ["t1", "t'2"]
_ROWS = [
    {"run_id": r, "task_id": t, "success": s, "phase": p, "reward": rw, "split": sp, "status": stt}
    for i, (r, t, s, p, rw, sp, stt) in enumerate(
        (r, t, s, p, rw, sp, stt)
        for r in _RUNS
        for t in _TASKS
        for s in (True, False)
        for p in (1, 2, 3)
        for rw, sp, stt in ((0.0, "train", "ok"), (0.5, "heldout", "failed"), (1.0, "train", "ok"))
    )
]


@pytest.fixture(scope="module")
def filter_table(tmp_path_factory):
    import lancedb

    db = lancedb.connect(str(tmp_path_factory.mktemp("filters")))
    return db.create_table("rows", pa.Table.from_pylist(_ROWS))


_filters = st.builds(
    MemoryFilter,
    success=st.none() | st.booleans(),
    phase=st.none() | st.sampled_from([1, 2, 3]),
    min_reward=st.none() | st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    run_id=st.none() | st.sampled_from(_RUNS + ["nobody"]),
    split=st.none() | st.sampled_from(["train", "heldout"]),
    status=st.none() | st.sampled_from(["ok", "failed"]),
    exclude_run_task=st.none() | st.tuples(st.sampled_from(_RUNS), st.sampled_from(_TASKS)),
)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(flt=_filters)
def test_matches_agrees_with_the_sql_lancedb_runs(filter_table, flt):
    """The catalog counts in-process with ``matches``; LanceDB runs ``where()``: same rows."""
    expected = sum(flt.matches(r) for r in _ROWS)
    assert filter_table.count_rows(flt.where()) == expected
