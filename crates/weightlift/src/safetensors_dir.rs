//! A directory of `.safetensors` files (a Hugging Face checkpoint) as a source manifest.
//! Only headers are read here; tensor data stays on disk until a transfer needs it.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::Dtype;
use weightlift_core::{DType, Manifest, ManifestError, ModelConfig, TensorSpec};

/// safetensors' own bound on header size; a larger length prefix is garbage, not a header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: tensor `{tensor}` has dtype {dtype}, which weightlift does not move", path.display())]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("tensor `{tensor}` appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor { tensor: String, first: PathBuf, second: PathBuf },
    #[error("{} holds no .safetensors files", dir.display())]
    NoFiles { dir: PathBuf },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Where one tensor's bytes are: file and byte range within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// The tensors of a checkpoint directory, from headers alone.
#[derive(Debug, Clone)]
pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub manifest: Manifest,
    /// Parallel to `manifest`: where each tensor's bytes are.
    pub locations: Vec<TensorLocation>,
    /// The model's config.json, when the directory has one.
    pub config: Option<ModelConfig>,
}

impl SafetensorsDir {
    /// Reads the headers of every `*.safetensors` file in `dir` (sorted by name) and its
    /// `config.json` if present. Every tensor is listed in file order, then offset order.
    pub fn open(dir: &Path) -> Result<SafetensorsDir, SourceError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SourceError::Io { path, source }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SourceError::NoFiles { dir: dir.to_path_buf() });
        }

        let mut specs = Vec::new();
        let mut locations = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (file_index, path) in files.iter().enumerate() {
            let (header_len, metadata) = read_header(path)?;
            for name in metadata.offset_keys() {
                let info: &TensorInfo = metadata.info(&name).expect("offset_keys lists known names");
                if let Some(&first) = seen.get(&name) {
                    return Err(SourceError::DuplicateTensor {
                        tensor: name,
                        first: files[first].clone(),
                        second: path.clone(),
                    });
                }
                let dtype = dtype_of(info.dtype).ok_or_else(|| SourceError::UnsupportedDtype {
                    path: path.clone(),
                    tensor: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                })?;
                let (start, end) = info.data_offsets;
                locations.push(TensorLocation {
                    file: file_index,
                    offset: 8 + header_len + start as u64,
                    len: (end - start) as u64,
                });
                seen.insert(name.clone(), file_index);
                specs.push(TensorSpec::new(name, dtype, info.shape.iter().map(|&d| d as u64).collect::<Vec<_>>()));
            }
        }
        let manifest = Manifest::new(specs)?;

        let config_path = dir.join("config.json");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                let name = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
                let config = ModelConfig::from_hf_json(&name, &text)
                    .map_err(|e| SourceError::Config { path: config_path.clone(), reason: e.to_string() })?;
                Some(config)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(SourceError::Io { path: config_path, source }),
        };
        Ok(SafetensorsDir { dir: dir.to_path_buf(), files, manifest, locations, config })
    }
}

/// Reads and validates one file's header without reading its data: the header's offsets
/// must tile the data section, and the data section must end exactly at the end of the file.
fn read_header(path: &Path) -> Result<(u64, Metadata), SourceError> {
    let malformed = |reason: String| SourceError::Malformed { path: path.to_path_buf(), reason };
    let io_err = |source| SourceError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| malformed(format!("{file_len} bytes is too short for a header")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(malformed(format!("header length {header_len} does not fit in a {file_len}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err)?;
    let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| malformed(format!("bad header: {e}")))?;
    let expected = 8 + header_len + metadata.data_len() as u64;
    if expected != file_len {
        return Err(malformed(format!("the header describes {expected} bytes but the file has {file_len}")));
    }
    Ok((header_len, metadata))
}

/// Writes tensors (spec and bytes each) as one safetensors file.
pub fn write_file(path: &Path, tensors: &[(&TensorSpec, &[u8])]) -> Result<(), SourceError> {
    let views = tensors
        .iter()
        .map(|(spec, data)| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            TensorView::new(safetensors_dtype(spec.dtype), shape, data).map(|view| (spec.name.clone(), view)).map_err(
                |e| SourceError::Malformed { path: path.to_path_buf(), reason: format!("`{}`: {e}", spec.name) },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| SourceError::Malformed { path: path.to_path_buf(), reason: e.to_string() })
}

fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::F8E5M2 => Dtype::F8_E5M2,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

fn dtype_of(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::F8_E5M2 => DType::F8E5M2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory under the system temp dir, unique to this test.
    pub fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weightlift-test-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes `specs` as one zero-filled safetensors file.
    pub fn write_zeros(path: &Path, specs: &[TensorSpec]) {
        let data: Vec<Vec<u8>> = specs.iter().map(|s| vec![0u8; s.byte_len() as usize]).collect();
        let tensors: Vec<(&TensorSpec, &[u8])> = specs.iter().zip(data.iter().map(Vec::as_slice)).collect();
        write_file(path, &tensors).unwrap();
    }

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("b.weight", DType::BF16, vec![4, 2]),
            TensorSpec::new("a.weight", DType::F32, vec![3]),
            TensorSpec::new("c.weight", DType::I64, vec![]),
        ]
    }

    #[test]
    fn reads_every_file_header_in_order() {
        let dir = temp_dir("ok");
        write_zeros(&dir.join("model-00002.safetensors"), &specs()[2..]);
        write_zeros(&dir.join("model-00001.safetensors"), &specs()[..2]);
        std::fs::write(dir.join("README.md"), "not a tensor file").unwrap();
        let src = SafetensorsDir::open(&dir).unwrap();
        assert_eq!(src.files.len(), 2);
        assert_eq!(src.manifest.len(), 3);
        // File 1 first; within it, offset order (which safetensors sorts by dtype alignment).
        assert_eq!(src.manifest.specs()[2].name, "c.weight");
        for (spec, loc) in src.manifest.iter().zip(&src.locations) {
            assert_eq!(loc.len, spec.byte_len(), "{}", spec.name);
        }
        assert!(src.config.is_none());
    }

    #[test]
    fn malformed_files_are_named_errors() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short", vec![1, 2, 3]),
            ("huge-length", u64::MAX.to_le_bytes().to_vec()),
            ("garbage-json", [8u64.to_le_bytes().to_vec(), b"{not json".to_vec()].concat()),
            ("bad-offsets", {
                let h = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
                [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 4]].concat()
            }),
            ("truncated", {
                let h = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 5]].concat()
            }),
        ];
        for (label, bytes) in cases {
            let dir = temp_dir(label);
            let path = dir.join("model.safetensors");
            std::fs::write(&path, bytes).unwrap();
            let err = SafetensorsDir::open(&dir).unwrap_err();
            assert!(matches!(err, SourceError::Malformed { .. }), "{label}: {err}");
            assert!(err.to_string().contains("model.safetensors"), "{label}: {err}");
        }
    }

    #[test]
    fn duplicate_tensors_unsupported_dtypes_and_empty_dirs_are_errors() {
        let dir = temp_dir("dup");
        write_zeros(&dir.join("a.safetensors"), &specs()[..1]);
        write_zeros(&dir.join("b.safetensors"), &specs()[..1]);
        let err = SafetensorsDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("`b.weight`") && err.contains("a.safetensors") && err.contains("b.safetensors"), "{err}");

        let dir = temp_dir("f64");
        let h = br#"{"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#;
        std::fs::write(
            dir.join("m.safetensors"),
            [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 8]].concat(),
        )
        .unwrap();
        let err = SafetensorsDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("`d`") && err.contains("F64"), "{err}");

        let dir = temp_dir("empty");
        assert!(matches!(SafetensorsDir::open(&dir).unwrap_err(), SourceError::NoFiles { .. }));
        assert!(matches!(SafetensorsDir::open(&dir.join("absent")).unwrap_err(), SourceError::Io { .. }));
    }

    #[test]
    fn config_json_is_read_and_bad_ones_are_named() {
        let dir = temp_dir("config");
        write_zeros(&dir.join("m.safetensors"), &specs());
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 256}"#,
        )
        .unwrap();
        assert_eq!(SafetensorsDir::open(&dir).unwrap().config.unwrap().head_dim, 16);
        std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen3"}"#).unwrap();
        let err = SafetensorsDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
    }
}
