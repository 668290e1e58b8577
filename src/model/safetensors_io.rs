//! Reading and writing safetensors: single files, HF sharded directories
//! (`model.safetensors.index.json`), and named tensor sets for training state.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use super::config::ModelSpec;
use super::params::{expected_shapes, ParamStore};
use super::ModelError;

/// Name of the single-file weights of an HF directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of an HF directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn st_err(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Reads every tensor of one safetensors file onto the CPU, in its stored dtype.
pub fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    parse(path, &bytes)
}

/// The tensors of a safetensors file held in memory (a file sent over the wire).
pub fn read_bytes(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, ModelError> {
    parse(Path::new("<bytes>"), bytes)
}

/// The safetensors bytes of `tensors` (what [`write_file`] writes).
pub fn to_file_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, ModelError> {
    let path = Path::new("<bytes>");
    let owned = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), to_bytes(name, t, path)?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(owned.iter().map(|(n, b)| (n.as_str(), b)), Some(metadata))
        .map_err(|e| st_err(path, e))
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(path, e))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| st_err(path, format!("{name}: dtype {:?} unsupported", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// The weight files of an HF model directory: the shards named by the index, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| st_err(&index, e))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| st_err(&index, "no weight_map"))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        // A shard is a file of this directory: no separators, no `..`, nothing absolute.
        if let Some(bad) = files
            .iter()
            .find(|f| f.is_empty() || f.contains(['/', '\\']) || f.as_str() == ".." || f.as_str() == ".")
        {
            return Err(st_err(
                &index,
                format!("shard name {bad:?} is not a file name of this directory"),
            ));
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights(dir.to_path_buf()))
}

/// Loads the weights of an HF directory as fp32 parameters on `device`, checking every name
/// and shape the config implies. Extra tensors (e.g. a tied `lm_head.weight`) are ignored.
pub fn load_params(spec: &ModelSpec, dir: &Path, device: Device) -> Result<ParamStore, ModelError> {
    let mut found: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(dir)? {
        for (name, tensor) in read_file(&file)? {
            found.insert(name, tensor);
        }
    }
    let mut tensors = BTreeMap::new();
    for (name, shape) in expected_shapes(spec) {
        let tensor = found.remove(&name).ok_or_else(|| ModelError::MissingWeight {
            name: name.clone(),
            shape: shape.clone(),
        })?;
        if tensor.size() != shape {
            return Err(ModelError::ShapeMismatch {
                name,
                found: tensor.size(),
                expected: shape,
            });
        }
        tensors.insert(name, tensor.to_kind(Kind::Float).to_device(device));
    }
    // A tied model's file may still carry lm_head.weight; rotary buffers are recomputed.
    let ignored: Vec<_> = found
        .keys()
        .filter(|n| !n.ends_with("rotary_emb.inv_freq") && n.as_str() != "lm_head.weight")
        .collect();
    if !ignored.is_empty() {
        tracing::warn!(count = ignored.len(), first = %ignored[0], "ignoring tensors the model does not use");
    }
    Ok(ParamStore::from_tensors(tensors))
}

/// A CPU tensor's bytes in safetensors form.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(name: &str, tensor: &Tensor, path: &Path) -> Result<Bytes, ModelError> {
    let t = tensor.detach().to_device(Device::Cpu).contiguous();
    let dtype = dtype_of(t.kind()).ok_or_else(|| st_err(path, format!("{name}: kind {:?} unsupported", t.kind())))?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(Bytes {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// Writes named tensors to one safetensors file with `{"format": "pt"}` metadata.
pub fn write_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let owned = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), to_bytes(name, t, path)?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(owned.iter().map(|(n, b)| (n.as_str(), b)), Some(metadata), path)
        .map_err(|e| st_err(path, e))
}

/// Writes model weights into `dir` as HF does: one `model.safetensors`, or shards of at most
/// `max_shard_bytes` plus `model.safetensors.index.json`.
pub fn write_model(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: u64) -> Result<(), ModelError> {
    let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let bytes = size(t);
        if current > 0 && current + bytes > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name.clone(), t.shallow_clone()));
        }
    }
    if shards.len() == 1 {
        return write_file(&dir.join(SINGLE_FILE), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_file(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let total: u64 = tensors.iter().map(|(_, t)| size(t)).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|e| st_err(&path, e))?;
    std::fs::write(&path, text).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_may_name_only_files_of_its_directory() {
        for bad in ["../secret.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""] {
            let dir = tempfile::tempdir().expect("tempdir");
            let index = serde_json::json!({"weight_map": {"a": bad}});
            std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).expect("index");
            let err = weight_files(dir.path()).expect_err(bad);
            assert!(err.to_string().contains("not a file name"), "{bad}: {err}");
        }
    }

    #[test]
    fn round_trip_single_and_sharded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tensors: Vec<(String, Tensor)> = (0..4)
            .map(|i| (format!("t{i}"), Tensor::randn([8, 4], (Kind::Float, Device::Cpu))))
            .collect();
        write_model(dir.path(), &tensors, 1 << 30).expect("single");
        assert_eq!(weight_files(dir.path()).expect("files").len(), 1);
        let sharded = tempfile::tempdir().expect("tempdir");
        write_model(sharded.path(), &tensors, 200).expect("sharded");
        let files = weight_files(sharded.path()).expect("files");
        assert_eq!(files.len(), 4, "each 128-byte tensor in its own shard");
        let mut back: Vec<(String, Tensor)> = files.iter().flat_map(|f| read_file(f).expect("read")).collect();
        back.sort_by(|a, b| a.0.cmp(&b.0));
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1} differs after the round trip");
        }
    }
}
