//! Counter-based randomness for DARE: the keep decision of element `i` of source `s` of tensor
//! `name` is a pure function of (seed, name, s, i), so results do not depend on threads, chunk
//! sizes or order.

/// SplitMix64's output mix (Steele, Lea & Flood 2014).
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// FNV-1a over the name's bytes.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// MurmurHash3's 32-bit finaliser (a bijection with full avalanche).
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// A Bernoulli(p) stream keyed by (seed, tensor name, source index). Only 32-bit integer
/// operations per element, so the mask loop vectorises.
#[derive(Debug, Clone, Copy)]
pub struct KeepStream {
    k1: u32,
    k2: u32,
    k3: u32,
    /// keep iff the 32-bit hash is below this (p = 1 keeps all via `all`).
    threshold: u32,
    all: bool,
}

impl KeepStream {
    pub fn new(seed: u64, name: &str, source: usize, p: f64) -> KeepStream {
        let k1 = mix64(seed.wrapping_add(GOLDEN));
        let k2 = mix64(k1 ^ fnv1a(name));
        let key = mix64(k2 ^ (source as u64 + 1).wrapping_mul(GOLDEN));
        let p = p.clamp(0.0, 1.0);
        KeepStream {
            k1: key as u32,
            k2: (key >> 32) as u32,
            k3: mix64(key) as u32,
            threshold: (p * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            all: p >= 1.0,
        }
    }

    #[inline(always)]
    pub fn keep(&self, index: u64) -> bool {
        (self.draw(index) < self.threshold) | self.all
    }

    /// The stream's uniform 32-bit draw for element `index` (`keep` compares it with p·2^32).
    #[inline(always)]
    pub fn draw(&self, index: u64) -> u32 {
        self.draw_lo(index as u32, self.hi_word((index >> 32) as u32))
    }

    /// The part of `draw` that depends only on the index's high 32 bits (constant over runs of
    /// 2^32 elements, so loops over a chunk hoist it).
    #[inline(always)]
    pub fn hi_word(&self, hi: u32) -> u32 {
        self.k2 ^ hi.wrapping_mul(0x85EB_CA77)
    }

    /// `draw` of the element whose index has low word `lo` and whose high word gave `hw`.
    #[inline(always)]
    pub fn draw_lo(&self, lo: u32, hw: u32) -> u32 {
        let h = fmix32(lo.wrapping_mul(0x9E37_79B1) ^ self.k1);
        let h = fmix32(h ^ hw);
        fmix32(h ^ self.k3)
    }

    /// `keep` from the low word and `hi_word` (see `draw_lo`).
    #[inline(always)]
    pub fn keep_lo(&self, lo: u32, hw: u32) -> bool {
        (self.draw_lo(lo, hw) < self.threshold) | self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_close_to_p_and_keyed() {
        let s = KeepStream::new(0, "w", 0, 0.3);
        let n = 200_000u64;
        let kept = (0..n).filter(|&i| s.keep(i)).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        let a: Vec<bool> = (0..64).map(|i| s.keep(i)).collect();
        let b: Vec<bool> = (0..64)
            .map(|i| KeepStream::new(0, "w", 1, 0.3).keep(i))
            .collect();
        let c: Vec<bool> = (0..64)
            .map(|i| KeepStream::new(1, "w", 0, 0.3).keep(i))
            .collect();
        let d: Vec<bool> = (0..64)
            .map(|i| KeepStream::new(0, "v", 0, 0.3).keep(i))
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!((0..1000).all(|i| KeepStream::new(3, "x", 0, 1.0).keep(i)));
        assert!((0..1000).all(|i| !KeepStream::new(3, "x", 0, 0.0).keep(i)));
    }
}
