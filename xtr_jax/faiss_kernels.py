"""The FAISS backend's refinement kernel (`faiss_index`): rescore given candidates from FAISS's stored codes.

FAISS has no call that refines candidates it is handed, and `faiss_index` hands them over: its int8 / float32
refinement runs FAISS's coarse quantizer and `search_preassigned` itself (the adaptive probe marks lists to skip in
between) and rescores the candidates here. Two things make this faster than FAISS's `IndexRefine`: every candidate
is a random 128-byte row of a corpus-sized array, so the row `_PREFETCH_AHEAD` candidates ahead is requested early (a
prefetch hint: it changes no value) and those memory waits overlap; and each query token's candidates are ordered by
a radix sort of their scores (`_stable_order`) instead of a comparison sort. The whole search call, `IndexRefine`
against `FaissIndex.search`, one core, SciFact MiniLM tokens, 4,096 lists, 64 queries (README, Benchmarks: the
refinement-kernel row; `python benchmarks/faiss_search_parts.py --vs_index_refine`): 1.98 -> 1.84 ms/query at
k' = 100 with 15 lists and 1.5 k' int8 candidates, 9.65 -> 7.33 at k' = 1000 with 30 lists.
"""

from __future__ import annotations

from llvmlite import ir  # numba's own code generator (numba==0.68.1 pins it)
import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
import numpy as np

_PREFETCH_AHEAD = 16  # candidates; 4 to 32 measured alike (the kernel alone: 0.33 vs 0.48 ms/query without)


@intrinsic
def _prefetch_row(typingctx, arr, row):  # pylint: disable=unused-argument
  """Hints the CPU to load the first two cache lines of arr[row] (a 2-d C array: all of a 128-dim int8 row, the
  start of a float32 one); changes no value."""

  def codegen(context, builder, signature, args):
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], context.get_constant(types.intp, 0)])
    byte_ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr.type, i32, i32, i32]), "llvm.prefetch.p0")
    for line in (0, 64):  # read, keep in all cache levels, data cache
      builder.call(prefetch, [builder.gep(byte_ptr, [ir.Constant(ir.IntType(64), line)]), i32(0), i32(3), i32(1)])
    return context.get_dummy_value()

  return types.void(arr, types.intp), codegen


def _rescore(codes, cand, w, b, k):
  """Best k of each row's candidates rescored as w[i] . codes[t] + b[i].

  codes uint8 or float32 [T, D], cand int64 [N, C] (-1: none), w float32 [N, D], b float32 [N] (finite) -> (scores
  float32 [N, k], ids int64 [N, k]) best first, ties in candidate order, missing entries -inf / -1.
  """
  n, c = cand.shape
  d = w.shape[1]
  out_s = np.full((n, k), -np.inf, np.float32)
  out_i = np.full((n, k), -1, np.int64)
  for i in numba.prange(n):
    s = np.empty(c, np.float32)
    keys = np.empty(c, np.uint32)
    for j in range(c):
      ahead = cand[i, j + _PREFETCH_AHEAD] if j + _PREFETCH_AHEAD < c else -1
      if ahead >= 0:
        _prefetch_row(codes, ahead)
      t = cand[i, j]
      if t < 0:
        keys[j] = _LAST  # sorted after every score
        continue
      acc = np.float32(0.0)
      for e in range(d):
        acc += w[i, e] * np.float32(codes[t, e])
      s[j] = acc + b[i]
      keys[j] = _descending_key(s[j])
    order = _stable_order(keys)
    for j in range(min(k, c)):
      o = order[j]
      if cand[i, o] < 0:
        break
      out_s[i, j] = s[o]
      out_i[i, j] = cand[i, o]
  return out_s, out_i


_LAST = np.uint32(0xFFFFFFFF)  # larger than `_descending_key` of any float but NaN
_SIGN = np.uint32(0x80000000)


@numba.njit(cache=True)
def _descending_key(v):
  """A uint32 whose ascending order is float32 v's descending order (v not NaN; -0.0 and 0.0 alike)."""
  u = np.float32(v).view(np.uint32)
  if u == _SIGN:  # -0.0 -> 0.0, in integers: the fastmath kernels that inline this may drop a float `+ 0.0`
    u = np.uint32(0)
  ascending = (u ^ _LAST) if u & _SIGN else (u | _SIGN)  # sign-magnitude -> unsigned order
  return np.uint32(ascending ^ _LAST)


@numba.njit(cache=True)
def _stable_order(keys):
  """The stable ascending order of uint32 keys [C] (int64 [C]): an LSD radix sort, one byte per pass.

  Sorting the C = ceil(factor x k') candidates of each query token was most of the kernel's arithmetic with numba's
  merge-sort argsort: 8.3 vs 3.1 ms for 1,464 rows of C = 150 random scores (a batch of 64 SciFact queries' tokens),
  146 vs 24 ms at C = 1500, one core."""
  c = len(keys)
  order = np.arange(c)
  keys_out = np.empty(c, np.uint32)
  order_out = np.empty(c, np.int64)
  count = np.empty(256, np.int64)
  for shift in range(0, 32, 8):
    count[:] = 0
    for j in range(c):
      count[(keys[j] >> np.uint32(shift)) & np.uint32(255)] += 1
    if count.max() == c:  # one digit value: the pass would not move anything
      continue
    total = 0
    for digit in range(256):
      total, count[digit] = total + count[digit], total
    for j in range(c):
      digit = (keys[j] >> np.uint32(shift)) & np.uint32(255)
      keys_out[count[digit]] = keys[j]
      order_out[count[digit]] = order[j]
      count[digit] += 1
    keys, keys_out = keys_out, keys
    order, order_out = order_out, order
  return order


# fastmath: the dot products may be summed in any order (SIMD); scores then differ from FAISS's in the last bits.
rescore_serial = numba.njit(fastmath=True, cache=True)(_rescore)  # prange runs as range
# (not cached: numba's cache may not tell two compilations of one function apart by their flags)
rescore_parallel = numba.njit(parallel=True, fastmath=True)(_rescore)
