//! Element types of tensors, their sizes, their safetensors names, and the casts a plan may apply.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Element type of a tensor. Names follow safetensors (`BF16`, `F8_E4M3`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "F32")]
    F32,
    #[serde(rename = "BF16")]
    BF16,
    #[serde(rename = "F16")]
    F16,
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    #[serde(rename = "I64")]
    I64,
    #[serde(rename = "I32")]
    I32,
    #[serde(rename = "U8")]
    U8,
    #[serde(rename = "BOOL")]
    Bool,
}

impl DType {
    pub const ALL: [DType; 9] = [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    /// The safetensors spelling, also used in JSON and in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Whether a plan may convert `self` into `to` on the way. Only the conversions trainers need:
    /// f32 master weights into the engine's half-precision dtype (and back, for checkers).
    pub fn casts_to(self, to: DType) -> bool {
        self == to
            || matches!((self, to), (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown dtype name; carries the name that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}` (expected one of F32, BF16, F16, F8_E4M3, F8_E5M2, I64, I32, U8, BOOL)")]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;

    /// Accepts the safetensors names and the torch spellings (`bfloat16`, `float8_e4m3fn`, ...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let dtype = match lower.trim_start_matches("torch.") {
            "f32" | "float32" | "float" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "half" => DType::F16,
            "f8_e4m3" | "f8e4m3" | "float8_e4m3fn" | "e4m3" => DType::F8E4M3,
            "f8_e5m2" | "f8e5m2" | "float8_e5m2" | "e5m2" => DType::F8E5M2,
            "i64" | "int64" | "long" => DType::I64,
            "i32" | "int32" | "int" => DType::I32,
            "u8" | "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return Err(UnknownDType(s.to_string())),
        };
        Ok(dtype)
    }
}

/// A dtype conversion applied while copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cast {
    pub from: DType,
    pub to: DType,
}

/// Converts `elems` elements from `src` (dtype `cast.from`) into `dst` (dtype `cast.to`).
/// Rounding is round-to-nearest-even, as torch's `.to(torch.bfloat16)` does.
///
/// # Panics
/// If the slices are shorter than `elems` elements or the cast is not one `casts_to` allows;
/// plans are validated before execution, so either is a bug in the caller.
pub fn convert(cast: Cast, src: &[u8], dst: &mut [u8], elems: usize) {
    use half::{bf16, f16};
    let (from, to) = (cast.from, cast.to);
    let src = &src[..elems * from.size() as usize];
    let dst = &mut dst[..elems * to.size() as usize];
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let read_f32 = |i: usize| -> f32 {
        let b = &src[i * from.size() as usize..];
        match from {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            other => unreachable!("cast from {other} is not supported"),
        }
    };
    for i in 0..elems {
        let v = read_f32(i);
        let out = &mut dst[i * to.size() as usize..];
        match to {
            DType::F32 => out[..4].copy_from_slice(&v.to_le_bytes()),
            DType::BF16 => out[..2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::F16 => out[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
            other => unreachable!("cast to {other} is not supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_safetensors() {
        let sizes: Vec<u64> = DType::ALL.iter().map(|d| d.size()).collect();
        assert_eq!(sizes, vec![4, 2, 2, 1, 1, 8, 4, 1, 1]);
    }

    #[test]
    fn names_round_trip_through_parse_and_serde() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<DType>(&json).unwrap(), d);
        }
        assert_eq!("torch.bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("float8_e4m3fn".parse::<DType>().unwrap(), DType::F8E4M3);
        let err = "complex64".parse::<DType>().unwrap_err();
        assert!(err.to_string().contains("complex64"));
    }

    #[test]
    fn only_float_widening_and_narrowing_casts_are_allowed() {
        assert!(DType::F32.casts_to(DType::BF16));
        assert!(DType::BF16.casts_to(DType::F32));
        assert!(DType::I64.casts_to(DType::I64));
        assert!(!DType::I64.casts_to(DType::I32));
        assert!(!DType::BF16.casts_to(DType::F16));
        assert!(!DType::F32.casts_to(DType::F8E4M3));
    }

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1.0 and 1 + 2^-7): ties go to even, 1.0.
        // 1 + 3 * 2^-8 ties between 1 + 2^-7 and 1 + 2^-6: goes to the even mantissa, 1 + 2^-6.
        let values = [1.0f32 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5, 65504.0];
        let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut dst = vec![0u8; values.len() * 2];
        convert(Cast { from: DType::F32, to: DType::BF16 }, &src, &mut dst, values.len());
        let got: Vec<f32> = dst.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(got, vec![1.0, 1.0 + 2f32.powi(-6), -2.5, 65536.0]);
    }
}
