//! LoRA adapters and PEFT, both ways: `peft.PeftModel` loads an adapter we wrote and gives our
//! logits; we load an adapter peft wrote (`get_peft_model` + `save_pretrained`) and give its
//! logits; a merged checkpoint (`W + alpha/r * B @ A`) loads in plain transformers and gives
//! the adapted logits. All within 1e-4 relative (max |diff| / max |ref|), fp32 on the CPU.

mod common;

use std::path::Path;

use grpo_node::checkpoint::hf::COPIED_FILES;
use grpo_node::model::lora::{load_adapter, merge, save_adapter, LoraSpec, LoraTarget};
use grpo_node::model::safetensors_io::{load_params, read_file, write_model};
use grpo_node::model::{ModelSpec, ParamStore, Transformer};
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-4;

fn ids(vocab: i64) -> Vec<Vec<i64>> {
    (0..2)
        .map(|b| (0..12).map(|t| (b * 131 + t * 17 + 3) % vocab).collect())
        .collect()
}

/// transformers' logits for `ids` on the model in `model_dir`, with `adapter` through peft.
fn reference(model_dir: &Path, adapter: Option<&Path>, rows: &[Vec<i64>], scratch: &Path) -> Tensor {
    let ids_path = scratch.join("ids.json");
    std::fs::write(&ids_path, serde_json::json!({ "input_ids": rows }).to_string()).expect("ids");
    let out = scratch.join("ref.safetensors");
    let mut args = vec![
        "--model",
        model_dir.to_str().expect("utf8"),
        "--ids",
        ids_path.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().expect("utf8")]);
    }
    common::run_ref("ref_forward.py", &args);
    read_file(&out).expect("read").remove(0).1
}

fn ours(model: &Transformer, rows: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = rows.concat();
    tch::no_grad(|| model.forward(&Tensor::from_slice(&flat).view([rows.len() as i64, -1])))
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

fn lora(targets: &[LoraTarget], layers: Option<&[i64]>) -> LoraSpec {
    LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: targets.iter().copied().collect(),
        layers: layers.map(|l| l.iter().copied().collect()),
    }
}

/// Adapter tensors that change the model: PEFT's init, then B random.
fn trained(l: &LoraSpec, spec: &ModelSpec) -> Vec<(String, Tensor)> {
    l.init(spec, 3, Device::Cpu)
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with("lora_B.weight") {
                (n, Tensor::randn(t.size().as_slice(), (Kind::Float, Device::Cpu)) * 0.3)
            } else {
                (n, t)
            }
        })
        .collect()
}

fn adapted(spec: &ModelSpec, base: &ParamStore, l: &LoraSpec, tensors: &[(String, Tensor)]) -> Transformer {
    Transformer::new(spec, base)
        .expect("bind")
        .with_lora(l, tensors)
        .expect("adapter")
}

#[test]
fn peft_loads_our_adapter_and_gives_our_logits() {
    for (arch, extra, l) in [
        ("llama", &[][..], lora(&LoraTarget::ALL, None)),
        (
            "qwen3",
            &[][..],
            lora(&[LoraTarget::K, LoraTarget::O, LoraTarget::Up], Some(&[0])),
        ),
    ] {
        let dir = common::tiny_model(arch, extra);
        let spec = ModelSpec::from_dir(dir.path()).expect("spec");
        let base = load_params(&spec, dir.path(), Device::Cpu).expect("load");
        let tensors = trained(&l, &spec);
        let adapter = dir.path().join("adapter");
        save_adapter(&adapter, &l, &tensors, dir.path().to_str().expect("utf8")).expect("save");
        let rows = ids(spec.vocab_size);
        let theirs = reference(dir.path(), Some(&adapter), &rows, dir.path());
        let plain = reference(dir.path(), None, &rows, dir.path());
        let mine = ours(&adapted(&spec, &base, &l, &tensors), &rows);
        assert!(
            rel(&plain, &theirs) > 1e-2,
            "{arch}: the adapter must change the logits"
        );
        let r = rel(&mine, &theirs);
        assert!(r < REL_TOL, "{arch}: ours vs peft {r}");
        // And our reader takes back what we wrote.
        let (back, back_tensors) = load_adapter(&adapter, &spec).expect("reload");
        assert_eq!(back, l);
        let back: std::collections::BTreeMap<String, Tensor> = back_tensors.into_iter().collect();
        assert_eq!(back.len(), tensors.len());
        for (n, t) in &tensors {
            assert!(t.equal(&back[n]), "{n} differs after the round trip");
        }
    }
}

#[test]
fn we_load_a_peft_written_adapter_and_give_its_logits() {
    let dir = common::tiny_model("qwen2", &["--tie"]);
    let adapter = dir.path().join("peft_adapter");
    common::run_ref(
        "make_peft_adapter.py",
        &[
            "--model",
            dir.path().to_str().expect("utf8"),
            "--out",
            adapter.to_str().expect("utf8"),
            "--targets",
            "q_proj",
            "v_proj",
            "gate_proj",
            "down_proj",
            "--layers",
            "1",
        ],
    );
    let spec = ModelSpec::from_dir(dir.path()).expect("spec");
    let base = load_params(&spec, dir.path(), Device::Cpu).expect("load");
    let (l, tensors) = load_adapter(&adapter, &spec).expect("peft's adapter");
    assert_eq!(l.layers, Some([1].into_iter().collect()));
    assert_eq!(l.targets.len(), 4);
    let rows = ids(spec.vocab_size);
    let theirs = reference(dir.path(), Some(&adapter), &rows, dir.path());
    let r = rel(&ours(&adapted(&spec, &base, &l, &tensors), &rows), &theirs);
    assert!(r < REL_TOL, "ours vs peft {r}");
}

#[test]
fn a_merged_checkpoint_loads_in_transformers_and_gives_the_adapted_logits() {
    let dir = common::tiny_model("llama", &[]);
    let spec = ModelSpec::from_dir(dir.path()).expect("spec");
    let base = load_params(&spec, dir.path(), Device::Cpu).expect("load");
    let l = lora(&[LoraTarget::Q, LoraTarget::V, LoraTarget::Down], None);
    let tensors = trained(&l, &spec);
    let merged = merge(&base.snapshot(), &l, &spec, &tensors);
    let out = tempfile::tempdir().expect("dir");
    for f in COPIED_FILES {
        if dir.path().join(f).is_file() {
            std::fs::copy(dir.path().join(f), out.path().join(f)).expect("copy");
        }
    }
    write_model(out.path(), &merged, 1 << 30).expect("write merged");
    let rows = ids(spec.vocab_size);
    let theirs = reference(out.path(), None, &rows, out.path());
    let r = rel(&ours(&adapted(&spec, &base, &l, &tensors), &rows), &theirs);
    assert!(r < REL_TOL, "adapted vs merged in transformers {r}");
}
