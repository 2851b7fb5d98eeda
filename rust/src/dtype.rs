//! BF16 / F16 / F32 conversions, bit-identical to torch's `.to()` on CPU, and the FP8 E4M3 ("fn":
//! finite, no infinities, max 448) codec used by block-scaled checkpoints.
//!
//! - f32 → bf16: round to nearest, ties to even; NaN becomes 0xFFFF (what torch's vectorised CPU
//!   path produces for every NaN).
//! - f32 → f16: round to nearest, ties to even, subnormals and overflow to ±inf as IEEE; NaN keeps
//!   its sign and top payload bits, quieted (torch and F16C do the same). Via the `half` crate.
//! - Widening to f32 is exact.
//!
//! Inputs are byte slices that may be unaligned: values are assembled with `from_le_bytes`.

use half::f16;

use crate::safetensors::Dtype;

/// f32 → bf16 bits, round-to-nearest-even; every NaN → 0xFFFF (torch CPU).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        0xFFFF
    } else {
        let bias = 0x7FFF + ((b >> 16) & 1);
        (b.wrapping_add(bias) >> 16) as u16
    }
}

#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// FP8 E4M3FN bits → f32 (exact): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
/// is subnormal (m · 2⁻⁹); 0x7F / 0xFF are NaN; there are no infinities.
pub const fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    // 2^(e-7) built from bits (const-friendly): e-7+127 in the f32 exponent field.
    let v = if e == 0 {
        m * f32::from_bits((127 - 9) << 23)
    } else {
        (1.0 + m / 8.0) * f32::from_bits(((e - 7 + 127) as u32) << 23)
    };
    sign * v
}

const F8E4M3_LUT: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f8e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// The largest finite E4M3FN value.
pub const F8E4M3_MAX: f32 = 448.0;

/// f32 → FP8 E4M3FN bits, round to nearest, ties to even; magnitudes beyond 448 saturate to
/// ±448 (block quantisation scales so that they do not occur); NaN → 0x7F.
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= F8E4M3_MAX {
        return sign | 0x7E;
    }
    let bits = a.to_bits();
    let e = ((bits >> 23) & 0xFF) as i32 - 127;
    if e < -6 {
        // Subnormal range: multiples of 2^-9, rounded to nearest even (8 becomes the smallest
        // normal, 0x08, which is the right encoding too).
        let q = a * 512.0; // exact: a power-of-two scaling
        let f = q.floor();
        let r = q - f;
        let mut m = f as u32;
        if r > 0.5 || (r == 0.5 && m & 1 == 1) {
            m += 1;
        }
        return sign | m as u8;
    }
    let mant = bits & 0x7F_FFFF;
    let mut q = mant >> 20;
    let rem = mant & 0xF_FFFF;
    let half = 0x8_0000;
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    let mut ef = e + 7;
    if q == 8 {
        q = 0;
        ef += 1;
    }
    if ef > 15 || (ef == 15 && q == 7) {
        return sign | 0x7E;
    }
    sign | ((ef as u8) << 3) | q as u8
}

/// Whether the arithmetic path supports this dtype (as input or output).
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Runs `$body` compiled for AVX2 when the CPU has it (same results: no FMA contraction, same
/// IEEE operations, only wider vectors), else for the baseline target.
macro_rules! avx2_dispatch {
    ($generic:ident, $avx2:ident, ($($arg:ident : $ty:ty),*)) => {
        crate::dtype::avx2_dispatch!($generic, $avx2, ($($arg: $ty),*) -> ())
    };
    ($generic:ident, $avx2:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { $avx2($($arg),*) };
        }
        $generic($($arg),*)
    }};
}
pub(crate) use avx2_dispatch;

/// Converts little-endian `src` bytes of `dtype` into `out` (len = element count).
pub fn load_f32(dtype: Dtype, src: &[u8], out: &mut [f32]) {
    avx2_dispatch!(load_f32_generic, load_f32_avx2, (dtype: Dtype, src: &[u8], out: &mut [f32]));
}

/// Converts `src` into little-endian bytes of `dtype` in `dst` (len = count × size).
pub fn store_f32(dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    avx2_dispatch!(store_f32_generic, store_f32_avx2, (dtype: Dtype, src: &[f32], dst: &mut [u8]));
}

#[inline(always)]
fn load_f32_generic(dtype: Dtype, src: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            debug_assert_eq!(src.len(), out.len() * 2);
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Dtype::F16 => {
            debug_assert_eq!(src.len(), out.len() * 2);
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Dtype::F32 => {
            debug_assert_eq!(src.len(), out.len() * 4);
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F8_E4M3 => {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = F8E4M3_LUT[b as usize];
            }
        }
        other => panic!("load_f32: unsupported dtype {other}"),
    }
}

#[inline(always)]
fn store_f32_generic(dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    match dtype {
        Dtype::BF16 => {
            debug_assert_eq!(dst.len(), src.len() * 2);
            for (c, &x) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
            }
        }
        Dtype::F16 => {
            debug_assert_eq!(dst.len(), src.len() * 2);
            for (c, &x) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_f16(x).to_le_bytes());
            }
        }
        Dtype::F32 => {
            debug_assert_eq!(dst.len(), src.len() * 4);
            for (c, &x) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        other => panic!("store_f32: unsupported dtype {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(bits: u32) -> f32 {
        f32::from_bits(bits)
    }

    #[test]
    fn bf16_round_to_nearest_even() {
        // Exact.
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // Just below halfway rounds down, just above rounds up.
        assert_eq!(f32_to_bf16(f(0x3F80_7FFF)), 0x3F80);
        assert_eq!(f32_to_bf16(f(0x3F80_8001)), 0x3F81);
        // Ties: to even.
        assert_eq!(f32_to_bf16(f(0x3F80_8000)), 0x3F80); // 0x3F80 is even
        assert_eq!(f32_to_bf16(f(0x3F81_8000)), 0x3F82); // 0x3F81 odd → up
                                                         // Negative.
        assert_eq!(f32_to_bf16(f(0xBF81_8000)), 0xBF82);
        // Zeros.
        assert_eq!(f32_to_bf16(0.0), 0x0000);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        // Subnormals round like everything else.
        assert_eq!(f32_to_bf16(f(0x0000_8000)), 0x0000); // tie → even 0
        assert_eq!(f32_to_bf16(f(0x0001_8000)), 0x0002);
        assert_eq!(f32_to_bf16(f(0x0000_8001)), 0x0001);
        // Overflow to inf, inf stays inf.
        assert_eq!(f32_to_bf16(f(0x7F7F_FFFF)), 0x7F80);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xFF80);
        // NaN stays NaN (torch CPU writes 0xFFFF), including payloads that would round to inf.
        assert_eq!(f32_to_bf16(f32::NAN), 0xFFFF);
        assert_eq!(f32_to_bf16(f(0x7F80_0001)), 0xFFFF);
        assert!(bf16_to_f32(f32_to_bf16(f(0xFF81_2345))).is_nan());
    }

    #[test]
    fn f16_round_to_nearest_even() {
        assert_eq!(f32_to_f16(1.0), 0x3C00);
        // 1 + 2^-11 is halfway between 1 and 1+2^-10: tie → even (1.0).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        // 1 + 3·2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9: → up.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        assert_eq!(f32_to_f16(65504.0), 0x7BFF);
        assert_eq!(f32_to_f16(65520.0), 0x7C00); // rounds to inf
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000); // tie → even 0
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002); // tie between 1 and 2 → 2
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        // NaN: quieted, sign and top payload kept (torch: 0x7f812345 → 0x7e09).
        assert_eq!(f32_to_f16(f(0x7F81_2345)), 0x7E09);
        assert_eq!(f32_to_f16(f(0xFFC0_0000)), 0xFE00);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }

    #[test]
    fn f8e4m3_codec() {
        // Every code decodes; every finite code encodes back to itself (−0 included).
        for b in 0..=255u8 {
            let v = f8e4m3_to_f32(b);
            if b & 0x7F == 0x7F {
                assert!(v.is_nan());
                continue;
            }
            assert_eq!(f32_to_f8e4m3(v), b, "code {b:#x} = {v}");
        }
        assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        // Round to nearest even between neighbours: 1.0 and 1.125 (tie → 1.0, even mantissa),
        // 1.125 and 1.25 (tie → 1.25).
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        assert_eq!(f32_to_f8e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_f8e4m3(1.07), 0x39);
        // Subnormal ties and the subnormal/normal boundary.
        assert_eq!(f32_to_f8e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_f8e4m3(3.0 * 2f32.powi(-10)), 0x02);
        assert_eq!(f32_to_f8e4m3(7.5 * 2f32.powi(-9)), 0x08);
        // Saturation and NaN.
        assert_eq!(f32_to_f8e4m3(1e9), 0x7E);
        assert_eq!(f32_to_f8e4m3(-460.0), 0xFE);
        assert_eq!(f32_to_f8e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_f8e4m3(f32::NAN), 0x7F);
        // Nearest: every f32 in a sweep maps to a code no farther than any other code.
        let finite: Vec<f32> = (0..=255u8)
            .map(f8e4m3_to_f32)
            .filter(|v| v.is_finite())
            .collect();
        let mut x = -447.0f32;
        while x < 447.0 {
            let got = f8e4m3_to_f32(f32_to_f8e4m3(x));
            let best = finite
                .iter()
                .map(|v| (v - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((got - x).abs() <= best, "{x}: {got}");
            x += 0.37;
        }
    }

    #[test]
    fn unaligned_load_store_roundtrip() {
        let vals = [1.5f32, -2.25, 0.0, 0.375];
        let mut buf = [0u8; 1 + 16];
        store_f32(Dtype::F32, &vals, &mut buf[1..]);
        let mut out = [0f32; 4];
        load_f32(Dtype::F32, &buf[1..], &mut out);
        assert_eq!(out, vals);
        let mut b16 = [0u8; 1 + 8];
        store_f32(Dtype::BF16, &vals, &mut b16[1..]);
        load_f32(Dtype::BF16, &b16[1..], &mut out);
        assert_eq!(out, vals);
        store_f32(Dtype::F16, &vals[..3], &mut b16[1..7]);
        load_f32(Dtype::F16, &b16[1..7], &mut out[..3]);
        assert_eq!(&out[..3], &vals[..3]);
    }
}
