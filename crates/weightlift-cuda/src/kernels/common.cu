typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

// Index of the item whose [start[i], start[i+1]) holds `x` (start has n+1 entries).
__device__ __forceinline__ u32 find(const u64* start, u32 n, u64 x) {
    u32 lo = 0, hi = n;
    while (hi - lo > 1) { u32 mid = (lo + hi) >> 1; if (start[mid] <= x) lo = mid; else hi = mid; }
    return lo;
}

// The same, searched forward from `hint` (x's item or one before it; start holds n + 1
// entries, start[n] > x): a thread's chunks only move forward, mostly within one run or a few
// runs on, so this is one or two loads where a search of the whole list is a dependent chain
// of log2(n) (12 for Qwen3-30B-A3B's 2,700 runs a wave), each an L2 round trip.
__device__ __forceinline__ u32 find_from(const u64* start, u32 n, u64 x, u32 hint) {
    if (hint >= n || start[hint] > x) return find(start, n, x);
    u32 lo = hint, hi = hint + 1, step = 1;
    while (start[hi] <= x) { lo = hi; step *= 2; hi = lo + step < n ? lo + step : n; }
    while (hi - lo > 1) { u32 mid = (lo + hi) >> 1; if (start[mid] <= x) lo = mid; else hi = mid; }
    return lo;
}
