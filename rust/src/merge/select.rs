//! Exact whole-tensor order statistics of |δ| without a copy of the tensor: a two-pass radix
//! selection over the f32 magnitude bits (pass 1: histogram of the top 15 bits; pass 2: histogram
//! of the low 16 bits inside the bucket that holds the wanted rank), plus, only when a threshold
//! value is shared by elements on both sides of the cut, a counting pass so that ties are broken
//! by element index (lower index first). Exactly the requested number of elements is kept.
//!
//! Elements are ranked by (|δ| descending, index ascending); NaN ranks above +inf. A [`Bound`]
//! answers "is this element's rank < R?".

/// Magnitude key: the f32 bits without the sign; orders like |x| for non-NaN values.
#[inline(always)]
pub fn key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

pub const HI_BINS: usize = 1 << 15;
pub const LO_BINS: usize = 1 << 16;

/// "rank < R" for one boundary R.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// R = 0: no element.
    Never,
    /// R = numel: every element.
    Always,
    /// Every element with key ≥ t (all elements equal to t fall inside).
    Ge(u32),
    /// key > t, plus the first `keep` elements (by index) equal to t. `prefix[c]` = elements
    /// equal to t in chunks before chunk c (nchunks + 1 entries).
    Tie { t: u32, keep: u64, prefix: Vec<u64> },
}

/// Where the wanted rank lies after pass 1.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub bucket: u32,
    /// Elements in higher buckets.
    pub above: u64,
    /// The boundary R.
    pub r: u64,
}

/// From the pass-1 histogram, the bucket holding rank r−1 (the last kept element).
pub fn locate_bucket(hist: &[u64], r: u64) -> Pending {
    debug_assert!(r >= 1);
    let mut above = 0u64;
    for b in (0..hist.len()).rev() {
        if above + hist[b] >= r {
            return Pending {
                bucket: b as u32,
                above,
                r,
            };
        }
        above += hist[b];
    }
    panic!("rank {r} beyond histogram total {above}");
}

/// Result of pass 2 for one boundary: the threshold key, how many elements equal to it are kept,
/// and how many there are.
#[derive(Debug, Clone, Copy)]
pub struct Threshold {
    pub t: u32,
    pub keep: u64,
    pub count_eq: u64,
}

pub fn locate_value(p: &Pending, lo_hist: &[u64]) -> Threshold {
    let mut above = p.above;
    for l in (0..lo_hist.len()).rev() {
        let c = lo_hist[l];
        if above + c >= p.r {
            return Threshold {
                t: (p.bucket << 16) | l as u32,
                keep: p.r - above,
                count_eq: c,
            };
        }
        above += c;
    }
    panic!("rank {} not found in bucket {}", p.r, p.bucket);
}

/// Evaluates a bound for one element; `counter` counts elements equal to t seen so far (only
/// meaningful for `Tie`, starting at `prefix[chunk]`).
#[inline(always)]
pub fn below(b: &Bound, k: u32, counter: &mut u64) -> bool {
    match b {
        Bound::Never => false,
        Bound::Always => true,
        Bound::Ge(t) => k >= *t,
        Bound::Tie { t, keep, .. } => {
            if k > *t {
                true
            } else if k == *t {
                let r = *counter < *keep;
                *counter += 1;
                r
            } else {
                false
            }
        }
    }
}

/// Keep δ whose rank is in [lo, hi): zero the rest of one chunk in place.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepRule {
    pub lo: Bound,
    pub hi: Bound,
}

impl KeepRule {
    pub fn all() -> KeepRule {
        KeepRule {
            lo: Bound::Never,
            hi: Bound::Always,
        }
    }

    #[inline(always)]
    pub fn apply(&self, chunk: usize, d: &mut [f32]) {
        if let (Bound::Never, Bound::Always) = (&self.lo, &self.hi) {
            return;
        }
        match (chunk_test(&self.lo, chunk), chunk_test(&self.hi, chunk)) {
            (Some(lo), Some(hi)) => {
                // keep iff key > hi_thr and not key > lo_thr, with thresholds shifted by one so
                // that "never" and "always" are plain comparisons too.
                for x in d.iter_mut() {
                    let k = key(*x) as u64 + 1;
                    let keep = (k > hi) & (k <= lo);
                    *x = if keep { *x } else { 0.0 };
                }
            }
            _ => {
                // The one chunk per boundary where ties are split: element by element.
                let start = |b: &Bound| match b {
                    Bound::Tie { prefix, .. } => prefix[chunk],
                    _ => 0,
                };
                let (mut clo, mut chi) = (start(&self.lo), start(&self.hi));
                for x in d.iter_mut() {
                    let k = key(*x);
                    let in_hi = below(&self.hi, k, &mut chi);
                    let in_lo = below(&self.lo, k, &mut clo);
                    if !in_hi || in_lo {
                        *x = 0.0;
                    }
                }
            }
        }
    }
}

/// For one chunk, "rank < R" as `key + 1 > thr` (None when ties are split inside this chunk).
fn chunk_test(b: &Bound, chunk: usize) -> Option<u64> {
    match b {
        Bound::Never => Some(u64::MAX),
        Bound::Always => Some(0),
        Bound::Ge(t) => Some(*t as u64),
        Bound::Tie { t, keep, prefix } => {
            let (before, after) = (prefix[chunk], prefix[chunk + 1]);
            if after <= *keep {
                Some(*t as u64) // every tie in this chunk is kept: key >= t
            } else if before >= *keep {
                Some(*t as u64 + 1) // none is: key > t
            } else {
                None
            }
        }
    }
}

/// Sorts `pairs`, each `key << 32 | index`, into ascending order: by key, equal keys by index.
/// `pairs` must hold the indices in ascending order on entry: an LSD radix sort over the key's four
/// bytes (stable, so equal keys keep that order; a byte on which every key agrees is skipped) then
/// gives exactly the order of a stable comparison sort on the key. `tmp` is scratch.
///
/// Each pass splits the array into `W` parts counted and scattered side by side (part w's
/// elements of a digit placed after those of parts < w, so the pass stays stable): magnitudes of
/// one row share most of their high and low bytes, and a single counter per digit would make
/// every element wait for the previous one's increment.
pub fn radix_sort_keyed(pairs: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    const W: usize = 4;
    let n = pairs.len();
    if n < 2 {
        return;
    }
    tmp.resize(n, 0);
    let (mut or, mut and, mut low_nz) = (0u32, u32::MAX, 0usize);
    for &p in pairs.iter() {
        let k = (p >> 32) as u32;
        or |= k;
        and &= k;
        low_nz += usize::from(k & 0xFFFF != 0);
    }
    let vary = or ^ and;
    // Few keys with nonzero low 16 bits (the magnitude of a difference of two bf16 values mostly
    // has none): the stable sort by the low 16 bits is then the keys whose low half is zero, in
    // order, followed by the others stably sorted by it, instead of two byte passes.
    let sparse_low = vary & 0xFFFF != 0 && low_nz * 8 <= n;
    if sparse_low {
        let (mut z, mut r) = (0usize, 0usize);
        for &p in pairs.iter() {
            let nz = (p >> 32) & 0xFFFF != 0;
            // zero low halves from the front, the others from the back (branch-free)
            tmp[z] = p;
            tmp[n - 1 - r] = p;
            z += usize::from(!nz);
            r += usize::from(nz);
        }
        let rest = &mut tmp[z..];
        rest.reverse();
        rest.sort_by_key(|&p| (p >> 32) as u16); // stable
        std::mem::swap(pairs, tmp);
    }
    // parts [w·q, (w+1)·q) for w < W−1, the last one to n
    let q = n / W;
    for b in 0..4 {
        if (vary >> (8 * b)) & 0xFF == 0 || (sparse_low && b < 2) {
            continue; // every key has the same byte b (or the low half is sorted already)
        }
        let shift = 32 + 8 * b;
        let digit = |p: u64| ((p >> shift) & 0xFF) as usize;
        let (src, dst) = (&pairs[..], &mut tmp[..]);
        let mut cnt = [[0u32; 256]; W];
        for i in 0..q {
            for (w, c) in cnt.iter_mut().enumerate() {
                c[digit(src[w * q + i])] += 1;
            }
        }
        for &p in &src[W * q..] {
            cnt[W - 1][digit(p)] += 1;
        }
        let mut off = [[0u32; 256]; W];
        let mut s = 0u32;
        for v in 0..256 {
            for w in 0..W {
                off[w][v] = s;
                s += cnt[w][v];
            }
        }
        for i in 0..q {
            for (w, o) in off.iter_mut().enumerate() {
                let p = src[w * q + i];
                let v = digit(p);
                dst[o[v] as usize] = p;
                o[v] += 1;
            }
        }
        for &p in &src[W * q..] {
            let v = digit(p);
            dst[off[W - 1][v] as usize] = p;
            off[W - 1][v] += 1;
        }
        std::mem::swap(pairs, tmp);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reference: indices kept when keeping ranks [lo, hi) by (|x| desc, index asc).
    pub fn reference_keep(x: &[f32], lo: usize, hi: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| key(x[b]).cmp(&key(x[a])).then(a.cmp(&b)));
        let mut keep = vec![false; x.len()];
        for &i in &idx[lo.min(x.len())..hi.min(x.len())] {
            keep[i] = true;
        }
        keep
    }

    /// Single-chunk version of the passes, to test the selection logic on its own.
    pub fn bound_for(x: &[f32], r: u64, chunks: &[std::ops::Range<usize>]) -> Bound {
        let n = x.len() as u64;
        if r == 0 {
            return Bound::Never;
        }
        if r >= n {
            return Bound::Always;
        }
        let mut h = vec![0u64; HI_BINS];
        for &v in x {
            h[(key(v) >> 16) as usize] += 1;
        }
        let p = locate_bucket(&h, r);
        let mut l = vec![0u64; LO_BINS];
        for &v in x {
            if key(v) >> 16 == p.bucket {
                l[(key(v) & 0xFFFF) as usize] += 1;
            }
        }
        let th = locate_value(&p, &l);
        if th.keep == th.count_eq {
            return Bound::Ge(th.t);
        }
        let mut prefix = Vec::new();
        let mut acc = 0;
        for c in chunks {
            prefix.push(acc);
            acc += x[c.clone()].iter().filter(|&&v| key(v) == th.t).count() as u64;
        }
        prefix.push(acc);
        Bound::Tie {
            t: th.t,
            keep: th.keep,
            prefix,
        }
    }

    #[test]
    fn radix_sort_keyed_matches_a_stable_sort_on_magnitude() {
        let mut st = 0x0123_4567_89AB_CDEF_u64;
        let mut next = move || {
            st = crate::merge::rng::mix64(st);
            st
        };
        for &n in &[0usize, 1, 2, 3, 17, 256, 1000, 4097] {
            for kind in 0..6 {
                let x: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = next();
                        match kind {
                            // few distinct magnitudes (ties), both signs, zeros of both signs
                            0 => ((r % 7) as f32 - 3.0) * 0.5,
                            1 => f32::from_bits(r as u32),
                            // bf16-exact values: the low 16 bits agree (skipped bytes)
                            2 => f32::from_bits((r as u32) & 0xFFFF_0000),
                            3 => 1.0,
                            // a few keys with nonzero low bits (1 in 16), on a coarse grid
                            5 => f32::from_bits(
                                ((r as u32) & 0x0F03_0000)
                                    | if r >> 60 == 0 {
                                        (r >> 32) as u32 & 0x0101
                                    } else {
                                        0
                                    },
                            ),
                            _ => [0.0, -0.0, f32::NAN, f32::INFINITY, -f32::INFINITY, 1e-40]
                                [(r % 6) as usize],
                        }
                    })
                    .collect();
                let mut want: Vec<u32> = (0..n as u32).collect();
                want.sort_by(|&p, &q| x[p as usize].abs().total_cmp(&x[q as usize].abs()));
                let mut pairs: Vec<u64> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (u64::from(key(v)) << 32) | i as u64)
                    .collect();
                let mut tmp = Vec::new();
                radix_sort_keyed(&mut pairs, &mut tmp);
                let got: Vec<u32> = pairs.iter().map(|&p| p as u32).collect();
                assert_eq!(got, want, "n={n} kind={kind}");
            }
        }
    }

    #[test]
    fn radix_selection_matches_sort() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = crate::merge::rng::mix64(seed.wrapping_add(1));
            seed
        };
        for trial in 0..40 {
            let n = 1 + (next() % 3000) as usize;
            // Mix of continuous values, many exact duplicates, zeros, negative zeros.
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    match r % 5 {
                        0 => 0.0,
                        1 => -0.0,
                        2 => ((r >> 8) % 7) as f32 * if r & 128 == 0 { 1.0 } else { -1.0 },
                        _ => {
                            f32::from_bits((r >> 32) as u32 & 0x3FFF_FFFF)
                                * if r & 64 == 0 { 1.0 } else { -1.0 }
                        }
                    }
                })
                .collect();
            let csz = 1 + (next() % 500) as usize;
            let chunks: Vec<_> = (0..n).step_by(csz).map(|a| a..(a + csz).min(n)).collect();
            for _ in 0..4 {
                let hi = (next() % (n as u64 + 1)) as usize;
                let lo = (next() % (hi as u64 + 1)) as usize;
                let rule = KeepRule {
                    lo: bound_for(&x, lo as u64, &chunks),
                    hi: bound_for(&x, hi as u64, &chunks),
                };
                let mut y = x.clone();
                for (ci, c) in chunks.iter().enumerate() {
                    rule.apply(ci, &mut y[c.clone()]);
                }
                let want = reference_keep(&x, lo, hi);
                let kept: usize = want.iter().filter(|&&k| k).count();
                assert_eq!(kept, hi - lo);
                for i in 0..n {
                    let expect = if want[i] { x[i] } else { 0.0 };
                    assert_eq!(
                        y[i].to_bits() & 0x7FFF_FFFF,
                        expect.to_bits() & 0x7FFF_FFFF,
                        "trial {trial} i {i} lo {lo} hi {hi}"
                    );
                }
            }
        }
    }
}
