import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vattn.allocator import SlotState
from vattn.layout import Layout
from vattn.targets import TargetIndex

MiB = 1 << 20


def llama(kind: str = "per_layer", context: int = 32768) -> Layout:
    return Layout(32, 8, 128, 2, 32, context, 2 * MiB, kind)  # type: ignore[arg-type]


def test_per_layer_llama3_8b() -> None:
    lay = llama()
    assert lay.num_tensors == 64
    assert lay.token_bytes == 2048
    assert lay.tokens_for_pages(1) == 1024
    assert lay.max_context_len == 32768
    assert lay.pages_per_slot == 32
    assert lay.slot_stride_bytes == 64 * MiB
    assert lay.reservation_bytes == 2 * MiB + 64 * 32 * 64 * MiB


def test_token_major_llama3_8b() -> None:
    lay = llama("token_major")
    assert lay.num_tensors == 2
    assert lay.token_bytes == 32 * 2048
    assert lay.tokens_for_pages(1) == 32
    assert lay.pages_per_slot == 1024


@pytest.mark.parametrize("context, padded", [(1, 1024), (1024, 1024), (1025, 2048),
                                             (5000, 5120)])
def test_context_padded_to_whole_pages(context: int, padded: int) -> None:
    lay = llama(context=context)
    assert lay.max_context_len == padded
    assert lay.slot_stride_bytes == lay.max_context_len * lay.token_bytes
    assert lay.slot_stride_bytes % lay.page_size_bytes == 0


def test_token_size_not_dividing_page() -> None:
    # 3 heads x 100 x 2 B = 600 B a token: lcm(600, 2 MiB) / 600 = 2 MiB / 8 tokens.
    lay = Layout(1, 3, 100, 2, 2, 10, 2 * MiB)
    assert lay.max_context_len == 262144
    assert lay.slot_stride_bytes % lay.page_size_bytes == 0
    assert lay.pages_for_tokens(3495) == 1  # 3495 * 600 <= 2 MiB < 3496 * 600
    assert lay.pages_for_tokens(3495, read_slack=1) == 2


def test_pages_for_tokens_with_slack_capped_at_slot() -> None:
    lay = llama(context=4096)
    assert lay.pages_for_tokens(0) == 0
    assert lay.pages_for_tokens(0, read_slack=256) == 1
    assert lay.pages_for_tokens(1024) == 1
    assert lay.pages_for_tokens(1024, read_slack=1) == 2
    assert lay.pages_for_tokens(4096, read_slack=256) == 4


def test_offsets() -> None:
    lay = llama()
    assert lay.tensor_offset(0) == 2 * MiB
    assert lay.page_offset(1, 2, 3) == 2 * MiB + lay.tensor_bytes + 2 * 64 * MiB + 3 * 2 * MiB


@pytest.mark.parametrize("field, value", [("num_layers", 0), ("head_dim", -1),
                                          ("page_size_bytes", 1.5), ("max_batch_size", True)])
def test_rejects_bad_numbers(field: str, value: object) -> None:
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8, dtype_bytes=2, max_batch_size=1,
                requested_context_len=1, page_size_bytes=MiB)
    args[field] = value
    with pytest.raises(ValueError, match=field):
        Layout(**args)  # type: ignore[arg-type]


def test_rejects_unknown_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        Layout(1, 1, 8, 2, 1, 1, MiB, "paged")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(layers=st.integers(1, 40), heads=st.integers(1, 16), dim=st.sampled_from([64, 80, 128]),
       context=st.integers(1, 20000), page_kib=st.sampled_from([64, 2048]),
       kind=st.sampled_from(["per_layer", "token_major"]), slack=st.integers(0, 300),
       lookahead=st.integers(0, 600), data=st.data())
def test_target_index_keeps_the_layouts_arithmetic(layers: int, heads: int, dim: int,
                                                   context: int, page_kib: int, kind: str,
                                                   slack: int, lookahead: int,
                                                   data: st.DataObject) -> None:
    # TargetIndex copies the layout's sizes into ints for its hot path: its pages and
    # fits must stay those of `Layout.pages_for_tokens` / `tokens_for_pages`.
    layout = Layout(layers, heads, dim, 2, 3, context, page_kib << 10, kind)  # type: ignore[arg-type]
    index = TargetIndex(layout, slack, lookahead)
    tokens = data.draw(st.integers(0, layout.max_context_len))
    assert index.pages_for(tokens) == layout.pages_for_tokens(tokens, slack)
    pages = data.draw(st.integers(0, layout.pages_per_slot))
    state = SlotState(num_pages=pages, active=True)
    expected = (layout.max_context_len if pages == layout.pages_per_slot
                else layout.tokens_for_pages(pages) - slack - lookahead)
    assert index.fit(state) == expected
    assert index.fit(SlotState(num_pages=pages, active=False)) == -1
