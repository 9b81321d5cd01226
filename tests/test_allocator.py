import ast
import pathlib

import pytest

from vattn.allocator import MapPlan, PageRun, SlotAllocator
from vattn.errors import OutOfPages, OutOfSlots

T = 4  # tensors


def policy(slots: int = 4, pages_per_slot: int = 8) -> SlotAllocator:
    return SlotAllocator(slots, pages_per_slot, T)


def grow(p: SlotAllocator, targets: dict[int, int], available: int = 1000) -> MapPlan:
    plan = p.plan(targets, available)
    p.apply(plan)
    return plan


def test_allocate_lowest_first_then_out_of_slots() -> None:
    p = policy(slots=2)
    assert [p.allocate(), p.allocate()] == [0, 1]
    assert not p.can_allocate()
    with pytest.raises(OutOfSlots):
        p.allocate()


def test_plan_grows_only_what_is_missing() -> None:
    p = policy()
    a, b = p.allocate(), p.allocate()
    assert grow(p, {a: 2, b: 3}) == MapPlan(grow=(PageRun(0, 0, 2), PageRun(1, 0, 3)))
    assert grow(p, {a: 2, b: 1}).empty
    assert grow(p, {b: 5}) == MapPlan(grow=(PageRun(1, 3, 2),))


def test_best_fit_reuses_freed_slot() -> None:
    p = policy()
    slots = [p.allocate() for _ in range(4)]
    grow(p, {slots[0]: 6, slots[1]: 2, slots[2]: 4, slots[3]: 1})
    for s in slots[:3]:
        p.free(s)
    assert p.choose(3) == 2   # 4 pages: the fewest that cover 3
    assert p.choose(7) == 0   # none covers 7: the most pages
    assert p.choose(0) == 0   # unknown size: the most pages
    assert p.allocate(2) == 1


def test_reclaim_least_recently_freed_from_the_top() -> None:
    p = policy()
    slots = [p.allocate() for _ in range(3)]
    grow(p, {slots[0]: 3, slots[1]: 4, slots[2]: 1})
    p.free(slots[1])
    p.free(slots[0])
    new = p.allocate(8)   # slot 1 (4 pages): none covers 8, it has the most
    assert new == 1
    # 2 more pages for slot 1 = 8 physical pages, pool has 4: short 4 = 1 page of slot 0.
    plan = p.plan({new: 6}, available=4)
    assert plan == MapPlan(grow=(PageRun(1, 4, 2),), reclaim=(PageRun(0, 2, 1),))
    p.apply(plan)
    assert [s.num_pages for s in p.slots] == [2, 6, 1, 0]


def test_reclaim_spans_several_idle_slots_in_free_order() -> None:
    p = policy()
    slots = [p.allocate() for _ in range(4)]
    grow(p, dict.fromkeys(slots, 2))
    for s in (2, 0, 1):
        p.free(s)
    plan = p.plan({3: 6}, available=0)
    assert plan.reclaim == (PageRun(2, 0, 2), PageRun(0, 0, 2))


def test_out_of_pages_changes_nothing() -> None:
    p = policy()
    a, b = p.allocate(), p.allocate()
    grow(p, {a: 2})
    p.free(a)
    with pytest.raises(OutOfPages) as info:
        p.plan({b: 4}, available=4)
    assert (info.value.needed, info.value.available) == (16, 4 + 8)
    assert [s.num_pages for s in p.slots] == [2, 0, 0, 0]


def test_trim_plan_takes_every_idle_page() -> None:
    p = policy()
    a, b, c = p.allocate(), p.allocate(), p.allocate()
    grow(p, {a: 2, b: 3, c: 1})
    p.free(a)
    p.free(c)
    plan = p.trim_plan()
    assert plan == MapPlan(reclaim=(PageRun(0, 0, 2), PageRun(2, 0, 1)))
    p.apply(plan)
    assert [s.num_pages for s in p.slots] == [0, 3, 0, 0]


POLICY_MODULES = ["allocator.py", "layout.py", "pages.py", "errors.py", "targets.py"]
ALLOWED = {"__future__", "collections", "dataclasses", "math", "typing", "vattn"}


@pytest.mark.parametrize("name", POLICY_MODULES)
def test_policy_imports_neither_torch_nor_driver(name: str) -> None:
    root = pathlib.Path(__file__).parent.parent / "vattn"
    tree = ast.parse((root / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] in ALLOWED, f"{name} imports {module}"
            if module.startswith("vattn."):
                assert module.split(".")[1] + ".py" in POLICY_MODULES, f"{name} imports {module}"
