//! CI's share of `grpo-node bench fuzz`: a short seeded slice of every target (no panics, no
//! violated invariant), and hand-written hostile inputs per target that must be refused with a
//! clear error (not a panic, and not accepted).

use std::time::Duration;

use grpo_node::engine::protocol::GenerateLimits;
use grpo_node::fuzz::batch::{learner_path, BatchCase, BodyOutcome};
use grpo_node::fuzz::config::{resolve_text, ConfigRefusal, ConfigTarget};
use grpo_node::fuzz::generate::{server_path, GenerateCase, GenerateRefusal};
use grpo_node::fuzz::plan::{manifest, receiver_path, PlanCase, PlanInput, PlanRefusal};
use grpo_node::fuzz::{make_target, run_target, Report, TargetName};
use grpo_node::grpo::pack::Packing;
use grpo_node::grpo::{Limits, RejectReason};
use grpo_node::rpc::pb;
use grpo_node::sync::plan::{check_against, check_plan, unpack, PlanError};

/// The CI slice: this many cases of this seed per target.
const SEED: u64 = 0x5EED_F022;
const CASES: u64 = 3_000;

fn slice(name: TargetName) -> Report {
    let mut target = make_target(name).expect("target");
    run_target(target.as_mut(), SEED, CASES, Some(Duration::from_secs(120)))
}

/// No panic anywhere, and no violation except the `tolerated` checks (known, reported bugs).
fn assert_clean(report: &Report, tolerated: &[&str]) {
    assert_eq!(report.cases, CASES);
    let failures: Vec<String> = report
        .sites
        .iter()
        .filter(|(key, _)| !(key.starts_with("violation") && tolerated.iter().any(|t| key.ends_with(t))))
        .map(|(_, site)| site.to_string())
        .collect();
    assert!(failures.is_empty(), "{report}\n{}", failures.join("\n"));
    let accepted = report.outcomes.get("accepted").copied().unwrap_or(0);
    assert!(
        accepted * 50 >= CASES,
        "under 2% accepted, the generator is off: {}",
        report.breakdown()
    );
}

/// No known violation is tolerated (grpo::validate now refuses advantages that are not finite
/// in fp32, including a group mean that overflows: `fuzz_batch_advantages_are_finite_f32`).
const KNOWN_BATCH: &[&str] = &[];

#[test]
fn fuzz_slice_batch() {
    assert_clean(&slice(TargetName::Batch), KNOWN_BATCH);
}

#[test]
fn fuzz_slice_generate() {
    assert_clean(&slice(TargetName::Generate), &[]);
}

#[test]
fn fuzz_slice_plan() {
    assert_clean(&slice(TargetName::Plan), &[]);
}

#[test]
fn fuzz_slice_config() {
    assert_clean(&slice(TargetName::Config), &[]);
}

#[test]
fn fuzz_slice_manifest() {
    assert_clean(&slice(TargetName::Manifest), &[]);
}

fn batch(body: &str) -> BatchCase {
    BatchCase {
        body: body.as_bytes().to_vec(),
        limits: Limits {
            vocab_size: 100,
            seq_len: 16,
            truncate_long: false,
            allow_missing_logprobs: false,
        },
        micro_batch: 4,
        packing: Packing::Sorted,
    }
}

/// A one-group body whose group is `{GOOD}` with `edit` applied to its JSON text.
fn one_group(edit: impl Fn(&str) -> String) -> String {
    const GOOD: &str = r#"{"tokens":[[1,2,3,4],[1,2,5,6]],"masks":[[-100,-100,3,4],[-100,-100,5,6]],"scores":[1.0,0.0],"inference_logprobs":[[1,1,-0.5,-0.1],[1,1,-2.0,-0.3]],"env_id":3}"#;
    format!(r#"{{"batch":[{}]}}"#, edit(GOOD))
}

/// The one rejection of a one-group body.
fn rejection_of(body: &str) -> (RejectReason, String) {
    match learner_path(&batch(body)) {
        Ok(BodyOutcome::Batch { groups: 1, prepared }) => {
            assert!(prepared.batch.is_none(), "{body} was trained on");
            let r = &prepared.rejections[0];
            (r.reason, r.detail.clone())
        }
        other => panic!("{body}: {other:?}"),
    }
}

#[test]
fn hostile_batches_are_refused_with_a_reason() {
    let ok = learner_path(&batch(&one_group(str::to_string))).expect("valid body");
    assert!(matches!(ok, BodyOutcome::Batch { prepared, .. } if prepared.batch.is_some()));
    let cases: Vec<(String, RejectReason, &str)> = vec![
        (
            one_group(|g| g.replace("[1,2,5,6]", "[1,2,5,100]")),
            RejectReason::TokenOutOfVocab,
            "outside vocabulary",
        ),
        (
            one_group(|g| g.replace("[1,2,3,4]", "[-7,2,3,4]")),
            RejectReason::TokenOutOfVocab,
            "token -7",
        ),
        (
            one_group(|g| g.replace("[1,2,3,4]", "[18446744073709551616,2,3,4]")),
            RejectReason::Malformed,
            "expected i64",
        ),
        (
            one_group(|g| g.replace("[-100,-100,5,6]", "[-100,5,6]")),
            RejectReason::MaskLength,
            "masks for",
        ),
        (
            one_group(|g| g.replace("\"scores\":[1.0,0.0]", "\"scores\":[1.0]")),
            RejectReason::ScoreCount,
            "scores",
        ),
        (
            one_group(|g| g.replace("-0.5", "1e300")),
            RejectReason::LogprobsInvalid,
            "not a finite value <= 0",
        ),
        (
            one_group(|g| g.replace("[[1,2,3,4],[1,2,5,6]]", "[]")),
            RejectReason::EmptyGroup,
            "no sequences",
        ),
        (
            one_group(|g| g.replace("\"tokens\"", "\"tokenz\"")),
            RejectReason::Malformed,
            "tokens",
        ),
        (
            one_group(|g| g.replace("[1,2,3,4]", "\"1,2,3,4\"")),
            RejectReason::Malformed,
            "invalid type",
        ),
    ];
    for (body, reason, detail) in cases {
        let (got, text) = rejection_of(&body);
        assert_eq!(got, reason, "{body}: {text}");
        assert!(text.contains(detail) && !text.is_empty(), "{body}: {text}");
    }
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for (body, says) in [
        ("not json".to_string(), "expected"),
        (r#"{"batch":5}"#.to_string(), "no batch field"),
        (one_group(|g| g.replace("1.0,0.0", "NaN,0.0")), "expected value"),
        (one_group(|g| g.replace("1.0,0.0", "1e309,0.0")), "number out of range"),
        (
            one_group(|g| g.replace("\"env_id\":3", &format!("\"env_id\":{deep}"))),
            "recursion limit",
        ),
        (r#"{"status":"error","message":"boom"}"#.to_string(), "boom"),
    ] {
        let err = learner_path(&batch(&body)).expect_err(&body).to_string();
        assert!(err.contains("/batch") && err.contains(says), "{body}: {err}");
    }
}

#[test]
fn fuzz_batch_advantages_are_finite_f32() {
    for body in [
        one_group(|g| g.replace("\"scores\":[1.0,0.0]", "\"scores\":[1e308,1e308]")),
        one_group(|g| g.replace("\"env_id\":3", "\"advantages\":[[0,0,1e300,0],[0,0,0,0]]")),
    ] {
        if let Ok(BodyOutcome::Batch { prepared, .. }) = learner_path(&batch(&body)) {
            if let Some(b) = prepared.batch {
                let all_finite = b
                    .micro_batches
                    .iter()
                    .all(|m| m.advantages.iter().all(|a| a.is_finite()));
                assert!(all_finite, "{body} was accepted with non-finite advantages");
            }
        }
    }
}

fn generate(body: &str) -> Result<(), GenerateRefusal> {
    server_path(&GenerateCase {
        body: body.as_bytes().to_vec(),
        limits: GenerateLimits::default(),
        context: 2048,
    })
    .map(|_| ())
}

#[test]
fn hostile_generate_requests_are_refused_with_a_reason() {
    generate(r#"{"prompt":{"prompt_token_ids":[1,2]},"logprobs":0,"n":4,"max_tokens":8}"#).expect("Atropos request");
    let cases = [
        (r#"{"prompt":"hi","n":0}"#, "n must be in 1..=256"),
        (r#"{"prompt":"hi","n":257}"#, "n must be in 1..=256"),
        (r#"{"prompt":"hi","n":-1}"#, "invalid value"),
        (r#"{"prompt":"hi","n":18446744073709551616}"#, "invalid"),
        (r#"{"prompt":"hi","max_tokens":0}"#, "max_tokens must be at least 1"),
        (r#"{"prompt":"hi","max_tokens":100000}"#, "over this server's limit"),
        (r#"{"prompt":"hi","temperature":NaN}"#, "expected value"),
        (r#"{"prompt":"hi","temperature":1e309}"#, "number out of range"),
        (r#"{"prompt":"hi","temperature":-0.5}"#, "temperature must be >= 0"),
        (r#"{"prompt":"hi","top_p":0}"#, "top_p must be in (0, 1]"),
        (r#"{"prompt":"hi","logprobs":21}"#, "logprobs must be at most 20"),
        (
            r#"{"prompt":"hi","min_tokens":20,"max_tokens":10}"#,
            "min_tokens must not exceed",
        ),
        (
            r#"{"prompt":"hi","repetition_penalty":1.1}"#,
            "penalties are not supported",
        ),
        (r#"{"prompt":{"prompt_token_ids":[]}}"#, "prompt_token_ids is empty"),
        (r#"{"prompt":{"prompt_token_ids":[1.5]}}"#, "did not match any variant"),
        (r#"{"prompt":"hi","best_of":2}"#, "best_of"),
        (r#"{"prompt":"hi","n":2,"n":3}"#, "duplicate field"),
        (r#"{"n":2}"#, "missing field `prompt`"),
        (r#"{"prompt":"hi","stream":true}"#, "stream=true is not supported"),
    ];
    for (body, says) in cases {
        let err = generate(body).expect_err(body).to_string();
        assert!(err.contains(says), "{body}: {err}");
    }
}

fn spec(name: &str, shape: Vec<i64>) -> pb::TensorSpec {
    pb::TensorSpec {
        name: name.into(),
        dtype: "f32".into(),
        shape,
    }
}

/// The plan of the fuzz manifest, bucketed by 16 bytes.
fn good_plan() -> pb::BucketPlan {
    pb::BucketPlan {
        tensors: manifest().into_iter().map(|(n, s)| spec(&n, s)).collect(),
        bucket_bytes: 16,
        total_bytes: 100,
        bucket_count: 7,
    }
}

fn begin(plan: pb::BucketPlan, transport: pb::Transport) -> Result<(), PlanRefusal> {
    let case = PlanCase {
        input: PlanInput::Request(pb::BeginUpdateRequest {
            version: Some(pb::PolicyVersion { step: 1 }),
            plan: Some(plan),
            transport: transport as i32,
        }),
        stream: (0u8..=255).collect(),
    };
    receiver_path(&case, &manifest()).map(|_| ())
}

#[test]
fn hostile_plans_are_refused_with_a_reason() {
    begin(good_plan(), pb::Transport::GrpcStream).expect("the manifest's own plan");
    let with = |tensors: Vec<pb::TensorSpec>, total: u64| pb::BucketPlan {
        tensors,
        total_bytes: total,
        ..good_plan()
    };
    let cases: Vec<(pb::BucketPlan, &str)> = vec![
        (with(vec![spec("a", vec![i64::MAX, 4])], 16), "too large"),
        (with(vec![spec("a", vec![1 << 32, 1 << 32, 1 << 32])], 16), "too large"),
        (with(vec![spec("a", vec![-1, 4])], 16), "negative or too large"),
        (
            with(vec![spec("a", vec![1 << 61]), spec("b", vec![1 << 61])], 16),
            "overflow",
        ),
        (with(vec![spec("a", vec![4])], 15), "the plan says 15"),
        (
            pb::BucketPlan {
                bucket_bytes: 0,
                ..good_plan()
            },
            "bucket count",
        ),
        (
            pb::BucketPlan {
                bucket_count: u32::MAX,
                ..good_plan()
            },
            "bucket count",
        ),
    ];
    for (plan, says) in cases {
        let err = check_plan(&plan).expect_err(says).to_string();
        assert!(err.contains(says), "{plan:?}: {err}");
        assert!(begin(plan, pb::Transport::GrpcStream).is_err());
    }
    let mut f16 = good_plan();
    f16.tensors[0].dtype = "f16".into();
    assert!(matches!(check_plan(&f16), Err(PlanError::Dtype { .. })));
    let served = manifest();
    let mut other = good_plan();
    other.tensors[1].shape = vec![9, 1];
    assert!(matches!(
        check_against(&other, &served),
        Err(PlanError::Mismatch { .. })
    ));
    let mut twice = good_plan();
    twice.tensors[1] = twice.tensors[0].clone();
    assert!(check_against(&twice, &served).is_err());
    let mut short = good_plan();
    short.tensors.pop();
    assert!(matches!(check_against(&short, &served), Err(PlanError::Missing(_))));
    let nccl = pb::BucketPlan {
        bucket_bytes: 100,
        bucket_count: 1,
        ..good_plan()
    };
    let err = begin(nccl, pb::Transport::Nccl).expect_err("bucket not a multiple of 256");
    assert!(err.to_string().contains("multiple of 256"), "{err}");
}

#[test]
fn unpack_refuses_short_streams_and_bad_shapes_without_panicking() {
    let plan = good_plan();
    assert!(matches!(unpack(&plan, &[0u8; 99]), Err(PlanError::Short(_))));
    assert_eq!(unpack(&plan, &[0u8; 100]).expect("exact").len(), 5);
    for shape in [vec![i64::MAX, 2], vec![-1], vec![0, i64::MAX, i64::MAX], vec![1; 70]] {
        let odd = with_one(spec("x", shape.clone()));
        let _ = unpack(&odd, &[0u8; 64]).map(|t| assert_eq!(t.len(), 1, "{shape:?}"));
    }
    let garbage = PlanCase {
        input: PlanInput::Wire(vec![0xff; 40]),
        stream: Vec::new(),
    };
    let err = receiver_path(&garbage, &manifest()).expect_err("not protobuf");
    assert!(matches!(err, PlanRefusal::Decode(_)), "{err}");
}

fn with_one(t: pb::TensorSpec) -> pb::BucketPlan {
    pb::BucketPlan {
        tensors: vec![t],
        bucket_bytes: 4,
        total_bytes: 4,
        bucket_count: 1,
    }
}

#[test]
fn hostile_configs_are_refused_naming_the_flag() {
    let target = ConfigTarget::new().expect("model dir");
    resolve_text(&target, "lr = 0.5\ntraining-steps = 7\n").expect("valid");
    let deep = format!("lr = {}1{}\n", "[".repeat(5000), "]".repeat(5000));
    let cases = [
        ("max-shard-mb = 9223372036854775807\n", "--max-shard-mb"),
        ("prefetch = 9223372036854775807\n", "--prefetch"),
        ("sync-deadline-s = 9223372036854775807\n", "--sync-deadline-s"),
        ("batch-size = 4611686018427387904\n", "--batch-size"),
        ("lr = nan\n", "--lr"),
        ("lr = -inf\n", "--lr"),
        ("clip-eps = inf\n", "--clip-eps"),
        ("is-cap = nan\n", "--is-cap"),
        ("train-layer-indices = \"3-1\"\n", "--train-layer-indices"),
        (
            "train-layer-indices = \"0-99999999999999999999\"\n",
            "--train-layer-indices",
        ),
        ("device = \"cuda:99999999999999999999\"\n", "--device"),
        ("sidecar = [\"localhost:1\"]\n", "--sidecar"),
        ("grpc-listen = \"0.0.0.0:1\"\n", "--grpc-listen"),
        ("learning-rate = 1.0\n", "learning-rate"),
        ("seq-len = -1\n", "seq-len"),
        ("seq-len = 9223372036854775808\n", "--seq-len"),
        ("seq-len = 18446744073709551616\n", "config file"),
        ("lr = 1\nlr = 2\n", "duplicate key"),
        ("[learner]\nlr = 1\n", "learner"),
        (deep.as_str(), "config file"),
    ];
    for (text, says) in cases {
        let err = resolve_text(&target, text).expect_err(text);
        let shown = err.to_string();
        assert!(shown.contains(says), "{}: {shown}", &text[..text.len().min(60)]);
        if says.starts_with("--") {
            assert!(matches!(err, ConfigRefusal::Config(_)), "{shown}");
        }
    }
}

#[test]
fn hostile_manifests_are_refused_with_a_reason() {
    let read = grpo_node::fuzz::manifest::read;
    for seed in grpo_node::fuzz::manifest::SEEDS {
        read(seed).expect("the real cluster manifests are valid");
    }
    let base = "name = \"x\"\n[[process]]\nname = \"a\"\ncommand = [\"true\"]\nmain = true\n";
    read(base).expect("minimal manifest");
    let cases = [
        (
            format!("{base}\n[[setup]]\nname = \"s\"\ncommand = []\n"),
            "step s has an empty command",
        ),
        (
            format!("{base}\n[[finally]]\nname = \"f\"\ncommand = []\n"),
            "step f has an empty command",
        ),
        (
            format!("{base}ready_timeout_s = 9223372036854775807\n"),
            "ready_timeout_s must be at most",
        ),
        (
            format!("{base}\n[[process]]\nname = \"b\"\ncommand = [\"x\"]\nmain = true\n"),
            "exactly one process",
        ),
        (
            format!("{base}\n[[process]]\nname = \"a\"\ncommand = [\"x\"]\n"),
            "unique",
        ),
        (
            format!("{base}\n[[process]]\nname = \"b\"\ncommand = []\n"),
            "process b has an empty command",
        ),
        (format!("{base}retries = 3\n"), "retries"),
        (format!("{base}gpus = [-1]\n"), "gpus"),
        (format!("{base}ready = {{ exec = \"x\" }}\n"), "exec"),
        (format!("{base}ready_timeout_s = -1\n"), "ready_timeout_s"),
        ("name = \"x\"\n".to_string(), "process"),
        ("not toml".to_string(), "fuzz.toml"),
    ];
    for (text, says) in cases {
        let err = read(&text).expect_err(says).to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}
