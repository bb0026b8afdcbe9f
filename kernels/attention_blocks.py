"""Which (query block, key block) tiles the flash-attention kernels (kernels/attention.py) visit.

The forward and dQ kernels run one program per block of BLOCK_M queries and walk key blocks of
BLOCK_N; dK/dV runs one per block of BLOCK_N keys and walks query blocks of BLOCK_M. A program
visits only the blocks its masks can reach: causal and window bounds, and with doc ids the
documents of its own rows, from the start of its first row's document to the end of its last
row's. Inside that range a block shared by one document, within the causal and window bounds,
runs with no mask at all; the blocks at the edges run masked. So packed documents cost work in
proportion to the sum of their squared lengths (FlashAttention's varlen kernels' cost), not to
the square of the sequence.

The document of each position comes from `doc_bounds`: a few O(B * S) tensor ops on the doc ids'
device per call (no host sync, nothing of O(S^2)); doc ids that are not non-decreasing along a
row (a document id that comes back later) are detected there, and that row takes the masked path
over its causal/window range, still exact.

`visited_blocks` counts the tiles a kernel visits from the same bounds (`key_bounds`, `query_bounds`
and `_doc_clip` of the kernels, above, mirrored on the host below): the work measure `tritongpt bench attention`
reports beside time; tests/test_attention.py checks it against a brute-force count of the tiles
that hold any visible (query, key) pair.

    python -c "from tritongpt.kernels import attention_blocks as ab; \
               print(ab.visited_blocks('fwd', 1024, 1024, True, None, None, 128, 128))"   # 36
"""

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# In the kernels: the ranges a program walks
# ----------------------------------------------------------------------------------------------

@triton.jit
def _doc_clip(
    hi,  # end of the range (causal / window / length bounds)
    lo,  # first block of the range
    full_lo,  # first block needing no mask
    full_hi,  # end of the blocks needing no mask
    bounds_base,  # DocBounds + this batch: (2, S) int32, document start then end of each position
    S,  # key length
    first,  # position of the program's first row (query or key)
    last,  # position of its last row inside the sequence
    shift,  # S - T when the range is of queries (query i is position i + S - T), else 0
    BLOCK: tl.constexpr,  # rows per block of the range
):
    """(hi, lo, full_lo, full_hi) narrowed to the documents of rows first..last, document ids
    non-decreasing along the sequence (DocBounds' start is -1 for a batch row where they are not:
    then only the mask decides, everywhere). The range runs from the start of the first row's
    document to the end of the last row's; a block needs no mask only inside the document shared
    by the first and the last row (start of the last row's, end of the first row's)."""
    start_first = tl.load(bounds_base + first)
    start_last = tl.load(bounds_base + last)
    end_first = tl.load(bounds_base + S + first)
    end_last = tl.load(bounds_base + S + last)
    monotone = start_last >= 0
    hi = tl.minimum(hi, tl.maximum(end_last - shift, 0))
    lo = tl.maximum(lo, (tl.maximum(start_first - shift, 0) // BLOCK) * BLOCK)
    full_lo = tl.where(monotone, tl.maximum(full_lo, tl.cdiv(tl.maximum(start_last - shift, 0), BLOCK) * BLOCK), hi)
    # whole blocks before the shared document's end; a document that runs to the end leaves the
    # range's own end (which may be ragged, as past T in _query_bounds)
    doc_end = (tl.maximum(end_first - shift, 0) // BLOCK) * BLOCK
    full_hi = tl.where(end_first == S, full_hi, tl.minimum(full_hi, doc_end))
    return hi, lo, full_lo, full_hi


@triton.jit
def key_bounds(
    start_m,  # index of the query block
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    bounds_base,  # DocBounds + this batch (read only when HAS_DOCS)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Keys (lo, full_lo, full_hi, hi) that queries start_m * BLOCK_M + [0, BLOCK_M) may see:
    [lo, hi), split so that key blocks starting in [full_lo, full_hi) are visible to every query
    of the block (no mask). The three regions: the window's leading edge or the first query's
    document start, the fully visible middle, the causal diagonal / document end / ragged end."""
    first = start_m * BLOCK_M + S - T  # key position of the block's first query
    last = first + BLOCK_M - 1
    lo = 0
    full_lo = 0
    hi = S
    full_hi = (S // BLOCK_N) * BLOCK_N  # the ragged last key block needs the key-length mask
    if CAUSAL:
        hi = tl.minimum(S, last + 1)
        full_hi = tl.minimum(full_hi, ((first + 1) // BLOCK_N) * BLOCK_N)
        if HAS_WINDOW:
            lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N
    if HAS_DOCS:
        hi, lo, full_lo, full_hi = _doc_clip(hi, lo, full_lo, full_hi, bounds_base, S, first,
                                             tl.minimum(last, S - 1), 0, BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_bounds(
    start_n,  # index of the key block
    T,  # query length
    S,  # key length
    window,  # sliding window (ignored unless HAS_WINDOW)
    bounds_base,  # DocBounds + this batch (read only when HAS_DOCS)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Queries (lo, full_lo, full_hi, hi) that may see keys start_n * BLOCK_N + [0, BLOCK_N):
    [lo, hi), split so that query blocks starting in [full_lo, full_hi) see every key of the
    block. The three regions: the causal diagonal or the first key's document start, the fully
    visible middle, the window's trailing edge / the document end. Query rows past T need no
    mask: their lse is +inf, so their probabilities are 0."""
    first = start_n * BLOCK_N - (S - T)  # the first key, as a query index (query i sits at i + S - T)
    last = first + BLOCK_N - 1
    lo = 0
    full_lo = 0
    hi = T
    full_hi = T
    if CAUSAL:  # query i sees key j iff i >= j - (S - T)
        lo = (tl.maximum(first, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last, 0), BLOCK_M) * BLOCK_M
        if HAS_WINDOW:  # ... and i < j - (S - T) + window
            hi = tl.minimum(T, last + window)
            full_hi = (tl.maximum(first + window, 0) // BLOCK_M) * BLOCK_M
    if HAS_DOCS:
        key0 = start_n * BLOCK_N
        hi, lo, full_lo, full_hi = _doc_clip(hi, lo, full_lo, full_hi, bounds_base, S, key0,
                                             tl.minimum(key0 + BLOCK_N, S) - 1, S - T, BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------
# On the host: the document bounds the kernels read, and the tiles they visit
# ----------------------------------------------------------------------------------------------


def doc_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, S) int32 [start; end] of each position's document (its first position, one past its
    last) from (B, S) doc ids; along a row whose ids are not non-decreasing, start -1 and end S."""
    b, s = doc_ids.shape
    pos = torch.arange(s, device=doc_ids.device)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, S - 1): position p + 1 starts a document
    edge = torch.ones(b, 1, dtype=torch.bool, device=doc_ids.device)
    start = torch.where(torch.cat([edge, change], 1), pos, 0).cummax(1).values
    end = torch.where(torch.cat([change, edge], 1), pos + 1, s).flip(1).cummin(1).values.flip(1)
    monotone = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all(1, keepdim=True)
    return torch.stack([torch.where(monotone, start, -1), torch.where(monotone, end, s)], 1).to(torch.int32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _doc_clip_on_host(hi: int, lo: int, full_lo: int, full_hi: int, start: list[int], end: list[int], s: int,
                      first: int, last: int, shift: int, block: int) -> tuple[int, int, int, int]:
    """`_doc_clip` for one program, on the host: (hi, lo, full_lo, full_hi) narrowed to the documents
    of rows first..last."""
    hi = min(hi, max(end[last] - shift, 0))
    lo = max(lo, max(start[first] - shift, 0) // block * block)
    full_lo = max(full_lo, _cdiv(max(start[last] - shift, 0), block) * block) if start[last] >= 0 else hi
    if end[first] != s:
        full_hi = min(full_hi, max(end[first] - shift, 0) // block * block)
    return hi, lo, full_lo, full_hi


def block_ranges(kernel: str, t: int, s: int, causal: bool, window: int | None,
                 bounds: tuple[list[int], list[int]] | None, block_m: int, block_n: int,
                 ) -> list[tuple[int, int, int, int]]:
    """(lo, full_lo, full_hi, hi) of every program of `kernel` ("fwd", "dq": query blocks over keys;
    "dkdv": key blocks over queries) for one batch row; `bounds` is that row's ([start], [end])."""
    ranges = []
    for block in range(_cdiv(s, block_n) if kernel == "dkdv" else _cdiv(t, block_m)):
        if kernel == "dkdv":  # queries that may see keys block * block_n + [0, block_n)
            first, last = block * block_n - (s - t), block * block_n - (s - t) + block_n - 1
            lo, full_lo, hi, full_hi = 0, 0, t, t
            if causal:
                lo, full_lo = max(first, 0) // block_m * block_m, _cdiv(max(last, 0), block_m) * block_m
                if window is not None:
                    hi, full_hi = min(t, last + window), max(first + window, 0) // block_m * block_m
            rows, shift, step = (block * block_n, min(block * block_n + block_n, s) - 1), s - t, block_m
        else:  # keys that queries block * block_m + [0, block_m) may see
            first = block * block_m + s - t
            last = first + block_m - 1
            lo, full_lo, hi, full_hi = 0, 0, s, s // block_n * block_n
            if causal:
                hi, full_hi = min(s, last + 1), min(full_hi, (first + 1) // block_n * block_n)
                if window is not None:
                    lo = max(first - window + 1, 0) // block_n * block_n
                    full_lo = _cdiv(max(last - window + 1, 0), block_n) * block_n
            rows, shift, step = (first, min(last, s - 1)), 0, block_n
        if bounds is not None:
            hi, lo, full_lo, full_hi = _doc_clip_on_host(hi, lo, full_lo, full_hi, *bounds, s, *rows, shift, step)
        full_lo = min(max(full_lo, lo), hi)
        ranges.append((lo, full_lo, min(max(full_hi, full_lo), hi), hi))
    return ranges


def visited_blocks(kernel: str, t: int, s: int, causal: bool, window: int | None, doc_ids: torch.Tensor | None,
                   block_m: int, block_n: int) -> int:
    """Tiles (of BLOCK_M queries x BLOCK_N keys) that `kernel` ("fwd", "dq" or "dkdv") visits for
    query length t and key length s, summed over the batch rows of doc_ids (B, S) (one row
    without); multiply by the heads (query heads; k/v heads x group for dK/dV) for a call's count."""
    rows = [None] if doc_ids is None else [(b[0].tolist(), b[1].tolist()) for b in doc_bounds(doc_ids.cpu())]
    step = block_m if kernel == "dkdv" else block_n
    return sum(max(0, _cdiv(hi - lo, step)) for bounds in rows
               for lo, _, _, hi in block_ranges(kernel, t, s, causal, window, bounds, block_m, block_n))
