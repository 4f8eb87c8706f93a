//! A directory of `.safetensors` files (a Hugging Face checkpoint) as a source manifest.
//! Only headers are read here; tensor data stays on disk until a transfer needs it.

use std::collections::HashSet;
use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::Dtype;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
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
    #[error("duplicate tensor name `{tensor}` in the header of {}", path.display())]
    RepeatedTensor { tensor: String, path: PathBuf },
    /// A directory, FIFO, socket or device where a file is read: refused before anything
    /// waits on it (a FIFO blocks its reader until a writer comes).
    #[error("{} is a {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} holds no .safetensors files", dir.display())]
    NoFiles { dir: PathBuf },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Map(#[from] weightlift_cuda::MapError),
    #[error(transparent)]
    Read(Box<weightlift_cuda::ReadError>),
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
    /// Only regular files (or links to them) are read; anything else is refused by name.
    pub fn open(dir: &Path) -> Result<SafetensorsDir, SourceError> {
        SafetensorsDir::open_files(dir).map(|(dir, _)| dir)
    }

    /// As [`open`](SafetensorsDir::open), with each file as it was opened and checked, and its
    /// length then (parallel to `files`), so a caller maps the very files whose headers were read.
    pub(crate) fn open_files(dir: &Path) -> Result<(SafetensorsDir, Vec<(File, u64)>), SourceError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| SourceError::Io { path: dir.to_path_buf(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SourceError::NoFiles { dir: dir.to_path_buf() });
        }

        let mut opened = Vec::with_capacity(files.len());
        let mut specs = Vec::new();
        let mut locations = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (file_index, path) in files.iter().enumerate() {
            let (mut file, file_len) = open_regular(path)?;
            let (header_len, metadata) = read_header(path, &mut file, file_len)?;
            opened.push((file, file_len));
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
        let config = match read_text(&config_path) {
            Ok(text) => {
                let name = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
                let config = ModelConfig::from_hf_json(&name, &text)
                    .map_err(|e| SourceError::Config { path: config_path.clone(), reason: e.to_string() })?;
                Some(config)
            }
            Err(SourceError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let dir = SafetensorsDir { dir: dir.to_path_buf(), files, manifest, locations, config };
        Ok((dir, opened))
    }

    /// Each tensor's bytes on disk, parallel to `manifest`: its file, the byte offset in that
    /// file and the length; what a [`FileReader`](weightlift_cuda::FileReader) reads.
    pub fn tensor_ranges(&self) -> impl ExactSizeIterator<Item = (&Path, u64, u64)> + '_ {
        self.locations.iter().map(|loc| (self.files[loc.file].as_path(), loc.offset, loc.len))
    }
}

/// Opens `path` to read if it is a regular file (links are followed), with its length.
///
/// The path's type is checked before opening, so nothing else is ever opened (opening a device
/// can do things of its own; a socket cannot be opened at all), and again on the opened
/// descriptor, which is what is read, in case the name changed in between. The open is
/// non-blocking, so a FIFO swapped in does not wait for a writer; reads are blocking again
/// once the file is known to be regular.
fn open_regular(path: &Path) -> Result<(File, u64), SourceError> {
    let io_err = |source: io::Error| SourceError::Io { path: path.to_path_buf(), source };
    refuse_unless_regular(path, std::fs::metadata(path).map_err(io_err)?.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(io_err)?;
    let metadata = file.metadata().map_err(io_err)?;
    refuse_unless_regular(path, metadata.file_type())?;
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| io_err(e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK).map_err(|e| io_err(e.into()))?;
    Ok((file, metadata.len()))
}

/// A whole regular file as text (config.json and other small JSON files).
fn read_text(path: &Path) -> Result<String, SourceError> {
    let (mut file, _) = open_regular(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?;
    Ok(text)
}

fn refuse_unless_regular(path: &Path, file_type: FileType) -> Result<(), SourceError> {
    let kind = if file_type.is_file() {
        return Ok(());
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Err(SourceError::NotRegular { path: path.to_path_buf(), kind })
}

/// Reads and validates one file's header without reading its data: the header's offsets
/// must tile the data section, and the data section must end exactly at the end of the file.
fn read_header(path: &Path, file: &mut File, file_len: u64) -> Result<(u64, Metadata), SourceError> {
    let malformed = |reason: String| SourceError::Malformed { path: path.to_path_buf(), reason };
    let read_err = |source: io::Error| match source.kind() {
        io::ErrorKind::UnexpectedEof => malformed(format!("{file_len} bytes is too short for a header")),
        _ => SourceError::Io { path: path.to_path_buf(), source },
    };
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(read_err)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(malformed(format!("header length {header_len} does not fit in a {file_len}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(read_err)?;
    let bad = |e: serde_json::Error| malformed(format!("bad header: {e}"));
    // safetensors keeps the last of a repeated name and then reports "invalid offset".
    if let Some(tensor) = serde_json::from_slice::<RepeatedKey>(&header).map_err(bad)?.0 {
        return Err(SourceError::RepeatedTensor { tensor, path: path.to_path_buf() });
    }
    let metadata: Metadata = serde_json::from_slice(&header).map_err(bad)?;
    let expected = 8 + header_len + metadata.data_len() as u64;
    if expected != file_len {
        return Err(malformed(format!("the header describes {expected} bytes but the file has {file_len}")));
    }
    Ok((header_len, metadata))
}

/// The first tensor name a header's JSON object repeats, if any (its values are skipped).
struct RepeatedKey(Option<String>);

impl<'de> Deserialize<'de> for RepeatedKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RepeatedKey, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = RepeatedKey;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RepeatedKey, A::Error> {
                let mut seen = HashSet::new();
                let mut repeated = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    // `__metadata__` is free-form text, not a tensor.
                    if repeated.is_some() || key == "__metadata__" {
                        continue;
                    }
                    if seen.contains(&key) {
                        repeated = Some(key);
                    } else {
                        seen.insert(key);
                    }
                }
                Ok(RepeatedKey(repeated))
            }
        }
        deserializer.deserialize_map(Keys)
    }
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
    fn tensor_ranges_read_with_a_file_reader_match_the_mapped_tensors() {
        use crate::tensors::{CheckpointTensors, SourceTensors};
        use weightlift_cuda::{AlignedBuffer, FileReader, ReadMode};
        let dir = temp_dir("ranges");
        let specs = [
            TensorSpec::new("a.weight", DType::BF16, vec![1000, 3]),
            TensorSpec::new("b.weight", DType::F32, vec![5]),
            TensorSpec::new("c.weight", DType::U8, vec![4099]),
        ];
        let data: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(t, s)| (0..s.byte_len()).map(|i| (i as usize * 7 + t * 50) as u8).collect())
            .collect();
        let tensors: Vec<(&TensorSpec, &[u8])> = specs.iter().zip(data.iter().map(Vec::as_slice)).collect();
        write_file(&dir.join("model-00001.safetensors"), &tensors[..2]).unwrap();
        write_file(&dir.join("model-00002.safetensors"), &tensors[2..]).unwrap();
        let src = SafetensorsDir::open(&dir).unwrap();
        let mapped = CheckpointTensors::open(&dir).unwrap();
        assert_eq!(src.tensor_ranges().len(), src.manifest.len());
        for (index, (path, offset, len)) in src.tensor_ranges().enumerate() {
            assert_eq!(path, src.files[src.locations[index].file]);
            let reader = FileReader::open(path, ReadMode::Direct).unwrap();
            let mut buffer = AlignedBuffer::new(FileReader::span(offset, len as usize));
            let read = reader.read_range(offset, len as usize, &mut buffer).unwrap();
            assert_eq!(read, mapped.bytes(index), "{}", src.manifest.specs()[index].name);
            let name = &src.manifest.specs()[index].name;
            let expected = &data[specs.iter().position(|s| &s.name == name).unwrap()];
            assert_eq!(read, &expected[..], "{name}");
            // Both readers of the checkpoint read the very file mapped.
            for mode in [ReadMode::Direct, ReadMode::Buffered] {
                let (reader, at) = mapped.on_disk(index, mode).unwrap();
                let mut got = vec![0u8; len as usize];
                reader.read_at(at, &mut got).unwrap();
                assert_eq!(got, mapped.bytes(index), "{name}, {mode}");
            }
        }
        assert_eq!(mapped.on_disk(0, ReadMode::Buffered).unwrap().0.mode(), ReadMode::Buffered);
        // Each opening is a mapping of its own: a page-lock of one is not taken for another's.
        let again = CheckpointTensors::open(&dir).unwrap();
        assert!(mapped.mapping_id().is_some() && mapped.mapping_id() != again.mapping_id());
        let _ = std::fs::remove_dir_all(&dir);
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

    /// Opens `dir` on another thread, failing (not hanging) if that takes more than 10 s: a
    /// FIFO opened the blocking way waits for a writer. Such a FIFO is then opened for writing
    /// and closed, so the stuck reader returns.
    fn open_within_seconds(dir: &Path, fifo: Option<&Path>) -> Result<SafetensorsDir, SourceError> {
        let (done, result) = std::sync::mpsc::channel();
        let path = dir.to_path_buf();
        std::thread::spawn(move || drop(done.send(SafetensorsDir::open(&path))));
        let answer = result.recv_timeout(std::time::Duration::from_secs(10));
        if let (Err(_), Some(fifo)) = (&answer, fifo) {
            let _ = rustix::fs::open(fifo, OFlags::WRONLY | OFlags::NONBLOCK, rustix::fs::Mode::empty());
        }
        answer.unwrap_or_else(|_| panic!("opening {} did not return within 10 s", dir.display()))
    }

    #[test]
    fn only_regular_files_are_read_and_others_are_named() {
        let mkfifo = |path: &Path| rustix::fs::mkfifoat(rustix::fs::CWD, path, rustix::fs::Mode::RUSR).unwrap();
        let dir = temp_dir("fifo");
        let fifo = dir.join("model.safetensors");
        mkfifo(&fifo);
        let err = open_within_seconds(&dir, Some(&fifo)).unwrap_err();
        assert!(matches!(err, SourceError::NotRegular { kind: "FIFO", .. }), "{err}");
        assert_eq!(err.to_string(), format!("{} is a FIFO, not a regular file", fifo.display()));

        let dir = temp_dir("dir");
        std::fs::create_dir(dir.join("model.safetensors")).unwrap();
        let err = SafetensorsDir::open(&dir).unwrap_err().to_string();
        assert!(err.ends_with("model.safetensors is a directory, not a regular file"), "{err}");

        let dir = temp_dir("socket");
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("model.safetensors")).unwrap();
        let err = SafetensorsDir::open(&dir).unwrap_err().to_string();
        assert!(err.ends_with("model.safetensors is a socket, not a regular file"), "{err}");

        // A link to a regular file is read; a config.json that is a FIFO is refused too.
        let dir = temp_dir("linked");
        write_zeros(&dir.join("weights.bin"), &specs());
        std::os::unix::fs::symlink(dir.join("weights.bin"), dir.join("model.safetensors")).unwrap();
        assert_eq!(SafetensorsDir::open(&dir).unwrap().manifest.len(), 3);
        let config = dir.join("config.json");
        mkfifo(&config);
        let err = open_within_seconds(&dir, Some(&config)).unwrap_err().to_string();
        assert!(err.ends_with("config.json is a FIFO, not a regular file"), "{err}");
    }

    #[test]
    fn a_name_repeated_in_one_header_is_named() {
        let dir = temp_dir("repeated");
        let h = concat!(
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
            r#""w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        )
        .as_bytes();
        let path = dir.join("model.safetensors");
        std::fs::write(&path, [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 8]].concat()).unwrap();
        let err = SafetensorsDir::open(&dir).unwrap_err();
        assert!(matches!(&err, SourceError::RepeatedTensor { tensor, .. } if tensor == "w"), "{err}");
        assert_eq!(err.to_string(), format!("duplicate tensor name `w` in the header of {}", path.display()));
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
