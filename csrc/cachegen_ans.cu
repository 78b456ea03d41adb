// CacheGen serde: decode all ANS-coded symbol tables of one chunk at once, one thread a table.
//
// Bit-exact with constriction's DefaultAnsCoder (64-bit state, 32-bit words, 24-bit
// probabilities): the encoder is constriction on the CPU (lmcache/serde/cachegen.py). The
// compressed words of a table are a stack: the state is popped from the end (top word high,
// next word low), then each step takes quantile = state mod 2^24, finds the symbol s with
// cdf[s] <= quantile < cdf[s+1], sets state = (state >> 24) * (cdf[s+1] - cdf[s]) +
// quantile - cdf[s], and refills from the stack when state < 2^32.
//
// out: int16 [K, L, T, D]; table t writes tokens x width values starting at out_base[t] (row
// stride dim): the symbol index plus add[t] (lo - C for raw tables, lo - 2C for token deltas;
// the caller takes the cumulative sum of delta tables over tokens).

extern "C" __global__ void cachegen_ans_decode(
    const unsigned int* __restrict__ words, const long long* __restrict__ word_off,
    const unsigned int* __restrict__ nwords, const int* __restrict__ cdf,
    const long long* __restrict__ cdf_off, const int* __restrict__ nsym,
    const int* __restrict__ add, const int* __restrict__ width,
    const long long* __restrict__ out_base, short* __restrict__ out,
    int ntables, int tokens, int dim)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= ntables) return;
    const unsigned int* w = words + word_off[t];
    int pos = (int)nwords[t];
    unsigned long long state = 0;
    if (pos > 0) {
        state = w[--pos];
        if (pos > 0) state = (state << 32) | w[--pos];
    }
    const int* c = cdf + cdf_off[t];
    const int n = nsym[t];
    const int a = add[t];
    const int wd = width[t];
    short* o = out + out_base[t];
    for (int tok = 0; tok < tokens; ++tok) {
        for (int ch = 0; ch < wd; ++ch) {
            const unsigned int q = (unsigned int)(state & 0xFFFFFFull);
            int lo = 0, hi = n;  // c[0] = 0 <= q < c[n] = 2^24
            while (hi - lo > 1) {
                const int mid = (lo + hi) >> 1;
                if ((unsigned int)c[mid] <= q) lo = mid; else hi = mid;
            }
            const unsigned int left = (unsigned int)c[lo];
            const unsigned int prob = (unsigned int)c[lo + 1] - left;
            state = (state >> 24) * prob + (q - left);
            if (state < (1ull << 32) && pos > 0) state = (state << 32) | w[--pos];
            o[(long long)tok * dim + ch] = (short)(lo + a);
        }
    }
}
